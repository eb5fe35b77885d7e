// Self-test for tests/support/fixture.hpp (no gtest).
//
//   c++ -std=c++17 -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror
//       -I tests/support tests/support/fixture_selftest.cpp -o /tmp/fixture_selftest
//   /tmp/fixture_selftest tests/fixtures
//
// Runs a few malformed-input checks on the parser, then parses every *.txt in
// the directory and prints the case count per file, module and dtype. The
// records of rms_norm.txt, bf16.txt and fold.txt also get structure checks
// (required tensors and shapes; bfloat16/float32 inputs exactly representable).
// Exits non-zero on any parse or structure error (or when the directory holds
// no fixture files).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "fixture.hpp"

namespace {

const char* const kGood =
    "# comment\n"
    "case ok\n"
    "module BatchNorm1d\n"
    "dtype float64\n"
    "opt num_features 2\n"
    "opt eps 1e-05\n"
    "opt momentum none\n"
    "opt affine 1\n"
    "opt track_running_stats 1\n"
    "tag nan\n"
    "init running_var 1 2 : 0x1p+0 0x1.8p+0\n"
    "initint num_batches_tracked 2\n"
    "step train\n"
    "tensor x 2 2 2 : 0x1p-1 -0x1.8p+1 nan -inf\n"
    "tensor y 2 2 2 : 0x0p+0 -0x0p+0 inf 1e-3\n"
    "int num_batches_tracked 3\n"
    "endstep\n"
    "end\n";

// RMSNorm with eps none, and a bfloat16 record.
const char* const kGoodNew =
    "case rms\n"
    "module RMSNorm\n"
    "dtype float32\n"
    "opt normalized_shape 2\n"
    "opt eps none\n"
    "opt eps_effective 1.1920928955078125e-07\n"
    "opt elementwise_affine 0\n"
    "step train\n"
    "tensor x 1 2 : 0x1p+0 -0x1p+0\n"
    "tensor y 1 2 : 0x1p+0 -0x1p+0\n"
    "endstep\n"
    "end\n"
    "case bf\n"
    "module LayerNorm\n"
    "dtype bfloat16\n"
    "opt normalized_shape 2\n"
    "opt eps 1e-05\n"
    "opt elementwise_affine 0\n"
    "opt param_dtype bfloat16\n"
    "step train\n"
    "tensor x 1 2 : 0x1.8p+0 -0x1p+0\n"
    "tensor y 1 2 : 0x1p+0 -0x1p+0\n"
    "tensor y_ref 1 2 : 0x1.fffffp-1 -0x1.fffffp-1\n"
    "endstep\n"
    "end\n";

int check_parser() {
  int failures = 0;
  // The well-formed sample must parse to the expected values.
  try {
    std::istringstream in(kGood);
    auto cs = normkit_test::parse_fixtures(in, "<good>");
    const auto& c = cs.at(0);
    const auto& x = c.steps.at(0).at("x");
    bool ok = cs.size() == 1 && c.module == "BatchNorm1d" && !c.opt_momentum().has_value() &&
              c.opt_bool("affine") && c.opt_int("num_features") == 2 &&
              c.opt_double("eps") == 1e-5 && c.has_tag("nan") &&
              c.init_at("running_var").values.at(1) == 1.5 &&
              c.init_ints.at("num_batches_tracked") == 2 && x.dims == std::vector<long>{2, 2} &&
              x.values[0] == 0.5 && x.values[1] == -3.0 && std::isnan(x.values[2]) &&
              std::isinf(x.values[3]) && x.values[3] < 0 && c.steps[0].train &&
              c.steps[0].int_at("num_batches_tracked") == 3 && c.steps[0].at("y").values[3] == 1e-3;
    if (!ok) {
      std::printf("parser self-check: well-formed sample parsed wrongly\n");
      ++failures;
    }
  } catch (const std::exception& e) {
    std::printf("parser self-check: well-formed sample rejected: %s\n", e.what());
    ++failures;
  }

  try {
    std::istringstream in(kGoodNew);
    auto cs = normkit_test::parse_fixtures(in, "<good-new>");
    bool ok = cs.size() == 2 && cs[0].module == "RMSNorm" &&
              !cs[0].opt_double_or_none("eps").has_value() &&
              cs[0].opt_double("eps_effective") == 0x1p-23 && cs[1].is_bfloat16() &&
              cs[1].steps.at(0).at("y_ref").values.at(0) == 0x1.fffffp-1;
    if (!ok) {
      std::printf("parser self-check: RMSNorm/bfloat16 sample parsed wrongly\n");
      ++failures;
    }
  } catch (const std::exception& e) {
    std::printf("parser self-check: RMSNorm/bfloat16 sample rejected: %s\n", e.what());
    ++failures;
  }
  for (const auto& m : std::vector<std::pair<std::string, std::string>>{
           {"opt eps_effective 1.1920928955078125e-07\n", ""},
           {"dtype bfloat16", "dtype float16"},
       }) {
    std::string text = kGoodNew;
    text.replace(text.find(m.first), m.first.size(), m.second);
    try {
      std::istringstream in(text);
      normkit_test::parse_fixtures(in, "<mutated-new>");
      std::printf("parser self-check: accepted malformed input ('%s' -> '%s')\n", m.first.c_str(),
                  m.second.c_str());
      ++failures;
    } catch (const std::runtime_error&) {
      // expected
    }
  }

  // Each mutation must be rejected.
  const std::vector<std::pair<std::string, std::string>> mutations = {
      {"tensor x 2 2 2 : 0x1p-1 -0x1.8p+1 nan -inf", "tensor x 2 2 2 : 0x1p-1 -0x1.8p+1 nan"},
      {"tensor x 2 2 2 : 0x1p-1 -0x1.8p+1 nan -inf", "tensor x 2 2 2 0x1p-1 -0x1.8p+1 nan -inf"},
      {"tensor x 2 2 2 : 0x1p-1", "tensor x 2 2 2 : 0x1q-1"},
      {"tensor x 2 2 2", "tensor x -1 2 2"},
      {"opt momentum none\n", ""},
      {"module BatchNorm1d", "module BatchNorm4d"},
      {"dtype float64", "dtype float16"},
      {"endstep\nend\n", "endstep\n"},
      {"endstep\n", ""},
      {"step train", "step test"},
      {"int num_batches_tracked 3", "int num_batches_tracked 3.5"},
      {"case ok", "case"},
      {"tensor y", "tensor x"},
  };
  for (const auto& m : mutations) {
    std::string text = kGood;
    const auto pos = text.find(m.first);
    if (pos == std::string::npos) {
      std::printf("parser self-check: mutation pattern '%s' not found\n", m.first.c_str());
      ++failures;
      continue;
    }
    text.replace(pos, m.first.size(), m.second);
    try {
      std::istringstream in(text);
      normkit_test::parse_fixtures(in, "<mutated>");
      std::printf("parser self-check: accepted malformed input ('%s' -> '%s')\n", m.first.c_str(),
                  m.second.c_str());
      ++failures;
    } catch (const std::runtime_error&) {
      // expected
    }
  }
  // Duplicate case names.
  try {
    std::istringstream in(std::string(kGood) + kGood);
    normkit_test::parse_fixtures(in, "<dup>");
    std::printf("parser self-check: accepted duplicate case names\n");
    ++failures;
  } catch (const std::runtime_error&) {
  }
  std::printf("parser self-check: %s (%zu malformed inputs rejected)\n", failures ? "FAILED" : "ok",
              mutations.size() + 3);
  return failures;
}

// ---- structure checks for the RMSNorm, bfloat16 and fold records

bool f32_exact(double v) {
  return std::isnan(v) || static_cast<double>(static_cast<float>(v)) == v;
}
bool bf16_exact(double v) {
  if (!f32_exact(v))
    return false;
  const float f = static_cast<float>(v);
  std::uint32_t bits = 0;
  std::memcpy(&bits, &f, sizeof bits);
  return std::isnan(v) || (bits & 0xffffu) == 0;
}

struct Checker {
  const normkit_test::FixtureCase& c;
  int errors = 0;

  void fail(const std::string& what) {
    std::fprintf(stderr, "structure error: %s: %s\n", c.where().c_str(), what.c_str());
    ++errors;
  }
  const normkit_test::FixtureTensor* need(const normkit_test::FixtureStep& s,
                                          const std::string& name) {
    if (!s.has(name)) {
      fail("step lacks tensor '" + name + "'");
      return nullptr;
    }
    return &s.at(name);
  }
  void same_dims(const normkit_test::FixtureTensor* a,
                 const normkit_test::FixtureTensor* b,
                 const std::string& what) {
    if (a && b && a->dims != b->dims)
      fail(what + ": dims differ");
  }
  void exact(const normkit_test::FixtureTensor* t, bool bf16, const std::string& name) {
    if (!t)
      return;
    for (double v : t->values)
      if (!(bf16 ? bf16_exact(v) : f32_exact(v))) {
        fail(name + " holds a value that is not " + (bf16 ? "bfloat16" : "float32"));
        return;
      }
  }
};

// Returns the number of errors (0 for cases of the older families: nothing to check).
int check_structure(const normkit_test::FixtureCase& c) {
  Checker k{c};
  if (c.module == "RMSNorm") {
    const std::vector<long> ns = c.opt_list("normalized_shape");
    const bool affine = c.opt_bool("elementwise_affine");
    const auto eps = c.opt_double_or_none("eps");
    const double eff = c.opt_double("eps_effective");
    const double want = eps ? *eps : c.is_float32() ? 0x1p-23 : 0x1p-52;
    if (eff != want)
      k.fail("eps_effective does not match eps/dtype");
    if (c.has_init("weight")) {
      if (!affine || c.init_at("weight").dims != ns)
        k.fail("init weight without affine or with dims != normalized_shape");
      if (c.is_float32())
        k.exact(&c.init_at("weight"), false, "init weight");
    }
    for (const auto& s : c.steps) {
      const auto* x = k.need(s, "x");
      for (const char* n : {"y", "dy", "dx"}) k.same_dims(x, k.need(s, n), n);
      if (affine)
        k.need(s, "dweight");
      else if (s.has("dweight"))
        k.fail("dweight without elementwise_affine");
      if (x && (x->dims.size() < ns.size() ||
                !std::equal(ns.begin(), ns.end(), x->dims.end() - static_cast<long>(ns.size()))))
        k.fail("x does not end in normalized_shape");
      if (c.is_float32()) {
        k.exact(x, false, "x");
        k.exact(k.need(s, "dy"), false, "dy");
      }
    }
  } else if (c.is_bfloat16()) {
    const std::string pd = c.has_opt("param_dtype") ? c.opt_single("param_dtype") : "";
    if (pd != "bfloat16" && pd != "float32")
      k.fail("bfloat16 case needs 'opt param_dtype bfloat16|float32'");
    for (const auto& kv : c.init) k.exact(&kv.second, true, "init " + kv.first);
    for (const auto& s : c.steps) {
      const auto* x = k.need(s, "x");
      k.exact(x, true, "x");
      for (const char* n : {"y", "dy", "dx"}) {
        const auto* t = k.need(s, n);
        k.same_dims(x, t, n);
        k.exact(t, true, n);
      }
      for (const char* n : {"y", "dx"}) k.same_dims(x, k.need(s, std::string(n) + "_ref"), n);
      for (const auto& kv : s.tensors) {
        const std::string& n = kv.first;
        if (n == "x" || n == "dy" || (n.size() > 4 && n.compare(n.size() - 4, 4, "_ref") == 0))
          continue;
        k.same_dims(&kv.second, k.need(s, n + "_ref"), n + "_ref");
        if (pd == "bfloat16")
          k.exact(&kv.second, true, n);
        else
          k.exact(&kv.second, false, n);
      }
    }
  } else if (c.module == "FuseConvBN" || c.module == "FuseLinearBN") {
    const long out = c.opt_int("bn_num_features");
    const std::vector<long> vec{out};
    if (!c.has_init("weight"))
      k.fail("no init weight");
    else if (c.init_at("weight").dims.at(c.opt_single("layer") == "ConvTranspose2d" ? 1 : 0) != out)
      k.fail("weight's output-channel axis != bn_num_features");
    if (c.has_init("bias") != c.opt_bool("bias"))
      k.fail("init bias present iff opt bias 1");
    for (const char* n : {"bn_weight", "bn_bias"})
      if (c.has_init(n) != c.opt_bool("bn_affine"))
        k.fail(std::string("init ") + n + " present iff opt bn_affine 1");
    for (const char* n : {"bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var"})
      if (c.has_init(n) && c.init_at(n).dims != vec)
        k.fail(std::string("init ") + n + " dims != {bn_num_features}");
    if (!c.has_init("bn_running_mean") || !c.has_init("bn_running_var"))
      k.fail("no running statistics");
    for (const auto& s : c.steps) {
      k.need(s, "x");
      const auto* y = k.need(s, "y");
      k.same_dims(y, k.need(s, "y_fused"), "y_fused");
      if (c.has_init("weight"))
        k.same_dims(&c.init_at("weight"), k.need(s, "fused_weight"), "fused_weight");
      const auto* fb = k.need(s, "fused_bias");
      if (fb && fb->dims != vec)
        k.fail("fused_bias dims != {bn_num_features}");
    }
  }
  return k.errors;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <fixture-dir>\n", argv[0]);
    return 2;
  }
  int failures = check_parser();

  namespace fs = std::filesystem;
  std::vector<fs::path> files;
  try {
    for (const auto& e : fs::directory_iterator(argv[1]))
      if (e.is_regular_file() && e.path().extension() == ".txt")
        files.push_back(e.path());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "error: no *.txt fixture files in %s\n", argv[1]);
    return 1;
  }

  std::size_t total = 0;
  for (const auto& p : files) {
    try {
      const auto cases = normkit_test::load_fixtures(p.string());
      std::map<std::string, std::map<std::string, int>> counts;  // module -> dtype -> n
      std::size_t steps = 0;
      for (const auto& c : cases) {
        ++counts[c.module][c.dtype];
        steps += c.steps.size();
        failures += check_structure(c);
      }
      std::printf("%s: %zu cases, %zu steps\n", p.filename().string().c_str(), cases.size(), steps);
      for (const auto& m : counts) {
        std::printf("  %-16s", m.first.c_str());
        for (const auto& d : m.second) std::printf(" %s=%d", d.first.c_str(), d.second);
        std::printf("\n");
      }
      total += cases.size();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "parse error: %s\n", e.what());
      ++failures;
    }
  }
  std::printf("total: %zu cases in %zu files\n", total, files.size());
  return failures ? 1 : 0;
}
