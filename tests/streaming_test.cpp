// Streaming stores (normkit::streaming_store_bytes(), detail/apply.hpp): outputs at or above
// the threshold are written around the caches. Per ISA level this CPU runs:
//  - every module's forward (training and evaluation), fused forward and backward give the
//    same bits with every output streamed as with none: row and column (channels-last,
//    BatchNorm1d) applies, LayerNorm's one-pass backward, odd run lengths (unaligned runs),
//    float, bfloat16 and half, an output at an odd float offset, in place, and on a thread
//    pool (replacing the streaming store with a wrong value fails every case but in place,
//    which never streams);
//  - the setting: default from the environment or the last-level cache, set/get.
#define EIGEN_USE_THREADS
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/bits.hpp"
#include "support/isa_param.hpp"

namespace {

using Idx = Eigen::Index;
using normkit::Activation;

template <class Tensor>
void fill(Tensor& t, unsigned seed, float offset = 0.0f) {
  unsigned s = seed * 2654435761u + 1u;
  for (Idx i = 0; i < t.size(); ++i) {
    s = s * 1664525u + 1013904223u;
    t.data()[i] = static_cast<typename Tensor::Scalar>(
        offset + static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

/// Sets streaming_store_bytes() for a scope and restores the previous value.
class StreamScope {
 public:
  explicit StreamScope(std::size_t bytes) : saved_(normkit::streaming_store_bytes()) {
    normkit::set_streaming_store_bytes(bytes);
  }
  ~StreamScope() { normkit::set_streaming_store_bytes(saved_); }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  std::size_t saved_;
};

using Outputs = std::vector<std::vector<float>>;

template <class Tensor>
void keep(Outputs& out, const Tensor& t) {
  std::vector<float> v(static_cast<std::size_t>(t.size()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(t.data()[i]);  // exact
  out.push_back(std::move(v));
}

/// run() with no output streamed and with every output streamed: the same bits.
template <class Run>
void expect_same_bits(const char* what, Run run) {
  SCOPED_TRACE(what);
  Outputs plain, streamed;
  {
    StreamScope never(normkit::kNeverStream);
    plain = run();
  }
  {
    StreamScope always(0);
    streamed = run();
  }
  ASSERT_EQ(plain.size(), streamed.size());
  for (std::size_t i = 0; i < plain.size(); ++i)
    EXPECT_TRUE(normkit_test::same_bits(plain[i], streamed[i])) << "output " << i << " differs";
}

/// A module's training forward, backward(x, dy), then its evaluation forward.
template <class Module, class Tensor>
Outputs module_outputs(Module m, const Tensor& x, const Tensor& dy) {
  Outputs out;
  keep(out, m.forward(x));
  const auto g = m.backward(x, dy);
  keep(out, g.input);
  keep(out, g.weight);
  keep(out, g.bias);
  m.eval();
  keep(out, m.forward(x));
  return out;
}

class Streaming : public normkit_test::PerIsa {};

TEST_P(Streaming, EveryModuleGivesTheSameBits) {
  // Run lengths 99, 130, 131, 256 (row applies), 200 and 67 channels (column applies); runs
  // shorter than 64 elements never stream.
  Eigen::Tensor<float, 4, Eigen::RowMajor> x4(3, 5, 9, 11), dy4(3, 5, 9, 11);
  fill(x4, 1, 2.0f);
  fill(dy4, 2);
  expect_same_bits("BatchNorm2d", [&] {
    return module_outputs(normkit::BatchNorm2d<float>(normkit::BatchNormOptions(5)), x4, dy4);
  });
  expect_same_bits("InstanceNorm2d", [&] {
    return module_outputs(
        normkit::InstanceNorm2d<float>(normkit::InstanceNormOptions(5).affine(true)), x4, dy4);
  });
  Eigen::Tensor<float, 4, Eigen::RowMajor> xg(2, 6, 10, 13), dyg(2, 6, 10, 13);
  fill(xg, 3, -1.0f);
  fill(dyg, 4);
  expect_same_bits("GroupNorm", [&] {
    return module_outputs(normkit::GroupNorm<float>(normkit::GroupNormOptions(3, 6)), xg, dyg);
  });
  Eigen::Tensor<float, 2, Eigen::RowMajor> xl(6, 131), dyl(6, 131);
  fill(xl, 5, 100.0f);
  fill(dyl, 6);
  expect_same_bits("LayerNorm", [&] {
    return module_outputs(normkit::LayerNorm<float>(normkit::LayerNormOptions({131})), xl, dyl);
  });
  expect_same_bits("LayerNorm without affine", [&] {
    return module_outputs(
        normkit::LayerNorm<float>(normkit::LayerNormOptions({131}).elementwise_affine(false)), xl,
        dyl);
  });
  Eigen::Tensor<float, 2, Eigen::RowMajor> xr(5, 256), dyr(5, 256);
  fill(xr, 7);
  fill(dyr, 8);
  expect_same_bits("RMSNorm", [&] {
    return module_outputs(normkit::RMSNorm<float>(normkit::RMSNormOptions({256})), xr, dyr);
  });
  Eigen::Tensor<float, 2, Eigen::RowMajor> xb(21, 200), dyb(21, 200);
  fill(xb, 9, 3.0f);
  fill(dyb, 10);
  expect_same_bits("BatchNorm1d", [&] {
    return module_outputs(normkit::BatchNorm1d<float>(normkit::BatchNormOptions(200)), xb, dyb);
  });
  Eigen::Tensor<float, 4, Eigen::RowMajor> xc(2, 5, 7, 67), dyc(2, 5, 7, 67);
  fill(xc, 11);
  fill(dyc, 12);
  expect_same_bits("BatchNorm2d channels-last", [&] {
    return module_outputs(
        normkit::BatchNorm2d<float>(normkit::BatchNormOptions(67).channels_last(true)), xc, dyc);
  });
  // 16-bit outputs stream on the AVX2 and AVX-512 paths (32-byte vectors).
  using bf16 = Eigen::bfloat16;
  Eigen::Tensor<bf16, 4, Eigen::RowMajor> x4b(3, 5, 9, 11), dy4b(3, 5, 9, 11);
  fill(x4b, 21, 2.0f);
  fill(dy4b, 22);
  expect_same_bits("BatchNorm2d bfloat16", [&] {
    return module_outputs(normkit::BatchNorm2d<bf16>(normkit::BatchNormOptions(5)), x4b, dy4b);
  });
  Eigen::Tensor<bf16, 2, Eigen::RowMajor> xlb(6, 131), dylb(6, 131);
  fill(xlb, 23, 1.0f);
  fill(dylb, 24);
  expect_same_bits("LayerNorm bfloat16", [&] {
    return module_outputs(normkit::LayerNorm<bf16>(normkit::LayerNormOptions({131})), xlb, dylb);
  });
  Eigen::Tensor<Eigen::half, 2, Eigen::RowMajor> xrh(5, 256), dyrh(5, 256);
  fill(xrh, 25);
  fill(dyrh, 26);
  expect_same_bits("RMSNorm half", [&] {
    return module_outputs(normkit::RMSNorm<Eigen::half>(normkit::RMSNormOptions({256})), xrh, dyrh);
  });
}

TEST_P(Streaming, FusedForwardsGiveTheSameBits) {
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(3, 5, 9, 11), r(3, 5, 9, 11);
  fill(x, 13, 1.0f);
  fill(r, 14);
  for (bool training : {true, false}) {
    expect_same_bits(training ? "BatchNorm2d fused, training" : "BatchNorm2d fused, evaluation",
                     [&] {
                       normkit::BatchNorm2d<float> bn(5);
                       if (!training)
                         bn.eval();
                       Outputs out;
                       keep(out, bn.forward_fused(x, r, Activation::relu));
                       keep(out, bn.forward_fused(x, Activation::silu));
                       return out;
                     });
  }
  Eigen::Tensor<float, 4, Eigen::RowMajor> xc(2, 5, 7, 67), rc(2, 5, 7, 67);
  fill(xc, 15);
  fill(rc, 16);
  expect_same_bits("BatchNorm2d channels-last fused", [&] {
    normkit::BatchNorm2d<float> bn(normkit::BatchNormOptions(67).channels_last(true));
    Outputs out;
    keep(out, bn.forward_fused(xc, rc, Activation::gelu));
    return out;
  });
}

TEST_P(Streaming, UnalignedInPlaceAndThreadedOutputsGiveTheSameBits) {
  // The output one float past a 64-byte boundary (every vector store unaligned), in place,
  // and a call large enough for two threads.
  const Idx rows = 40, n = 777;
  std::vector<float> xs(static_cast<std::size_t>(rows * n)), dys(xs.size());
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> x(xs.data(), rows, n),
      dy(dys.data(), rows, n);
  fill(x, 17, -5.0f);
  fill(dy, 18);
  normkit::LayerNormFuncOptions<float> opt({n});
  expect_same_bits("LayerNorm, output at an odd offset", [&] {
    std::vector<float> ys(xs.size() + 17);
    Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> y(ys.data() + 1, rows, n);
    normkit::layer_norm(x, y, opt);
    Outputs out;
    keep(out, y);
    return out;
  });
  expect_same_bits("LayerNorm in place", [&] {
    std::vector<float> ys(xs);
    Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> y(ys.data(), rows, n);
    normkit::layer_norm(y, y, opt);
    Outputs out;
    keep(out, y);
    return out;
  });
  Eigen::Tensor<float, 4, Eigen::RowMajor> xt(4, 8, 45, 47), dyt(4, 8, 45, 47);
  fill(xt, 19, 0.5f);
  fill(dyt, 20);
  expect_same_bits("BatchNorm2d on two threads", [&] {
    Eigen::ThreadPool pool(2);
    Eigen::ThreadPoolDevice dev(&pool, 2);
    normkit::BatchNorm2d<float> bn(8);
    Outputs out;
    keep(out, bn.forward(xt, dev));
    const auto g = bn.backward(xt, dyt, dev);
    keep(out, g.input);
    keep(out, g.weight);
    return out;
  });
}

NORMKIT_INSTANTIATE_PER_ISA(Streaming);

TEST(StreamingSetting, SetAndGet) {
  const std::size_t saved = normkit::streaming_store_bytes();
  normkit::set_streaming_store_bytes(0);
  EXPECT_EQ(normkit::streaming_store_bytes(), 0u);
  normkit::set_streaming_store_bytes(12345);
  EXPECT_EQ(normkit::streaming_store_bytes(), 12345u);
  normkit::set_streaming_store_bytes(normkit::kNeverStream);
  EXPECT_EQ(normkit::streaming_store_bytes(), normkit::kNeverStream);
  normkit::set_streaming_store_bytes(saved);
  EXPECT_EQ(normkit::streaming_store_bytes(), saved);
}

TEST(StreamingSetting, DefaultFromTheEnvironmentOrTheLastLevelCache) {
  const char* name = "NORMKIT_STREAMING_STORE_BYTES";
  std::size_t llc = normkit::kNeverStream;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  long c = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (c <= 0)
    c = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (c > 0)
    llc = static_cast<std::size_t>(c);
#endif
  const char* env = std::getenv(name);
  const std::string saved = env ? env : "";
  ASSERT_EQ(unsetenv(name), 0);
  EXPECT_EQ(normkit::detail::initial_streaming_store_bytes(), llc);
  const struct {
    const char* text;
    std::size_t want;
  } cases[] = {{"64M", std::size_t{64} << 20},
               {"3k", 3072},
               {"1G", std::size_t{1} << 30},
               {"0", 0},
               {"4096", 4096},
               {"never", normkit::kNeverStream},
               {"12x", llc},
               {"M", llc},
               {"5Mb", llc}};
  for (const auto& c2 : cases) {
    ASSERT_EQ(setenv(name, c2.text, 1), 0);
    EXPECT_EQ(normkit::detail::initial_streaming_store_bytes(), c2.want) << c2.text;
  }
  if (env)
    setenv(name, saved.c_str(), 1);
  else
    unsetenv(name);
}

}  // namespace
