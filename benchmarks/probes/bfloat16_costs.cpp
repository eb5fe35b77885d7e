// normkit probe: bfloat16 BatchNorm2d and LayerNorm in cache (one thread), next to the float
// BatchNorm2d on the same shape: the instruction cost of the 16-bit loads, the rounding
// stores and the float-block sums, without the VM's memory noise. Best of 400 calls each
// (the minimum is the machine's cost). Prints a hash of the outputs so that two builds can be
// checked for the same bits. Run once per ISA path: NORMKIT_ISA=avx2 probe_bfloat16_costs.
// Build: scripts/bench.sh (target probe_bfloat16_costs).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>

#include <normkit/normkit.hpp>

#include "rounds.hpp"

namespace {

using B = Eigen::bfloat16;

template <class T>
void fill(T& t, std::mt19937& g, float scale, float offset) {
  std::normal_distribution<float> d;
  for (Eigen::Index i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<typename T::Scalar>(d(g) * scale + offset);
}

template <class T>
std::uint64_t hash(const T& t, std::uint64_t h) {
  for (Eigen::Index i = 0; i < t.size(); ++i)
    h = h * 31 + Eigen::numext::bit_cast<std::uint16_t>(t.data()[i]);
  return h;
}

}  // namespace

int main() {
  std::mt19937 g(1);
  // BatchNorm2d (8, 64, 28, 28): 0.8 MB of bfloat16 per tensor, L2-resident.
  const long N = 8, C = 64, H = 28, W = 28;
  Eigen::Tensor<B, 4, Eigen::RowMajor> x(N, C, H, W), y(N, C, H, W), dy(N, C, H, W);
  Eigen::Tensor<float, 4, Eigen::RowMajor> xf(N, C, H, W), yf(N, C, H, W);
  fill(x, g, 2.0f, 1.0f);
  fill(dy, g, 1.0f, 0.0f);
  for (Eigen::Index i = 0; i < x.size(); ++i) xf.data()[i] = static_cast<float>(x.data()[i]);
  Eigen::Tensor<float, 1> rm(C), rv(C), w(C), b(C);
  fill(rm, g, 1.0f, 0.0f);
  fill(rv, g, 0.1f, 1.0f);
  fill(w, g, 0.1f, 1.0f);
  fill(b, g, 0.1f, 0.0f);
  const auto eval =
      normkit::BatchNormFuncOptions<float>().weight(w).bias(b).running_mean(rm).running_var(rv);
  const auto train = normkit::BatchNormFuncOptions<float>().weight(w).bias(b).training(true);
  const double bn_eval = probe::best_us([&] { normkit::batch_norm(x, y, eval); }, 400);
  const double bn_train = probe::best_us([&] { normkit::batch_norm(x, y, train); }, 400);
  const double bnf_eval = probe::best_us([&] { normkit::batch_norm(xf, yf, eval); }, 400);
  normkit::BatchNorm2d<B> bn(C);
  bn.forward(x);
  auto bg = bn.backward(dy);
  const double bn_bwd = probe::best_us([&] { bg = bn.backward(dy); }, 400);

  // LayerNorm (256, 768), all bfloat16, with weight and bias.
  Eigen::Tensor<B, 2, Eigen::RowMajor> lx(256, 768), ldy(256, 768);
  fill(lx, g, 1.0f, 0.0f);
  fill(ldy, g, 1.0f, 0.0f);
  normkit::LayerNorm<B> ln(normkit::LayerNormOptions({768}));
  ln.set_keep_input(false);
  auto ly = ln.forward(lx);
  const double ln_fwd = probe::best_us([&] { ly = ln.forward(lx); }, 400);
  auto lg = ln.backward(lx, ldy);
  const double ln_bwd = probe::best_us([&] { lg = ln.backward(lx, ldy); }, 400);

  std::uint64_t h = hash(y, 0);
  h = hash(bg.input, h);
  h = hash(ly, h);
  h = hash(lg.input, h);
  std::printf("normkit ISA path: %s\n", normkit::isa_name(normkit::isa()));
  std::printf(
      "BatchNorm2d (8, 64, 28, 28) bf16: eval %.1f us, train %.1f us, backward %.1f us "
      "(float eval %.1f us)\n",
      bn_eval, bn_train, bn_bwd, bnf_eval);
  std::printf("LayerNorm (256, 768) bf16: forward %.1f us, backward %.1f us\n", ln_fwd, ln_bwd);
  std::printf("output hash %016llx\n", static_cast<unsigned long long>(h));
}
