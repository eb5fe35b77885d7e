// Test support: run a test once per ISA level this CPU supports (normkit::supported_isas()),
// as a gtest parameter, with normkit::set_isa() in force for the test's duration.
#ifndef NORMKIT_TESTS_SUPPORT_ISA_PARAM_HPP_
#define NORMKIT_TESTS_SUPPORT_ISA_PARAM_HPP_

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/isa.hpp>

namespace normkit_test {

/// Sets an ISA level for a scope and restores the previous one.
class IsaScope {
 public:
  explicit IsaScope(normkit::Isa level) : saved_(normkit::isa()) { normkit::set_isa(level); }
  ~IsaScope() { normkit::set_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  normkit::Isa saved_;
};

/// Every level this CPU supports: the parameter values of the per-ISA tests.
inline std::vector<normkit::Isa> isa_levels() {
  return normkit::supported_isas();
}

/// A gtest-friendly name of a level ("x86_64", "avx2", "avx512", "aarch64").
inline std::string isa_label(normkit::Isa level) {
  std::string s = normkit::isa_name(level);
  for (char& c : s) c = (c == '-') ? '_' : c;
  return s;
}

/// Base of tests parameterized by ISA level: the level is in force during the test body.
class PerIsa : public ::testing::TestWithParam<normkit::Isa> {
 protected:
  void SetUp() override { scope_ = std::make_unique<IsaScope>(GetParam()); }
  void TearDown() override { scope_.reset(); }

 private:
  std::unique_ptr<IsaScope> scope_;
};

}  // namespace normkit_test

/// Instantiates the PerIsa-derived suite `Suite` once per supported level.
#define NORMKIT_INSTANTIATE_PER_ISA(Suite)                                              \
  INSTANTIATE_TEST_SUITE_P(Isa, Suite, ::testing::ValuesIn(normkit_test::isa_levels()), \
                           [](const ::testing::TestParamInfo<normkit::Isa>& p) {        \
                             return normkit_test::isa_label(p.param);                   \
                           })

#endif  // NORMKIT_TESTS_SUPPORT_ISA_PARAM_HPP_
