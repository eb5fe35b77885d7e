// Writes a torch::nn::BatchNorm2d's state_dict (after 3 training steps) and its eval output on a
// fixed input as safetensors, with a minimal writer of its own (not normkit's), following
// https://github.com/huggingface/safetensors#format. Keys:
//   bn.weight, bn.bias, bn.running_mean, bn.running_var (F32 [3]), bn.num_batches_tracked (I64 [])
//   input (F32 [2, 3, 4, 5]), output (F32 [2, 3, 4, 5]) = bn.eval()(input)
// Usage: write_fixture <out.safetensors>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace {

struct Entry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian (x86-64 host)
};

Entry entry(const std::string& name, const torch::Tensor& t) {
  torch::Tensor c = t.contiguous().cpu();
  Entry e{name,
          c.scalar_type() == torch::kFloat  ? "F32"
          : c.scalar_type() == torch::kLong ? "I64"
                                            : "?",
          c.sizes().vec(),
          std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size())};
  TORCH_CHECK(e.dtype != "?", "unsupported dtype for ", name);
  return e;
}

void write(const std::string& path, const std::vector<Entry>& entries) {
  std::string h =
      "{\"__metadata__\":{\"format\":\"pt\",\"writer\":\"normkit tools/safetensors (libtorch " +
      std::string(TORCH_VERSION) + ")\"}";
  size_t pos = 0;
  for (const Entry& e : entries) {
    h += ",\"" + e.name + "\":{\"dtype\":\"" + e.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < e.shape.size(); ++i) h += (i ? "," : "") + std::to_string(e.shape[i]);
    h += "],\"data_offsets\":[" + std::to_string(pos) + "," + std::to_string(pos + e.bytes.size()) +
         "]}";
    pos += e.bytes.size();
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary);
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << h;
  for (const Entry& e : entries) out << e.bytes;
  TORCH_CHECK(out.good(), "cannot write ", path);
}

}  // namespace

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
  std::vector<Entry> entries;
  for (const auto& item : bn->named_parameters())
    entries.push_back(entry("bn." + item.key(), item.value().detach()));
  for (const auto& item : bn->named_buffers())
    entries.push_back(entry("bn." + item.key(), item.value()));
  entries.push_back(entry("input", input));
  entries.push_back(entry("output", output));
  write(argv[1], entries);
  for (const Entry& e : entries)
    std::printf("%s %s %zu bytes\n", e.name.c_str(), e.dtype.c_str(), e.bytes.size());
  return 0;
}
