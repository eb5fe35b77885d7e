// llm_block: the final RMSNorm of a Llama-style model on a bfloat16 hidden state, with the
// weight loaded from a safetensors file (tests/fixtures/llm_block.safetensors, written by the
// fixture generator: "model.norm.weight" and "hidden" in BF16, and the float64 result rounded
// to F32 as "expected").
//
// Two ways to hold the weights, as in PyTorch:
//   - RMSNorm<float> given bfloat16 tensors (mixed: float parameters, bfloat16 in and out --
//     what inference engines do), and
//   - RMSNorm<Eigen::bfloat16> (everything in bfloat16, as model.to(torch.bfloat16)).
// Both compute in float and round each output to bfloat16 once: every output is within one
// bfloat16 ulp of the exact result. Usage: llm_block [file.safetensors]
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>

#ifndef NORMKIT_EXAMPLE_DATA
#define NORMKIT_EXAMPLE_DATA "llm_block.safetensors"
#endif

namespace {

const normkit::StateTensor& find(const normkit::StateDict& d, const std::string& key) {
  for (const auto& kv : d) {
    if (kv.first == key)
      return kv.second;
  }
  throw std::runtime_error("llm_block: no tensor " + key);
}

// Distance in bfloat16 units in the last place between got and the exact value.
double bf16_ulps(Eigen::bfloat16 got, double exact) {
  const double g = static_cast<double>(static_cast<float>(got));
  const int e = std::ilogb(exact == 0 ? 1e-30 : exact);
  return std::abs(g - exact) / std::ldexp(1.0, e - 7);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : NORMKIT_EXAMPLE_DATA;
  std::map<std::string, std::string> meta;
  const normkit::StateDict file = normkit::read_safetensors(path, &meta);
  const double eps = std::stod(meta.at("eps"));

  // The hidden state: (tokens, hidden) in bfloat16, mapped without a copy.
  const normkit::StateTensor& h = find(file, "hidden");
  const std::vector<Eigen::bfloat16> hidden = normkit::to_vector<Eigen::bfloat16>(h);
  const Eigen::Index tokens = h.shape.at(0), dim = h.shape.at(1);
  Eigen::TensorMap<const Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor>> x(hidden.data(),
                                                                               tokens, dim);
  const std::vector<float> expected = normkit::to_vector<float>(find(file, "expected"));

  // Mixed: float weight (BF16 widens exactly), bfloat16 data.
  normkit::RMSNorm<float> norm(normkit::RMSNormOptions({dim}).eps(eps));
  normkit::load_state_dict(norm, file, "model.norm.");  // only "model.norm.*" is read
  norm.eval();
  const Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor> y = norm.forward(x);

  // All bfloat16.
  normkit::RMSNorm<Eigen::bfloat16> norm16(normkit::RMSNormOptions({dim}).eps(eps));
  normkit::load_state_dict(norm16, file, "model.norm.");
  norm16.eval();
  const Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor> y16 = norm16.forward(x);

  double worst = 0, worst16 = 0;
  for (Eigen::Index i = 0; i < y.size(); ++i) {
    const double e = expected[static_cast<std::size_t>(i)];
    worst = std::max(worst, bf16_ulps(y.data()[i], e));
    worst16 = std::max(worst16, bf16_ulps(y16.data()[i], e));
  }
  std::printf("RMSNorm over %ld tokens x %ld (eps %g), bfloat16 hidden state from %s\n",
              static_cast<long>(tokens), static_cast<long>(dim), eps, path.c_str());
  std::printf("  token 0:   x = %9.5f %9.5f %9.5f ...\n", static_cast<double>(x(0, 0)),
              static_cast<double>(x(0, 1)), static_cast<double>(x(0, 2)));
  std::printf("  mixed:     y = %9.5f %9.5f %9.5f ...  (largest error %.2f bf16 ulp)\n",
              static_cast<double>(y(0, 0)), static_cast<double>(y(0, 1)),
              static_cast<double>(y(0, 2)), worst);
  std::printf("  bfloat16:  y = %9.5f %9.5f %9.5f ...  (largest error %.2f bf16 ulp)\n",
              static_cast<double>(y16(0, 0)), static_cast<double>(y16(0, 1)),
              static_cast<double>(y16(0, 2)), worst16);
  std::printf("  exact:     y = %9.5f %9.5f %9.5f ...\n", static_cast<double>(expected[0]),
              static_cast<double>(expected[1]), static_cast<double>(expected[2]));
  if (worst > 1.0 || worst16 > 1.0) {
    std::printf("FAILED: an output is more than one bfloat16 ulp from the exact result\n");
    return 1;
  }
  std::printf("ok: every output within one bfloat16 ulp of the exact result\n");
  return 0;
}
