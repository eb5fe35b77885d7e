// Mixed-flags program, part 1: this translation unit is compiled with -mavx2 -mfma, so
// every inline function it instantiates may contain AVX2 instructions. normkit's ABI
// namespace (config.hpp) keeps them apart from odr_baseline.cpp's copies; without it the
// linker could keep this unit's copy for both, and the baseline part would fault on a CPU
// without AVX2 (the test runs it as a Westmere under qemu).
#include <normkit/normkit.hpp>

double odr_avx2_part(const float* data, long n) {
  Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> x(data, n / 8, 8);
  std::vector<float> out(static_cast<std::size_t>(n));
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> y(out.data(), n / 8, 8);
  normkit::LayerNorm<float> ln{normkit::LayerNormOptions({8})};
  ln.forward(x, y);
  double s = 0;
  for (float v : out) s += static_cast<double>(v) * v;
  return s;
}
