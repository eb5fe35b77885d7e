// Minimal safetensors writer for normkit's fixture generators (libtorch; not normkit's own
// reader/writer), following https://github.com/huggingface/safetensors#format:
// 8-byte little-endian header length, JSON header (padded with spaces to a multiple of 8), then
// the raw little-endian tensor bytes in header order.
//
// Used by tools/safetensors/write_fixture.cpp (bn2d_state.safetensors) and
// tools/fixtures/gen_fixtures.cpp (llm_block.safetensors). Dtypes: F32, F64, BF16 (raw bfloat16
// bits, as torch::kBFloat16 stores them), I64.
#ifndef NORMKIT_TOOLS_SAFETENSORS_WRITER_HPP
#define NORMKIT_TOOLS_SAFETENSORS_WRITER_HPP

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torch/version.h>

namespace normkit_tools {

struct StEntry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian (x86-64 host)
};

inline const char* st_dtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat:
      return "F32";
    case torch::kDouble:
      return "F64";
    case torch::kBFloat16:
      return "BF16";
    case torch::kLong:
      return "I64";
    default:
      return "?";
  }
}

inline StEntry st_entry(const std::string& name, const torch::Tensor& t) {
  torch::Tensor c = t.contiguous().cpu();
  StEntry e{name, st_dtype(c.scalar_type()), c.sizes().vec(),
            std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size())};
  TORCH_CHECK(e.dtype != "?", "unsupported dtype for ", name);
  return e;
}

// extra_metadata: appended to "__metadata__" after "format" and "writer" (string values; no JSON
// escaping is done, so keep them to plain ASCII without quotes or backslashes).
inline void st_write(const std::string& path,
                     const std::vector<StEntry>& entries,
                     const std::vector<std::pair<std::string, std::string>>& extra_metadata = {}) {
  std::string h =
      "{\"__metadata__\":{\"format\":\"pt\",\"writer\":\"normkit tools/safetensors (libtorch " +
      std::string(TORCH_VERSION) + ")\"";
  for (const auto& kv : extra_metadata) h += ",\"" + kv.first + "\":\"" + kv.second + "\"";
  h += "}";
  size_t pos = 0;
  for (const StEntry& e : entries) {
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
  for (const StEntry& e : entries) out << e.bytes;
  TORCH_CHECK(out.good(), "cannot write ", path);
}

}  // namespace normkit_tools

#endif  // NORMKIT_TOOLS_SAFETENSORS_WRITER_HPP
