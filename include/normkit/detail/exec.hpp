// normkit/detail/exec.hpp: threads for the kernels -- a device's pool, type-erased, and the
// one parallel-region primitive every kernel uses.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_EXEC_HPP_
#define NORMKIT_DETAIL_EXEC_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::min
#include <atomic>       // std::atomic
#include <chrono>       // std::chrono::steady_clock
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
inline std::atomic<long long> helper_linger_us{100};
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

/// How long (microseconds) a pool thread that helped a normkit call keeps watching for the
/// next call on the same pool before it returns to the pool (default 100). Back-to-back calls
/// then start their helper at once instead of waking a sleeping thread, which costs 10-60 us
/// on a VM -- as long as a whole 1 MB call. The price: for up to this long after a call, one
/// pool thread per helper spins (with `pause`, yielding now and then) instead of running
/// other tasks of that pool, the way an OpenMP runtime's threads spin after a parallel region
/// (libtorch's and oneDNN's do). One setting for the whole process. Results never depend
/// on it.
inline long long helper_linger_us() {
  return process_state::helper_linger_us.load(std::memory_order_relaxed);
}
/// Sets helper_linger_us(); 0 (or less) sends helpers back to their pool as soon as their
/// part of a call is done.
inline void set_helper_linger_us(long long us) {
  process_state::helper_linger_us.store(us < 0 ? 0 : us, std::memory_order_relaxed);
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
// Lingering (helper_linger_us()): a helper whose part is done waits a short while in its
// pool's lounge, watching a few offer slots; the next call on that pool offers its region
// there (one heap-held reference per slot) instead of scheduling a task, and a lingering
// helper takes it with an atomic exchange, so each reference has exactly one owner. An offer
// nobody took is withdrawn by the caller after its last phase (compare-exchange, so a taken
// one is never touched); a helper that takes an offer late finds every item claimed, as a
// late-waking scheduled helper does.
struct Phase {
  Index items = 0;
  ItemFn fn;
};

namespace exec_impl {

inline constexpr int kMaxPhases = 4;
inline constexpr int kOffers = 4;    // offer slots per lounge (helpers one call can pick up)
inline constexpr int kLounges = 16;  // pools whose helpers can linger (the first 16 used)

struct Lounge;

struct Region {
  Phase phase[kMaxPhases];
  int phases = 0;
  Lounge* lounge = nullptr;     // where this call's scheduled helpers linger afterwards
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

using Ticket = std::shared_ptr<Region>;  // a heap-held reference a helper takes over

/// A pool's meeting point for lingering helpers and the calls that want one.
struct Lounge {
  std::atomic<void*> pool{nullptr};  // the pool this lounge serves (never changes once set)
  std::atomic<int> waiting{0};       // helpers lingering here now
  std::atomic<Ticket*> offer[kOffers] = {};
};
// In the ABI namespace on purpose: a Region of one ABI never reaches a helper of another.
inline Lounge lounges[kLounges];

/// The lounge of `pool`, claimed on first use; nullptr when every lounge serves another pool
/// (that pool's helpers then simply do not linger).
inline Lounge* lounge_for(void* pool) {
  for (Lounge& l : lounges) {
    void* p = l.pool.load(std::memory_order_acquire);
    if (p == nullptr) {
      l.pool.compare_exchange_strong(p, pool, std::memory_order_acq_rel);
      p = l.pool.load(std::memory_order_acquire);
    }
    if (p == pool)
      return &l;
  }
  return nullptr;
}

inline void helper(void* arg) {
  std::shared_ptr<Region> hold(std::move(*static_cast<Ticket*>(arg)));
  delete static_cast<Ticket*>(arg);
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

/// Waits in l for offers until helper_linger_us() passes without one, running each region
/// it takes. The setting is read again at every check, so lowering it ends a wait early.
inline void linger(Lounge& l) {
  using clock = std::chrono::steady_clock;
  if (helper_linger_us() <= 0)
    return;
  l.waiting.fetch_add(1, std::memory_order_acq_rel);
  auto last = clock::now();  // the last offer taken (or the start)
  for (unsigned spin = 1;; ++spin) {
    for (std::atomic<Ticket*>& o : l.offer) {
      if (o.load(std::memory_order_relaxed) == nullptr)
        continue;
      Ticket* t = o.exchange(nullptr, std::memory_order_acq_rel);
      if (t == nullptr)
        continue;
      l.waiting.fetch_sub(1, std::memory_order_acq_rel);
      helper(t);
      l.waiting.fetch_add(1, std::memory_order_acq_rel);
      last = clock::now();
    }
    if (spin % 64 == 0) {
      if (clock::now() - last >= std::chrono::microseconds(helper_linger_us()))
        break;
      std::this_thread::yield();  // a caller sharing this core gets it back
    } else {
      pause();
    }
  }
  l.waiting.fetch_sub(1, std::memory_order_acq_rel);
}

/// The task a call schedules on the pool: its part of the region, then lingering.
inline void helper_task(void* arg) {
  Lounge* l = (*static_cast<Ticket*>(arg))->lounge;
  helper(arg);
  if (l != nullptr)
    linger(*l);
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
  using exec_impl::Ticket;
  auto region = std::make_shared<exec_impl::Region>();
  for (int p = 0; p < count; ++p) region->phase[p] = phases[p];
  region->phases = count;
  exec_impl::Lounge* lounge = helper_linger_us() > 0 ? exec_impl::lounge_for(ex.pool) : nullptr;
  region->lounge = lounge;
  // Offer the region to helpers lingering from an earlier call, then schedule the rest.
  Ticket* offered[exec_impl::kOffers] = {};
  int offers = 0;
  if (lounge != nullptr) {
    const int want = std::min(helpers, lounge->waiting.load(std::memory_order_acquire));
    for (int i = 0; i < exec_impl::kOffers && offers < want; ++i) {
      Ticket* t = new Ticket(region);
      Ticket* empty = nullptr;
      if (lounge->offer[i].compare_exchange_strong(empty, t, std::memory_order_acq_rel)) {
        offered[i] = t;
        ++offers;
      } else {
        delete t;
      }
    }
  }
  for (int h = offers; h < helpers; ++h)
    ex.schedule(ex.pool, &exec_impl::helper_task, new Ticket(region));
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
  // Withdraw offers nobody took (a taken one belongs to its helper: the exchange fails).
  for (int i = 0; i < exec_impl::kOffers; ++i) {
    Ticket* t = offered[i];
    if (t != nullptr &&
        lounge->offer[i].compare_exchange_strong(t, nullptr, std::memory_order_acq_rel))
      delete offered[i];
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
