// normkit tests — the invariants of the safetensors file path, on one file: shared by the
// libFuzzer target (tests/fuzz/fuzz_safetensors.cpp) and the corpus replay in
// tests/safetensors_hostile_test.cpp, so that every seed and past finding is checked by the
// ordinary test suite too (g++ and clang, no libFuzzer needed).
//
// Invariants:
//   1. parse_safetensors either returns or throws std::invalid_argument (value_error) tagged
//      "[normkit.read_safetensors] "; anything else is a finding. On a throw the caller's
//      metadata map is unchanged.
//   2. An accepted file gives self-consistent tensors with unique names, and serialize -> parse
//      reproduces the same state dict and metadata (and serializing that again, the same bytes).
//   3. load_state_dict into BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm and GroupNorm,
//      float and double, with options inferred from the file (and one mismatched module), either
//      loads exactly the file's values (F32/F64 cast as torch's copy_, BF16/F16 exactly) or
//      throws std::invalid_argument tagged "[normkit.load_state_dict] " and leaves the module
//      bit-identical.
#ifndef NORMKIT_TESTS_FUZZ_SAFETENSORS_CHECK_HPP_
#define NORMKIT_TESTS_FUZZ_SAFETENSORS_CHECK_HPP_

#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>
#include <normkit/state_dict.hpp>

namespace normkit_fuzz {

using Bytes = std::vector<unsigned char>;

/// What check_safetensors_file found: failure is empty when every invariant held.
struct FileCheck {
  std::string failure;
  bool parsed = false;     // parse_safetensors accepted the file
  int loads_accepted = 0;  // load_state_dict calls that succeeded
  int loads_rejected = 0;  // load_state_dict calls that threw (module checked unchanged)
};

inline bool starts_with(const std::string& s, const char* prefix) {
  return s.compare(0, std::strlen(prefix), prefix) == 0;
}

template <class T>
Bytes tensor_bytes(const T& t) {
  const auto n = static_cast<std::size_t>(t.size()) * sizeof(typename T::Scalar);
  Bytes b(n + sizeof(Eigen::Index));
  const Eigen::Index size = t.size();
  std::memcpy(b.data(), &size, sizeof size);
  if (n)
    std::memcpy(b.data() + sizeof size, t.data(), n);
  return b;
}

template <class V>
Bytes value_bytes(const V& v) {
  Bytes b(sizeof(V));
  std::memcpy(b.data(), &v, sizeof(V));
  return b;
}

template <class M, class = void>
struct has_running : std::false_type {};
template <class M>
struct has_running<M, std::void_t<decltype(std::declval<const M&>().running_mean())>>
    : std::true_type {};

/// Every parameter, buffer and flag of m, bitwise (NaN payloads and -0.0 count).
template <class M>
std::vector<Bytes> snapshot(const M& m) {
  std::vector<Bytes> s;
  s.push_back(tensor_bytes(m.weight()));
  s.push_back(tensor_bytes(m.bias()));
  if constexpr (has_running<M>::value) {
    s.push_back(tensor_bytes(m.running_mean()));
    s.push_back(tensor_bytes(m.running_var()));
    s.push_back(value_bytes(static_cast<std::int64_t>(m.num_batches_tracked())));
  }
  s.push_back(value_bytes(m.is_training()));
  s.push_back(value_bytes(m.requires_grad()));
  s.push_back(tensor_bytes(m.saved_stats().mean));
  s.push_back(tensor_bytes(m.saved_stats().rstd));
  s.push_back(value_bytes(m.saved_stats().batch_stats));
  return s;
}

/// Distinct, non-default values everywhere, so that a partial load would show.
template <class M>
void perturb(M& m) {
  using S = typename M::Vector::Scalar;
  auto ramp = [](Eigen::Index n, double start) {
    typename M::Vector v(n);
    for (Eigen::Index i = 0; i < n; ++i)
      v(i) = static_cast<S>(start + 0.37 * static_cast<double>(i));
    return v;
  };
  m.set_weight(ramp(m.weight().size(), 0.25));
  m.set_bias(ramp(m.bias().size(), -1.5));
  if constexpr (has_running<M>::value) {
    m.set_running_mean(ramp(m.running_mean().size(), 3.0));
    m.set_running_var(ramp(m.running_var().size(), 0.5));
    m.set_num_batches_tracked(12345);
  }
}

/// The value of a 16-bit float (BF16 or F16 bits h) as S (float or double), exactly; an
/// infinity or a NaN bit by bit, with its sign and payload (not quieted). Eigen's own
/// conversion to float is the oracle for the finite values.
template <class S>
S float16_value(const std::string& dtype, std::uint16_t h) {
  const bool bf = dtype == "BF16";
  const int man = bf ? 7 : 10;
  const unsigned all = bf ? 0xffu : 0x1fu;
  if (((h >> man) & all) == all) {
    const std::uint64_t sign = h >> 15, m = h & ((1u << man) - 1);
    S v;
    if constexpr (std::is_same<S, float>::value) {
      const auto u = static_cast<std::uint32_t>(sign << 31 | 0x7f800000u | m << (23 - man));
      std::memcpy(&v, &u, 4);
    } else {
      const std::uint64_t u = sign << 63 | std::uint64_t{0x7ff} << 52 | m << (52 - man);
      std::memcpy(&v, &u, 8);
    }
    return v;
  }
  float w = 0;
  if (bf) {
    Eigen::bfloat16 b;
    std::memcpy(static_cast<void*>(&b), &h, 2);
    w = static_cast<float>(b);
  } else {
    Eigen::half f;
    std::memcpy(static_cast<void*>(&f), &h, 2);
    w = static_cast<float>(f);
  }
  return static_cast<S>(w);
}

/// The module's value at i of the state dict entry `name`: F32 and F64 cast to S, as torch's
/// copy_; BF16 and F16 exactly (S is float or double).
template <class S>
S file_value(const normkit::StateTensor& t, std::size_t i) {
  if (t.dtype == "F32")
    return static_cast<S>(normkit::detail::load_le<float>(t.bytes.data() + 4 * i));
  if (t.dtype == "F64")
    return static_cast<S>(normkit::detail::load_le<double>(t.bytes.data() + 8 * i));
  return float16_value<S>(t.dtype, normkit::detail::load_le<std::uint16_t>(t.bytes.data() + 2 * i));
}

template <class M>
const typename M::Vector& module_vector(const M& m, const std::string& local) {
  if constexpr (has_running<M>::value) {
    if (local == "running_mean")
      return m.running_mean();
    if (local == "running_var")
      return m.running_var();
  }
  return local == "weight" ? m.weight() : m.bias();
}

/// Invariant 3 on one module.
template <class M>
std::string check_load(M& m,
                       const normkit::StateDict& sd,
                       const std::string& prefix,
                       FileCheck& out) {
  using S = typename M::Vector::Scalar;
  const std::string label = std::string(M::kName) + "<" +
                            (std::is_same<S, float>::value ? "float" : "double") + "> prefix " +
                            normkit::detail::quote(prefix) + ": ";
  perturb(m);
  const std::vector<Bytes> before = snapshot(m);
  try {
    normkit::load_state_dict(m, sd, prefix);
  } catch (const std::invalid_argument& e) {
    ++out.loads_rejected;
    if (snapshot(m) != before)
      return label + "a rejected load changed the module: " + e.what();
    if (!starts_with(e.what(), "[normkit.load_state_dict] "))
      return label + "untagged load_state_dict message: " + e.what();
    return {};
  } catch (const std::exception& e) {
    return label + "load_state_dict threw a non-invalid_argument exception: " + e.what();
  } catch (...) {
    return label + "load_state_dict threw a non-std exception";
  }
  ++out.loads_accepted;
  for (const auto& kv : normkit::state_dict(m, prefix)) {
    const std::string local = kv.first.substr(prefix.size());
    const normkit::StateTensor* f = normkit::find_state(sd, kv.first);
    if (local == "num_batches_tracked") {
      if constexpr (has_running<M>::value) {
        const std::int64_t want =
            !f                  ? 12345
            : f->dtype == "I64" ? normkit::detail::load_le<std::int64_t>(f->bytes.data())
                                : static_cast<std::int64_t>(
                                      normkit::detail::load_le<std::int32_t>(f->bytes.data()));
        if (m.num_batches_tracked() != want)
          return label + "num_batches_tracked is not the file's";
      }
      continue;
    }
    if (!f)
      return label + "accepted a state dict without " + normkit::detail::quote(kv.first);
    const typename M::Vector& v = module_vector(m, local);
    if (static_cast<std::int64_t>(v.size()) != f->numel())
      return label + "loaded " + local + " has the wrong size";
    for (Eigen::Index i = 0; i < v.size(); ++i) {
      const S want = file_value<S>(*f, static_cast<std::size_t>(i));
      if (std::memcmp(&want, &v(i), sizeof(S)) != 0)
        return label + "loaded " + local + " differs from the file's value";
    }
  }
  // Loading the module's own state dict back changes nothing.
  const std::vector<Bytes> loaded = snapshot(m);
  try {
    normkit::load_state_dict(m, normkit::state_dict(m, prefix), prefix);
  } catch (const std::exception& e) {
    return label + "reloading the module's own state dict threw: " + e.what();
  }
  if (snapshot(m) != loaded)
    return label + "reloading the module's own state dict changed it";
  return {};
}

/// Module options inferred from the entries under one prefix.
struct Inferred {
  Eigen::Index c = 3;
  bool affine = false, track = false, bias = false;
  std::vector<Eigen::Index> ln_shape{3};
};

inline Inferred infer(const normkit::StateDict& sd, const std::string& prefix) {
  constexpr std::int64_t kCap = 1 << 12;  // keeps each run fast; larger files still parse
  Inferred r;
  bool have_c = false;
  for (const char* name :
       {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}) {
    const normkit::StateTensor* f = normkit::find_state(sd, prefix + name);
    if (!f)
      continue;
    const std::string n = name;
    r.affine = r.affine || n == "weight" || n == "bias";
    r.bias = r.bias || n == "bias";
    r.track = r.track || n == "running_mean" || n == "running_var" || n == "num_batches_tracked";
    if (n == "num_batches_tracked")
      continue;
    if (!have_c && f->shape.size() == 1 && f->shape[0] <= kCap) {
      r.c = static_cast<Eigen::Index>(f->shape[0]);
      have_c = true;
    }
    if ((n == "weight" || n == "bias") && !f->shape.empty() && f->numel() <= kCap) {
      bool small = true;
      for (std::int64_t d : f->shape) small = small && d <= kCap;
      if (small)
        r.ln_shape.assign(f->shape.begin(), f->shape.end());
    }
  }
  if (!have_c && r.ln_shape.size() == 1)
    r.c = r.ln_shape[0];
  return r;
}

/// Constructs M from options (skipped when the options themselves are invalid) and checks it.
template <class M, class Options>
std::string check_module(const Options& o,
                         const normkit::StateDict& sd,
                         const std::string& prefix,
                         FileCheck& out) {
  std::unique_ptr<M> m;
  try {
    m = std::make_unique<M>(o);
  } catch (const std::invalid_argument&) {  // options rejected by the constructor: not our case
    return {};
  }
  return check_load(*m, sd, prefix, out);
}

template <class S>
std::string check_modules(const normkit::StateDict& sd, const std::string& prefix, FileCheck& out) {
  const Inferred r = infer(sd, prefix);
  const auto bn = normkit::BatchNormOptions(r.c).affine(r.affine).track_running_stats(r.track);
  const auto in = normkit::InstanceNormOptions(r.c).affine(r.affine).track_running_stats(r.track);
  const auto ln = normkit::LayerNormOptions(r.ln_shape).elementwise_affine(r.affine).bias(r.bias);
  const auto gn = normkit::GroupNormOptions(1, r.c).affine(r.affine);
  const auto mismatch = normkit::BatchNormOptions(r.c + 1);
  std::string f;
  if ((f = check_module<normkit::BatchNorm1d<S>>(bn, sd, prefix, out)).size() ||
      (f = check_module<normkit::BatchNorm2d<S>>(bn, sd, prefix, out)).size() ||
      (f = check_module<normkit::BatchNorm3d<S>>(bn, sd, prefix, out)).size() ||
      (f = check_module<normkit::InstanceNorm1d<S>>(in, sd, prefix, out)).size() ||
      (f = check_module<normkit::InstanceNorm2d<S>>(in, sd, prefix, out)).size() ||
      (f = check_module<normkit::InstanceNorm3d<S>>(in, sd, prefix, out)).size() ||
      (f = check_module<normkit::LayerNorm<S>>(ln, sd, prefix, out)).size() ||
      (f = check_module<normkit::GroupNorm<S>>(gn, sd, prefix, out)).size() ||
      (f = check_module<normkit::BatchNorm2d<S>>(mismatch, sd, prefix, out)).size()) {
    return f;
  }
  return {};
}

inline bool same_dict(const normkit::StateDict& a, const normkit::StateDict& b) {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first || a[i].second.dtype != b[i].second.dtype ||
        a[i].second.shape != b[i].second.shape || a[i].second.bytes != b[i].second.bytes) {
      return false;
    }
  }
  return true;
}

/// Runs invariants 1-3 on one file.
inline FileCheck check_safetensors_file(const Bytes& file) {
  FileCheck out;
  const std::map<std::string, std::string> sentinel{{"normkit.sentinel", "unchanged"}};
  std::map<std::string, std::string> meta = sentinel;
  normkit::StateDict sd;
  try {
    sd = normkit::parse_safetensors(file, &meta);
  } catch (const std::invalid_argument& e) {
    if (!starts_with(e.what(), "[normkit.read_safetensors] "))
      out.failure = std::string("untagged parse_safetensors message: ") + e.what();
    else if (meta != sentinel)
      out.failure = std::string("a rejected parse changed the metadata map: ") + e.what();
    return out;
  } catch (const std::exception& e) {
    out.failure =
        std::string("parse_safetensors threw a non-invalid_argument exception: ") + e.what();
    return out;
  } catch (...) {
    out.failure = "parse_safetensors threw a non-std exception";
    return out;
  }
  out.parsed = true;

  // Invariant 2: consistent tensors, unique names, round trip.
  std::set<std::string> names;
  for (const auto& kv : sd) {
    std::int64_t n = 0;
    const std::string why = normkit::detail::check_tensor(kv.second, &n);
    if (!why.empty()) {
      out.failure = "accepted tensor " + normkit::detail::quote(kv.first) + " " + why;
      return out;
    }
    if (kv.first == "__metadata__" || !names.insert(kv.first).second) {
      out.failure = "accepted a duplicate or reserved name " + normkit::detail::quote(kv.first);
      return out;
    }
  }
  try {
    const Bytes again = normkit::serialize_safetensors(sd, meta);
    std::map<std::string, std::string> meta2;
    const normkit::StateDict sd2 = normkit::parse_safetensors(again, &meta2);
    if (!same_dict(sd, sd2))
      out.failure = "serialize -> parse changed the state dict";
    else if (meta != meta2)
      out.failure = "serialize -> parse changed the metadata";
    else if (normkit::serialize_safetensors(sd2, meta2) != again)
      out.failure = "serializing the round-tripped dict gave different bytes";
  } catch (const std::exception& e) {
    out.failure = std::string("round trip of an accepted file threw: ") + e.what();
  }
  if (!out.failure.empty())
    return out;

  // Invariant 3: loads, under the first few prefixes of the file ("" for a flat dict).
  std::vector<std::string> prefixes;
  for (const auto& kv : sd) {
    const std::size_t dot = kv.first.rfind('.');
    std::string p = dot == std::string::npos ? std::string() : kv.first.substr(0, dot + 1);
    bool seen = false;
    for (const std::string& q : prefixes) seen = seen || q == p;
    if (!seen && prefixes.size() < 4)
      prefixes.push_back(std::move(p));
  }
  if (prefixes.empty())
    prefixes.emplace_back();
  for (const std::string& p : prefixes) {
    out.failure = check_modules<float>(sd, p, out);
    if (out.failure.empty())
      out.failure = check_modules<double>(sd, p, out);
    if (!out.failure.empty())
      return out;
  }
  return out;
}

}  // namespace normkit_fuzz

#endif  // NORMKIT_TESTS_FUZZ_SAFETENSORS_CHECK_HPP_
