// Self-test for tests/support/fixture.hpp (no gtest).
//
//   c++ -std=c++17 -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror
//       -I tests/support tests/support/fixture_selftest.cpp -o /tmp/fixture_selftest
//   /tmp/fixture_selftest tests/fixtures
//
// Runs a few malformed-input checks on the parser, then parses every *.txt in
// the directory and prints the case count per file, module and dtype. Exits
// non-zero on any parse error (or when the directory holds no fixture files).
#include <algorithm>
#include <cmath>
#include <cstdio>
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
              mutations.size() + 1);
  return failures;
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
