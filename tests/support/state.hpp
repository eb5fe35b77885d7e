// normkit tests — bitwise snapshots of a module's state (parameters, buffers, counter, mode
// and what the last forward left for backward), to check docs/semantics.md §11.5: a rejected
// call changes nothing.
#ifndef NORMKIT_TESTS_STATE_HPP_
#define NORMKIT_TESTS_STATE_HPP_

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

namespace normkit_test {

/// True for modules with running statistics (BatchNorm, InstanceNorm).
template <class M, class = void>
struct has_running_stats : std::false_type {};
template <class M>
struct has_running_stats<M,
                         std::void_t<decltype(std::declval<const M&>().running_mean()),
                                     decltype(std::declval<const M&>().num_batches_tracked())>>
    : std::true_type {};
template <class M>
inline constexpr bool has_running_stats_v = has_running_stats<M>::value;

/// The dims and raw bytes of a tensor (Tensor or TensorMap, any rank and storage order).
struct Blob {
  std::vector<Eigen::Index> dims;
  std::vector<unsigned char> bytes;
};

template <class T>
Blob blob_of(const T& t) {
  Blob b;
  for (std::size_t i = 0; i < static_cast<std::size_t>(T::NumDimensions); ++i)
    b.dims.push_back(t.dimensions()[i]);
  const auto n = static_cast<std::size_t>(t.size()) * sizeof(typename T::Scalar);
  b.bytes.resize(n);
  if (n)
    std::memcpy(b.bytes.data(), t.data(), n);
  return b;
}

template <class V>
Blob blob_of_value(const V& v) {
  static_assert(std::is_trivially_copyable<V>::value,
                "blob_of_value: trivially copyable values only");
  Blob b;
  b.bytes.resize(sizeof(V));
  std::memcpy(b.bytes.data(), &v, sizeof(V));
  return b;
}

/// Named blobs; compared bitwise (memcmp), so NaN payloads and -0.0 count as changes.
struct State {
  std::vector<std::pair<std::string, Blob>> parts;
  void add(std::string name, Blob b) { parts.emplace_back(std::move(name), std::move(b)); }
};

/// weight, bias, running_mean, running_var, num_batches_tracked, train/eval, requires_grad
/// and the statistics saved by the last successful forward.
template <class M>
State snapshot(const M& m) {
  State s;
  s.add("weight", blob_of(m.weight()));
  s.add("bias", blob_of(m.bias()));
  if constexpr (has_running_stats_v<M>) {
    s.add("running_mean", blob_of(m.running_mean()));
    s.add("running_var", blob_of(m.running_var()));
    s.add("num_batches_tracked", blob_of_value(static_cast<std::int64_t>(m.num_batches_tracked())));
  }
  s.add("is_training", blob_of_value(m.is_training()));
  s.add("requires_grad", blob_of_value(m.requires_grad()));
  s.add("saved_stats.mean", blob_of(m.saved_stats().mean));
  s.add("saved_stats.rstd", blob_of(m.saved_stats().rstd));
  s.add("saved_stats.batch_stats", blob_of_value(m.saved_stats().batch_stats));
  return s;
}

/// Snapshot of loose tensors (the caller's storage handed to the free functions).
template <class... T>
State snapshot_tensors(const std::vector<std::string>& names, const T&... t) {
  State s;
  std::size_t i = 0;
  (s.add(i < names.size() ? names[i++] : std::string("tensor"), blob_of(t)), ...);
  return s;
}

/// Success iff both snapshots have the same parts with bit-identical contents.
inline ::testing::AssertionResult same_state(const State& before, const State& after) {
  if (before.parts.size() != after.parts.size()) {
    return ::testing::AssertionFailure()
           << "state has " << after.parts.size() << " parts, was " << before.parts.size();
  }
  for (std::size_t i = 0; i < before.parts.size(); ++i) {
    const auto& [name, b] = before.parts[i];
    const Blob& a = after.parts[i].second;
    if (a.dims != b.dims)
      return ::testing::AssertionFailure() << name << ": dims changed";
    if (a.bytes.size() != b.bytes.size() ||
        (!a.bytes.empty() && std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) != 0)) {
      return ::testing::AssertionFailure() << name << ": contents changed";
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace normkit_test

#endif  // NORMKIT_TESTS_STATE_HPP_
