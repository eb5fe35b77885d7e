// normkit/detail/exec.hpp: threads for the kernels -- a device's pool, type-erased, and the
// one parallel-region primitive every kernel uses.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_EXEC_HPP_
#define NORMKIT_DETAIL_EXEC_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::min
#include <atomic>       // std::atomic
#include <memory>       // std::shared_ptr, std::make_shared
#include <thread>       // std::this_thread::yield
#include <type_traits>  // std::void_t
#include <utility>      // std::declval

#include <normkit/config.hpp>

namespace normkit {
namespace process_state {
// See isa.hpp: process-wide, outside the ABI namespace. Calls on fewer elements run on the
// calling thread even when a thread pool is given (set_min_parallel_elements()).
inline std::atomic<long long> min_parallel_elements{Index{1} << 16};
}  // namespace process_state
}  // namespace normkit

NORMKIT_BEGIN_NAMESPACE

/// Calls on tensors with fewer elements than this run on the calling thread even when a
/// thread pool device is passed (default 65536, i.e. 256 KiB of floats). One setting for the
/// whole process, so every translation unit agrees. Results never depend on it: work is cut
/// into the same blocks, merged in the same order, on one thread or many.
inline Index min_parallel_elements() {
  return static_cast<Index>(process_state::min_parallel_elements.load(std::memory_order_relaxed));
}
/// Sets min_parallel_elements() (values below 1 mean 1).
inline void set_min_parallel_elements(Index n) {
  process_state::min_parallel_elements.store(n < 1 ? 1 : n, std::memory_order_relaxed);
}

namespace detail {

/// A callable (item index) -> void, by reference: what crosses from the kernels to the
/// executor. Two pointers; the callable must outlive the call.
struct ItemFn {
  void* obj = nullptr;
  void (*call)(void*, Index) = nullptr;
};
template <class F>
ItemFn item_fn(F& f) {
  return ItemFn{&f, [](void* o, Index i) { (*static_cast<F*>(o))(i); }};
}

/// The threads a call may use: `threads` workers (the caller counts as one) from an Eigen
/// thread pool, type-erased so that no kernel is a template on the device type.
struct Exec {
  int threads = 1;
  void* pool = nullptr;
  void (*schedule)(void* pool, void (*task)(void*), void* arg) = nullptr;

  /// Whether a call over `numel` elements should use more than the calling thread.
  bool parallel(Index numel) const {
    return threads > 1 && pool != nullptr && numel >= min_parallel_elements();
  }
};

template <class Device, class = void>
struct has_pool : std::false_type {};
template <class Device>
struct has_pool<Device,
                std::void_t<decltype(std::declval<const Device&>().getPool()),
                            decltype(std::declval<const Device&>().numThreads())>>
    : std::true_type {};

/// The Exec of a device: Eigen::ThreadPoolDevice (defined when the user compiles with
/// EIGEN_USE_THREADS) gives its pool's threads; every other device runs on the caller.
/// normkit never defines EIGEN_USE_THREADS itself.
template <class Device>
Exec make_exec(const Device& d) {
  Exec e;
  if constexpr (has_pool<Device>::value) {
    if (d.getPool() != nullptr && d.numThreads() > 1) {
      using Pool = std::remove_pointer_t<decltype(d.getPool())>;
      e.threads = d.numThreads();
      e.pool = static_cast<void*>(d.getPool());
      e.schedule = [](void* pool, void (*task)(void*), void* arg) {
        static_cast<Pool*>(pool)->Schedule([task, arg] { task(arg); });
      };
    }
  } else {
    (void)d;
  }
  return e;
}

// NB: the parallel region. A call's work is a short list of phases (statistics, then apply),
// each a fixed list of items; which thread runs an item never changes a result, because
// items are fixed by the shape and their partial results are merged in a fixed order.
// Threads *claim* items with an atomic counter instead of being handed fixed ranges: the
// caller starts at once and claims whatever no helper has taken, so a pool thread that
// wakes late (a wake-up costs 10-60 us on a 2-vCPU VM) takes what is left, or nothing,
// and never delays the call. The caller waits only for items a running helper has
// claimed. One region per call, whatever the number of phases: one wake-up per helper.
// The shared counters live on the heap, reference-counted, because a helper may run after
// the caller has returned; it then finds every item claimed and touches nothing else.
// Works from inside a pool thread too (nested calls): unclaimed work never waits for a
// thread that cannot start.
struct Phase {
  Index items = 0;
  ItemFn fn;
};

namespace exec_impl {

inline constexpr int kMaxPhases = 4;

struct Region {
  Phase phase[kMaxPhases];
  int phases = 0;
  std::atomic<int> current{0};  // published phase; helpers wait for it to move
  std::atomic<Index> next[kMaxPhases] = {};
  std::atomic<Index> done[kMaxPhases] = {};
};

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Claims and runs items of phase p until none is left.
inline void work(Region& r, int p) {
  const Index n = r.phase[p].items;
  for (;;) {
    const Index i = r.next[p].fetch_add(1, std::memory_order_relaxed);
    if (i >= n)
      return;
    r.phase[p].fn.call(r.phase[p].fn.obj, i);
    r.done[p].fetch_add(1, std::memory_order_release);
  }
}

inline void wait_until(const std::atomic<Index>& v, Index target) {
  for (int spin = 0; v.load(std::memory_order_acquire) < target; ++spin) {
    if (spin < 4096) {
      pause();
    } else {
      std::this_thread::yield();
    }
  }
}

inline void helper(void* arg) {
  std::shared_ptr<Region> hold(std::move(*static_cast<std::shared_ptr<Region>*>(arg)));
  delete static_cast<std::shared_ptr<Region>*>(arg);
  Region& r = *hold;
  for (int p = 0; p < r.phases; ++p) {
    // Wait for the caller to publish phase p (it is running: the wait is short), unless
    // the region is already over.
    for (int spin = 0; r.current.load(std::memory_order_acquire) < p; ++spin) {
      if (r.next[r.phases - 1].load(std::memory_order_relaxed) >= r.phase[r.phases - 1].items)
        return;
      if (spin < 4096) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
    work(r, p);
  }
}

}  // namespace exec_impl

/// Runs the phases in order: every item of phase p (fn(i), i < items) before any of phase
/// p + 1, and between(ctx, p) on the calling thread after phase p, before p + 1 starts.
inline void run_region(const Exec& ex,
                       const Phase* phases,
                       int count,
                       void (*between)(void*, int) = nullptr,
                       void* ctx = nullptr) {
  NORMKIT_ASSERT(count >= 1 && count <= exec_impl::kMaxPhases);
  Index most = 0;
  for (int p = 0; p < count; ++p) most = std::max(most, phases[p].items);
  const int helpers = static_cast<int>(std::min<Index>(ex.threads - 1, most - 1));
  if (helpers <= 0 || ex.pool == nullptr) {
    for (int p = 0; p < count; ++p) {
      for (Index i = 0; i < phases[p].items; ++i) phases[p].fn.call(phases[p].fn.obj, i);
      if (between && p + 1 < count)
        between(ctx, p);
    }
    return;
  }
  auto region = std::make_shared<exec_impl::Region>();
  for (int p = 0; p < count; ++p) region->phase[p] = phases[p];
  region->phases = count;
  for (int h = 0; h < helpers; ++h)
    ex.schedule(ex.pool, &exec_impl::helper, new std::shared_ptr<exec_impl::Region>(region));
  exec_impl::Region& r = *region;
  for (int p = 0; p < count; ++p) {
    exec_impl::work(r, p);
    exec_impl::wait_until(r.done[p], r.phase[p].items);
    if (p + 1 < count) {
      if (between)
        between(ctx, p);
      r.current.store(p + 1, std::memory_order_release);
    }
  }
}

/// One phase: f(i) for every i < n, on the caller and the pool's threads.
template <class F>
void run_items(const Exec& ex, Index n, F&& f) {
  if (n <= 0)
    return;
  Phase ph{n, item_fn(f)};
  run_region(ex, &ph, 1);
}

/// Splits [0, n) into `parts` contiguous ranges (part q: [q*n/parts, (q+1)*n/parts)) and runs
/// f(first, last) for each as one item.
template <class F>
void run_ranges(const Exec& ex, Index n, Index parts, F&& f) {
  parts = std::max<Index>(1, std::min(parts, n));
  auto item = [&](Index q) { f(q * n / parts, (q + 1) * n / parts); };
  run_items(ex, parts, item);
}

/// How many items to cut parallel work into: a few per thread, so that a late helper still
/// finds some (the claim loop balances them).
inline Index items_for(const Exec& ex, Index work_units) {
  return std::min<Index>(work_units, Index{4} * ex.threads);
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_EXEC_HPP_
