// normkit/safetensors.hpp: reading and writing state dicts as safetensors files (needs
// nlohmann/json). SPDX-License-Identifier: MIT
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
#include <cstring>    // std::memchr
#include <fstream>    // std::ifstream, std::ofstream
#include <iterator>   // std::istreambuf_iterator
#include <map>        // std::map
#include <set>        // std::set
#include <string>     // std::string
#include <utility>    // std::move
#include <vector>     // std::vector

#include <nlohmann/json.hpp>

#include <normkit/state_dict.hpp>

NORMKIT_BEGIN_NAMESPACE

namespace detail {

/// Most containers a safetensors header may nest; a valid header nests 3 deep (the header
/// object, a tensor entry, its shape array).
inline constexpr int kMaxHeaderDepth = 16;
/// Longest header accepted: the reference implementation's MAX_HEADER_SIZE (100 MB).
inline constexpr std::uint64_t kMaxHeaderBytes = 100000000;

/// The JSON type of v, for error messages ("an array", "a string", ...).
inline std::string json_kind(const nlohmann::json& v) {
  if (v.is_number_float())
    return "a non-integer number";
  if (v.is_number())
    return "an integer";
  const std::string t = v.type_name();
  return (t == "array" || t == "object" ? "an " : "a ") + t;
}

/// v for an error message, short whatever v is: a string quoted (and cut), a scalar or a small
/// array of scalars as JSON, anything else by its kind and size. Never dumps a large value.
inline std::string json_excerpt(const nlohmann::json& v) {
  if (v.is_string())
    return quote(v.get_ref<const std::string&>());
  if (v.is_primitive())
    return v.dump();
  bool small = v.is_array() && v.size() <= 4;
  for (std::size_t i = 0; small && i < v.size(); ++i)
    small = v[i].is_number() || v[i].is_boolean() || v[i].is_null();
  if (small)
    return v.dump();
  return json_kind(v) + " of " + std::to_string(v.size()) +
         (v.is_array() ? " elements" : " members");
}

/// A JSON value as a non-negative 64-bit integer: true and *out set for an integer >= 0
/// (nlohmann stores "-0" as a signed 0; it is accepted as the reference reader does).
inline bool json_uint(const nlohmann::json& v, std::uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<std::uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<std::int64_t>() == 0) {
    *out = 0;
    return true;
  }
  return false;
}

/// Parses a safetensors JSON header with two bounds checked while parsing, before anything is
/// built: at most kMaxHeaderDepth nested containers and no key twice in one object.
// NB: the depth bound runs in nlohmann's parser callback, which sees each '[' or '{' as it is
// read, so a megabyte of '[' costs 17 bytes of reading and no recursion anywhere (parsing,
// building, destroying or dumping the value). Duplicate keys: nlohmann would keep the last one
// silently; the reference reader's serde rejects a repeated field and a repeated tensor name
// hides a tensor, so both are errors here.
inline nlohmann::json parse_header(const unsigned char* first, const unsigned char* last) {
  const std::string who = "[normkit.read_safetensors] ";
  struct Frame {
    bool object;
    std::set<std::string> keys;
  };
  std::vector<Frame> frames;
  std::string tensor;  // the current top-level key, to name the tensor at fault
  using Event = nlohmann::json::parse_event_t;
  auto guard = [&](int depth, Event event, nlohmann::json& parsed) {
    switch (event) {
      case Event::object_start:
      case Event::array_start:
        if (depth >= kMaxHeaderDepth) {
          throw value_error(who + "the header nests deeper than " +
                            std::to_string(kMaxHeaderDepth) + " levels" +
                            (frames.size() >= 2 && frames.front().object ? " in " + quote(tensor)
                                                                         : std::string()));
        }
        frames.push_back(Frame{event == Event::object_start, {}});
        break;
      case Event::object_end:
      case Event::array_end:
        if (!frames.empty())
          frames.pop_back();
        break;
      case Event::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (frames.size() == 1)
          tensor = k;
        if (!frames.empty() && !frames.back().keys.insert(k).second) {
          if (frames.size() == 1)
            throw value_error(who + "duplicate tensor name " + quote(k) + " in the header");
          throw value_error(
              who + (tensor == "__metadata__" ? "\"__metadata__\"" : "tensor " + quote(tensor)) +
              ": duplicate key " + quote(k));
        }
        break;
      }
      case Event::value:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(first, last, guard);
  } catch (const nlohmann::json::exception& e) {
    // nlohmann quotes the bytes it last read, which may be anything: keep the message ASCII.
    const std::string raw = e.what();
    std::string what;
    for (std::size_t i = 0; i < raw.size() && i < 200; ++i) {
      const auto c = static_cast<unsigned char>(raw[i]);
      if (c < 0x20 || c >= 0x7f) {
        what += "\\x";
        what += "0123456789abcdef"[c >> 4];
        what += "0123456789abcdef"[c & 0xf];
      } else {
        what += static_cast<char>(c);
      }
    }
    if (raw.size() > 200)
      what += "...";
    throw value_error(who + "invalid JSON header: " + what);
  }
}

}  // namespace detail

/// Parses a safetensors file held in memory. Entries come back in file order (by data offsets,
/// then name). Follows the reference implementation and rejects, with a value_error whose
/// message starts "[normkit.read_safetensors]" and names the tensor at fault:
/// - a file shorter than 8 bytes, a header length past the end of the file or over 100 MB;
/// - a header that holds a NUL byte, is not valid UTF-8 JSON, is not an object, nests more than
///   16 deep or repeats a key; a "__metadata__" that is not an object of strings;
/// - an entry that is not an object with a string dtype, an array shape and
///   data_offsets [begin, end]; an unknown dtype; an extent or offset that is not a
///   non-negative integer; an extent over 2^63 - 1;
/// - a shape whose byte count overflows int64 (any product of its non-zero extents), offsets
///   out of order or past the data section, a span that is not numel x item size;
/// - entries that overlap, leave a gap or leave trailing bytes (they must tile the data).
/// Nothing is rejected for its values: NaN or infinite floats load as in PyTorch.
/// @param metadata if not null, receives the "__metadata__" string map (empty when the file
///        has none); left unchanged when this throws.
/// @throws value_error for a malformed file.
inline StateDict parse_safetensors(const std::vector<unsigned char>& file,
                                   std::map<std::string, std::string>* metadata = nullptr) {
  const std::string who = "[normkit.read_safetensors] ";
  if (file.size() < 8) {
    throw value_error(who + "file of " + std::to_string(file.size()) +
                      " bytes is shorter than the 8-byte header length");
  }
  const auto n = detail::load_le<std::uint64_t>(file.data());
  // file.size() >= 8: no wrap-around; n <= file.size() - 8 then makes 8 + n safe.
  const std::uint64_t after_length = static_cast<std::uint64_t>(file.size()) - 8;
  if (n > after_length) {
    throw value_error(who + "header length " + std::to_string(n) + " exceeds the " +
                      std::to_string(after_length) + " bytes after the length field");
  }
  if (n > detail::kMaxHeaderBytes) {
    throw value_error(who + "header length " + std::to_string(n) + " exceeds the limit of " +
                      std::to_string(detail::kMaxHeaderBytes) + " bytes");
  }
  const auto hdr_end = static_cast<std::size_t>(8 + n);
  // NB: nlohmann's lexer takes a NUL byte for the end of the input, so "{...}\0<anything>" would
  // parse as "{...}"; the format allows only spaces after the JSON.
  if (const void* nul = std::memchr(file.data() + 8, 0, hdr_end - 8)) {
    throw value_error(who + "the header holds a NUL byte at offset " +
                      std::to_string(static_cast<const unsigned char*>(nul) - (file.data() + 8)));
  }
  const nlohmann::json header = detail::parse_header(file.data() + 8, file.data() + hdr_end);
  if (!header.is_object()) {
    throw value_error(who + "the header is " + detail::json_kind(header) + ", not a JSON object");
  }

  struct Entry {
    std::string name;
    StateTensor t;
    std::uint64_t begin, end;
  };
  std::vector<Entry> entries;
  std::map<std::string, std::string> meta;
  const std::uint64_t data_size = after_length - n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) {
        throw value_error(who + "\"__metadata__\" is " + detail::json_kind(v) +
                          ", not an object of strings");
      }
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          throw value_error(who + "\"__metadata__\" entry " + detail::quote(m.key()) + " is " +
                            detail::json_kind(m.value()) + ", not a string");
        }
        meta[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string tag = who + "tensor " + detail::quote(key) + ": ";
    if (!v.is_object()) {
      throw value_error(tag + "expected an object with dtype, shape and data_offsets, got " +
                        detail::json_kind(v));
    }
    // Unknown fields are ignored, as by the reference reader.
    auto field = [&](const char* name) {
      const auto f = v.find(name);
      if (f == v.end())
        throw value_error(tag + "no \"" + name + "\" field");
      return f;
    };
    const auto dtype = field("dtype");
    const auto shape = field("shape");
    const auto offsets = field("data_offsets");
    Entry e;
    e.name = key;
    if (!dtype->is_string())
      throw value_error(tag + "dtype is " + detail::json_kind(*dtype) + ", not a string");
    e.t.dtype = dtype->get<std::string>();
    const auto item = static_cast<std::int64_t>(dtype_size(e.t.dtype));
    if (item == 0)
      throw value_error(tag + "unknown dtype " + detail::quote(e.t.dtype));
    if (!shape->is_array())
      throw value_error(tag + "shape is " + detail::json_kind(*shape) + ", not an array");
    e.t.shape.reserve(shape->size());
    for (std::size_t i = 0; i < shape->size(); ++i) {
      const nlohmann::json& d = (*shape)[i];
      std::uint64_t extent = 0;
      if (!detail::json_uint(d, &extent)) {
        throw value_error(tag + "shape[" + std::to_string(i) + "] = " + detail::json_excerpt(d) +
                          " is not a non-negative integer");
      }
      if (extent > static_cast<std::uint64_t>(detail::kMaxTensorBytes)) {
        throw value_error(tag + "shape[" + std::to_string(i) + "] = " + std::to_string(extent) +
                          " exceeds 2^63 - 1");
      }
      e.t.shape.push_back(static_cast<std::int64_t>(extent));
    }
    std::int64_t numel = 0;
    const std::string why = detail::check_shape(e.t.shape, item, &numel);
    if (!why.empty())
      throw value_error(tag + e.t.dtype + " " + why);
    if (!offsets->is_array() || offsets->size() != 2) {
      throw value_error(tag + "data_offsets = " + detail::json_excerpt(*offsets) +
                        " is not [begin, end]");
    }
    for (std::size_t i = 0; i < 2; ++i) {
      if (!detail::json_uint((*offsets)[i], i == 0 ? &e.begin : &e.end)) {
        throw value_error(tag + "data_offsets[" + std::to_string(i) + "] = " +
                          detail::json_excerpt((*offsets)[i]) + " is not a non-negative integer");
      }
    }
    const std::string span =
        "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
    if (e.begin > e.end)
      throw value_error(tag + span + " end before they begin");
    if (e.end > data_size) {
      throw value_error(tag + span + " run past the data section of " + std::to_string(data_size) +
                        " bytes");
    }
    // numel * item <= 2^63 - 1 (check_shape): no overflow.
    const auto need = static_cast<std::uint64_t>(numel) * static_cast<std::uint64_t>(item);
    if (e.end - e.begin != need) {
      throw value_error(tag + span + " span " + std::to_string(e.end - e.begin) + " bytes, but " +
                        e.t.dtype + " of shape " + detail::shape_str(e.t.shape) + " needs " +
                        std::to_string(need));
    }
    // hdr_end + e.end <= file.size(): both offsets fit the buffer.
    e.t.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(hdr_end + e.begin),
                     file.begin() + static_cast<std::ptrdiff_t>(hdr_end + e.end));
    entries.push_back(std::move(e));
  }
  // NB: the name breaks ties between empty tensors at one offset, so the order (and a round
  // trip through serialize_safetensors) does not depend on the sort.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.begin != b.begin)
      return a.begin < b.begin;
    return a.end != b.end ? a.end < b.end : a.name < b.name;
  });
  std::uint64_t pos = 0;
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin != pos) {
      const std::string span =
          "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
      std::string msg = who + "tensor " + detail::quote(e.name) + ": " + span;
      if (e.begin < pos) {
        msg += " overlap tensor " + detail::quote(prev->name) + " at [" +
               std::to_string(prev->begin) + ", " + std::to_string(prev->end) + "]";
      } else {
        msg += " leave a gap of " + std::to_string(e.begin - pos) + " bytes after " +
               (prev ? "tensor " + detail::quote(prev->name) : std::string("the header"));
      }
      throw value_error(msg);
    }
    pos = e.end;
    prev = &e;
  }
  if (pos != data_size) {
    throw value_error(
        who + "the data section has " + std::to_string(data_size - pos) + " trailing bytes after " +
        (prev ? "tensor " + detail::quote(prev->name) + " ends at " + std::to_string(pos)
              : std::string("an empty header")));
  }
  StateDict out;
  out.reserve(entries.size());
  for (Entry& e : entries) out.emplace_back(std::move(e.name), std::move(e.t));
  if (metadata)
    metadata->swap(meta);
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
  if (in.bad())
    throw value_error("[normkit.read_safetensors] cannot read " + path);
  return parse_safetensors(file, metadata);
}

/// Serializes a state dict as safetensors: the data in dict order, the header padded with
/// spaces to a multiple of 8 bytes (as the reference writer does, so the data is aligned).
/// parse_safetensors reads the result back as the same dict.
/// @throws value_error for an unknown dtype, an invalid shape or one that does not match the
///         byte count, a duplicate or reserved ("__metadata__") name, or a name or metadata
///         string that is not valid UTF-8.
inline std::vector<unsigned char> serialize_safetensors(
    const StateDict& dict, const std::map<std::string, std::string>& metadata = {}) {
  const std::string who = "[normkit.write_safetensors] ";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty())
    header["__metadata__"] = metadata;
  std::set<std::string> names;
  std::uint64_t pos = 0;
  for (const auto& kv : dict) {
    const StateTensor& t = kv.second;
    if (kv.first == "__metadata__" || !names.insert(kv.first).second) {
      throw value_error(who + "duplicate or reserved tensor name " + detail::quote(kv.first));
    }
    std::int64_t numel = 0;
    const std::string why = detail::check_tensor(t, &numel);
    if (!why.empty())
      throw value_error(who + "tensor " + detail::quote(kv.first) + ": " + why);
    // The bytes are in memory, so their sum cannot overflow 64 bits.
    header[kv.first] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {pos, pos + t.bytes.size()}}};
    pos += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // type_error 316: invalid UTF-8
    throw value_error(who + "a tensor name or metadata string is not valid UTF-8: " + e.what());
  }
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
/// @throws value_error for an unreadable or malformed file (parse_safetensors); as
///         load_state_dict otherwise. m is unchanged when this throws.
template <class M>
void load_safetensors(M& m, const std::string& path, const std::string& prefix = "") {
  load_state_dict(m, read_safetensors(path), prefix);
}

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_SAFETENSORS_HPP_
