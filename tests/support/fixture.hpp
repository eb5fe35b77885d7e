// Parser for normkit's golden-value fixture files (tests/fixtures/*.txt).
//
// The files are written by tools/fixtures/gen_fixtures.cpp (libtorch 1.13);
// the format is described in tools/fixtures/README.md. Header-only, C++17,
// standard library only. Besides the normalization modules, the parser knows the
// records of rms_norm.txt (module RMSNorm), bf16.txt (dtype bfloat16) and fold.txt
// (modules FuseConvBN and FuseLinearBN).
//
//   auto cases = normkit_test::load_fixtures("tests/fixtures/batch_norm.txt");
//   for (const auto& c : cases) {
//     if (c.module != "BatchNorm2d") continue;
//     double eps = c.opt_double("eps");
//     std::optional<double> momentum = c.opt_momentum();   // nullopt == "none"
//     for (const auto& s : c.steps) {
//       const auto& x = s.at("x");                           // dims + row-major values
//       if (s.has("dx")) { ... }
//     }
//   }
//
// Malformed input throws std::runtime_error("<file>:<line>: <what>").
#ifndef NORMKIT_TESTS_SUPPORT_FIXTURE_HPP
#define NORMKIT_TESTS_SUPPORT_FIXTURE_HPP

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <fstream>
#include <istream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace normkit_test {

struct FixtureTensor {
  std::vector<long> dims;      // empty for a 0-d tensor
  std::vector<double> values;  // row-major (PyTorch contiguous); float32 values are exact

  std::size_t rank() const { return dims.size(); }
  std::size_t numel() const {
    std::size_t n = 1;
    for (long d : dims) n *= static_cast<std::size_t>(d);
    return n;
  }
};

struct FixtureStep {
  bool train = false;
  std::map<std::string, FixtureTensor>
      tensors;                            // x, y, dy, dx, dweight, dbias, running_mean, running_var
  std::map<std::string, long long> ints;  // num_batches_tracked
  long line = 0;                          // line of the "step" keyword

  bool has(const std::string& name) const { return tensors.count(name) != 0; }
  const FixtureTensor& at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end())
      throw std::runtime_error("fixture step (line " + std::to_string(line) + ") has no tensor '" +
                               name + "'");
    return it->second;
  }
  bool has_int(const std::string& name) const { return ints.count(name) != 0; }
  long long int_at(const std::string& name) const {
    auto it = ints.find(name);
    if (it == ints.end())
      throw std::runtime_error("fixture step (line " + std::to_string(line) + ") has no int '" +
                               name + "'");
    return it->second;
  }
};

namespace detail {

inline bool parse_double(const std::string& tok, double& out) {
  if (tok.empty())
    return false;
  const char* begin = tok.c_str();
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(begin, &end);
  // ERANGE on underflow (subnormals) is fine: the value is still the exact one.
  if (end != begin + tok.size())
    return false;
  out = v;
  return true;
}

inline bool parse_ll(const std::string& tok, long long& out) {
  if (tok.empty())
    return false;
  const char* begin = tok.c_str();
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(begin, &end, 10);
  if (errno == ERANGE || end != begin + tok.size())
    return false;
  out = v;
  return true;
}

inline bool parse_long(const std::string& tok, long& out) {
  if (tok.empty())
    return false;
  const char* begin = tok.c_str();
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(begin, &end, 10);
  if (errno == ERANGE || end != begin + tok.size())
    return false;
  out = v;
  return true;
}

inline bool is_bn_or_in(const std::string& m) {
  return m == "BatchNorm1d" || m == "BatchNorm2d" || m == "BatchNorm3d" || m == "InstanceNorm1d" ||
         m == "InstanceNorm2d" || m == "InstanceNorm3d";
}

inline bool is_known_module(const std::string& m) {
  return is_bn_or_in(m) || m == "LayerNorm" || m == "GroupNorm" || m == "RMSNorm" ||
         m == "FuseConvBN" || m == "FuseLinearBN";
}

inline bool is_known_dtype(const std::string& d) {
  return d == "float32" || d == "float64" || d == "bfloat16";
}

inline std::vector<std::string> required_opts(const std::string& m) {
  if (is_bn_or_in(m))
    return {"num_features", "eps", "momentum", "affine", "track_running_stats"};
  if (m == "LayerNorm")
    return {"normalized_shape", "eps", "elementwise_affine"};
  if (m == "GroupNorm")
    return {"num_groups", "num_channels", "eps", "affine"};
  if (m == "RMSNorm")
    return {"normalized_shape", "eps", "eps_effective", "elementwise_affine"};
  if (m == "FuseConvBN")
    return {"layer",     "in_channels",     "out_channels", "kernel_size", "stride",
            "padding",   "output_padding",  "dilation",     "groups",      "bias",
            "transpose", "bn_num_features", "bn_eps",       "bn_affine"};
  if (m == "FuseLinearBN")
    return {"layer",           "in_features", "out_features", "bias",
            "bn_num_features", "bn_eps",      "bn_affine"};
  return {};
}

}  // namespace detail

struct FixtureCase {
  std::string name, module, dtype;
  std::map<std::string, std::vector<std::string>> opts;
  std::set<std::string> tags;
  std::map<std::string, FixtureTensor> init;   // weight, bias, running_mean, running_var
  std::map<std::string, long long> init_ints;  // num_batches_tracked
  std::vector<FixtureStep> steps;
  std::string file;
  long line = 0;  // line of the "case" keyword

  std::string where() const { return file + ":" + std::to_string(line) + " (case " + name + ")"; }
  bool is_float32() const { return dtype == "float32"; }
  bool is_float64() const { return dtype == "float64"; }
  bool is_bfloat16() const { return dtype == "bfloat16"; }
  bool has_tag(const std::string& t) const { return tags.count(t) != 0; }
  bool has_opt(const std::string& key) const { return opts.count(key) != 0; }

  const std::vector<std::string>& opt(const std::string& key) const {
    auto it = opts.find(key);
    if (it == opts.end())
      throw std::runtime_error(where() + ": no option '" + key + "'");
    return it->second;
  }
  const std::string& opt_single(const std::string& key) const {
    const auto& v = opt(key);
    if (v.size() != 1)
      throw std::runtime_error(where() + ": option '" + key + "' must have exactly one value");
    return v.front();
  }
  double opt_double(const std::string& key) const {
    double d = 0.0;
    if (!detail::parse_double(opt_single(key), d))
      throw std::runtime_error(where() + ": option '" + key + "' is not a number");
    return d;
  }
  long opt_int(const std::string& key) const {
    long v = 0;
    if (!detail::parse_long(opt_single(key), v))
      throw std::runtime_error(where() + ": option '" + key + "' is not an integer");
    return v;
  }
  bool opt_bool(const std::string& key) const {
    const std::string& s = opt_single(key);
    if (s == "1")
      return true;
    if (s == "0")
      return false;
    throw std::runtime_error(where() + ": option '" + key + "' must be 0 or 1");
  }
  // momentum: a number, or "none" (PyTorch momentum=None: cumulative moving average).
  std::optional<double> opt_momentum() const {
    if (opt_single("momentum") == "none")
      return std::nullopt;
    return opt_double("momentum");
  }
  // A number, or "none" (RMSNorm eps=None) as nullopt.
  std::optional<double> opt_double_or_none(const std::string& key) const {
    if (opt_single(key) == "none")
      return std::nullopt;
    return opt_double(key);
  }
  std::vector<long> opt_list(const std::string& key) const {
    std::vector<long> out;
    for (const auto& s : opt(key)) {
      long v = 0;
      if (!detail::parse_long(s, v))
        throw std::runtime_error(where() + ": option '" + key + "' has a non-integer element '" +
                                 s + "'");
      out.push_back(v);
    }
    return out;
  }
  bool has_init(const std::string& name_) const { return init.count(name_) != 0; }
  const FixtureTensor& init_at(const std::string& name_) const {
    auto it = init.find(name_);
    if (it == init.end())
      throw std::runtime_error(where() + ": no init tensor '" + name_ + "'");
    return it->second;
  }
};

// Parses fixture text; source_name is used in error messages only.
inline std::vector<FixtureCase> parse_fixtures(std::istream& in, const std::string& source_name) {
  std::vector<FixtureCase> cases;
  std::set<std::string> names;
  long lineno = 0;
  auto fail = [&](const std::string& what) -> void {
    throw std::runtime_error(source_name + ":" + std::to_string(lineno) + ": " + what);
  };

  // "<name> <rank> <d0..> : <values>" starting at toks[1].
  auto parse_tensor = [&](const std::vector<std::string>& toks, std::string& name_out,
                          FixtureTensor& t) {
    if (toks.size() < 4)
      fail("truncated '" + toks[0] + "' line");
    name_out = toks[1];
    long rank = 0;
    if (!detail::parse_long(toks[2], rank) || rank < 0)
      fail("bad rank '" + toks[2] + "'");
    const std::size_t r = static_cast<std::size_t>(rank);
    if (toks.size() < 4 + r)
      fail("truncated '" + toks[0] + "' line (expected " + toks[2] + " dims)");
    std::size_t numel = 1;
    for (std::size_t i = 0; i < r; ++i) {
      long d = 0;
      if (!detail::parse_long(toks[3 + i], d) || d < 0)
        fail("bad dimension '" + toks[3 + i] + "'");
      t.dims.push_back(d);
      numel *= static_cast<std::size_t>(d);
    }
    if (toks[3 + r] != ":")
      fail("expected ':' after the dims of '" + name_out + "', got '" + toks[3 + r] + "'");
    const std::size_t nvals = toks.size() - 4 - r;
    if (nvals != numel)
      fail("tensor '" + name_out + "' has " + std::to_string(nvals) + " values, dims need " +
           std::to_string(numel));
    t.values.reserve(numel);
    for (std::size_t i = 4 + r; i < toks.size(); ++i) {
      double v = 0.0;
      if (!detail::parse_double(toks[i], v))
        fail("bad number '" + toks[i] + "' in tensor '" + name_out + "'");
      t.values.push_back(v);
    }
  };

  enum class State { Outside, InCase, InStep };
  State state = State::Outside;
  FixtureCase cur;
  FixtureStep step;
  std::string line;

  while (std::getline(in, line)) {
    ++lineno;
    std::vector<std::string> toks;
    {
      std::istringstream ls(line);
      std::string tok;
      while (ls >> tok) {
        if (tok[0] == '#')
          break;  // comment (whole line or trailing)
        toks.push_back(tok);
      }
    }
    if (toks.empty())
      continue;
    const std::string& kw = toks[0];

    if (state == State::Outside) {
      if (kw != "case")
        fail("expected 'case', got '" + kw + "'");
      if (toks.size() != 2)
        fail("'case' needs exactly one name");
      if (!names.insert(toks[1]).second)
        fail("duplicate case name '" + toks[1] + "'");
      cur = FixtureCase{};
      cur.name = toks[1];
      cur.file = source_name;
      cur.line = lineno;
      state = State::InCase;
      continue;
    }

    if (state == State::InStep) {
      if (kw == "tensor") {
        std::string nm;
        FixtureTensor t;
        parse_tensor(toks, nm, t);
        if (!step.tensors.emplace(nm, std::move(t)).second)
          fail("duplicate tensor '" + nm + "' in step");
      } else if (kw == "int") {
        long long v = 0;
        if (toks.size() != 3 || !detail::parse_ll(toks[2], v))
          fail("malformed 'int' line");
        if (!step.ints.emplace(toks[1], v).second)
          fail("duplicate int '" + toks[1] + "' in step");
      } else if (kw == "endstep") {
        if (toks.size() != 1)
          fail("'endstep' takes no arguments");
        if (!step.has("x"))
          fail("step without tensor 'x'");
        if (!step.has("y"))
          fail("step without tensor 'y'");
        cur.steps.push_back(std::move(step));
        step = FixtureStep{};
        state = State::InCase;
      } else {
        fail("unexpected '" + kw + "' inside a step (missing 'endstep'?)");
      }
      continue;
    }

    // State::InCase
    if (kw == "module") {
      if (toks.size() != 2)
        fail("'module' needs exactly one value");
      if (!detail::is_known_module(toks[1]))
        fail("unknown module '" + toks[1] + "'");
      if (!cur.module.empty())
        fail("duplicate 'module'");
      cur.module = toks[1];
    } else if (kw == "dtype") {
      if (toks.size() != 2 || !detail::is_known_dtype(toks[1]))
        fail("'dtype' must be float32, float64 or bfloat16");
      if (!cur.dtype.empty())
        fail("duplicate 'dtype'");
      cur.dtype = toks[1];
    } else if (kw == "opt") {
      if (toks.size() < 3)
        fail("'opt' needs a key and at least one value");
      if (!cur.steps.empty())
        fail("'opt' after the first step");
      std::vector<std::string> vals(toks.begin() + 2, toks.end());
      if (!cur.opts.emplace(toks[1], std::move(vals)).second)
        fail("duplicate option '" + toks[1] + "'");
    } else if (kw == "tag") {
      if (toks.size() != 2)
        fail("'tag' needs exactly one word");
      cur.tags.insert(toks[1]);
    } else if (kw == "init") {
      if (!cur.steps.empty())
        fail("'init' after the first step");
      std::string nm;
      FixtureTensor t;
      parse_tensor(toks, nm, t);
      if (!cur.init.emplace(nm, std::move(t)).second)
        fail("duplicate init '" + nm + "'");
    } else if (kw == "initint") {
      long long v = 0;
      if (toks.size() != 3 || !detail::parse_ll(toks[2], v))
        fail("malformed 'initint' line");
      if (!cur.steps.empty())
        fail("'initint' after the first step");
      if (!cur.init_ints.emplace(toks[1], v).second)
        fail("duplicate initint '" + toks[1] + "'");
    } else if (kw == "step") {
      if (toks.size() != 2 || (toks[1] != "train" && toks[1] != "eval"))
        fail("'step' must be train or eval");
      step = FixtureStep{};
      step.train = toks[1] == "train";
      step.line = lineno;
      state = State::InStep;
    } else if (kw == "end") {
      if (toks.size() != 1)
        fail("'end' takes no arguments");
      if (cur.module.empty())
        fail("case '" + cur.name + "' has no 'module'");
      if (cur.dtype.empty())
        fail("case '" + cur.name + "' has no 'dtype'");
      for (const auto& k : detail::required_opts(cur.module))
        if (!cur.has_opt(k))
          fail("case '" + cur.name + "' lacks option '" + k + "'");
      if (cur.steps.empty())
        fail("case '" + cur.name + "' has no steps");
      cases.push_back(std::move(cur));
      cur = FixtureCase{};
      state = State::Outside;
    } else {
      fail("unexpected '" + kw + "' inside a case");
    }
  }
  if (in.bad())
    fail("read error");
  if (state != State::Outside)
    fail("unexpected end of file inside case '" + cur.name + "'");
  return cases;
}

// Loads one fixture file. Throws std::runtime_error("<path>:<line>: ...") on malformed input.
inline std::vector<FixtureCase> load_fixtures(const std::string& path) {
  std::ifstream f(path);
  if (!f)
    throw std::runtime_error(path + ": cannot open fixture file");
  return parse_fixtures(f, path);
}

}  // namespace normkit_test

#endif  // NORMKIT_TESTS_SUPPORT_FIXTURE_HPP
