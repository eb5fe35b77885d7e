// Runtime ISA dispatch (normkit/isa.hpp): which levels exist and ran, forcing a level, the
// NORMKIT_ISA names, first-use detection from many threads, and that every level computes the
// same results (to rounding: FMA contraction is the only difference between the copies).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/isa_param.hpp"

namespace {

using normkit::Isa;

TEST(IsaTest, ReportsWhichLevelsRunAndWhichTheCpuLacks) {
  const auto levels = normkit::supported_isas();
  ASSERT_FALSE(levels.empty());
  EXPECT_EQ(levels.front(), Isa::baseline);
  EXPECT_EQ(levels.back(), normkit::cpu_isa());
  std::string ran;
  for (Isa l : levels) ran += std::string(ran.empty() ? "" : ", ") + normkit::isa_name(l);
  std::string lack;
  for (int i = static_cast<int>(normkit::cpu_isa()) + 1; i <= static_cast<int>(Isa::avx512); ++i)
    lack += std::string(lack.empty() ? "" : ", ") + normkit::isa_name(static_cast<Isa>(i));
  // Printed for CI logs: the per-ISA tests (…/Isa/<level>) ran for these levels.
  // (Off x86-64 the higher levels are not compiled in at all.)
  std::printf("normkit ISA levels tested: %s; %s: %s; active: %s\n", ran.c_str(),
              NORMKIT_X86_DISPATCH ? "lacking on this CPU" : "not on this target",
              lack.empty() ? "none" : lack.c_str(), normkit::isa_name(normkit::isa()));
  RecordProperty("isa_levels_tested", ran);
  RecordProperty("isa_levels_lacking", lack.empty() ? "none" : lack);
}

TEST(IsaTest, SetIsaForcesALevelAndRejectsWhatTheCpuLacks) {
  const Isa before = normkit::isa();
  for (Isa l : normkit::supported_isas()) {
    normkit::set_isa(l);
    EXPECT_EQ(normkit::isa(), l);
  }
  try {
    normkit::set_isa(static_cast<Isa>(static_cast<int>(normkit::cpu_isa()) + 1));
    ADD_FAILURE() << "expected value_error";
  } catch (const normkit::value_error& e) {
    EXPECT_NE(std::string(e.what()).find("[normkit.set_isa]"), std::string::npos) << e.what();
  }
  normkit::set_isa(before);
  EXPECT_EQ(normkit::isa(), before);
}

TEST(IsaTest, EnvironmentNames) {
  Isa l = Isa::avx2;
  EXPECT_TRUE(normkit::detail::parse_isa("AVX512", l));
  EXPECT_EQ(l, Isa::avx512);
  EXPECT_TRUE(normkit::detail::parse_isa("avx2", l));
  EXPECT_EQ(l, Isa::avx2);
  for (const char* s : {"baseline", "x86-64", "sse2", "generic", "aarch64", "NEON", "default"}) {
    EXPECT_TRUE(normkit::detail::parse_isa(s, l)) << s;
    EXPECT_EQ(l, Isa::baseline) << s;
  }
  EXPECT_FALSE(normkit::detail::parse_isa("avx3", l));
  EXPECT_FALSE(normkit::detail::parse_isa("", l));
}

// The baseline is named after the target; off x86-64 (aarch64: the portable kernels, NEON
// through GCC/Clang generic vectors) it is the only level compiled in, whatever the CPU.
TEST(IsaTest, BaselineIsNamedAfterTheTarget) {
#if defined(__x86_64__) || defined(_M_X64)
  EXPECT_STREQ(normkit::isa_name(Isa::baseline), "x86-64");
#elif defined(__aarch64__)
  EXPECT_STREQ(normkit::isa_name(Isa::baseline), "aarch64");
#else
  EXPECT_STREQ(normkit::isa_name(Isa::baseline), "generic");
#endif
#if !NORMKIT_X86_DISPATCH
  EXPECT_EQ(normkit::cpu_isa(), Isa::baseline);
  EXPECT_EQ(normkit::supported_isas(), std::vector<Isa>{Isa::baseline});
  EXPECT_EQ(normkit::isa(), Isa::baseline);
#endif
}

// The first use detects the level once, whatever the number of threads racing to it
// (ThreadSanitizer runs this test).
TEST(IsaTest, FirstUseFromManyThreadsAgrees) {
  const Isa want = normkit::isa();
  normkit::process_state::active_isa.store(-1);  // back to "not chosen yet"
  std::vector<std::thread> ts;
  std::vector<int> seen(8, -2);
  std::atomic<bool> go{false};
  for (std::size_t t = 0; t < seen.size(); ++t) {
    ts.emplace_back([&, t] {
      while (!go.load()) {
      }
      seen[t] = static_cast<int>(normkit::isa());
    });
  }
  go.store(true);
  for (auto& t : ts) t.join();
  for (int s : seen) EXPECT_EQ(s, static_cast<int>(normkit::detail::initial_isa()));
  normkit::set_isa(want);
}

template <class T, int R>
Eigen::Tensor<T, R, Eigen::RowMajor> random(const std::array<Eigen::Index, R>& d,
                                            unsigned seed,
                                            double offset) {
  Eigen::Tensor<T, R, Eigen::RowMajor> t(d);
  std::mt19937 g(seed);
  std::normal_distribution<double> n(offset, 1.0);
  for (Eigen::Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(n(g));
  return t;
}

template <class A, class B>
double max_rel(const A& a, const B& b) {
  double w = 0;
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]), y = static_cast<double>(b.data()[i]);
    w = std::max(w, std::abs(x - y) / (1 + std::abs(y)));
  }
  return w;
}

// Every level computes the same function: outputs and gradients agree with the baseline
// level's to a few float ulps (the levels differ only where FMA rounds once instead of twice).
TEST(IsaTest, EveryLevelAgreesWithTheBaseline) {
  const auto x = random<float, 4>({8, 16, 20, 20}, 1, 5.0);
  const auto dy = random<float, 4>({8, 16, 20, 20}, 2, 0.0);
  const auto xl = random<float, 4>({8, 20, 20, 16}, 3, -2.0);
  const auto dyl = random<float, 4>({8, 20, 20, 16}, 4, 0.0);
  auto run_all = [&] {
    std::vector<Eigen::Tensor<float, 4, Eigen::RowMajor>> out;
    normkit::BatchNorm2d<float> bn(16);
    out.push_back(bn.forward(x));
    out.push_back(bn.backward(dy).input);
    normkit::BatchNorm2d<float> bl(normkit::BatchNormOptions(16).channels_last(true));
    out.push_back(bl.forward(xl));
    out.push_back(bl.backward(dyl).input);
    normkit::LayerNorm<float> ln(normkit::LayerNormOptions({20, 20}));
    out.push_back(ln.forward(x));
    out.push_back(ln.backward(dy).input);
    normkit::GroupNorm<float> gn(normkit::GroupNormOptions(4, 16));
    out.push_back(gn.forward(x));
    out.push_back(gn.backward(dy).input);
    return out;
  };
  normkit_test::IsaScope base(Isa::baseline);
  const auto want = run_all();
  for (Isa l : normkit::supported_isas()) {
    normkit_test::IsaScope scope(l);
    const auto got = run_all();
    for (std::size_t k = 0; k < got.size(); ++k)
      EXPECT_LE(max_rel(got[k], want[k]), 4e-6) << normkit::isa_name(l) << " output " << k;
  }
}

}  // namespace
