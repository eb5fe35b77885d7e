// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_PARALLEL_HPP_
#define NORMKIT_DETAIL_PARALLEL_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::min
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

// NB: below this many elements a call runs inline even on a thread pool. A parallel region
// on Eigen's pool costs a thread wake-up and a barrier: measured 10-60 us on the 2-vCPU VM
// (an empty parallelFor), about what 1 Mi floats take to stream. A 1 MB BatchNorm1d ran
// 2x slower on 2 threads than on 1 with the old threshold of 64 Ki elements. Overridable
// (tests lower it to exercise the parallel paths on small tensors).
#ifndef NORMKIT_MIN_PARALLEL_ELEMENTS
#define NORMKIT_MIN_PARALLEL_ELEMENTS (1 << 20)
#endif
inline constexpr Index kMinParallelElements = NORMKIT_MIN_PARALLEL_ELEMENTS;

/// Runs f(first, last) over [0, n) work items, each moving about `bytes_per_item` bytes.
template <class Device, class F>
void parallel_for(const Device& d, Index n, double bytes_per_item, bool worth_it, F&& f) {
  if constexpr (has_parallel_for<Device>::value) {
    if (worth_it && n > 1 && d.numThreads() > 1) {
      // NB: one contiguous range of items per thread, the caller's thread taking the first.
      // Handing Eigen all n items lets its cost model cut them into up to 4x more blocks
      // than threads, and then it runs them all on the pool while the caller sleeps: two
      // wake-ups per call (~10 us each on a 2-vCPU VM; a 1 MB BatchNorm1d ran slower on 2
      // threads than on 1). Which thread runs an item never changes a result.
      const Index parts = std::min<Index>(n, d.numThreads());
      (void)bytes_per_item;
      d.parallelFor(parts, Eigen::TensorOpCost(1e9, 1e9, 1e9),  // one part per block
                    std::function<void(Index, Index)>([&](Index p0, Index p1) {
                      for (Index q = p0; q < p1; ++q) f(q * n / parts, (q + 1) * n / parts);
                    }));
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
