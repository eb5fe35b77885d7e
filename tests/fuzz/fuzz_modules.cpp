// normkit fuzz target (libFuzzer): modules x options x shapes x storage orders x values x call
// sequences. Checks: no crash/sanitizer report; rejected calls throw std::invalid_argument and
// leave the module bit-identical; batch-statistics forwards match a double reference; finite
// inputs never give NaN except the PyTorch-defined 0/0 cases. Set NORMKIT_FUZZ_VERBOSE=1 to
// print the decoded input.
//
// ISA levels: the kernels run on normkit::isa(), chosen once per process (the CPU's best,
// capped by NORMKIT_ISA=baseline|avx2|avx512). LLVMFuzzerInitialize prints the level in force
// ("normkit fuzz_modules: ISA level = <level> ..."), and every input checks that it has not
// changed; tests/fuzz/run_fuzz.sh --per-isa runs the target once per level and checks that
// line. NORMKIT_FUZZ_LIST_ISAS=1 prints the levels this CPU supports and lacks, and exits.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include <normkit/normkit.hpp>

#include "support/reference.hpp"

namespace {

bool verbose() {
  static const bool v = std::getenv("NORMKIT_FUZZ_VERBOSE") != nullptr;
  return v;
}
#define FZLOG(...)                       \
  do {                                   \
    if (verbose())                       \
      std::fprintf(stderr, __VA_ARGS__); \
  } while (0)

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "\n*** normkit fuzz check failed: %s\n", what.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

// ---- bitwise module snapshot (as tests/support/state.hpp, without gtest) ----
using Blob = std::vector<unsigned char>;
template <class T>
Blob blob(const T& t) {
  Blob b(static_cast<std::size_t>(t.size()) * sizeof(typename T::Scalar) + sizeof(Eigen::Index));
  Eigen::Index n = t.size();
  std::memcpy(b.data(), &n, sizeof n);
  if (t.size())
    std::memcpy(b.data() + sizeof n, t.data(), b.size() - sizeof n);
  return b;
}
template <class V>
Blob vblob(const V& v) {
  Blob b(sizeof(V));
  std::memcpy(b.data(), &v, sizeof(V));
  return b;
}
template <class M, class = void>
struct has_running : std::false_type {};
template <class M>
struct has_running<M, std::void_t<decltype(std::declval<const M&>().running_mean())>>
    : std::true_type {};

template <class M>
std::vector<Blob> snapshot(const M& m) {
  std::vector<Blob> s;
  s.push_back(blob(m.weight()));
  s.push_back(blob(m.bias()));
  if constexpr (has_running<M>::value) {
    s.push_back(blob(m.running_mean()));
    s.push_back(blob(m.running_var()));
    s.push_back(vblob(static_cast<std::int64_t>(m.num_batches_tracked())));
  }
  s.push_back(vblob(m.is_training()));
  s.push_back(vblob(m.requires_grad()));
  s.push_back(blob(m.saved_stats().mean));
  s.push_back(blob(m.saved_stats().rstd));
  s.push_back(vblob(m.saved_stats().batch_stats));
  return s;
}

enum Kind { kBN1, kBN2, kIN1, kIN2, kLN, kGN, kNumKinds };
const char* kind_name(int k) {
  static const char* n[] = {"BatchNorm1d",    "BatchNorm2d", "InstanceNorm1d",
                            "InstanceNorm2d", "LayerNorm",   "GroupNorm"};
  return n[k];
}

struct Config {
  int kind = 0;
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;
  bool affine = true, tracking = true, channels_last = false, ln_bias = true;
  long C = 1, G = 1;
  std::vector<long> normalized;  // LayerNorm
};

template <class S>
S pick_value(FuzzedDataProvider& p, int mode) {
  switch (mode) {
    case 0:
      return static_cast<S>(p.ConsumeIntegralInRange<int>(-8, 8)) / S(4);
    case 1:
      return static_cast<S>(p.ConsumeFloatingPointInRange<double>(-1e3, 1e3));
    default:
      break;
  }
  switch (p.ConsumeIntegralInRange<int>(0, 11)) {
    case 0:
      return std::numeric_limits<S>::quiet_NaN();
    case 1:
      return std::numeric_limits<S>::infinity();
    case 2:
      return -std::numeric_limits<S>::infinity();
    case 3:
      return std::numeric_limits<S>::denorm_min() * S(p.ConsumeIntegralInRange<int>(-3, 3));
    case 4:
      return S(1e30);
    case 5:
      return S(-1e30);
    case 6:
      return S(1e6);
    case 7:
      return S(-0.0);
    case 8:
      return S(1.0);
    default:
      return static_cast<S>(p.ConsumeFloatingPointInRange<double>(-10, 10));
  }
}

bool is_batched_axis0(int kind, int R) {
  if (kind == kIN1)
    return R == 3;
  if (kind == kIN2)
    return R == 4;
  return true;
}
// Physical axis of the channel dim.
int channel_axis(const Config& c, int R) {
  const bool batched = is_batched_axis0(c.kind, R);
  if (c.channels_last) {
    if (batched)
      return R >= 3 ? R - 1 : 1;
    return R >= 2 ? R - 1 : 0;
  }
  return batched ? 1 : 0;
}

template <class S, class M, int R, int L>
void run_module(M& m, const Config& c, FuzzedDataProvider& p, const std::array<long, R>& dims0) {
  using T = Eigen::Tensor<S, R, L>;
  using Vec = Eigen::Tensor<S, 1>;
  constexpr bool kRunning = has_running<M>::value;
  const bool is_ln = c.kind == kLN;

  // Optional custom parameters / running stats (setters are validated; sizes are right here).
  if (c.affine && p.ConsumeBool()) {
    Vec w(m.weight().size()), b(m.bias().size());
    static const double gammas[] = {1, -1, 0.5, 2, 1e-3, 3.75};
    for (Eigen::Index i = 0; i < w.size(); ++i)
      w(i) = S(gammas[p.ConsumeIntegralInRange<int>(0, 5)]);
    for (Eigen::Index i = 0; i < b.size(); ++i) b(i) = S(p.ConsumeIntegralInRange<int>(-4, 4));
    m.set_weight(w);
    if (b.size())
      m.set_bias(b);
  }
  if constexpr (kRunning) {
    if (c.tracking && p.ConsumeBool()) {
      Vec rv(m.running_var().size());
      for (Eigen::Index i = 0; i < rv.size(); ++i) rv(i) = S(p.ConsumeIntegralInRange<int>(0, 3));
      m.set_running_var(rv);
      FZLOG("  set_running_var(values in 0..3)\n");
    }
  }
  if (p.ConsumeIntegralInRange<int>(0, 7) == 0)
    m.set_requires_grad(false);

  const int ncalls = p.ConsumeIntegralInRange<int>(1, 4);
  std::array<long, R> dims = dims0;
  std::array<long, R> last_ok = dims0;  // dims of the last accepted forward
  bool have_ok = false;
  for (int call = 0; call < ncalls && p.remaining_bytes() > 0; ++call) {
    const int op = p.ConsumeIntegralInRange<int>(0, 9);
    if (op == 9) {
      if (p.ConsumeBool())
        m.train();
      else
        m.eval();
      FZLOG("  call %d: %s\n", call, m.is_training() ? "train()" : "eval()");
      continue;
    }
    if (op >= 7) {  // backward
      const bool bump = p.ConsumeIntegralInRange<int>(0, 3) == 0;
      std::array<long, R> dd = have_ok ? last_ok : dims;
      if (bump)
        dd[static_cast<std::size_t>(p.ConsumeIntegralInRange<int>(0, R - 1))] += 1;
      const bool mismatch = have_ok && dd != last_ok;
      T dy(dd);
      for (Eigen::Index i = 0; i < dy.size(); ++i) dy.data()[i] = pick_value<S>(p, 0);
      FZLOG("  call %d: backward(dy)%s\n", call, mismatch ? " [dims+1]" : "");
      const auto before = snapshot(m);
      try {
        auto g = m.backward(dy);
        (void)g;
        if (mismatch)
          fail("backward accepted a grad_output with the wrong dims");
      } catch (const std::invalid_argument& e) {
        FZLOG("    rejected: %s\n", e.what());
        if (snapshot(m) != before)
          fail(std::string("rejected backward changed the module: ") + e.what());
      } catch (const std::exception& e) {
        fail(std::string("backward threw a non-invalid_argument exception: ") + e.what());
      }
      continue;
    }
    // forward: maybe a new shape
    if (op >= 5) {
      for (int i = 0; i < R; ++i)
        dims[static_cast<std::size_t>(i)] = p.ConsumeIntegralInRange<long>(0, 5);
    }
    const int vmode = p.ConsumeIntegralInRange<int>(0, 2);
    const long numel = [&] {
      long n = 1;
      for (long d : dims) n *= d;
      return n;
    }();
    std::vector<double> logical(static_cast<std::size_t>(numel));
    T x(dims);
    bool finite = true, small = true;
    const bool repeat = p.ConsumeIntegralInRange<int>(0, 4) == 0;
    const S rep = pick_value<S>(p, vmode);
    {
      std::array<Eigen::Index, R> idx{};
      for (long li = 0; li < numel; ++li) {
        long r = li;
        for (int a = R - 1; a >= 0; --a) {
          idx[static_cast<std::size_t>(a)] = r % dims[static_cast<std::size_t>(a)];
          r /= dims[static_cast<std::size_t>(a)];
        }
        const S v = repeat && p.ConsumeBool() ? rep : pick_value<S>(p, vmode);
        x(idx) = v;
        logical[static_cast<std::size_t>(li)] = static_cast<double>(v);
        if (!std::isfinite(v))
          finite = false;
        if (!(std::fabs(static_cast<double>(v)) <= 1e6))
          small = false;
      }
    }
    const bool into_map = p.ConsumeIntegralInRange<int>(0, 5) == 0;
    const bool bad_map = into_map && p.ConsumeBool() && R >= 1;
    std::array<long, R> ydims = dims;
    if (bad_map)
      ydims[0] += 1;
    std::vector<S> ybuf(static_cast<std::size_t>([&] {
                          long n = 1;
                          for (long d : ydims) n *= d;
                          return n;
                        }()) +
                        1);
    Eigen::TensorMap<T> ymap(ybuf.data(), ydims);
    const bool training = m.is_training();
    if (verbose()) {
      std::fprintf(stderr, "  call %d: forward(%s) x dims [", call, training ? "train" : "eval");
      for (long d : dims) std::fprintf(stderr, "%ld ", d);
      std::fprintf(stderr, "] %s%s values:", into_map ? "into TensorMap" : "",
                   bad_map ? "(wrong dims)" : "");
      for (double v : logical) std::fprintf(stderr, " %.9g", v);
      std::fprintf(stderr, "\n");
    }
    // Channel mismatch must be rejected (BN/IN/GN).
    const int cax = channel_axis(c, R);
    const bool chan_mismatch = !is_ln && dims[static_cast<std::size_t>(cax)] != c.C;
    const auto before = snapshot(m);
    const Vec w0 = m.weight(), b0 = m.bias();
    Vec rm0, rv0;
    if constexpr (kRunning) {
      rm0 = m.running_mean();
      rv0 = m.running_var();
    }
    T y;
    try {
      if (into_map) {
        m.forward(x, ymap);
        y = ymap;
      } else {
        y = m.forward(x);
      }
    } catch (const std::invalid_argument& e) {
      FZLOG("    rejected: %s\n", e.what());
      if (snapshot(m) != before)
        fail(std::string("rejected forward changed the module: ") + e.what());
      continue;
    } catch (const std::exception& e) {
      fail(std::string("forward threw a non-invalid_argument exception: ") + e.what());
    }
    FZLOG("    accepted\n");
    last_ok = dims;
    have_ok = true;
    if (chan_mismatch)
      fail("forward accepted an input with the wrong channel count");
    if (bad_map)
      fail("forward accepted an output TensorMap with the wrong dims");
    for (int i = 0; i < R; ++i)
      if (y.dimension(static_cast<std::size_t>(i)) != dims[static_cast<std::size_t>(i)])
        fail("output dims differ from input dims");
    if (numel == 0)
      continue;

    // Slots (per-statistic groups) and affine index over the physical row-major enumeration.
    const bool batched = is_batched_axis0(c.kind, R);
    long slots = 1, inner = 1;
    std::vector<long> slot(static_cast<std::size_t>(numel)), aidx(static_cast<std::size_t>(numel));
    if (is_ln) {
      const int k = static_cast<int>(c.normalized.size());
      for (int a = R - k; a < R; ++a) inner *= dims[static_cast<std::size_t>(a)];
      slots = numel / inner;
      for (long li = 0; li < numel; ++li) {
        slot[static_cast<std::size_t>(li)] = li / inner;
        aidx[static_cast<std::size_t>(li)] = li % inner;
      }
    } else {
      const long N = batched ? dims[0] : 1;
      const long cpg = c.kind == kGN ? c.C / c.G : 1;
      slots = c.kind == kBN1 || c.kind == kBN2 ? c.C : c.kind == kGN ? N * c.G : N * c.C;
      for (long li = 0; li < numel; ++li) {
        long r = li, ch = 0, n = 0;
        for (int a = R - 1; a >= 0; --a) {
          const long d = dims[static_cast<std::size_t>(a)], v = r % d;
          r /= d;
          if (a == cax)
            ch = v;
          if (a == 0 && batched)
            n = v;
        }
        aidx[static_cast<std::size_t>(li)] = ch;
        slot[static_cast<std::size_t>(li)] = c.kind == kBN1 || c.kind == kBN2 ? ch
                                             : c.kind == kGN                  ? n * c.G + ch / cpg
                                                                              : n * c.C + ch;
      }
    }
    const bool batch_stats = is_ln || c.kind == kGN || training || !c.tracking;
    std::vector<double> mean, var;
    std::vector<double> ref = normkit_test::reference_normalize(
        logical.data(), numel, slots, [&](long i) { return slot[static_cast<std::size_t>(i)]; },
        c.eps, &mean, &var);
    std::vector<long> cnt(static_cast<std::size_t>(slots), 0);
    for (long s : slot) cnt[static_cast<std::size_t>(s)]++;
    std::vector<double> maxabs(static_cast<std::size_t>(slots), 0.0);
    std::vector<char> constant(static_cast<std::size_t>(slots), 1);  // all values exactly equal
    std::vector<double> first(static_cast<std::size_t>(slots),
                              std::numeric_limits<double>::quiet_NaN());
    for (long li = 0; li < numel; ++li) {
      const auto s = static_cast<std::size_t>(slot[static_cast<std::size_t>(li)]);
      const double v = logical[static_cast<std::size_t>(li)];
      if (std::isnan(first[s]))
        first[s] = v;
      else if (v != first[s])
        constant[s] = 0;
    }
    for (long li = 0; li < numel; ++li)
      maxabs[static_cast<std::size_t>(slot[static_cast<std::size_t>(li)])] =
          std::max(maxabs[static_cast<std::size_t>(slot[static_cast<std::size_t>(li)])],
                   std::fabs(logical[static_cast<std::size_t>(li)]));

    std::array<Eigen::Index, R> idx{};
    for (long li = 0; li < numel; ++li) {
      long r = li;
      for (int a = R - 1; a >= 0; --a) {
        idx[static_cast<std::size_t>(a)] = r % dims[static_cast<std::size_t>(a)];
        r /= dims[static_cast<std::size_t>(a)];
      }
      const double got = static_cast<double>(y(idx));
      const auto s = static_cast<std::size_t>(slot[static_cast<std::size_t>(li)]);
      const auto ai = aidx[static_cast<std::size_t>(li)];
      const double g = w0.size() ? static_cast<double>(w0(ai)) : 1.0;
      const double b = b0.size() ? static_cast<double>(b0(ai)) : 0.0;
      char where[160];
      std::snprintf(where, sizeof where,
                    " at logical-row-major element %ld (slot %zu): got %.9g, ref %.9g", li, s, got,
                    ref[static_cast<std::size_t>(li)] * g + b);
      if (batch_stats) {
        const bool degenerate =
            c.eps == 0 && (constant[s] || !(var[s] > std::numeric_limits<double>::min()));
        if (finite && std::isnan(got) && !degenerate)
          fail(std::string("NaN output for finite input") + where);
        // Reference comparison: finite, |x| <= 1e6, slice of > 1 element, not constant with eps 0
        // and well-conditioned (the variance is not lost to cancellation in S).
        const double scale = maxabs[s] * maxabs[s];
        const double tiny = (std::is_same<S, float>::value ? 1e-6 : 1e-13) * scale;
        if (finite && small && cnt[s] > 1 && !(c.eps == 0 && (var[s] == 0 || constant[s])) &&
            var[s] + c.eps > tiny) {
          const double want = ref[static_cast<std::size_t>(li)] * g + b;
          const double tol = (std::is_same<S, float>::value ? 1e-3 : 1e-9) * (1 + std::fabs(want));
          if (!(std::fabs(got - want) <= tol))
            fail(std::string("mismatch vs double reference") + where);
        }
      } else if constexpr (kRunning) {
        // Evaluation with running statistics: NaN only if the statistics are non-finite or
        // running_var + eps == 0 (PyTorch's 0/0).
        const auto ch = static_cast<Eigen::Index>(ai);
        const double rm = static_cast<double>(rm0(ch)), rv = static_cast<double>(rv0(ch));
        const bool ok_stats = std::isfinite(rm) && std::isfinite(rv) && rv + c.eps > 0 &&
                              std::fabs(logical[static_cast<std::size_t>(li)] - rm) < 1e300;
        if (finite && ok_stats && std::isnan(got))
          fail(std::string("NaN output in eval for finite input and stats") + where);
      }
    }
  }
}

template <class S, int R, int L>
void run_rank(const Config& c, FuzzedDataProvider& p) {
  std::array<long, R> dims{};
  for (int i = 0; i < R; ++i)
    dims[static_cast<std::size_t>(i)] = p.ConsumeIntegralInRange<long>(0, 5);
  // Usually make the channel (and LayerNorm trailing) dims match the module.
  if (c.kind != kLN && p.ConsumeIntegralInRange<int>(0, 4) != 0)
    dims[static_cast<std::size_t>(channel_axis(c, R))] = c.C;
  if (c.kind == kLN && p.ConsumeIntegralInRange<int>(0, 4) != 0 &&
      static_cast<int>(c.normalized.size()) <= R) {
    for (std::size_t i = 0; i < c.normalized.size(); ++i)
      dims[R - c.normalized.size() + i] = c.normalized[i];
  }
  try {
    switch (c.kind) {
      case kBN1:
        if constexpr (R == 2 || R == 3) {
          normkit::BatchNorm1d<S> m(normkit::BatchNormOptions(c.C)
                                        .eps(c.eps)
                                        .momentum(c.momentum)
                                        .affine(c.affine)
                                        .track_running_stats(c.tracking)
                                        .channels_last(c.channels_last));
          run_module<S, decltype(m), R, L>(m, c, p, dims);
        }
        break;
      case kBN2:
        if constexpr (R == 4) {
          normkit::BatchNorm2d<S> m(normkit::BatchNormOptions(c.C)
                                        .eps(c.eps)
                                        .momentum(c.momentum)
                                        .affine(c.affine)
                                        .track_running_stats(c.tracking)
                                        .channels_last(c.channels_last));
          run_module<S, decltype(m), R, L>(m, c, p, dims);
        }
        break;
      case kIN1:
        if constexpr (R == 2 || R == 3) {
          normkit::InstanceNorm1d<S> m(normkit::InstanceNormOptions(c.C)
                                           .eps(c.eps)
                                           .momentum(c.momentum)
                                           .affine(c.affine)
                                           .track_running_stats(c.tracking)
                                           .channels_last(c.channels_last));
          run_module<S, decltype(m), R, L>(m, c, p, dims);
        }
        break;
      case kIN2:
        if constexpr (R == 3 || R == 4) {
          normkit::InstanceNorm2d<S> m(normkit::InstanceNormOptions(c.C)
                                           .eps(c.eps)
                                           .momentum(c.momentum)
                                           .affine(c.affine)
                                           .track_running_stats(c.tracking)
                                           .channels_last(c.channels_last));
          run_module<S, decltype(m), R, L>(m, c, p, dims);
        }
        break;
      case kLN: {
        std::vector<normkit::Index> ns(c.normalized.begin(), c.normalized.end());
        normkit::LayerNorm<S> m(
            normkit::LayerNormOptions(ns).eps(c.eps).elementwise_affine(c.affine).bias(c.ln_bias));
        run_module<S, decltype(m), R, L>(m, c, p, dims);
        break;
      }
      case kGN:
        if constexpr (R >= 2) {
          normkit::GroupNorm<S> m(
              normkit::GroupNormOptions(c.G, c.C).eps(c.eps).affine(c.affine).channels_last(
                  c.channels_last));
          run_module<S, decltype(m), R, L>(m, c, p, dims);
        }
        break;
      default:
        break;
    }
  } catch (const std::invalid_argument& e) {
    // Construction rejected (invalid options) or a setter rejected: fine.
    FZLOG("  construction/setter rejected: %s\n", e.what());
  } catch (const std::exception& e) {
    fail(std::string("non-invalid_argument exception: ") + e.what());
  }
}

template <class S, int L>
void run_layout(int R, const Config& c, FuzzedDataProvider& p) {
  switch (R) {
    case 1:
      run_rank<S, 1, L>(c, p);
      break;
    case 2:
      run_rank<S, 2, L>(c, p);
      break;
    case 3:
      run_rank<S, 3, L>(c, p);
      break;
    default:
      run_rank<S, 4, L>(c, p);
      break;
  }
}

}  // namespace

namespace {

// The NORMKIT_ISA spelling of a level (isa_name() says "x86-64" for the baseline).
const char* env_name(normkit::Isa level) {
  switch (level) {
    case normkit::Isa::avx512:
      return "avx512";
    case normkit::Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

normkit::Isa g_isa = normkit::Isa::baseline;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  if (std::getenv("NORMKIT_FUZZ_LIST_ISAS") != nullptr) {
    std::string supported, lacking;
    for (normkit::Isa l : normkit::supported_isas())
      supported += std::string(supported.empty() ? "" : " ") + env_name(l);
    for (int i = static_cast<int>(normkit::cpu_isa()) + 1;
         i <= static_cast<int>(normkit::Isa::avx512); ++i)
      lacking += std::string(lacking.empty() ? "" : " ") + env_name(static_cast<normkit::Isa>(i));
    std::printf("normkit-isa-supported: %s\nnormkit-isa-lacking: %s\n", supported.c_str(),
                lacking.c_str());
    std::fflush(stdout);
    std::exit(0);
  }
  g_isa = normkit::isa();
  const char* env = std::getenv("NORMKIT_ISA");
  std::fprintf(stderr,
               "normkit fuzz_modules: ISA level = %s (%s); NORMKIT_ISA = %s; CPU best = %s\n",
               env_name(g_isa), normkit::isa_name(g_isa), env != nullptr ? env : "(unset)",
               env_name(normkit::cpu_isa()));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (normkit::isa() != g_isa)
    fail(std::string("the ISA level changed during the run: ") + normkit::isa_name(normkit::isa()) +
         ", started on " + normkit::isa_name(g_isa));
  FuzzedDataProvider p(data, size);
  Config c;
  c.kind = p.ConsumeIntegralInRange<int>(0, kNumKinds - 1);
  static const double epss[] = {1e-5, 0.0, 1e-3, 1.0, -1.0, 1e-12};
  c.eps = epss[p.ConsumeIntegralInRange<int>(0, 5)];
  switch (p.ConsumeIntegralInRange<int>(0, 4)) {
    case 0:
      c.momentum = 0.0;
      break;
    case 1:
      c.momentum = 0.1;
      break;
    case 2:
      c.momentum = 1.0;
      break;
    case 3:
      c.momentum = std::nullopt;
      break;
    default:
      c.momentum = 1.5;
      break;
  }
  c.affine = p.ConsumeBool();
  c.tracking = p.ConsumeBool();
  c.channels_last = p.ConsumeIntegralInRange<int>(0, 3) == 0;
  c.ln_bias = p.ConsumeBool();
  c.G = p.ConsumeIntegralInRange<long>(0, 3);
  c.C = c.kind == kGN ? c.G * p.ConsumeIntegralInRange<long>(0, 2) +
                            (p.ConsumeIntegralInRange<int>(0, 7) == 0 ? 1 : 0)
                      : p.ConsumeIntegralInRange<long>(0, 4);
  const bool dbl = p.ConsumeBool();
  const bool row = p.ConsumeBool();
  int R = 0;
  switch (c.kind) {
    case kBN1:
      R = p.ConsumeBool() ? 2 : 3;
      break;
    case kBN2:
      R = 4;
      break;
    case kIN1:
      R = p.ConsumeBool() ? 2 : 3;
      break;
    case kIN2:
      R = p.ConsumeBool() ? 3 : 4;
      break;
    case kLN: {
      R = p.ConsumeIntegralInRange<int>(1, 4);
      const int k = p.ConsumeIntegralInRange<int>(1, R);
      for (int i = 0; i < k; ++i) c.normalized.push_back(p.ConsumeIntegralInRange<long>(0, 4));
      break;
    }
    default:
      R = p.ConsumeIntegralInRange<int>(2, 4);
      break;
  }
  if (verbose()) {
    std::fprintf(
        stderr,
        "%s<%s> rank %d %s eps=%g momentum=%s affine=%d tracking=%d channels_last=%d C=%ld G=%ld",
        kind_name(c.kind), dbl ? "double" : "float", R, row ? "RowMajor" : "ColMajor", c.eps,
        c.momentum ? std::to_string(*c.momentum).c_str() : "none", c.affine, c.tracking,
        c.channels_last, c.C, c.G);
    if (c.kind == kLN) {
      std::fprintf(stderr, " normalized_shape=[");
      for (long d : c.normalized) std::fprintf(stderr, "%ld ", d);
      std::fprintf(stderr, "] bias=%d", c.ln_bias);
    }
    std::fprintf(stderr, "\n");
  }
  if (dbl) {
    if (row)
      run_layout<double, Eigen::RowMajor>(R, c, p);
    else
      run_layout<double, Eigen::ColMajor>(R, c, p);
  } else {
    if (row)
      run_layout<float, Eigen::RowMajor>(R, c, p);
    else
      run_layout<float, Eigen::ColMajor>(R, c, p);
  }
  return 0;
}
