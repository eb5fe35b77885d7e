// normkit/detail/scratch.hpp: a call's temporary vectors (statistics, coefficients, column
// tables) without a heap allocation per call.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_SCRATCH_HPP_
#define NORMKIT_DETAIL_SCRATCH_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::max, std::min
#include <cstddef>      // std::size_t
#include <memory>       // std::uninitialized_value_construct_n
#include <new>          // std::align_val_t, std::nothrow
#include <type_traits>  // std::is_trivially_copyable, std::is_trivially_destructible

#include <normkit/config.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: why a per-thread block. A BatchNorm1d call over 1024 features needs ~150 KB of
// temporaries; taken from the heap and freed on every call, glibc handed the freed top of
// the heap back to the OS each time, so every call page-faulted and zeroed it again: a
// quarter of a (256, 1024) evaluation forward and a third of a training forward, measured
// (the same binary with glibc's trim and mmap thresholds raised ran that much faster). Each
// thread keeps one block instead. A call's buffers are carved from it in order and it is
// reset when the last one is released (so release order does not matter); a request that
// does not fit goes to the heap as before, and the block grows to the call's total the next
// time it is empty, up to kMaxBytes per thread (larger calls have work enough to pay for
// the heap). Threads of an Eigen pool each get their own.
class ScratchArena {
 public:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kMaxBytes = std::size_t{1} << 20;

  static ScratchArena& local() noexcept {
    thread_local ScratchArena arena;
    return arena;
  }

  ScratchArena() = default;
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;
  ~ScratchArena() { free_block(); }

  /// `bytes` from the block, or null (then the caller uses the heap and calls give(false)).
  void* take(std::size_t bytes) noexcept {
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    total_ += bytes;
    want_ = std::max(want_, std::min(total_, kMaxBytes));
    if (live_ == 0 && want_ > cap_)
      grow();
    ++live_;
    if (cap_ - used_ < bytes)
      return nullptr;
    void* p = block_ + used_;
    used_ += bytes;
    return p;
  }
  /// Bytes in the thread's block (tests).
  std::size_t capacity() const noexcept { return cap_; }
  /// Ends one take(); the block is reused from its start once none is live.
  void give() noexcept {
    if (--live_ == 0)
      used_ = total_ = 0;
  }

 private:
  void grow() noexcept {
    free_block();
    block_ =
        static_cast<unsigned char*>(::operator new(want_, std::align_val_t(kAlign), std::nothrow));
    cap_ = block_ ? want_ : 0;
  }
  void free_block() noexcept {
    if (block_)
      ::operator delete(block_, std::align_val_t(kAlign));
    block_ = nullptr;
    cap_ = 0;
  }

  unsigned char* block_ = nullptr;
  std::size_t cap_ = 0;    // bytes in block_
  std::size_t used_ = 0;   // bytes handed out from block_ since it was last empty
  std::size_t total_ = 0;  // bytes asked for since then, block or heap
  std::size_t want_ = 0;   // the size the block grows to when next empty
  int live_ = 0;           // takes not yet given back
};

/// Scratch of n value-initialized elements (T trivially copyable and destructible): inside
/// the object when n <= kLocal (a heap allocation costs about as much as normalizing 100
/// floats), else from the thread's ScratchArena, else from the heap. Sized once, by the
/// constructor or by resize() on an empty buffer.
template <class T, std::size_t kLocal = 192>
class SmallBuffer {
  static_assert(std::is_trivially_copyable<T>::value && std::is_trivially_destructible<T>::value,
                "SmallBuffer holds plain data");

 public:
  SmallBuffer() = default;
  explicit SmallBuffer(Index n) { resize(n); }
  SmallBuffer(const SmallBuffer&) = delete;
  SmallBuffer& operator=(const SmallBuffer&) = delete;
  ~SmallBuffer() {
    if (size_ > kLocal) {
      ScratchArena::local().give();
      if (heap_)
        ::operator delete(heap_, std::align_val_t(ScratchArena::kAlign));
    }
  }

  /// Sizes an empty buffer (n >= 0).
  void resize(std::size_t n) {
    NORMKIT_ASSERT(size_ == 0);
    if (n > kLocal) {
      void* p = ScratchArena::local().take(n * sizeof(T));
      if (!p) {
        heap_ = ::operator new(n * sizeof(T), std::align_val_t(ScratchArena::kAlign), std::nothrow);
        if (!heap_) {
          ScratchArena::local().give();
          throw std::bad_alloc();
        }
        p = heap_;
      }
      ptr_ = static_cast<T*>(p);
    }
    size_ = n;
    std::uninitialized_value_construct_n(ptr_, n);
  }
  void resize(Index n) { resize(static_cast<std::size_t>(n)); }

  T* data() noexcept { return ptr_; }
  const T* data() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return ptr_[i]; }
  const T& operator[](std::size_t i) const noexcept { return ptr_[i]; }

 private:
  T local_[kLocal];
  T* ptr_ = local_;
  void* heap_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_SCRATCH_HPP_
