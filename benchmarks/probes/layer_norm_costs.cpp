// normkit probe: LayerNorm forward (float, one thread) split into a per-row and a per-element
// cost, in cache (rows x n = 192 Ki elements, 768 KiB) and out of cache (4096 x 768), beside
// a memcpy of the same bytes. Best of 300 calls each (the VM is noisy;
// the minimum is the machine's cost, the mean is the neighbours'). See
// benchmarks/results/2026-11-30-profiles.md.
// Build: scripts/bench.sh (target probe_layer_norm_costs).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <normkit/normkit.hpp>

#include "rounds.hpp"

namespace {

void run(long rows, long n) {
  using Map = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
  std::vector<float> xs(static_cast<std::size_t>(rows * n)), ys(xs.size());
  std::mt19937 g(1);
  std::normal_distribution<float> d;
  for (float& v : xs) v = d(g);
  Map x(xs.data(), rows, n), y(ys.data(), rows, n);
  Eigen::Tensor<float, 1> w(n), b(n);
  for (long i = 0; i < n; ++i) {
    w(i) = 1 + 0.1f * d(g);
    b(i) = 0.1f * d(g);
  }
  const auto opt = normkit::LayerNormFuncOptions<float>({n}).weight(w).bias(b);
  const double ln = probe::best_us([&] { normkit::layer_norm(x, y, opt); }, 300);
  const double cp =
      probe::best_us([&] { std::memcpy(ys.data(), xs.data(), xs.size() * sizeof(float)); }, 300);
  const double e = static_cast<double>(xs.size());
  std::printf(
      "%5ld x %5ld (%6.2f MB): layer_norm %7.1f us (%.3f ns/element) | memcpy %7.1f us "
      "(%.3f ns/element) | ratio %.2f\n",
      rows, n, e * 4e-6, ln, 1e3 * ln / e, cp, 1e3 * cp / e, ln / cp);
}

}  // namespace

int main() {
  std::printf("normkit ISA path: %s\n", normkit::isa_name(normkit::isa()));
  for (long n : {192L, 768L, 3072L, 12288L}) run(196608 / n, n);  // in cache: per-row cost
  run(4096, 768);                                                 // ln-bert, out of cache
}
