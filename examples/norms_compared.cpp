// norms_compared: BatchNorm2d, LayerNorm, InstanceNorm2d, GroupNorm and RMSNorm on one
// (N, C, H, W) tensor. They differ only in which elements share a mean and a variance; this
// example prints that grouping as an (n, c) map and checks that every group of the output has
// mean 0 and (biased) variance var / (var + eps), var being the group's input variance --
// except RMSNorm, which does not center: its output's mean square is ms / (ms + eps), ms being
// the group's input mean square.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <normkit/normkit.hpp>

namespace {

constexpr Eigen::Index N = 2, C = 4, H = 3, W = 3;
using Tensor4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;

struct Norm {
  const char* name;
  const char* words;
  int groups;
  std::function<int(Eigen::Index, Eigen::Index)> group_of;  // (n, c) -> group; all h, w alike
  Tensor4 y;
  bool rms = false;  // RMSNorm: scaled by the root mean square, not centered
};

// Prints which group each (n, c) plane of H x W elements belongs to, then checks the
// output statistics of each group. Returns false on a mismatch.
bool report(const Norm& m, const Tensor4& x, double eps) {
  const Eigen::Index per_group = N * C * H * W / m.groups;
  std::printf("\n%s: %s -- %d groups of %ld elements\n", m.name, m.words, m.groups,
              static_cast<long>(per_group));
  std::printf("  group of each (n, c) plane of %ldx%ld (h, w) elements:\n        ",
              static_cast<long>(H), static_cast<long>(W));
  for (Eigen::Index c = 0; c < C; ++c) std::printf(" c=%ld", static_cast<long>(c));
  std::printf("\n");
  for (Eigen::Index n = 0; n < N; ++n) {
    std::printf("    n=%ld ", static_cast<long>(n));
    for (Eigen::Index c = 0; c < C; ++c) std::printf("   %c", 'A' + m.group_of(n, c));
    std::printf("\n");
  }
  const auto G = static_cast<std::size_t>(m.groups);
  std::vector<double> sx(G), sxx(G), sy(G), syy(G);
  for (Eigen::Index n = 0; n < N; ++n)
    for (Eigen::Index c = 0; c < C; ++c)
      for (Eigen::Index h = 0; h < H; ++h)
        for (Eigen::Index w = 0; w < W; ++w) {
          const auto g = static_cast<std::size_t>(m.group_of(n, c));
          const double xv = x(n, c, h, w), yv = m.y(n, c, h, w);
          sx[g] += xv, sxx[g] += xv * xv, sy[g] += yv, syy[g] += yv * yv;
        }
  bool ok = true;
  const auto cnt = static_cast<double>(per_group);
  if (m.rms) {
    std::printf("  group  input ms    output ms   expected ms\n");
    for (std::size_t g = 0; g < G; ++g) {
      const double mx = sxx[g] / cnt, my = syy[g] / cnt, want = mx / (mx + eps);
      const bool good = std::abs(my - want) <= 1e-3;
      ok = ok && good;
      std::printf("    %c   %10.4f  %10.6f  %12.6f%s\n", static_cast<char>('A' + g), mx, my, want,
                  good ? "" : "  <-- MISMATCH");
    }
    return ok;
  }
  std::printf("  group  input var   output mean  output var  expected var\n");
  for (std::size_t g = 0; g < G; ++g) {
    const double vx = sxx[g] / cnt - (sx[g] / cnt) * (sx[g] / cnt);
    const double my = sy[g] / cnt, vy = syy[g] / cnt - my * my;
    const double want = vx / (vx + eps);
    const bool good = std::abs(my) <= 1e-5 && std::abs(vy - want) <= 1e-3;
    ok = ok && good;
    std::printf("    %c   %10.4f  %+11.2e  %10.6f  %12.6f%s\n", static_cast<char>('A' + g), vx, my,
                vy, want, good ? "" : "  <-- MISMATCH");
  }
  return ok;
}

}  // namespace

int main() {
  // Channels on very different scales and offsets, as real feature maps often are.
  Tensor4 x(N, C, H, W);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scale[C] = {0.01f, 1.0f, 5.0f, 100.0f};
  const float offset[C] = {3.0f, -2.0f, 0.5f, 40.0f};
  for (Eigen::Index n = 0; n < N; ++n)
    for (Eigen::Index c = 0; c < C; ++c)
      for (Eigen::Index h = 0; h < H; ++h)
        for (Eigen::Index w = 0; w < W; ++w) x(n, c, h, w) = offset[c] + scale[c] * normal(gen);

  normkit::BatchNorm2d<float> bn(C);
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({C, H, W}));
  normkit::InstanceNorm2d<float> in(C);
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(2, C));
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({C, H, W}).eps(1e-5));

  auto i = [](Eigen::Index v) { return static_cast<int>(v); };
  std::vector<Norm> norms = {
      {"BatchNorm2d(4)", "one statistic per channel c, over n, h, w", i(C),
       [i](Eigen::Index, Eigen::Index c) { return i(c); }, bn.forward(x)},
      {"LayerNorm({4, 3, 3})", "one statistic per sample n, over c, h, w", i(N),
       [i](Eigen::Index n, Eigen::Index) { return i(n); }, ln.forward(x)},
      {"InstanceNorm2d(4)", "one statistic per (n, c), over h, w", i(N * C),
       [i](Eigen::Index n, Eigen::Index c) { return i(n * C + c); }, in.forward(x)},
      {"GroupNorm(2 groups, 4 channels)",
       "one statistic per (n, group of 2 channels), over c in group, h, w", i(N * 2),
       [i](Eigen::Index n, Eigen::Index c) { return i(n * 2 + c / 2); }, gn.forward(x)},
      {"RMSNorm({4, 3, 3})", "one root mean square per sample n, over c, h, w (no centering)", i(N),
       [i](Eigen::Index n, Eigen::Index) { return i(n); }, rms.forward(x), true},
  };

  const double eps = 1e-5;  // the default of the first four modules, and RMSNorm's here
  bool ok = true;
  for (const Norm& m : norms) ok = report(m, x, eps) && ok;
  std::printf("\n%s\n", ok ? "OK: every group has mean 0 and variance var/(var+eps) (RMSNorm: mean "
                             "square ms/(ms+eps))"
                           : "FAIL");
  return ok ? 0 : 1;
}
