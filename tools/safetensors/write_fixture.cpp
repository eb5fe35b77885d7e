// Writes a torch::nn::BatchNorm2d's state_dict (after 3 training steps) and its eval output on a
// fixed input as safetensors, with the minimal writer in safetensors_writer.hpp (not normkit's),
// following https://github.com/huggingface/safetensors#format. Keys:
//   bn.weight, bn.bias, bn.running_mean, bn.running_var (F32 [3]), bn.num_batches_tracked (I64 [])
//   input (F32 [2, 3, 4, 5]), output (F32 [2, 3, 4, 5]) = bn.eval()(input)
// Usage: write_fixture <out.safetensors>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "safetensors_writer.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <out.safetensors>\n", argv[0]);
    return 2;
  }
  torch::set_num_threads(1);
  torch::manual_seed(20240601);
  torch::nn::BatchNorm2d bn(torch::nn::BatchNorm2dOptions(3).momentum(0.1).eps(1e-5));
  {
    torch::NoGradGuard ng;
    bn->weight.copy_(torch::tensor({0.5f, 1.25f, -2.0f}));
    bn->bias.copy_(torch::tensor({0.1f, -0.3f, 2.0f}));
  }
  bn->train();
  for (int step = 0; step < 3; ++step) {
    torch::Tensor x = torch::randn({4, 3, 5, 6}) * (1.5 + step) + 0.75 * step;
    bn->forward(x);
  }
  bn->eval();
  torch::Tensor input = torch::randn({2, 3, 4, 5}) * 2.0 + 1.0;
  torch::Tensor output;
  {
    torch::NoGradGuard ng;
    output = bn->forward(input);
  }
  std::vector<normkit_tools::StEntry> entries;
  for (const auto& item : bn->named_parameters())
    entries.push_back(normkit_tools::st_entry("bn." + item.key(), item.value().detach()));
  for (const auto& item : bn->named_buffers())
    entries.push_back(normkit_tools::st_entry("bn." + item.key(), item.value()));
  entries.push_back(normkit_tools::st_entry("input", input));
  entries.push_back(normkit_tools::st_entry("output", output));
  normkit_tools::st_write(argv[1], entries);
  for (const auto& e : entries)
    std::printf("%s %s %zu bytes\n", e.name.c_str(), e.dtype.c_str(), e.bytes.size());
  return 0;
}
