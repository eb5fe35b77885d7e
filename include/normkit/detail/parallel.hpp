// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_PARALLEL_HPP_
#define NORMKIT_DETAIL_PARALLEL_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <functional>   // std::function
#include <type_traits>  // std::void_t
#include <utility>      // std::declval

#include <normkit/config.hpp>

namespace normkit {
namespace detail {

// NB: threading goes through Eigen's own device abstraction. Any device with a
// `parallelFor(n, TensorOpCost, std::function<void(Index, Index)>)` member (Eigen's
// ThreadPoolDevice, available when the user defines EIGEN_USE_THREADS) runs work items in
// parallel; every other device (Eigen::DefaultDevice) runs them inline. We never define
// EIGEN_USE_THREADS ourselves. Work items are fixed by the shape, never by the thread count,
// and partial results are merged in a fixed order: results are bitwise identical for any
// number of threads.

template <class Device, class = void>
struct has_parallel_for : std::false_type {};

template <class Device>
struct has_parallel_for<Device,
                        std::void_t<decltype(std::declval<const Device&>().parallelFor(
                            Index{}, Eigen::TensorOpCost{}, std::function<void(Index, Index)>{}))>>
    : std::true_type {};

/// Number of threads a device offers (1 for devices without a pool).
template <class Device>
int device_threads(const Device& d) {
  if constexpr (has_parallel_for<Device>::value) {
    return d.numThreads();
  } else {
    (void)d;
    return 1;
  }
}

// NB: below this many elements a call runs inline even on a thread pool: waking threads
// costs a few microseconds, about what 64 Ki floats take to stream from L2.
inline constexpr Index kMinParallelElements = Index{1} << 16;

/// Runs f(first, last) over [0, n) work items, each moving about `bytes_per_item` bytes.
template <class Device, class F>
void parallel_for(const Device& d, Index n, double bytes_per_item, bool worth_it, F&& f) {
  if constexpr (has_parallel_for<Device>::value) {
    if (worth_it && n > 1 && d.numThreads() > 1) {
      d.parallelFor(n, Eigen::TensorOpCost(bytes_per_item, 0, bytes_per_item),
                    std::function<void(Index, Index)>(f));
      return;
    }
  } else {
    (void)d;
    (void)bytes_per_item;
    (void)worth_it;
  }
  if (n > 0)
    f(Index{0}, n);
}

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_PARALLEL_HPP_
