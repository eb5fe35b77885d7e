// A consumer of normkit::safetensors: trains a BatchNorm2d for two steps, writes its state dict
// to a safetensors file under a prefix, reads the file back and loads it into a fresh module,
// which must then hold the same parameters and buffers and give the same evaluation output.
// Exits non-zero otherwise.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>
#include <normkit/state_dict.hpp>

namespace {

template <class T>
bool same_bits(const T& a, const T& b) {
  const auto bytes = static_cast<std::size_t>(a.size()) * sizeof(*a.data());
  return a.size() == b.size() && (bytes == 0 || std::memcmp(a.data(), b.data(), bytes) == 0);
}

}  // namespace

int main() {
  constexpr int kN = 2, kC = 3, kH = 4, kW = 5;
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(kN, kC, kH, kW);
  for (int i = 0; i < static_cast<int>(x.size()); ++i) {
    x.data()[i] = static_cast<float>((i * 37) % 23) * 0.25f + 3.0f;
  }
  normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{kC}};
  bn.forward(x);
  bn.forward(x);  // running statistics moved twice; num_batches_tracked = 2

  const std::string path = "normkit_consumer_state.safetensors";
  normkit::write_safetensors(path, normkit::state_dict(bn, "features.1."), {{"format", "pt"}});

  int bad = 0;
  const normkit::StateDict file = normkit::read_safetensors(path);
  const std::vector<std::string> want = {"features.1.weight", "features.1.bias",
                                         "features.1.running_mean", "features.1.running_var",
                                         "features.1.num_batches_tracked"};
  if (file.size() != want.size())
    ++bad;
  for (std::size_t i = 0; i < file.size() && i < want.size(); ++i) {
    std::printf("%s %s\n", file[i].first.c_str(), file[i].second.dtype.c_str());
    if (file[i].first != want[i])
      ++bad;
  }

  normkit::BatchNorm2d<float> restored{normkit::BatchNormOptions{kC}};
  normkit::load_safetensors(restored, path, "features.1.");
  if (!same_bits(restored.running_mean(), bn.running_mean()) ||
      !same_bits(restored.running_var(), bn.running_var()) || restored.num_batches_tracked() != 2) {
    ++bad;
  }
  bn.eval();
  restored.eval();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y0 = bn.forward(x);
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y1 = restored.forward(x);
  if (!same_bits(y0, y1))
    ++bad;
  std::remove(path.c_str());
  std::printf("normkit %d.%d.%d safetensors: %s\n", NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR,
              NORMKIT_VERSION_PATCH, bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
