// Soak test (issue #15): thousands of calls on long-lived modules -- forward and every backward
// form, over random shapes (the ranks each module accepts), train/eval, requires_grad,
// keep_input, RowMajor / ColMajor / channels_last storage, float and double, the calling thread
// or a pool of 1, 2 or 3 threads, and every ISA level this CPU supports (set_isa per step).
// Checks, at every step:
//  (a) the long-lived module's results are bitwise those of a fresh module in the same state
//      (same options, parameters and buffers, and the last kept training forward replayed),
//      run on the calling thread at the same ISA level: forward outputs, all three gradients,
//      running statistics, num_batches_tracked and the saved statistics;
//  (b) resident memory stops growing once warmed up (/proc/self/statm, checked only without
//      sanitizers, whose allocators hold freed memory on purpose);
//  (c) valid calls never throw, and a few invalid ones throw std::invalid_argument and leave
//      the module bit-identical.
// NORMKIT_SOAK_SECONDS (default 5) sets the duration, NORMKIT_SOAK_SEED (default 1) the seed;
// NORMKIT_SOAK_VERBOSE=1 prints every step (a failure names its step, module and call).
// Registered with the ctest label "soak": CI runs `NORMKIT_SOAK_SECONDS=60 ctest -L soak`.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <normkit/normkit.hpp>

#include "support/state.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NORMKIT_SOAK_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define NORMKIT_SOAK_SANITIZED 1
#endif
#endif
#ifndef NORMKIT_SOAK_SANITIZED
#define NORMKIT_SOAK_SANITIZED 0
#endif

namespace {

using Index = Eigen::Index;
using normkit::Isa;

// ---- settings, failures, memory ----

double env_number(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0)
    return fallback;
  char* end = nullptr;
  const double d = std::strtod(v, &end);
  return end != v && d >= 0 ? d : fallback;
}

// A failed check: thrown to the test body, which reports it with the step's description. Not a
// std::exception, so that the harness's own catch clauses never take it for the module's.
struct SoakFailure {
  std::string what;
};
[[noreturn]] void soak_fail(const std::string& what) {
  throw SoakFailure{what};
}

// Resident set size now (/proc/self/statm), and its peak (getrusage).
long long rss_bytes() {
  long long size = 0, resident = 0;
  if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%lld %lld", &size, &resident) != 2)
      resident = 0;
    std::fclose(f);
  }
  return resident * static_cast<long long>(sysconf(_SC_PAGESIZE));
}
long long peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<long long>(u.ru_maxrss) * 1024;
}
double mib(long long bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : g_(seed) {}
  int below(int n) { return static_cast<int>(g_() % static_cast<std::uint64_t>(n)); }
  int range(int lo, int hi) { return lo + below(hi - lo + 1); }
  bool chance(double p) { return std::uniform_real_distribution<double>(0.0, 1.0)(g_) < p; }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g_); }
  template <class T>
  const T& pick(const std::vector<T>& v) {
    return v[static_cast<std::size_t>(below(static_cast<int>(v.size())))];
  }

 private:
  std::mt19937_64 g_;
};

// ---- the modules ----

enum class Family { batch, instance, layer, group };

template <class M>
struct Traits;
template <class S, int D>
struct Traits<normkit::BatchNorm<S, D>> {
  using Scalar = S;
  static constexpr Family family = Family::batch;
  static constexpr int lo = D == 1 ? 2 : D + 2, hi = D + 2;
};
template <class S, int D>
struct Traits<normkit::InstanceNorm<S, D>> {
  using Scalar = S;
  static constexpr Family family = Family::instance;
  static constexpr int lo = D + 1, hi = D + 2;
};
template <class S>
struct Traits<normkit::LayerNorm<S>> {
  using Scalar = S;
  static constexpr Family family = Family::layer;
  static constexpr int lo = 2, hi = 5;
};
template <class S>
struct Traits<normkit::GroupNorm<S>> {
  using Scalar = S;
  static constexpr Family family = Family::group;
  static constexpr int lo = 2, hi = 5;
};

struct Config {
  Index C = 1, G = 1;
  std::vector<Index> ns;  // LayerNorm's normalized_shape
  bool channels_last = false, affine = true, tracking = true, ln_bias = true;
  std::optional<double> momentum = 0.1;
  double eps = 1e-5;

  std::string text() const {
    char b[200];
    std::snprintf(b, sizeof b,
                  "C=%lld G=%lld ns_len=%zu channels_last=%d affine=%d tracking=%d bias=%d "
                  "momentum=%s eps=%g",
                  static_cast<long long>(C), static_cast<long long>(G), ns.size(), channels_last,
                  affine, tracking, ln_bias, momentum ? std::to_string(*momentum).c_str() : "none",
                  eps);
    return b;
  }
};

template <class M>
Config random_config(Rng& r) {
  constexpr Family fam = Traits<M>::family;
  Config c;
  static const std::vector<double> epss = {1e-5, 1e-3, 0.1};
  c.eps = r.pick(epss);
  c.affine = r.chance(0.7);
  c.tracking = fam == Family::batch ? r.chance(0.8) : r.chance(0.4);
  c.channels_last = r.chance(0.3);
  static const std::vector<double> moms = {0.1, 0.0, 1.0, 0.5};
  c.momentum =
      fam == Family::batch && r.chance(0.15) ? std::nullopt : std::optional<double>(r.pick(moms));
  if (fam == Family::group) {
    c.G = r.range(1, 4);
    c.C = c.G * r.range(1, 4);
  } else {
    c.C = r.range(1, 12);
  }
  if (fam == Family::layer) {
    c.ln_bias = r.chance(0.7);
    const int k = r.range(1, 2);
    for (int i = 0; i < k; ++i) c.ns.push_back(r.range(1, k == 1 ? 40 : 8));
  }
  return c;
}

template <class M>
std::unique_ptr<M> make_module(const Config& c) {
  constexpr Family fam = Traits<M>::family;
  if constexpr (fam == Family::batch) {
    return std::make_unique<M>(normkit::BatchNormOptions(c.C)
                                   .eps(c.eps)
                                   .momentum(c.momentum)
                                   .affine(c.affine)
                                   .track_running_stats(c.tracking)
                                   .channels_last(c.channels_last));
  } else if constexpr (fam == Family::instance) {
    return std::make_unique<M>(normkit::InstanceNormOptions(c.C)
                                   .eps(c.eps)
                                   .momentum(c.momentum)
                                   .affine(c.affine)
                                   .track_running_stats(c.tracking)
                                   .channels_last(c.channels_last));
  } else if constexpr (fam == Family::layer) {
    return std::make_unique<M>(
        normkit::LayerNormOptions(c.ns).eps(c.eps).elementwise_affine(c.affine).bias(c.ln_bias));
  } else {
    return std::make_unique<M>(
        normkit::GroupNormOptions(c.G, c.C).eps(c.eps).affine(c.affine).channels_last(
            c.channels_last));
  }
}

// Unbatched InstanceNorm input: (C, spatial...).
template <class M, int R>
constexpr bool unbatched() {
  return Traits<M>::family == Family::instance && R == Traits<M>::lo;
}

// The storage axis of the channel dim.
template <class M, int R>
int channel_axis(const Config& c) {
  if (unbatched<M, R>())
    return c.channels_last ? R - 1 : 0;
  return c.channels_last && R >= 3 ? R - 1 : 1;
}

// Whether inputs of rank R are stored channels-last (the option only moves C for rank >= 3,
// or unbatched InstanceNorm input).
template <class M, int R>
bool channels_last_storage(const Config& c) {
  return Traits<M>::family != Family::layer && c.channels_last && (R >= 3 || unbatched<M, R>());
}

// Dims of a valid input of rank R: at most about `cap` elements (PyTorch order, permuted to
// channels-last storage when the module says so); BatchNorm gets more than one value per
// channel and InstanceNorm more than one spatial element; sometimes one extent is 0.
template <class M, int R>
std::array<Index, R> random_dims(const Config& c, Rng& r, Index cap) {
  constexpr Family fam = Traits<M>::family;
  std::array<Index, R> d{};
  if constexpr (fam == Family::layer) {
    const int k = static_cast<int>(c.ns.size());
    Index inner = 1;
    for (Index v : c.ns) inner *= v;
    const int lead = R - k;
    Index room = std::max<Index>(1, cap / inner);
    for (int i = 0; i < lead; ++i) {
      const auto m = static_cast<int>(std::max<Index>(
          1, static_cast<Index>(std::pow(static_cast<double>(room), 1.0 / (lead - i)))));
      d[static_cast<std::size_t>(i)] = r.range(1, std::min(m, 16));
      room = std::max<Index>(1, room / d[static_cast<std::size_t>(i)]);
    }
    for (int i = 0; i < k; ++i)
      d[static_cast<std::size_t>(lead + i)] = c.ns[static_cast<std::size_t>(i)];
    if (lead > 0 && r.chance(0.02))
      d[0] = 0;
    return d;
  } else {
    // Logical (N, C, spatial...) or unbatched (C, spatial...).
    constexpr bool ub = unbatched<M, R>();
    std::array<Index, R> l{};
    const int first_free = ub ? 1 : 2;  // first spatial axis
    Index room = std::max<Index>(1, cap / c.C);
    const int nfree = R - first_free + (ub ? 0 : 1);
    int left = nfree;
    auto take = [&](int hi) {
      const auto m = static_cast<int>(
          std::max<Index>(1, static_cast<Index>(std::pow(static_cast<double>(room), 1.0 / left))));
      const Index v = r.range(1, std::max(1, std::min(m, hi)));
      room = std::max<Index>(1, room / v);
      --left;
      return v;
    };
    if (!ub)
      l[0] = take(8);
    l[ub ? 0 : 1] = c.C;
    for (int i = first_free; i < R; ++i) l[static_cast<std::size_t>(i)] = take(24);
    Index spatial = 1;
    for (int i = first_free; i < R; ++i) spatial *= l[static_cast<std::size_t>(i)];
    if (fam == Family::batch && l[0] * spatial < 2)
      l[0] = 2;
    if (fam == Family::instance && spatial < 2)
      l[static_cast<std::size_t>(first_free)] = 2;
    if (r.chance(0.02))
      l[ub ? static_cast<std::size_t>(first_free) : 0] = 0;
    // Storage order of the dims: channels_last puts C last (rank >= 3, or unbatched).
    const int cax = channel_axis<M, R>(c);
    const int lax = ub ? 0 : 1;
    if (cax == lax)
      return l;
    int k = 0;
    for (int i = 0; i < R; ++i) {
      if (i != lax)
        d[static_cast<std::size_t>(k++)] = l[static_cast<std::size_t>(i)];
    }
    d[static_cast<std::size_t>(R - 1)] = c.C;
    return d;
  }
}

template <class T>
void fill(T& t, Rng& r, bool gradient = false) {
  using S = typename T::Scalar;
  static const std::vector<double> means = {0.0, 1.0, -3.0, 100.0, 1e4};
  static const std::vector<double> sds = {0.01, 1.0, 10.0};
  const double mean = gradient ? 0.0 : r.pick(means);
  const double sd = r.pick(sds);
  if (!gradient && r.chance(0.03)) {
    const auto v = static_cast<S>(mean);
    std::fill(t.data(), t.data() + t.size(), v);
    return;
  }
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<S>(mean + sd * r.normal());
}

template <class D>
std::vector<Index> dims_vector(const D& d) {
  std::vector<Index> v;
  for (std::size_t i = 0; i < d.size(); ++i) v.push_back(d[i]);
  return v;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < static_cast<std::size_t>(A::NumDimensions); ++i) {
    if (a.dimension(i) != b.dimension(i))
      return false;
  }
  return a.size() == 0 || std::memcmp(a.data(), b.data(),
                                      sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}

// ---- the harness ----

struct Stats {
  long steps = 0, forwards = 0, backwards = 0, invalid = 0, setters = 0, modules = 0;
  std::array<long, 3> per_isa{};
  std::array<long, 4> per_threads{};  // calling thread, pools of 1, 2, 3
  std::array<long, 2> per_scalar{};   // float, double
  std::array<long, 3> per_storage{};  // RowMajor, ColMajor, channels_last
  std::array<long, 6> per_rank{};
  Index max_numel = 0;
  long long max_bytes = 0;
};

struct World {
  explicit World(std::uint64_t seed) : rng(seed) {}
  Rng rng;
  Eigen::ThreadPool pool1{1}, pool2{2}, pool3{3};
  Eigen::ThreadPoolDevice dev1{&pool1, 1}, dev2{&pool2, 2}, dev3{&pool3, 3};
  std::vector<Isa> isas = normkit::supported_isas();
  Isa isa = Isa::baseline;
  int threads = 0;  // 0: the calling thread (Eigen::DefaultDevice)
  std::string where;
  Stats stats;

  // Calls f(device) with the step's device.
  template <class F>
  void on_device(F&& f) {
    switch (threads) {
      case 1:
        f(dev1);
        break;
      case 2:
        f(dev2);
        break;
      case 3:
        f(dev3);
        break;
      default:
        f(Eigen::DefaultDevice());
        break;
    }
  }
  template <class T>
  void count_tensor(const T& t, bool channels_last) {
    stats.max_numel = std::max(stats.max_numel, static_cast<Index>(t.size()));
    stats.max_bytes =
        std::max(stats.max_bytes, static_cast<long long>(t.size()) *
                                      static_cast<long long>(sizeof(typename T::Scalar)));
    stats.per_rank[static_cast<std::size_t>(T::NumDimensions)]++;
    stats.per_storage[channels_last
                          ? 2
                          : (static_cast<int>(T::Layout) == static_cast<int>(Eigen::RowMajor)
                                 ? 0
                                 : 1)]++;
  }
  [[noreturn]] void fail(const std::string& what) const { soak_fail(where + ": " + what); }
};

// Runs fn; returns the message of the std::invalid_argument it threw, or nothing.
template <class F>
std::optional<std::string> attempt(const World& w, F&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    return std::string(e.what());
  } catch (const std::exception& e) {
    w.fail(std::string("threw a non-invalid_argument exception: ") + e.what());
  }
  return std::nullopt;
}

template <class M>
struct Slot {
  using S = typename Traits<M>::Scalar;
  using Vector = Eigen::Tensor<S, 1>;
  // What the last training forward that kept statistics needs to be replayed on a fresh
  // module: its input (replay), the state before it, the ISA level it ran on, and whether
  // its input is still kept; `backward` runs a random backward on the kept shape.
  struct Kept {
    std::function<void(M&)> replay;
    std::function<void(World&, Slot&, M&)> backward;
    Vector weight, bias, running_mean, running_var;
    std::int64_t num_batches_tracked = 0;
    Isa isa = Isa::baseline;
    bool x_kept = false;
    std::vector<Index> dims;
    int layout = 0;
  };
  Config cfg;
  std::unique_ptr<M> m;
  std::optional<Kept> kept;
};

template <class M>
void set_state(M& dst,
               const typename Slot<M>::Vector& w,
               const typename Slot<M>::Vector& b,
               const typename Slot<M>::Vector* rm,
               const typename Slot<M>::Vector* rv,
               std::int64_t nbt) {
  if (w.size())
    dst.set_weight(w);
  if (b.size())
    dst.set_bias(b);
  if constexpr (normkit_test::has_running_stats_v<M>) {
    if (rm->size())
      dst.set_running_mean(*rm);
    if (rv->size())
      dst.set_running_var(*rv);
    dst.set_num_batches_tracked(nbt);
  } else {
    (void)rm;
    (void)rv;
    (void)nbt;
  }
}

template <class M>
void capture_pre(const M& m, typename Slot<M>::Kept& k) {
  k.weight = m.weight();
  k.bias = m.bias();
  if constexpr (normkit_test::has_running_stats_v<M>) {
    k.running_mean = m.running_mean();
    k.running_var = m.running_var();
    k.num_batches_tracked = m.num_batches_tracked();
  }
}

// A fresh module in the long-lived one's state: same options, the last kept training forward
// replayed (on its own ISA level, the calling thread), then the current parameters, buffers
// and flags.
template <class M>
std::unique_ptr<M> fresh_clone(World& w, const Slot<M>& s) {
  auto f = make_module<M>(s.cfg);
  const M& l = *s.m;
  if (s.kept) {
    const auto& k = *s.kept;
    set_state(*f, k.weight, k.bias, &k.running_mean, &k.running_var, k.num_batches_tracked);
    f->set_keep_input(k.x_kept);
    normkit::set_isa(k.isa);
    if (attempt(w, [&] { k.replay(*f); }))
      w.fail("replaying the kept forward on a fresh module threw");
    normkit::set_isa(w.isa);
  }
  typename Slot<M>::Vector rm, rv;
  std::int64_t nbt = 0;
  if constexpr (normkit_test::has_running_stats_v<M>) {
    rm = l.running_mean();
    rv = l.running_var();
    nbt = l.num_batches_tracked();
  }
  set_state(*f, l.weight(), l.bias(), &rm, &rv, nbt);
  f->train(l.is_training());
  f->set_requires_grad(l.requires_grad());
  f->set_keep_input(l.keep_input());
  return f;
}

template <class M>
void expect_same_state(const World& w, const M& fresh, const M& l, const char* when) {
  const auto r = normkit_test::same_state(normkit_test::snapshot(fresh), normkit_test::snapshot(l));
  if (!r)
    w.fail(std::string("module state differs from a fresh module's ") + when + ": " + r.message());
  if (fresh.keep_input() != l.keep_input())
    w.fail(std::string("keep_input differs ") + when);
}

// Checks the outcome of one call made on the long-lived module (el) and on the fresh one (ef).
template <class M>
void check_outcome(World& w,
                   bool valid,
                   const std::optional<std::string>& el,
                   const std::optional<std::string>& ef,
                   const normkit_test::State& before,
                   const M& l,
                   const char* what) {
  if (valid) {
    if (el)
      w.fail(std::string(what) + ": a valid call threw: " + *el);
    if (ef)
      w.fail(std::string(what) + ": a valid call threw on the fresh module: " + *ef);
    return;
  }
  if (!el)
    w.fail(std::string(what) + ": an invalid call did not throw");
  if (!ef)
    w.fail(std::string(what) + ": an invalid call did not throw on the fresh module");
  const auto r = normkit_test::same_state(before, normkit_test::snapshot(l));
  if (!r)
    w.fail(std::string(what) + ": a rejected call changed the module: " + r.message());
  w.stats.invalid++;
}

// Where two tensors of the same size differ: count, first index, largest difference.
template <class A, class B>
std::string difference(const A& a, const B& b) {
  if (a.size() != b.size())
    return " (sizes " + std::to_string(a.size()) + " and " + std::to_string(b.size()) + ")";
  Index n = 0, first = -1;
  double worst = 0;
  for (Index i = 0; i < a.size(); ++i) {
    if (std::memcmp(a.data() + i, b.data() + i, sizeof(*a.data())) != 0) {
      if (first < 0)
        first = i;
      ++n;
      worst = std::max(
          worst, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
    }
  }
  char t[160];
  std::snprintf(t, sizeof t, " (%lld of %lld elements differ, first at %lld, largest by %g)",
                static_cast<long long>(n), static_cast<long long>(a.size()),
                static_cast<long long>(first), worst);
  return t;
}

template <class G>
void expect_same_grads(const World& w, const G& a, const G& b, const char* what) {
  if (!same_bits(a.input, b.input))
    w.fail(std::string(what) + ": grad input differs from the fresh module's" +
           difference(a.input, b.input));
  if (!same_bits(a.weight, b.weight))
    w.fail(std::string(what) + ": grad weight differs from the fresh module's" +
           difference(a.weight, b.weight));
  if (!same_bits(a.bias, b.bias))
    w.fail(std::string(what) + ": grad bias differs from the fresh module's" +
           difference(a.bias, b.bias));
}

template <class S, int R, int L>
normkit::Gradients<S, R, L>& reused_gradients() {
  static normkit::Gradients<S, R, L> g;  // reused across steps: backward resizes it in place
  return g;
}

// A random backward on inputs of dims `d` (the last forward's, when x is given): backward(dy),
// backward(dy, g), backward(x, dy), backward(x, dy, g), backward(x2, dy) with another input
// of the same dims. `f` is a fresh module in l's state.
template <class M, int R, int L>
void backward_on(World& w,
                 Slot<M>& s,
                 M& f,
                 const std::shared_ptr<const Eigen::Tensor<typename Traits<M>::Scalar, R, L>>& x) {
  using S = typename Traits<M>::Scalar;
  using T = Eigen::Tensor<S, R, L>;
  M& l = *s.m;
  T dy(x->dimensions());
  fill(dy, w.rng, true);
  // backward(dy) without a kept input must throw: only now and then.
  const bool x_kept = s.kept && s.kept->x_kept;
  const int v = x_kept || w.rng.chance(0.15) ? w.rng.below(5) : w.rng.range(2, 4);
  T x2;
  if (v == 4) {
    x2.resize(x->dimensions());
    fill(x2, w.rng);
  }
  static const char* names[] = {"backward(dy)", "backward(dy, g)", "backward(x, dy)",
                                "backward(x, dy, g)", "backward(x2, dy)"};
  w.where += std::string(", then ") + names[v];
  const bool valid =
      v >= 2 || (x_kept && s.kept->layout == L && s.kept->dims == dims_vector(x->dimensions()));
  const auto before = normkit_test::snapshot(l);
  normkit::Gradients<S, R, L> gl, gf;
  auto& reuse = reused_gradients<S, R, L>();
  const auto el = attempt(w, [&] {
    w.on_device([&](const auto& dev) {
      switch (v) {
        case 0:
          gl = l.backward(dy, dev);
          break;
        case 1:
          l.backward(dy, reuse, dev);
          gl = reuse;
          break;
        case 2:
          gl = l.backward(*x, dy, dev);
          break;
        case 3:
          l.backward(*x, dy, reuse, dev);
          gl = reuse;
          break;
        default:
          gl = l.backward(x2, dy, dev);
          break;
      }
    });
  });
  const auto ef = attempt(w, [&] {
    if (v <= 1)
      gf = f.backward(dy);
    else
      gf = f.backward(v == 4 ? x2 : *x, dy);
  });
  w.stats.backwards++;
  check_outcome(w, valid, el, ef, before, l, names[v]);
  if (valid)
    expect_same_grads(w, gl, gf, names[v]);
  expect_same_state(w, f, l, "after the backward");
}

// One forward of a random valid input (alloc, into a reused Tensor, into a TensorMap, or from a
// TensorMap), compared with a fresh module's; then, usually, a backward.
template <class M, int R, int L>
void forward_step(World& w, Slot<M>& s) {
  using S = typename Traits<M>::Scalar;
  using T = Eigen::Tensor<S, R, L>;
  static const std::vector<Index> caps = {256, 2048, 2048, 16384, 65536};
  const auto dims = random_dims<M, R>(s.cfg, w.rng, w.rng.pick(caps));
  auto xp = std::make_shared<T>(dims);
  fill(*xp, w.rng);
  const T& x = *xp;
  w.count_tensor(x, channels_last_storage<M, R>(s.cfg));
  M& l = *s.m;
  auto f = fresh_clone(w, s);
  expect_same_state(w, *f, l, "before the forward");
  const int how = w.rng.below(4);
  static const char* hows[] = {"forward(x)", "forward(x, reused y)", "forward(x, TensorMap y)",
                               "forward(TensorMap x)"};
  w.where += std::string(", ") + hows[how] + " dims [";
  for (Index d : dims) w.where += std::to_string(d) + " ";
  w.where += L == Eigen::RowMajor ? "] RowMajor" : "] ColMajor";
  typename Slot<M>::Kept k;
  capture_pre(l, k);
  T yl, yf;
  static T reused_y;
  std::vector<S> ybuf;
  const auto el = attempt(w, [&] {
    w.on_device([&](const auto& dev) {
      switch (how) {
        case 0:
          yl = l.forward(x, dev);
          break;
        case 1:
          l.forward(x, reused_y, dev);
          yl = reused_y;
          break;
        case 2: {
          ybuf.assign(static_cast<std::size_t>(x.size()), S(-7));
          Eigen::TensorMap<T> ym(ybuf.data(), dims);
          l.forward(x, ym, dev);
          yl = ym;
          break;
        }
        default: {
          Eigen::TensorMap<const T> xm(x.data(), dims);
          yl = l.forward(xm, dev);
          break;
        }
      }
    });
  });
  const auto ef = attempt(w, [&] { yf = f->forward(x); });
  w.stats.forwards++;
  check_outcome(w, true, el, ef, normkit_test::State(), l, hows[how]);
  if (!same_bits(yl, yf))
    w.fail("forward output differs from the fresh module's" + difference(yl, yf));
  expect_same_state(w, *f, l, "after the forward");
  if (l.is_training() && l.requires_grad()) {
    k.isa = w.isa;
    k.x_kept = l.keep_input();
    k.dims = dims_vector(dims);
    k.layout = L;
    k.replay = [xp](M& m) { (void)m.forward(*xp); };
    k.backward = [xp](World& ww, Slot<M>& ss, M& ff) { backward_on<M, R, L>(ww, ss, ff, xp); };
    s.kept = std::move(k);
  }
  if (w.rng.chance(0.7))
    backward_on<M, R, L>(w, s, *f, xp);
}

// A backward on the kept input's shape, on a fresh clone; or, with nothing kept, backward(dy),
// which must be rejected.
template <class M>
void kept_backward_step(World& w, Slot<M>& s) {
  auto f = fresh_clone(w, s);
  expect_same_state(w, *f, *s.m, "before the backward");
  if (s.kept) {
    w.where += ", backward on the kept shape";
    const auto backward = s.kept->backward;  // s.kept may change while it runs
    backward(w, s, *f);
    return;
  }
  using S = typename Traits<M>::Scalar;
  using T = Eigen::Tensor<S, Traits<M>::lo, Eigen::RowMajor>;
  const auto dims = random_dims<M, Traits<M>::lo>(s.cfg, w.rng, 256);
  T dy(dims);
  fill(dy, w.rng, true);
  w.where += ", backward(dy) with nothing kept";
  const auto before = normkit_test::snapshot(*s.m);
  const auto el =
      attempt(w, [&] { w.on_device([&](const auto& dev) { (void)s.m->backward(dy, dev); }); });
  const auto ef = attempt(w, [&] { (void)f->backward(dy); });
  w.stats.backwards++;
  check_outcome(w, false, el, ef, before, *s.m, "backward(dy) with nothing kept");
}

// backward(x, dy) of a random valid input, without a forward first (statistics recomputed,
// or the kept ones when x has the kept dims).
template <class M, int R, int L>
void backward_any_step(World& w, Slot<M>& s) {
  using S = typename Traits<M>::Scalar;
  using T = Eigen::Tensor<S, R, L>;
  const auto dims = random_dims<M, R>(s.cfg, w.rng, w.rng.chance(0.8) ? 2048 : 16384);
  T x(dims), dy(dims);
  fill(x, w.rng);
  fill(dy, w.rng, true);
  w.count_tensor(x, channels_last_storage<M, R>(s.cfg));
  auto f = fresh_clone(w, s);
  expect_same_state(w, *f, *s.m, "before the backward");
  w.where += ", backward(x, dy) without a forward";
  const auto before = normkit_test::snapshot(*s.m);
  normkit::Gradients<S, R, L> gl, gf;
  const auto el =
      attempt(w, [&] { w.on_device([&](const auto& dev) { gl = s.m->backward(x, dy, dev); }); });
  const auto ef = attempt(w, [&] { gf = f->backward(x, dy); });
  w.stats.backwards++;
  check_outcome(w, true, el, ef, before, *s.m, "backward(x, dy)");
  expect_same_grads(w, gl, gf, "backward(x, dy)");
  expect_same_state(w, *f, *s.m, "after the backward");
}

// train()/eval(), set_requires_grad, set_keep_input; the harness follows what the module keeps.
template <class M>
void mode_step(World& w, Slot<M>& s) {
  M& l = *s.m;
  w.stats.setters++;
  switch (w.rng.below(3)) {
    case 0: {
      const bool on = w.rng.chance(0.6);
      w.where += on ? ", train()" : ", eval()";
      if (on != l.is_training())
        s.kept.reset();
      l.train(on);
      break;
    }
    case 1: {
      const bool on = w.rng.chance(0.7);
      w.where += on ? ", set_requires_grad(true)" : ", set_requires_grad(false)";
      if (!on)
        s.kept.reset();
      l.set_requires_grad(on);
      break;
    }
    default: {
      const bool on = w.rng.chance(0.6);
      w.where += on ? ", set_keep_input(true)" : ", set_keep_input(false)";
      if (!on && s.kept)
        s.kept->x_kept = false;
      l.set_keep_input(on);
      break;
    }
  }
}

// New parameters or buffers (valid sizes, positive running variances).
template <class M>
void parameter_step(World& w, Slot<M>& s) {
  using S = typename Traits<M>::Scalar;
  M& l = *s.m;
  w.stats.setters++;
  auto random_vector = [&](Index n, double lo) {
    typename Slot<M>::Vector v(n);
    for (Index i = 0; i < n; ++i)
      v(i) = static_cast<S>(lo > 0 ? lo + std::abs(w.rng.normal()) : w.rng.normal());
    return v;
  };
  const bool buffers = normkit_test::has_running_stats_v<M> && w.rng.chance(0.5);
  if (!buffers) {
    w.where += ", set_weight/set_bias";
    if (l.weight().size())
      l.set_weight(random_vector(l.weight().size(), 0));
    if (l.bias().size())
      l.set_bias(random_vector(l.bias().size(), 0));
    return;
  }
  if constexpr (normkit_test::has_running_stats_v<M>) {
    w.where += ", set_running_mean/var, set_num_batches_tracked";
    if (l.running_mean().size())
      l.set_running_mean(random_vector(l.running_mean().size(), 0));
    if (l.running_var().size())
      l.set_running_var(random_vector(l.running_var().size(), 0.05));
    l.set_num_batches_tracked(w.rng.range(0, 1000));
  }
}

// A call that must be rejected with std::invalid_argument, leaving the module unchanged.
template <class M, int R, int L>
void invalid_step(World& w, Slot<M>& s) {
  using S = typename Traits<M>::Scalar;
  using T = Eigen::Tensor<S, R, L>;
  constexpr Family fam = Traits<M>::family;
  M& l = *s.m;
  auto dims = random_dims<M, R>(s.cfg, w.rng, 2048);
  int v = w.rng.below(6);
  const bool batch_stats = l.is_training() || !s.cfg.tracking;
  if (v == 5 && !((fam == Family::batch || fam == Family::instance) && batch_stats))
    v = 0;
  const auto before = normkit_test::snapshot(l);
  const bool keep_before = l.keep_input();
  std::optional<std::string> e;
  switch (v) {
    case 0: {  // wrong channel count, or LayerNorm trailing dims
      if (fam == Family::layer)
        dims[static_cast<std::size_t>(R - 1)] += 1;
      else
        dims[static_cast<std::size_t>(channel_axis<M, R>(s.cfg))] += 1;
      T x(dims);
      fill(x, w.rng);
      w.where += ", invalid: forward with the wrong channel count / normalized dims";
      e = attempt(w, [&] { w.on_device([&](const auto& dev) { (void)l.forward(x, dev); }); });
      break;
    }
    case 1: {  // output TensorMap of the wrong dims
      T x(dims);
      fill(x, w.rng);
      auto yd = dims;
      yd[0] += 1;
      Index n = 1;
      for (Index d : yd) n *= d;
      std::vector<S> buf(static_cast<std::size_t>(n));
      Eigen::TensorMap<T> ym(buf.data(), yd);
      w.where += ", invalid: forward into a TensorMap of the wrong dims";
      e = attempt(w, [&] { w.on_device([&](const auto& dev) { l.forward(x, ym, dev); }); });
      break;
    }
    case 2: {  // grad_output of other dims than x
      T x(dims);
      fill(x, w.rng);
      auto dd = dims;
      dd[static_cast<std::size_t>(w.rng.below(R))] += 1;
      T dy(dd);
      fill(dy, w.rng, true);
      w.where += ", invalid: backward(x, dy) with dy of other dims";
      e = attempt(w, [&] { w.on_device([&](const auto& dev) { (void)l.backward(x, dy, dev); }); });
      break;
    }
    case 3: {  // backward(dy) with dims other than the kept input's
      auto dd = dims;
      if (s.kept && s.kept->layout == L && s.kept->dims == dims_vector(dd))
        dd[0] += 1;
      T dy(dd);
      fill(dy, w.rng, true);
      w.where += ", invalid: backward(dy) with dy of other dims than the kept input";
      e = attempt(w, [&] { w.on_device([&](const auto& dev) { (void)l.backward(dy, dev); }); });
      break;
    }
    case 4: {  // parameter of the wrong size
      typename Slot<M>::Vector p(l.weight().size() + 1);
      p.setZero();
      w.where += ", invalid: set_weight of the wrong size";
      e = attempt(w, [&] { l.set_weight(p); });
      break;
    }
    default: {  // one value per channel (BatchNorm) / one spatial element (InstanceNorm)
      std::array<Index, R> d1{};
      for (auto& d : d1) d = 1;
      d1[static_cast<std::size_t>(channel_axis<M, R>(s.cfg))] = s.cfg.C;
      T x(d1);
      fill(x, w.rng);
      w.where += ", invalid: batch statistics of one value per channel / spatial element";
      e = attempt(w, [&] { w.on_device([&](const auto& dev) { (void)l.forward(x, dev); }); });
      break;
    }
  }
  if (!e)
    w.fail("an invalid call did not throw");
  const auto r = normkit_test::same_state(before, normkit_test::snapshot(l));
  if (!r)
    w.fail(std::string("a rejected call changed the module: ") + r.message());
  if (l.keep_input() != keep_before)
    w.fail("a rejected call changed keep_input");
  w.stats.invalid++;
}

// Calls f(integral_constant<int, R>, integral_constant<int, Layout>) for a random rank the
// module accepts and a random storage order.
template <class M, class F>
void with_rank_and_layout(World& w, F&& f) {
  constexpr int lo = Traits<M>::lo, hi = Traits<M>::hi;
  const int r = w.rng.range(lo, hi);
  const bool row = w.rng.chance(0.5);
  auto go = [&](auto rank) {
    if (row)
      f(rank, std::integral_constant<int, Eigen::RowMajor>());
    else
      f(rank, std::integral_constant<int, Eigen::ColMajor>());
  };
  if constexpr (lo <= 2 && 2 <= hi) {
    if (r == 2)
      go(std::integral_constant<int, 2>());
  }
  if constexpr (lo <= 3 && 3 <= hi) {
    if (r == 3)
      go(std::integral_constant<int, 3>());
  }
  if constexpr (lo <= 4 && 4 <= hi) {
    if (r == 4)
      go(std::integral_constant<int, 4>());
  }
  if constexpr (lo <= 5 && 5 <= hi) {
    if (r == 5)
      go(std::integral_constant<int, 5>());
  }
}

template <class M>
void step(World& w, Slot<M>& s) {
  using S = typename Traits<M>::Scalar;
  if (!s.m || w.rng.chance(1.0 / 300)) {
    s.cfg = random_config<M>(w.rng);
    s.m = make_module<M>(s.cfg);
    s.kept.reset();
    w.stats.modules++;
  }
  w.where += std::string(" ") + M::kName +
             (std::is_same<S, float>::value ? "<float>" : "<double>") + " {" + s.cfg.text() +
             (s.m->is_training() ? "} train" : "} eval") +
             (s.m->requires_grad() ? "" : " no-grad") + (s.m->keep_input() ? "" : " no-keep-input");
  w.stats.per_scalar[std::is_same<S, float>::value ? 0 : 1]++;
  const int op = w.rng.below(100);
  if (op < 50) {
    with_rank_and_layout<M>(
        w, [&](auto r, auto l) { forward_step<M, decltype(r)::value, decltype(l)::value>(w, s); });
  } else if (op < 62) {
    kept_backward_step(w, s);
  } else if (op < 72) {
    with_rank_and_layout<M>(w, [&](auto r, auto l) {
      backward_any_step<M, decltype(r)::value, decltype(l)::value>(w, s);
    });
  } else if (op < 84) {
    mode_step(w, s);
  } else if (op < 94) {
    parameter_step(w, s);
  } else {
    with_rank_and_layout<M>(
        w, [&](auto r, auto l) { invalid_step<M, decltype(r)::value, decltype(l)::value>(w, s); });
  }
}

using Slots = std::tuple<Slot<normkit::BatchNorm1d<float>>,
                         Slot<normkit::BatchNorm2d<float>>,
                         Slot<normkit::BatchNorm3d<float>>,
                         Slot<normkit::InstanceNorm1d<float>>,
                         Slot<normkit::InstanceNorm2d<float>>,
                         Slot<normkit::InstanceNorm3d<float>>,
                         Slot<normkit::LayerNorm<float>>,
                         Slot<normkit::GroupNorm<float>>,
                         Slot<normkit::BatchNorm1d<double>>,
                         Slot<normkit::BatchNorm2d<double>>,
                         Slot<normkit::BatchNorm3d<double>>,
                         Slot<normkit::InstanceNorm1d<double>>,
                         Slot<normkit::InstanceNorm2d<double>>,
                         Slot<normkit::InstanceNorm3d<double>>,
                         Slot<normkit::LayerNorm<double>>,
                         Slot<normkit::GroupNorm<double>>>;

template <std::size_t... I>
void step_slot(World& w, Slots& slots, std::size_t k, std::index_sequence<I...>) {
  ((k == I ? step(w, std::get<I>(slots)) : void()), ...);
}

// One random step: a module, an ISA level, a device, a parallel threshold, an operation.
void run_step(World& w, Slots& slots) {
  w.isa = w.rng.pick(w.isas);
  normkit::set_isa(w.isa);
  w.threads = w.rng.below(4);
  static const std::vector<Index> thresholds = {Index{1} << 16, 4096, 256};
  const Index threshold = w.rng.pick(thresholds);
  normkit::set_min_parallel_elements(threshold);
  w.stats.per_isa[static_cast<std::size_t>(w.isa)]++;
  w.stats.per_threads[static_cast<std::size_t>(w.threads)]++;
  w.where =
      "step " + std::to_string(w.stats.steps) + " [" + normkit::isa_name(w.isa) + ", " +
      (w.threads ? std::to_string(w.threads) + "-thread pool" : std::string("calling thread")) +
      ", min_parallel_elements " + std::to_string(threshold) + "]";
  constexpr std::size_t n = std::tuple_size<Slots>::value;
  step_slot(w, slots, static_cast<std::size_t>(w.rng.below(static_cast<int>(n))),
            std::make_index_sequence<n>());
  static const bool verbose = std::getenv("NORMKIT_SOAK_VERBOSE") != nullptr;
  if (verbose)
    std::fprintf(stderr, "%s\n", w.where.c_str());
  w.stats.steps++;
}

TEST(SoakTest, LongLivedModulesStayBitwiseFreshAndMemoryBounded) {
  const double seconds = env_number("NORMKIT_SOAK_SECONDS", 5.0);
  const auto seed = static_cast<std::uint64_t>(env_number("NORMKIT_SOAK_SEED", 1.0));
  const double warmup = std::min(std::max(1.0, 0.2 * seconds), 0.5 * seconds);
  constexpr long long kGrowthBound = 16LL << 20;  // bytes of RSS growth allowed after warm-up
  const Isa isa_before = normkit::isa();
  const Index threshold_before = normkit::min_parallel_elements();

  World w(seed);
  Slots slots;
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  const long long rss_start = rss_bytes();
  long long rss_warm = -1, rss_max_after = 0;
  long warm_steps = 0;
  double next_sample = 0;
  std::string failure;
  try {
    while (elapsed() < seconds) {
      run_step(w, slots);
      const double t = elapsed();
      if (rss_warm < 0 && t >= warmup) {
        rss_warm = rss_bytes();
        rss_max_after = rss_warm;
        warm_steps = w.stats.steps;
        next_sample = t + 0.25;
      } else if (rss_warm >= 0 && t >= next_sample) {
        rss_max_after = std::max(rss_max_after, rss_bytes());
        next_sample = t + 0.25;
      }
    }
  } catch (const SoakFailure& f) {
    failure = f.what;
  }
  const double took = elapsed();
  const long long rss_end = rss_bytes();
  rss_max_after = std::max(rss_max_after, rss_end);
  if (rss_warm < 0)
    rss_warm = rss_end;
  normkit::set_isa(isa_before);
  normkit::set_min_parallel_elements(threshold_before);

  const Stats& st = w.stats;
  std::printf(
      "normkit soak: seed %llu, %.1f s, %ld steps: %ld forward, %ld backward, %ld invalid "
      "(rejected), %ld setter calls, %ld modules built\n",
      static_cast<unsigned long long>(seed), took, st.steps, st.forwards, st.backwards, st.invalid,
      st.setters, st.modules);
  std::printf("normkit soak: steps per ISA level:");
  for (Isa l : normkit::supported_isas())
    std::printf(" %s %ld", normkit::isa_name(l), st.per_isa[static_cast<std::size_t>(l)]);
  std::printf("; per device: calling thread %ld, pool of 1 %ld, 2 %ld, 3 %ld\n", st.per_threads[0],
              st.per_threads[1], st.per_threads[2], st.per_threads[3]);
  std::printf(
      "normkit soak: inputs: float/double steps %ld/%ld; RowMajor %ld, ColMajor %ld, "
      "channels_last %ld; rank 2..5: %ld %ld %ld %ld; largest input %lld elements (%.2f MiB)\n",
      st.per_scalar[0], st.per_scalar[1], st.per_storage[0], st.per_storage[1], st.per_storage[2],
      st.per_rank[2], st.per_rank[3], st.per_rank[4], st.per_rank[5],
      static_cast<long long>(st.max_numel), mib(st.max_bytes));
  std::printf(
      "normkit soak: RSS start %.1f MiB, after %.1f s warm-up (%ld steps) %.1f MiB, end %.1f MiB, "
      "max after warm-up %.1f MiB (growth %+.2f MiB, bound %.0f MiB%s); peak RSS %.1f MiB\n",
      mib(rss_start), warmup, warm_steps, mib(rss_warm), mib(rss_end), mib(rss_max_after),
      mib(rss_max_after - rss_warm), mib(kGrowthBound),
      NORMKIT_SOAK_SANITIZED ? ", not checked under a sanitizer" : "", mib(peak_rss_bytes()));
  RecordProperty("soak_steps", static_cast<int>(st.steps));
  ASSERT_TRUE(failure.empty()) << failure << " (seed " << seed
                               << "; rerun with NORMKIT_SOAK_SEED to reproduce)";
  EXPECT_GT(st.steps, 0);
  if (!NORMKIT_SOAK_SANITIZED && seconds >= 2) {
    EXPECT_LE(rss_max_after - rss_warm, kGrowthBound)
        << "resident memory grew by " << mib(rss_max_after - rss_warm) << " MiB after warm-up";
  }
}

}  // namespace
