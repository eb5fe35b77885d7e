#!/usr/bin/env bash
# Runs clang-tidy (config: .clang-tidy) over every public header through one translation
# unit that includes them all (header-only library: headers are only checked when included).
set -euo pipefail
cd "$(dirname "$0")/.."
tu=$(mktemp --suffix=.cpp)
trap 'rm -f "$tu"' EXIT
printf '#include <normkit/normkit.hpp>\n#include <normkit/state_dict.hpp>\n#include <normkit/safetensors.hpp>\n' > "$tu"
cat >> "$tu" <<'CPP'
// Instantiate every module so the templates are analysed.
#include <cstdint>
#include <vector>
template class normkit::BatchNorm<float, 2>;
template class normkit::BatchNorm<double, 1>;
template class normkit::InstanceNorm<float, 2>;
template class normkit::LayerNorm<float>;
template class normkit::GroupNorm<double>;
template class normkit::RMSNorm<float>;
template class normkit::LayerNorm<Eigen::bfloat16>;
int main() {
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(2, 4, 3, 3);
  x.setRandom();
  normkit::BatchNorm2d<float> bn(4);
  auto y = bn.forward(x);
  auto g = bn.backward(y);
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(2, 4));
  auto z = gn.forward(x);
  auto gz = gn.backward(z);
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({3, 3}));
  auto w = ln.forward(x);
  auto gw = ln.backward(w);
  normkit::InstanceNorm2d<float> in(4);
  auto v = in.forward(x);
  auto gv = in.backward(v);
  // bfloat16 in a float module (mixed) and in a bfloat16 one; half in RMSNorm.
  Eigen::Tensor<Eigen::bfloat16, 4, Eigen::RowMajor> xb = x.cast<Eigen::bfloat16>();
  auto yb = bn.forward(xb);
  auto gb = bn.backward(yb);
  normkit::LayerNorm<Eigen::bfloat16> lnb(normkit::LayerNormOptions({3, 3}));
  auto wb = lnb.forward(xb);
  Eigen::Tensor<Eigen::half, 4, Eigen::RowMajor> xh = x.cast<Eigen::half>();
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({3}));
  auto rh = rms.forward(xh);
  auto grh = rms.backward(rh);
  // Precise BatchNorm statistics (a range; an accumulator).
  std::vector<Eigen::Tensor<float, 4, Eigen::RowMajor>> batches{x, x};
  normkit::recompute_running_stats(bn, batches);
  normkit::InstanceNorm2d<float> tracked(normkit::InstanceNormOptions(4).track_running_stats(true));
  normkit::RunningStatsAccumulator<normkit::InstanceNorm2d<float>> acc(tracked);
  acc.add(x);
  acc.write(tracked);
  // Fused epilogues.
  auto yf = bn.forward_fused(x, y, normkit::Activation::gelu);
  auto gf = bn.backward_fused(x, yf, y, normkit::Activation::relu);
  auto yg = gn.forward_fused(x, normkit::Activation::silu);
  Eigen::Tensor<float, 4, Eigen::RowMajor> h;
  auto ya = ln.forward_add(x, w, h);
  (void)gb, (void)wb, (void)grh, (void)gf, (void)yg, (void)ya;
  return static_cast<int>(g.input(0) + gz.input(0) + gw.input(0) + gv.input(0));
}
CPP
clang-tidy --quiet --config-file=.clang-tidy "$tu" -- -std=c++17 -Iinclude -isystem /usr/include/eigen3
