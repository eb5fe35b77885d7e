// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_SAFETENSORS_HPP_
#define NORMKIT_SAFETENSORS_HPP_

// safetensors files (https://github.com/huggingface/safetensors, "Format"): an 8-byte
// little-endian header length N, N bytes of JSON header
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "F32", "shape": [3], "data_offsets": [b, e]},
//   ...}
// (offsets relative to the byte after the header), then the raw little-endian data.
// Optional header: needs nlohmann/json (Debian nlohmann-json3-dev), which normkit::normkit does
// not link; link nlohmann_json::nlohmann_json yourself.

#include <algorithm>  // std::sort
#include <cstdint>    // std::uint64_t
#include <fstream>    // std::ifstream, std::ofstream
#include <iterator>   // std::istreambuf_iterator
#include <map>        // std::map
#include <string>     // std::string
#include <vector>     // std::vector

#include <nlohmann/json.hpp>

#include <normkit/state_dict.hpp>

namespace normkit {

/// Parses a safetensors file held in memory. Entries come back in file (data offset) order.
/// Validation follows the reference implementation: the header length fits the buffer, each
/// entry has a known dtype, a shape and offsets whose length matches, and the entries tile the
/// data section exactly.
/// @param metadata if not null, receives the "__metadata__" string map (cleared otherwise).
/// @throws value_error for a malformed file.
inline StateDict parse_safetensors(const std::vector<unsigned char>& file,
                                   std::map<std::string, std::string>* metadata = nullptr) {
  const char* who = "[normkit.read_safetensors] ";
  if (metadata)
    metadata->clear();
  if (file.size() < 8)
    throw value_error(std::string(who) + "file shorter than the 8-byte header length");
  const auto n = detail::load_le<std::uint64_t>(file.data());
  if (n > file.size() - 8) {
    throw value_error(std::string(who) + "header length " + std::to_string(n) +
                      " exceeds the file size");
  }
  const auto hdr_end = static_cast<std::size_t>(8 + n);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file.begin() + 8,
                                   file.begin() + static_cast<std::ptrdiff_t>(hdr_end));
  } catch (const nlohmann::json::exception& e) {
    throw value_error(std::string(who) + "invalid JSON header: " + e.what());
  }
  if (!header.is_object())
    throw value_error(std::string(who) + "the header is not a JSON object");

  struct Entry {
    std::string name;
    StateTensor t;
    std::uint64_t begin, end;
  };
  std::vector<Entry> entries;
  const std::uint64_t data_size = file.size() - hdr_end;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object())
        throw value_error(std::string(who) + "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          throw value_error(std::string(who) + "__metadata__ values must be strings (key " +
                            m.key() + ")");
        }
        if (metadata)
          (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) {
      return value_error(std::string(who) + "tensor " + key + ": " + what);
    };
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets")) {
      throw bad("expected an object with dtype, shape and data_offsets");
    }
    Entry e;
    e.name = key;
    if (!v["dtype"].is_string())
      throw bad("dtype is not a string");
    e.t.dtype = v["dtype"].get<std::string>();
    const std::size_t item = dtype_size(e.t.dtype);
    if (item == 0)
      throw bad("unknown dtype " + e.t.dtype);
    if (!v["shape"].is_array())
      throw bad("shape is not an array");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned())
        throw bad("shape holds a non-integer or negative extent");
      e.t.shape.push_back(d.get<std::int64_t>());
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      throw bad("data_offsets is not [begin, end]");
    }
    e.begin = off[0].get<std::uint64_t>();
    e.end = off[1].get<std::uint64_t>();
    if (e.begin > e.end || e.end > data_size)
      throw bad("data_offsets out of the data section");
    if (e.end - e.begin != static_cast<std::uint64_t>(e.t.numel()) * item) {
      throw bad("data_offsets span " + std::to_string(e.end - e.begin) + " bytes, the shape " +
                detail::shape_str(e.t.shape) + " needs " +
                std::to_string(static_cast<std::uint64_t>(e.t.numel()) * item));
    }
    e.t.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(hdr_end + e.begin),
                     file.begin() + static_cast<std::ptrdiff_t>(hdr_end + e.end));
    entries.push_back(std::move(e));
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t pos = 0;
  for (const Entry& e : entries) {
    if (e.begin != pos)
      throw value_error(std::string(who) + "tensor " + e.name +
                        ": data_offsets leave a gap or overlap");
    pos = e.end;
  }
  if (pos != data_size)
    throw value_error(std::string(who) + "the data section has trailing bytes no tensor covers");
  StateDict out;
  out.reserve(entries.size());
  for (Entry& e : entries) out.emplace_back(std::move(e.name), std::move(e.t));
  return out;
}

/// Reads a safetensors file. @see parse_safetensors
/// @throws value_error for an unreadable or malformed file.
inline StateDict read_safetensors(const std::string& path,
                                  std::map<std::string, std::string>* metadata = nullptr) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw value_error("[normkit.read_safetensors] cannot open " + path);
  std::vector<unsigned char> file((std::istreambuf_iterator<char>(in)),
                                  std::istreambuf_iterator<char>());
  return parse_safetensors(file, metadata);
}

/// Serializes a state dict as safetensors: the data in dict order, the header padded with
/// spaces to a multiple of 8 bytes (as the reference writer does, so the data is aligned).
/// @throws value_error for an unknown dtype, a byte count that does not match the shape, or a
///         duplicate or reserved ("__metadata__") name.
inline std::vector<unsigned char> serialize_safetensors(
    const StateDict& dict, const std::map<std::string, std::string>& metadata = {}) {
  const char* who = "[normkit.write_safetensors] ";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty())
    header["__metadata__"] = metadata;
  std::uint64_t pos = 0;
  for (const auto& kv : dict) {
    const StateTensor& t = kv.second;
    if (kv.first == "__metadata__" || header.contains(kv.first)) {
      throw value_error(std::string(who) + "duplicate or reserved tensor name " + kv.first);
    }
    const std::size_t item = dtype_size(t.dtype);
    if (item == 0)
      throw value_error(std::string(who) + "unknown dtype " + t.dtype + " for " + kv.first);
    if (t.bytes.size() != static_cast<std::size_t>(t.numel()) * item) {
      throw value_error(std::string(who) + kv.first + ": " + std::to_string(t.bytes.size()) +
                        " bytes do not match shape " + detail::shape_str(t.shape));
    }
    header[kv.first] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {pos, pos + t.bytes.size()}}};
    pos += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  // Sized once and filled in place (appending after an 8-byte vector trips a g++ 12
  // -Warray-bounds false positive at -O2).
  std::vector<unsigned char> out(8 + text.size() + static_cast<std::size_t>(pos));
  detail::store_le(static_cast<std::uint64_t>(text.size()), out.data());
  auto it = std::copy(text.begin(), text.end(), out.begin() + 8);
  for (const auto& kv : dict) it = std::copy(kv.second.bytes.begin(), kv.second.bytes.end(), it);
  return out;
}

/// Writes a state dict to a safetensors file. @see serialize_safetensors
/// @throws value_error as serialize_safetensors, or when the file cannot be written.
inline void write_safetensors(const std::string& path,
                              const StateDict& dict,
                              const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<unsigned char> bytes = serialize_safetensors(dict, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out)
    throw value_error("[normkit.write_safetensors] cannot write " + path);
}

/// Loads the tensors under `prefix` (e.g. "layer1.0.bn1.") of a safetensors file into m.
/// @code
/// normkit::BatchNorm2d<float> bn1(64);
/// normkit::load_safetensors(bn1, "resnet18.safetensors", "layer1.0.bn1.");
/// @endcode
/// @throws value_error for a malformed file; as load_state_dict otherwise (m unchanged).
template <class M>
void load_safetensors(M& m, const std::string& path, const std::string& prefix = "") {
  load_state_dict(m, read_safetensors(path), prefix);
}

}  // namespace normkit

#endif  // NORMKIT_SAFETENSORS_HPP_
