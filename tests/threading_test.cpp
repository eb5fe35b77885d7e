// Bitwise determinism: every module's forward and backward give identical bits on 1, 2, 3
// and 8 threads (fixed work items merged in a fixed order), and eval-mode forward on one
// module from several threads at once is safe.
#define EIGEN_USE_THREADS
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/bits.hpp"
#include "support/isa_param.hpp"

namespace {

// Every parallel path (split slots, fused vs two-pass, partial merges) must run on tensors
// small enough for a unit test: the threshold is lowered for the whole program (a runtime
// setting, normkit::set_min_parallel_elements, shared by every translation unit).
[[maybe_unused]] const int kThreshold = [] {
  normkit::set_min_parallel_elements(Eigen::Index{1} << 12);
  return 0;
}();

class ThreadingTest : public normkit_test::PerIsa {};

template <class Tensor>
void fill(Tensor& t, unsigned seed, float offset = 0.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(offset, 1.0f);
  for (Eigen::Index i = 0; i < t.size(); ++i) t.data()[i] = d(gen);
}

template <class Module, class Tensor>
void check_threads(const Module& proto, const Tensor& x, const Tensor& dy, const char* what) {
  SCOPED_TRACE(what);
  Module ref = proto;
  const auto y1 = ref.forward(x);
  const auto g1 = ref.backward(dy);
  for (int threads : {2, 3, 8}) {
    Eigen::ThreadPool pool(threads);
    Eigen::ThreadPoolDevice dev(&pool, threads);
    Module m = proto;
    const auto y = m.forward(x, dev);
    const auto g = m.backward(dy, dev);
    EXPECT_TRUE(normkit_test::same_bits(y, y1)) << threads << " threads: forward differs";
    EXPECT_TRUE(normkit_test::same_bits(g.input, g1.input)) << threads << " threads: dx differs";
    EXPECT_TRUE(normkit_test::same_bits(g.weight, g1.weight))
        << threads << " threads: dweight differs";
    EXPECT_TRUE(normkit_test::same_bits(g.bias, g1.bias)) << threads << " threads: dbias differs";
  }
}

TEST_P(ThreadingTest, BitwiseIdenticalForAnyThreadCount) {
  EXPECT_EQ(normkit::min_parallel_elements(), Eigen::Index{1} << 12);
  // Large enough to cross the parallel threshold and to split slots into several blocks.
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(8, 16, 48, 48), dy(8, 16, 48, 48);
  fill(x, 1, 3.0f);
  fill(dy, 2);
  check_threads(normkit::BatchNorm2d<float>(16), x, dy, "BatchNorm2d NCHW");
  check_threads(normkit::InstanceNorm2d<float>(normkit::InstanceNormOptions(16).affine(true)), x,
                dy, "InstanceNorm2d");
  check_threads(normkit::GroupNorm<float>(normkit::GroupNormOptions(4, 16)), x, dy, "GroupNorm");
  check_threads(normkit::LayerNorm<float>(normkit::LayerNormOptions({48, 48})), x, dy, "LayerNorm");
  check_threads(normkit::RMSNorm<float>(normkit::RMSNormOptions({48, 48})), x, dy, "RMSNorm");
  Eigen::Tensor<float, 4, Eigen::RowMajor> xl(8, 48, 48, 16), dyl(8, 48, 48, 16);
  fill(xl, 3, -2.0f);
  fill(dyl, 4);
  check_threads(normkit::BatchNorm2d<float>(normkit::BatchNormOptions(16).channels_last(true)), xl,
                dyl, "BatchNorm2d NHWC");
  Eigen::Tensor<double, 2, Eigen::ColMajor> xb(4096, 64), dyb(4096, 64);
  fill(xb, 5);
  fill(dyb, 6);
  check_threads(normkit::BatchNorm1d<double>(64), xb, dyb, "BatchNorm1d ColMajor double");
  // Slots that fit in cache but are too few for 8 threads: 1 and 2 threads take the fused
  // (statistics + normalize per slot) path, 3 and 8 threads the two-pass path: same bits.
  Eigen::Tensor<float, 2, Eigen::RowMajor> xf(4, 30000), dyf(4, 30000);
  fill(xf, 9, 50.0f);
  fill(dyf, 10);
  check_threads(normkit::LayerNorm<float>(normkit::LayerNormOptions({30000})), xf, dyf,
                "LayerNorm fused vs two-pass");
  check_threads(normkit::RMSNorm<float>(normkit::RMSNormOptions({30000})), xf, dyf,
                "RMSNorm fused vs two-pass");
  check_threads(normkit::BatchNorm1d<float>(4),
                Eigen::Tensor<float, 3, Eigen::RowMajor>(
                    xf.reshape(Eigen::array<Eigen::Index, 3>{1, 4, 30000})),
                Eigen::Tensor<float, 3, Eigen::RowMajor>(
                    dyf.reshape(Eigen::array<Eigen::Index, 3>{1, 4, 30000})),
                "BatchNorm1d fused vs two-pass");
  // Rows batched (the row-batch path of fused_slots: 16 rows of 500 per batch) on 1 to 3
  // threads, the two-pass path on 8 (10 rows are too few to fuse on 8 threads): same bits.
  // In double, where a statistic that differs in its last bits shows in the output.
  Eigen::Tensor<double, 2, Eigen::RowMajor> xr(10, 500), dyr(10, 500);
  fill(xr, 13, 20.0f);
  fill(dyr, 14);
  check_threads(normkit::LayerNorm<double>(normkit::LayerNormOptions({500})), xr, dyr,
                "LayerNorm row batches vs two-pass");
  check_threads(normkit::RMSNorm<double>(normkit::RMSNormOptions({500})), xr, dyr,
                "RMSNorm row batches vs two-pass");
  // Many channels of short runs (the channel-block path of fused_slots; 3 threads cut the
  // 64 channels into ranges that are not multiples of its 16-channel blocks).
  Eigen::Tensor<float, 4, Eigen::RowMajor> xc(64, 64, 4, 4), dyc(64, 64, 4, 4);
  fill(xc, 11, 1.0f);
  fill(dyc, 12);
  check_threads(normkit::BatchNorm2d<float>(64), xc, dyc, "BatchNorm2d short runs");
  // Few slot groups of many columns (column mode): column ranges side by side. 1000 columns
  // end in a partial vector; 1500 make two column tiles, the second partly empty for wide
  // ranges; channels-last with 200 channels.
  Eigen::Tensor<float, 2, Eigen::RowMajor> xw(256, 1000), dyw(256, 1000);
  fill(xw, 13, 5.0f);
  fill(dyw, 14);
  check_threads(normkit::BatchNorm1d<float>(1000), xw, dyw, "BatchNorm1d (256, 1000)");
  Eigen::Tensor<double, 2, Eigen::RowMajor> xt(300, 1500), dyt(300, 1500);
  fill(xt, 15, -3.0f);
  fill(dyt, 16);
  check_threads(normkit::BatchNorm1d<double>(1500), xt, dyt, "BatchNorm1d (300, 1500) double");
  Eigen::Tensor<float, 4, Eigen::RowMajor> xn(4, 12, 12, 200), dyn(4, 12, 12, 200);
  fill(xn, 17, 2.0f);
  fill(dyn, 18);
  check_threads(normkit::BatchNorm2d<float>(normkit::BatchNormOptions(200).channels_last(true)), xn,
                dyn, "BatchNorm2d NHWC 200 channels");
  // Few slots, long reductions: the path that splits one slot across threads.
  Eigen::Tensor<float, 3, Eigen::RowMajor> xs(2, 2, 300000), dys(2, 2, 300000);
  fill(xs, 7, 100.0f);
  fill(dys, 8);
  check_threads(normkit::BatchNorm1d<float>(2), xs, dys, "BatchNorm1d few channels");
}

// Regression (found by tests/soak_test.cpp): in this ColMajor GroupNorm the parallel apply's
// chunk edge fell inside a memory-order run at a point that is not a multiple of the leaves'
// vector width, moving elements from the vector body to the scalar tail; with FMA
// contraction (GCC's default) two elements of dx changed their last bit with 2 or 3 threads
// on the AVX2 and AVX-512 paths. Chunk edges inside runs are now aligned (apply.hpp).
TEST_P(ThreadingTest, ApplyChunkEdgesInsideRunsKeepTheBits) {
  Eigen::Tensor<float, 5, Eigen::ColMajor> x(8, 3, 13, 10, 18), dy(8, 3, 13, 10, 18);
  fill(x, 13);
  fill(dy, 14);
  check_threads(normkit::GroupNorm<float>(normkit::GroupNormOptions(1, 3).eps(1e-3)), x, dy,
                "GroupNorm ColMajor 5-D");
  Eigen::Tensor<double, 4, Eigen::ColMajor> xd(7, 5, 33, 41), dyd(7, 5, 33, 41);
  fill(xd, 15, 4.0f);
  fill(dyd, 16);
  check_threads(normkit::BatchNorm2d<double>(5), xd, dyd, "BatchNorm2d ColMajor double");
  check_threads(normkit::InstanceNorm2d<double>(normkit::InstanceNormOptions(5).affine(true)), xd,
                dyd, "InstanceNorm2d ColMajor double");
}

TEST_P(ThreadingTest, ConcurrentEvalForwardIsSafeAndIdentical) {
  normkit::BatchNorm2d<float> bn(8);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(4, 8, 16, 16);
  fill(x, 9);
  bn.forward(x);  // one training step so the running stats are non-trivial
  bn.eval();      // an evaluation forward only reads the module (by default)
  const auto want = bn.forward(x);
  std::vector<Eigen::Tensor<float, 4, Eigen::RowMajor>> out(4);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      for (int k = 0; k < 20; ++k) out[static_cast<std::size_t>(t)] = bn.forward(x);
    });
  }
  for (auto& t : ts) t.join();
  for (const auto& o : out) EXPECT_TRUE(normkit_test::same_bits(o, want));
}

// The apply leaves end a run that is not a multiple of the vector width with its last full
// vector shifted back over the body when the output shares no storage with the inputs, and
// with a zero-padded tail when it does (in place). Both must give the same bits.
template <class S>
void check_in_place_tails(Eigen::Index plane) {
  SCOPED_TRACE(plane);
  using T4 = Eigen::Tensor<S, 4, Eigen::RowMajor>;
  using T2 = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  T4 x(3, 5, 1, plane);
  fill(x, 31, 2.0f);
  for (bool training : {true, false}) {
    normkit::BatchNorm2d<S> a(5), c(5);
    if (!training) {  // non-trivial running statistics first
      a.forward(x);
      c.forward(x);
      a.eval();
      c.eval();
    }
    T4 y(x.dimensions());
    Eigen::TensorMap<T4> ym(y.data(), y.dimensions());
    a.forward(x, ym);
    T4 w = x;  // normalized in its own storage
    Eigen::TensorMap<T4> wm(w.data(), w.dimensions());
    c.forward(Eigen::TensorMap<const T4>(w.data(), w.dimensions()), wm);
    EXPECT_TRUE(normkit_test::same_bits(w, y)) << (training ? "training" : "evaluation");
  }
  T2 r(6, plane);  // LayerNorm over rows of `plane` elements
  fill(r, 33, -1.0f);
  normkit::LayerNorm<S> ln(normkit::LayerNormOptions({plane})), ln2 = ln;
  const T2 want = ln.forward(r);
  Eigen::TensorMap<T2> rm(r.data(), r.dimensions());
  ln2.forward(Eigen::TensorMap<const T2>(r.data(), r.dimensions()), rm);
  EXPECT_TRUE(normkit_test::same_bits(r, want)) << "LayerNorm";
}

TEST_P(ThreadingTest, RunTailsAgreeInPlaceAndOutOfPlace) {
  for (Eigen::Index plane : {17, 23, 49, 63}) {
    check_in_place_tails<float>(plane);
    check_in_place_tails<double>(plane);
  }
}

NORMKIT_INSTANTIATE_PER_ISA(ThreadingTest);

// A thread pool that counts the tasks scheduled on it, behind a device normkit accepts (any
// type with getPool() and numThreads(), like Eigen::ThreadPoolDevice).
struct CountingPool {
  explicit CountingPool(int n) : pool(n) {}
  void Schedule(std::function<void()> f) {
    scheduled.fetch_add(1);
    pool.Schedule(std::move(f));
  }
  std::atomic<int> scheduled{0};
  Eigen::ThreadPool pool;
};
struct CountingDevice {
  CountingPool* pool;
  int threads;
  CountingPool* getPool() const { return pool; }
  int numThreads() const { return threads; }
};

// Restores the process-wide linger setting however a test ends.
struct LingerGuard {
  long long saved = normkit::helper_linger_us();
  ~LingerGuard() { normkit::set_helper_linger_us(saved); }
};

bool wait_for_waiting(void* pool, int want) {
  auto* lounge = normkit::detail::exec_impl::lounge_for(pool);
  if (lounge == nullptr)
    return false;
  for (int i = 0; i < 2000; ++i) {
    if (lounge->waiting.load() == want)
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

TEST(ThreadLinger, TheNextCallIsOfferedToTheHelperInsteadOfScheduled) {
  LingerGuard guard;
  normkit::set_helper_linger_us(5'000'000);  // long enough for any scheduler hiccup
  CountingPool cp(1);
  const auto ex = normkit::detail::make_exec(CountingDevice{&cp, 2});
  const auto caller = std::this_thread::get_id();
  std::atomic<int> helped{0};
  auto item = [&](Eigen::Index) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    if (std::this_thread::get_id() != caller)
      helped.fetch_add(1);
  };
  normkit::detail::run_items(ex, 8, item);
  EXPECT_EQ(cp.scheduled.load(), 1);
  ASSERT_TRUE(wait_for_waiting(&cp, 1)) << "the helper did not linger";
  helped = 0;
  normkit::detail::run_items(ex, 8, item);
  EXPECT_EQ(cp.scheduled.load(), 1) << "the second call scheduled a task instead of an offer";
  EXPECT_GT(helped.load(), 0) << "the lingering helper ran none of the second call's items";
  // Lowering the setting ends the wait; the next call schedules again.
  normkit::set_helper_linger_us(0);
  ASSERT_TRUE(wait_for_waiting(&cp, 0))
      << "the helper kept lingering after set_helper_linger_us(0)";
  normkit::detail::run_items(ex, 8, item);
  EXPECT_EQ(cp.scheduled.load(), 2);
}

TEST(ThreadLinger, ConcurrentCallersOnOnePoolKeepTheBits) {
  LingerGuard guard;
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(64, 256), dy(64, 256);
  fill(x, 21, 3.0f);
  fill(dy, 22);
  normkit::BatchNorm1d<float> ref_bn(256);
  const auto y_ref = ref_bn.forward(x);
  const auto g_ref = ref_bn.backward(dy);
  for (long long linger : {100LL, 0LL, 2000LL}) {
    SCOPED_TRACE(linger);
    normkit::set_helper_linger_us(linger);
    Eigen::ThreadPool pool(3);
    Eigen::ThreadPoolDevice dev(&pool, 3);
    std::atomic<int> mismatches{0};
    std::vector<std::thread> callers;
    for (int t = 0; t < 3; ++t) {
      callers.emplace_back([&] {
        for (int k = 0; k < 40; ++k) {
          normkit::BatchNorm1d<float> bn(256);
          const auto y = bn.forward(x, dev);
          const auto g = bn.backward(dy, dev);
          if (!normkit_test::same_bits(y, y_ref) ||
              !normkit_test::same_bits(g.input, g_ref.input) ||
              !normkit_test::same_bits(g.weight, g_ref.weight))
            mismatches.fetch_add(1);
        }
      });
    }
    for (auto& c : callers) c.join();
    EXPECT_EQ(mismatches.load(), 0);
  }
}

}  // namespace
