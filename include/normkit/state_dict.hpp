// normkit/state_dict.hpp: PyTorch-style state dicts of the modules (names, order, dtypes).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_STATE_DICT_HPP_
#define NORMKIT_STATE_DICT_HPP_

// PyTorch-style state dicts: a module's parameters and buffers under PyTorch's names, in
// PyTorch's order (weight, bias, running_mean, running_var, num_batches_tracked), as raw
// little-endian bytes with safetensors dtype names ("F32", "F64", "BF16", "F16", "I64"). Not
// included by <normkit/normkit.hpp>; <normkit/safetensors.hpp> reads and writes them to files.

#include <algorithm>    // std::min, std::max
#include <cstddef>      // std::size_t
#include <cstdint>      // std::int64_t, std::uint64_t
#include <cstring>      // std::memcpy
#include <limits>       // std::numeric_limits
#include <set>          // std::set
#include <string>       // std::string
#include <type_traits>  // std::is_same, std::conditional_t
#include <utility>      // std::pair
#include <vector>       // std::vector

#include <normkit/detail/float16.hpp>
#include <normkit/normkit.hpp>

NORMKIT_BEGIN_NAMESPACE

namespace detail {

/// Most bytes (and elements) a state dict tensor may have: INT64_MAX, PyTorch's numel type.
inline constexpr std::int64_t kMaxTensorBytes = std::numeric_limits<std::int64_t>::max();

inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

/// s double-quoted for an error message: quotes, backslashes and control bytes escaped, and
/// only the first 96 bytes of a longer s (then its length), so that a hostile key can neither
/// forge a message nor make it huge.
inline std::string quote(const std::string& s) {
  constexpr std::size_t kMaxQuoted = 96;
  const char* hex = "0123456789abcdef";
  std::string r = "\"";
  std::size_t n = std::min(s.size(), kMaxQuoted);
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80)
    --n;  // cut at a UTF-8 code point boundary
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      r += '\\';
      r += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      r += "\\x";
      r += hex[c >> 4];
      r += hex[c & 0xf];
    } else {
      r += static_cast<char>(c);
    }
  }
  if (s.size() > n)
    return r + "...\" (" + std::to_string(s.size()) + " bytes)";
  return r + '"';
}

/// Checks a shape of `item`-byte elements (item >= 1): every extent >= 0, and item times the
/// product of the non-zero extents at most INT64_MAX. Returns why not ("" when valid) as a
/// phrase starting with "shape"; *numel receives the element count when valid.
// NB: zero extents are left out of the bound rather than short-circuiting it, so that no partial
// product of the extents, in any order (strides, nested loops, a reference reader's fold), can
// overflow: [0, 2^32, 2^32] is rejected like [2^32, 2^32, 0], while [0, 2^40] (an empty tensor
// PyTorch can save) is accepted. The bound is in bytes so that numel x item never overflows.
inline std::string check_shape(const std::vector<std::int64_t>& shape,
                               std::int64_t item,
                               std::int64_t* numel) {
  std::int64_t volume = item;  // item x the product of the non-zero extents so far
  bool empty = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::int64_t d = shape[i];
    if (d < 0) {
      return "shape " + shape_str(shape) + " has a negative extent (shape[" + std::to_string(i) +
             "] = " + std::to_string(d) + ")";
    }
    if (d == 0) {
      empty = true;
      continue;
    }
    if (volume > kMaxTensorBytes / d) {
      return "shape " + shape_str(shape) + " overflows: " +
             (item == 1 ? std::string("its element count")
                        : "its byte count at " + std::to_string(item) + " bytes per element") +
             " exceeds 2^63 - 1 = " + std::to_string(kMaxTensorBytes);
    }
    volume *= d;
  }
  *numel = empty ? 0 : volume / item;
  return {};
}

}  // namespace detail

/// One tensor of a state dict: safetensors dtype name, PyTorch shape (empty for a 0-dim
/// tensor such as num_batches_tracked) and the elements as little-endian bytes, row-major.
struct StateTensor {
  /// safetensors dtype name: "F32", "F64", "BF16" or "F16" for parameters and float buffers
  /// (the module's Scalar), "I64" for num_batches_tracked.
  std::string dtype;
  /// PyTorch shape; empty for a 0-dim tensor.
  std::vector<std::int64_t> shape;
  /// numel() elements as little-endian bytes, row-major.
  std::vector<unsigned char> bytes;

  /// Number of elements: the product of shape (1 for a 0-dim tensor).
  /// @throws value_error for a negative extent, or when the product of the non-zero extents
  ///         exceeds 2^63 - 1 (so no product of extents, in any order, overflows int64).
  std::int64_t numel() const {
    std::int64_t n = 0;
    const std::string why = detail::check_shape(shape, 1, &n);
    if (!why.empty())
      throw value_error("[normkit.StateTensor] numel(): " + why);
    return n;
  }
};

/// (name, tensor) pairs in order, as torch.nn.Module.state_dict().
using StateDict = std::vector<std::pair<std::string, StateTensor>>;

/// Bytes per element of a safetensors dtype name, or 0 when the name is unknown.
inline std::size_t dtype_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64")
    return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32")
    return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16")
    return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2")
    return 1;
  return 0;
}

namespace detail {

inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char b = 0;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

template <class T>
void store_le(T v, unsigned char* out) {
  std::memcpy(out, &v, sizeof(T));
  if (!host_is_little_endian()) {
    for (std::size_t i = 0; i < sizeof(T) / 2; ++i) std::swap(out[i], out[sizeof(T) - 1 - i]);
  }
}

template <class T>
T load_le(const unsigned char* in) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, in, sizeof(T));
  if (!host_is_little_endian()) {
    for (std::size_t i = 0; i < sizeof(T) / 2; ++i) std::swap(b[i], b[sizeof(T) - 1 - i]);
  }
  T v;
  // void*: T may be Eigen::bfloat16 or Eigen::half, trivially copyable but not trivial.
  std::memcpy(static_cast<void*>(&v), b, sizeof(T));
  return v;
}

template <class T>
constexpr const char* dtype_name() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    is_float16_v<T> || std::is_same<T, std::int64_t>::value,
                "state dicts hold float, double, Eigen::bfloat16, Eigen::half or int64 tensors");
  if constexpr (std::is_same<T, float>::value)
    return "F32";
  else if constexpr (std::is_same<T, double>::value)
    return "F64";
  else if constexpr (std::is_same<T, Eigen::bfloat16>::value)
    return "BF16";
  else if constexpr (std::is_same<T, Eigen::half>::value)
    return "F16";
  else
    return "I64";
}

template <class T>
StateTensor make_state_tensor(const T* data, std::size_t n, std::vector<std::int64_t> shape) {
  StateTensor t;
  t.dtype = dtype_name<T>();
  t.shape = std::move(shape);
  t.bytes.resize(n * sizeof(T));
  for (std::size_t i = 0; i < n; ++i) store_le(data[i], t.bytes.data() + i * sizeof(T));
  return t;
}

/// Checks that t is self-consistent: a known dtype, a valid shape (check_shape) and exactly
/// numel x item bytes. Returns why not ("" when consistent), to follow "<name>: "; *numel
/// receives the element count when consistent.
inline std::string check_tensor(const StateTensor& t, std::int64_t* numel) {
  const auto item = static_cast<std::int64_t>(dtype_size(t.dtype));
  if (item == 0)
    return "unknown dtype " + quote(t.dtype);
  std::int64_t n = 0;
  std::string why = check_shape(t.shape, item, &n);
  if (!why.empty())
    return why;
  // n * item <= kMaxTensorBytes (check_shape); compared in 64 bits, never truncated.
  const auto want = static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(item);
  if (static_cast<std::uint64_t>(t.bytes.size()) != want) {
    return std::to_string(t.bytes.size()) + " bytes, but " + t.dtype + " of shape " +
           shape_str(t.shape) + " needs " + std::to_string(want);
  }
  *numel = n;
  return {};
}

/// "k1", "k2", ... for an error message: at most 32 keys, then how many more.
inline std::string key_list(const std::vector<std::string>& keys) {
  constexpr std::size_t kMaxListed = 32;
  std::string r;
  for (std::size_t i = 0; i < keys.size() && i < kMaxListed; ++i)
    r += (i ? ", " : "") + quote(keys[i]);
  if (keys.size() > kMaxListed)
    r += " and " + std::to_string(keys.size() - kMaxListed) + " more";
  return r;
}

/// What a module holds under one name: its PyTorch shape, another accepted shape (LayerNorm's
/// flat weight/bias; [1] for a 0-dim tensor, as torch accepts for old checkpoints) and whether
/// it is the int64 num_batches_tracked.
struct StateSpec {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> alt_shape;
  bool integer = false;
};

template <class M>
struct is_layer_norm : std::false_type {};
template <class S>
struct is_layer_norm<LayerNorm<S>> : std::true_type {};
template <class M>
struct is_rms_norm : std::false_type {};
template <class S>
struct is_rms_norm<RMSNorm<S>> : std::true_type {};
template <class M>
struct is_group_norm : std::false_type {};
/// Modules without running statistics (LayerNorm, RMSNorm, GroupNorm).
template <class M>
inline constexpr bool stateless_v =
    is_layer_norm<M>::value || is_rms_norm<M>::value || is_group_norm<M>::value;
template <class S>
struct is_group_norm<GroupNorm<S>> : std::true_type {};

/// The entries of M's state dict in PyTorch's order: parameters, then buffers.
template <class M>
std::vector<StateSpec> state_specs(const M& m) {
  std::vector<StateSpec> out;
  if constexpr (is_rms_norm<M>::value) {
    const auto& o = m.options();
    std::vector<std::int64_t> ns(o.normalized_shape().begin(), o.normalized_shape().end());
    const std::vector<std::int64_t> flat{static_cast<std::int64_t>(product(o.normalized_shape()))};
    if (o.elementwise_affine())
      out.push_back({"weight", ns, flat, false});
  } else if constexpr (is_layer_norm<M>::value) {
    const auto& o = m.options();
    std::vector<std::int64_t> ns(o.normalized_shape().begin(), o.normalized_shape().end());
    const std::vector<std::int64_t> flat{static_cast<std::int64_t>(product(o.normalized_shape()))};
    if (o.elementwise_affine()) {
      out.push_back({"weight", ns, flat, false});
      if (o.bias())
        out.push_back({"bias", ns, flat, false});
    }
  } else if constexpr (is_group_norm<M>::value) {
    const auto& o = m.options();
    const std::vector<std::int64_t> c{static_cast<std::int64_t>(o.num_channels())};
    if (o.affine()) {
      out.push_back({"weight", c, c, false});
      out.push_back({"bias", c, c, false});
    }
  } else {  // BatchNorm, InstanceNorm (torch's _NormBase)
    const auto& o = m.options();
    const std::vector<std::int64_t> c{static_cast<std::int64_t>(o.num_features())};
    if (o.affine()) {
      out.push_back({"weight", c, c, false});
      out.push_back({"bias", c, c, false});
    }
    if (o.track_running_stats()) {
      out.push_back({"running_mean", c, c, false});
      out.push_back({"running_var", c, c, false});
      out.push_back({"num_batches_tracked", {}, {1}, true});
    }
  }
  return out;
}

template <class M>
const typename M::Vector& state_vector(const M& m, const std::string& name) {
  if constexpr (is_rms_norm<M>::value) {
    return m.weight();
  } else {
    if (name == "weight")
      return m.weight();
    if constexpr (!stateless_v<M>) {
      if (name == "running_mean")
        return m.running_mean();
      if (name == "running_var")
        return m.running_var();
    }
    return m.bias();
  }
}

template <class M>
void set_state_vector(M& m, const std::string& name, const typename M::Vector& v) {
  if (name == "weight") {
    m.set_weight(v);
  } else if constexpr (!is_rms_norm<M>::value) {
    if (name == "bias")
      m.set_bias(v);
    if constexpr (!stateless_v<M>) {
      if (name == "running_mean")
        m.set_running_mean(v);
      if (name == "running_var")
        m.set_running_var(v);
    }
  }
}

/// Decodes n elements of a float entry (dtype F16, BF16, F32 or F64, byte count checked) into
/// Scalar (float, double, Eigen::bfloat16 or Eigen::half) with one rounding step from the
/// stored value: the same dtype is copied bit for bit; a widening (BF16/F16 -> float or
/// double, F32 -> double) is exact; a narrowing rounds to nearest even once, from the stored
/// value (F64 -> bfloat16 directly from double, never through float). torch's
/// load_state_dict copies with a cast (param.copy_(input_param)); so do we, except that
/// libtorch's CPU cast from double to bfloat16 or half goes through float and may round twice
/// (docs/semantics.md §11.9).
template <class Scalar>
Eigen::Tensor<Scalar, 1> decode_floats(const StateTensor& t, Index n) {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value ||
                    is_float16_v<Scalar>,
                "module Scalar is float, double, Eigen::bfloat16 or Eigen::half");
  constexpr bool kWide = std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value;
  Eigen::Tensor<Scalar, 1> v(n);
  const unsigned char* p = t.bytes.data();
  auto each = [&](std::size_t item, auto convert) {
    for (Index i = 0; i < n; ++i) v(i) = convert(p + static_cast<std::size_t>(i) * item);
  };
  if (t.dtype == "F64") {
    each(8, [](const unsigned char* b) { return round_to<Scalar>(load_le<double>(b)); });
  } else if (t.dtype == "F32") {
    each(4, [](const unsigned char* b) {
      const float f = load_le<float>(b);
      if constexpr (kWide)
        return static_cast<Scalar>(f);
      else
        return round_to<Scalar>(static_cast<double>(f));  // float -> double is exact
    });
  } else {
    auto from16 = [](auto format, const unsigned char* b) {
      using F = decltype(format);
      const auto h = load_le<std::uint16_t>(b);
      if constexpr (std::is_same<Scalar, F>::value)
        return float16_from_bits<Scalar>(h);
      else if constexpr (kWide)
        return widen_float16<Scalar, F>(h);
      else
        return round_to<Scalar>(widen_float16<double, F>(h));  // the other 16-bit float
    };
    if (t.dtype == "BF16")
      each(2, [&](const unsigned char* b) { return from16(Eigen::bfloat16(), b); });
    else
      each(2, [&](const unsigned char* b) { return from16(Eigen::half(), b); });
  }
  return v;
}

}  // namespace detail

/// The module's state dict, as torch.nn.Module.state_dict(prefix=prefix): keys
/// prefix + {weight, bias, running_mean, running_var, num_batches_tracked}, only those the
/// module has, in that order. LayerNorm's weight/bias get the shape normalized_shape.
/// @code
/// normkit::BatchNorm2d<float> bn(64);
/// normkit::StateDict sd = normkit::state_dict(bn, "layer1.0.bn1.");
/// @endcode
template <class M>
StateDict state_dict(const M& m, const std::string& prefix = "") {
  StateDict out;
  for (const detail::StateSpec& s : detail::state_specs(m)) {
    if (s.integer) {
      if constexpr (!detail::stateless_v<M>) {
        const std::int64_t n = m.num_batches_tracked();
        out.emplace_back(prefix + s.name, detail::make_state_tensor(&n, 1, s.shape));
      }
    } else {
      const auto& v = detail::state_vector(m, s.name);
      out.emplace_back(prefix + s.name, detail::make_state_tensor(
                                            v.data(), static_cast<std::size_t>(v.size()), s.shape));
    }
  }
  return out;
}

/// Loads the entries of `dict` whose keys start with `prefix` into m, as
/// torch.nn.Module.load_state_dict(strict=True) on the submodule at that prefix: entries under
/// other prefixes are ignored. Float tensors may be F16, BF16, F32 or F64 whatever the module's
/// Scalar (float, double, Eigen::bfloat16 or Eigen::half), cast as by torch's copy_ but with
/// one round-to-nearest-even step from the stored value (exact when widening; decode_floats);
/// num_batches_tracked is I64 (or I32). LayerNorm accepts weight/bias of shape
/// normalized_shape or flat. A missing num_batches_tracked keeps the module's value, as
/// torch's _NormBase does for old checkpoints. Values are not judged: NaN, infinite or negative
/// entries (even in running_var) load as they do in PyTorch.
/// Strong guarantee: every entry is decoded and checked before the first one is set, so m is
/// unchanged when this throws.
/// @throws value_error for a key that appears twice under the prefix, an unsupported dtype, or a
///         tensor whose shape and byte count disagree; shape_error for missing or unexpected
///         keys (all named) or a shape mismatch. Messages start "[normkit.load_state_dict]".
template <class M>
void load_state_dict(M& m, const StateDict& dict, const std::string& prefix = "") {
  using Scalar = typename M::Vector::Scalar;
  const std::string who = std::string("[normkit.load_state_dict] ") + M::kName + ": ";
  const std::vector<detail::StateSpec> specs = detail::state_specs(m);

  std::vector<const StateTensor*> found(specs.size(), nullptr);
  std::vector<std::string> unexpected, missing;
  std::set<std::string> seen;
  for (const auto& kv : dict) {
    if (kv.first.compare(0, prefix.size(), prefix) != 0)
      continue;
    // NB: a StateDict is a list, so it can hold a key twice; a Python dict cannot. Which copy
    // would PyTorch load? Neither exists there, so this is a malformed dict, not a choice to make.
    if (!seen.insert(kv.first).second)
      throw value_error(who + "duplicate key " + detail::quote(kv.first) + " in the state dict");
    const std::string local = kv.first.substr(prefix.size());
    bool known = false;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      if (specs[i].name == local) {
        found[i] = &kv.second;
        known = true;
      }
    }
    if (!known)
      unexpected.push_back(kv.first);
  }
  for (std::size_t i = 0; i < specs.size(); ++i) {
    if (!found[i] && !specs[i].integer)
      missing.push_back(prefix + specs[i].name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string msg = who + "error(s) in loading state_dict:";
    if (!missing.empty())
      msg += " missing key(s): " + detail::key_list(missing) + ".";
    if (!unexpected.empty())
      msg += " unexpected key(s): " + detail::key_list(unexpected) + ".";
    throw shape_error(msg);
  }

  // Decode and check everything first, then set: the module changes only if all is well.
  std::vector<std::pair<std::string, typename M::Vector>> vectors;
  bool set_nbt = false;
  std::int64_t nbt = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const StateTensor* t = found[i];
    if (!t)
      continue;
    const detail::StateSpec& s = specs[i];
    const std::string key = prefix + s.name;
    if (t->shape != s.shape && t->shape != s.alt_shape) {
      throw shape_error(who + "size mismatch for " + key + ": copying a param with shape " +
                        detail::shape_str(t->shape) +
                        " from checkpoint, the shape in current module is " +
                        detail::shape_str(s.shape));
    }
    const bool ok_dtype = s.integer ? (t->dtype == "I64" || t->dtype == "I32")
                                    : (t->dtype == "F16" || t->dtype == "BF16" ||
                                       t->dtype == "F32" || t->dtype == "F64");
    if (!ok_dtype) {
      throw value_error(who + "unsupported dtype " + detail::quote(t->dtype) + " for " + key +
                        " (expected " + (s.integer ? "I64 or I32" : "F16, BF16, F32 or F64") + ")");
    }
    // The shape is the module's own, so it is valid; the byte count is the caller's.
    std::int64_t n = 0;
    const std::string why = detail::check_tensor(*t, &n);
    if (!why.empty())
      throw value_error(who + key + ": " + why);
    if (s.integer) {
      set_nbt = true;
      nbt = t->dtype == "I64"
                ? detail::load_le<std::int64_t>(t->bytes.data())
                : static_cast<std::int64_t>(detail::load_le<std::int32_t>(t->bytes.data()));
    } else {
      vectors.emplace_back(s.name, detail::decode_floats<Scalar>(*t, static_cast<Index>(n)));
    }
  }
  // NB: the commit. The setters check sizes that were checked above, and assigning a vector of
  // the same size does not allocate, so none of these throws: m is never left half loaded.
  for (const auto& nv : vectors) detail::set_state_vector(m, nv.first, nv.second);
  if constexpr (!detail::stateless_v<M>) {
    if (set_nbt)
      m.set_num_batches_tracked(nbt);
  }
}

/// A state dict entry as a std::vector<T> (T = float, double, Eigen::bfloat16, Eigen::half or
/// std::int64_t; the dtype must match exactly: F32, F64, BF16, F16 or I64). The 16-bit floats
/// come back bit for bit.
/// @throws value_error when the dtype is not T's, or the shape is invalid or does not match
///         the byte count.
template <class T>
std::vector<T> to_vector(const StateTensor& t) {
  if (t.dtype != detail::dtype_name<T>()) {
    throw value_error(std::string("[normkit.to_vector] expected dtype ") + detail::dtype_name<T>() +
                      " but got " + detail::quote(t.dtype));
  }
  std::int64_t n = 0;
  const std::string why = detail::check_tensor(t, &n);
  if (!why.empty())
    throw value_error("[normkit.to_vector] " + why);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = detail::load_le<T>(t.bytes.data() + i * sizeof(T));
  return v;
}

/// A StateTensor from T values (T = float, double, Eigen::bfloat16, Eigen::half or
/// std::int64_t) with the given shape; the dtype is T's (F32, F64, BF16, F16 or I64).
/// @throws value_error when the shape is invalid or its element count is not values.size().
template <class T>
StateTensor make_state_tensor(const std::vector<T>& values, std::vector<std::int64_t> shape) {
  std::int64_t n = 0;
  const std::string why = detail::check_shape(shape, static_cast<std::int64_t>(sizeof(T)), &n);
  if (!why.empty())
    throw value_error("[normkit.make_state_tensor] " + why);
  if (static_cast<std::uint64_t>(n) != static_cast<std::uint64_t>(values.size())) {
    throw value_error("[normkit.make_state_tensor] shape " + detail::shape_str(shape) + " has " +
                      std::to_string(n) + " elements, but " + std::to_string(values.size()) +
                      " values were given");
  }
  return detail::make_state_tensor(values.data(), values.size(), std::move(shape));
}

/// The entry named key, or nullptr.
inline const StateTensor* find_state(const StateDict& dict, const std::string& key) {
  for (const auto& kv : dict) {
    if (kv.first == key)
      return &kv.second;
  }
  return nullptr;
}

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_STATE_DICT_HPP_
