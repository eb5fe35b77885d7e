// Mixed-flags program, part 2 (compiled for the x86-64 baseline) and main(): runs normkit
// from this translation unit, and the -mavx2 unit's part only when the CPU has AVX2. Under
// qemu-x86_64 -cpu Westmere (no AVX) the program must run to the end whatever the link
// order: every normkit symbol it calls is this unit's own, baseline copy.
#include <cstdio>
#include <vector>

#include <normkit/normkit.hpp>

double odr_avx2_part(const float* data, long n);

int main() {
  std::vector<float> v(64);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 7) % 11) + 0.5f;
  Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> x(v.data(), 8, 8);
  std::vector<float> out(v.size());
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> y(out.data(), 8, 8);
  normkit::LayerNorm<float> ln{normkit::LayerNormOptions({8})};
  ln.forward(x, y);
  double s = 0;
  for (float f : out) s += static_cast<double>(f) * f;
  std::printf("baseline unit: sum of squares %.4f (isa %s)\n", s,
              normkit::isa_name(normkit::isa()));
  int bad = std::abs(s - 64.0) > 1e-3;  // 8 rows normalized over 8 elements
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    const double s2 = odr_avx2_part(v.data(), static_cast<long>(v.size()));
    std::printf("avx2 unit: sum of squares %.4f\n", s2);
    bad += std::abs(s2 - 64.0) > 1e-3;
  } else {
    std::printf("avx2 unit: skipped (no AVX2 on this CPU)\n");
  }
  std::printf("%s\n", bad ? "FAILED" : "ok");
  return bad;
}
