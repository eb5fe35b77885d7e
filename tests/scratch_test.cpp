// detail/scratch.hpp: a call's temporary vectors come from a per-thread block that grows to
// a call's total and is then reused, so that repeated calls allocate nothing; anything that
// does not fit still works from the heap.
#include <cstdint>
#include <thread>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

namespace {

using normkit::detail::ScratchArena;
using normkit::detail::SmallBuffer;

bool inside(const void* p, const void* lo, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p), b = reinterpret_cast<std::uintptr_t>(lo);
  return a >= b && a < b + bytes;
}

// Runs in a fresh thread: a fresh arena whatever other tests did on the main thread.
template <class F>
void in_new_thread(F f) {
  std::thread t(f);
  t.join();
}

TEST(Scratch, SmallSizesStayInsideTheObject) {
  in_new_thread([] {
    SmallBuffer<double, 8> b(8);
    EXPECT_TRUE(inside(b.data(), &b, sizeof b));
    EXPECT_EQ(ScratchArena::local().capacity(), 0u);
  });
}

TEST(Scratch, BuffersAreValueInitialized) {
  in_new_thread([] {
    {
      SmallBuffer<double, 4> a(1000);
      for (std::size_t i = 0; i < a.size(); ++i) a[i] = 7.0;
    }
    SmallBuffer<double, 4> b(1000);  // the same bytes of the block again
    for (std::size_t i = 0; i < b.size(); ++i) ASSERT_EQ(b[i], 0.0) << i;
    SmallBuffer<normkit::detail::Part, 4> p(100);
    for (std::size_t i = 0; i < p.size(); ++i) ASSERT_EQ(p[i].n, 0) << i;
  });
}

TEST(Scratch, TheBlockGrowsToACallsTotalAndIsReused) {
  in_new_thread([] {
    ScratchArena& arena = ScratchArena::local();
    {
      SmallBuffer<double, 4> a(1000);  // 8000 bytes: the empty block grows to it
      SmallBuffer<double, 4> b(2000);  // does not fit: heap
      EXPECT_EQ(arena.capacity(), 8000u);
      a[999] = 1.0;
      b[1999] = 2.0;
      EXPECT_EQ(a[999] + b[1999], 3.0);
    }
    // The next call's first buffer grows the block to the last call's total; then both fit.
    {
      SmallBuffer<double, 4> a(1000);
      EXPECT_EQ(arena.capacity(), 8000u + 16000u);
      SmallBuffer<double, 4> b(2000);
      EXPECT_TRUE(inside(b.data(), a.data(), arena.capacity()));
    }
    // A buffer sized after the others and released after them (c) works the same; once the
    // block holds a call's total, every call gets the same bytes.
    const double *pa = nullptr, *pb = nullptr;
    const float* pc = nullptr;
    for (int round = 0; round < 4; ++round) {
      SmallBuffer<float, 4> c;
      SmallBuffer<double, 4> a(1000);
      SmallBuffer<double, 4> b(2000);
      c.resize(std::size_t{10});  // 64 bytes: heap in round 0, then in the block
      if (round == 1) {
        pa = a.data();
        pb = b.data();
        pc = c.data();
        EXPECT_TRUE(inside(pc, pa, arena.capacity()));
      } else if (round > 1) {
        EXPECT_EQ(a.data(), pa);
        EXPECT_EQ(b.data(), pb);
        EXPECT_EQ(c.data(), pc);
      }
    }
    EXPECT_EQ(arena.capacity(), 8000u + 16000u + 64u);
  });
}

TEST(Scratch, CallsBeyondTheCapUseTheHeap) {
  in_new_thread([] {
    const std::size_t n = ScratchArena::kMaxBytes / sizeof(double) + 1;
    {
      SmallBuffer<double, 4> big(n);
      big[n - 1] = 1.0;
      EXPECT_EQ(big[n - 1], 1.0);
    }
    SmallBuffer<double, 4> again(n);
    EXPECT_LE(ScratchArena::local().capacity(), ScratchArena::kMaxBytes);
    again[n - 1] = 2.0;
    EXPECT_EQ(again[n - 1], 2.0);
  });
}

TEST(Scratch, EachThreadHasItsOwnBlock) {
  SmallBuffer<double, 4> here(5000);
  const double* p = here.data();
  const double* q = nullptr;
  in_new_thread([&] {
    SmallBuffer<double, 4> there(5000);
    q = there.data();
  });
  EXPECT_FALSE(inside(q, p, 5000 * sizeof(double)));
}

}  // namespace
