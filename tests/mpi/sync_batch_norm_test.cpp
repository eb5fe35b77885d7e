// normkit::SyncBatchNorm (normkit/mpi.hpp) under mpirun: a plain main() that every rank runs
// (ctest runs it with 1, 2, 3 and 4 processes). Every rank builds the same full batch from a
// fixed hash and takes its shard of it (the split is per case: uneven, empty shards, every
// shard empty, an even split), in RowMajor NCHW, ColMajor and channels-last layouts, inputs of
// rank 2 to 5, float and double. Per case and training step:
//  (a) this rank's y and dx slices, running_mean/var and num_batches_tracked are bitwise
//      those of SyncBatchNorm on the FULL batch over MPI_COMM_SELF (one process): the result
//      does not depend on the number of processes or the split;
//  (b) bitwise BatchNorm1d/2d/3d on the full batch when that takes per-sample blocks (a
//      sample's share of a channel >= 1024 elements, NCHW or channels-last), else within a
//      tight tolerance;
//  (c) dweight/dbias summed over the ranks (MPI_Allreduce) within tolerance of BatchNorm's;
//  (d) evaluation mode after training is plain BatchNorm on the running statistics;
//  (e) backward(x, dy) with kept statistics (keep_input false) and recomputing them
//      (requires_grad false) equal backward(dy) bitwise.
// Then the errors: bad input or a different mode on one rank makes every rank throw the same
// exception naming that rank, changes nothing, and hangs nothing (ctest's TIMEOUT fails a
// hang). Failures are counted per rank and summed with MPI_Allreduce: every rank exits with
// the same code.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define EIGEN_USE_THREADS
#include <mpi.h>
#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

// Sanitizer builds (10-100x slower, CI runs them on 2 cores) take a reduced matrix: every
// split and layout, fewer shapes.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NORMKIT_TEST_QUICK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define NORMKIT_TEST_QUICK 1
#endif
#endif
#ifndef NORMKIT_TEST_QUICK
#define NORMKIT_TEST_QUICK 0
#endif

namespace {

using Index = Eigen::Index;

int g_rank = 0, g_size = 1;
long g_failures = 0, g_checks = 0;
int g_printed = 0;

void failf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void failf(const char* fmt, ...) {
  ++g_failures;
  if (g_printed++ >= 40)
    return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "[rank %d] FAIL: %s\n", g_rank, buf);
}

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok)
    failf("%s", what.c_str());
}

template <class T>
MPI_Datatype mpi_type() {
  return std::is_same<T, float>::value ? MPI_FLOAT : MPI_DOUBLE;
}

// splitmix64: the same numbers on every rank and platform.
double unit(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ULL + i + 0x632BE59BD9B4E019ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

template <class TensorT>
void fill(TensorT& t, std::uint64_t seed, double lo, double hi) {
  using T = typename TensorT::Scalar;
  for (Index i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<T>(lo + (hi - lo) * unit(seed, static_cast<std::uint64_t>(i)));
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < static_cast<std::size_t>(A::NumDimensions); ++i) {
    if (a.dimension(i) != b.dimension(i))
      return false;
  }
  const auto bytes = static_cast<std::size_t>(a.size()) * sizeof(typename A::Scalar);
  return bytes == 0 || std::memcmp(a.data(), b.data(), bytes) == 0;
}

template <class T>
double rtol() {
  return std::is_same<T, float>::value ? 1e-6 : 1e-12;
}

// |a - b| <= rtol * (|b| + max(max|b|, floor)) elementwise: relative to the tensor's scale
// (or `floor`, the scale its inputs give it: a dx that is ~0 in exact arithmetic is noise).
template <class A, class B>
bool close(const A& a, const B& b, double tol, double* worst = nullptr, double floor = 0) {
  if (a.size() != b.size())
    return false;
  double scale = floor, w = 0;
  for (Index i = 0; i < b.size(); ++i)
    scale = std::max(scale, std::abs(static_cast<double>(b.data()[i])));
  bool ok = true;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]), y = static_cast<double>(b.data()[i]);
    const double err = std::abs(x - y);
    w = std::max(w, err / (std::abs(y) + scale + 1e-300));
    if (!(err <= tol * (std::abs(y) + scale)))
      ok = false;
  }
  if (worst)
    *worst = w;
  return ok;
}

template <class T>
std::string type_name() {
  return std::is_same<T, float>::value ? "float" : "double";
}

enum class Layout { nchw, colmajor, channels_last };

const char* layout_name(Layout l) {
  return l == Layout::nchw ? "NCHW" : l == Layout::colmajor ? "ColMajor" : "channels_last";
}

/// The options of variant v: 0 PyTorch's defaults; 1 no affine, cumulative average
/// (momentum none); 2 no running statistics, eps 1e-3.
normkit::BatchNormOptions options_of(Index C, int v, bool channels_last) {
  normkit::BatchNormOptions o(C);
  o.channels_last(channels_last);
  if (v == 1)
    o.affine(false).momentum(std::nullopt);
  if (v == 2)
    o.track_running_stats(false).eps(1e-3);
  return o;
}

template <class M>
void set_params(M& m, Index C) {
  if (!m.options().affine())
    return;
  Eigen::Tensor<typename M::Vector::Scalar, 1> w(C), b(C);
  for (Index c = 0; c < C; ++c) {
    w(c) = static_cast<typename M::Vector::Scalar>(0.5 + 0.25 * static_cast<double>(c));
    b(c) = static_cast<typename M::Vector::Scalar>(0.1 * static_cast<double>(c) - 0.2);
  }
  m.set_weight(w);
  m.set_bias(b);
}

struct Counter {
  long cases = 0, exact = 0;
  double worst_y = 0, worst_dx = 0, worst_dw = 0;
} g_count;

/// One case: the full batch of sum(split) samples with channel count C and spatial dims
/// `spatial`, split over the ranks as `split`; `dev` runs SyncBatchNorm's local work.
template <class T, int R, int L, class Dev>
void run_case(const std::string& label,
              const std::vector<Index>& split,
              Index C,
              const std::array<Index, R - 2>& spatial,
              bool cl,
              int variant,
              std::uint64_t seed,
              const Dev& dev) {
  constexpr int D = R <= 3 ? 1 : R - 2;
  using Tensor = Eigen::Tensor<T, R, L>;
  using Vec = Eigen::Tensor<T, 1>;
  Index N = 0, start = 0;
  for (int r = 0; r < g_size; ++r) {
    if (r < g_rank)
      start += split[static_cast<std::size_t>(r)];
    N += split[static_cast<std::size_t>(r)];
  }
  const Index n = split[static_cast<std::size_t>(g_rank)];
  std::array<Index, R> dims{}, off{}, ext{};
  dims[0] = N;
  dims[cl ? R - 1 : 1] = C;
  for (int i = 0; i < R - 2; ++i)
    dims[static_cast<std::size_t>(cl ? 1 + i : 2 + i)] = spatial[static_cast<std::size_t>(i)];
  ext = dims;
  off[0] = start;
  ext[0] = n;
  Index sp = 1;
  for (Index s : spatial) sp *= s;
  const bool exact = sp >= 1024 && L == Eigen::RowMajor;
  // y and dx the same bits for any split: RowMajor layouts (a sample's elements are a block
  // that the kernels walk alike in any shard). In ColMajor a shard's runs lie along N, and
  // the kernels' vector body, scalar tail and column variant round alike only without FMA
  // contraction (the baseline ISA of a build without -mfma); elsewhere within rounding.
#if defined(__FMA__)
  const bool split_exact = L == Eigen::RowMajor;
#else
  const bool split_exact = L == Eigen::RowMajor || normkit::isa() == normkit::Isa::baseline;
#endif
  const double tol = rtol<T>();
  ++g_count.cases;
  g_count.exact += exact ? 1 : 0;

  const normkit::BatchNormOptions opts = options_of(C, variant, cl);
  normkit::SyncBatchNorm<T> sync(opts, MPI_COMM_WORLD);
  normkit::SyncBatchNorm<T> sync_nokeep(opts, MPI_COMM_WORLD);
  normkit::SyncBatchNorm<T> sync_nograd(opts, MPI_COMM_WORLD);
  normkit::SyncBatchNorm<T> self(opts, MPI_COMM_SELF);
  normkit::BatchNorm<T, D> bn(opts);
  set_params(sync, C);
  set_params(sync_nokeep, C);
  set_params(sync_nograd, C);
  set_params(self, C);
  set_params(bn, C);
  sync_nokeep.set_keep_input(false);
  sync_nograd.set_requires_grad(false);
  const bool tracking = opts.track_running_stats();

  auto where = [&](const char* what, int step) {
    return label + " step " + std::to_string(step) + ": " + what;
  };
  Tensor x(dims), dy(dims);
  for (int step = 0; step < 2; ++step) {
    fill(x, seed * 4 + static_cast<std::uint64_t>(step), -1.0 + step, 3.0 + 2 * step);
    fill(dy, seed * 4 + 2 + static_cast<std::uint64_t>(step), -1.0, 1.0);
    const Tensor xs = x.slice(off, ext), dys = dy.slice(off, ext);

    const Tensor y = sync.forward(xs, dev);
    const auto g = sync.backward(dys, dev);
    const Tensor y_self = self.forward(x);
    const auto g_self = self.backward(dy);
    const Tensor y_bn = bn.forward(x);
    const auto g_bn = bn.backward(dy);
    const Tensor y_self_s = y_self.slice(off, ext), dx_self_s = g_self.input.slice(off, ext);
    const Tensor y_bn_s = y_bn.slice(off, ext), dx_bn_s = g_bn.input.slice(off, ext);

    // The scale dx gets from its inputs: max|dy| * max(weight, 1) * max rstd.
    double dx_floor = 0;
    for (Index i = 0; i < dy.size(); ++i)
      dx_floor = std::max(dx_floor, std::abs(static_cast<double>(dy.data()[i])));
    double rs = 0, ws = 1;
    for (Index c = 0; c < self.saved_stats().rstd.size(); ++c)
      rs = std::max(rs, self.saved_stats().rstd(c));
    for (Index c = 0; c < sync.weight().size(); ++c)
      ws = std::max(ws, std::abs(static_cast<double>(sync.weight()(c))));
    dx_floor *= rs * ws;

    // (a) the same bits as one process on the whole batch.
    if (split_exact) {
      expect(same_bits(y, y_self_s),
             where("(a) y == SyncBatchNorm(MPI_COMM_SELF) on the full batch", step));
      expect(same_bits(g.input, dx_self_s), where("(a) dx == SyncBatchNorm(MPI_COMM_SELF)", step));
    } else {
      expect(close(y, y_self_s, tol),
             where("(a) y close to SyncBatchNorm(MPI_COMM_SELF) on the full batch", step));
      expect(close(g.input, dx_self_s, tol, nullptr, dx_floor),
             where("(a) dx close to SyncBatchNorm(MPI_COMM_SELF)", step));
    }
    expect(same_bits(sync.running_mean(), self.running_mean()), where("(a) running_mean", step));
    expect(same_bits(sync.running_var(), self.running_var()), where("(a) running_var", step));
    expect(sync.num_batches_tracked() == self.num_batches_tracked(),
           where("(a) num_batches_tracked", step));

    // (b) BatchNorm on the concatenated batch.
    if (exact) {
      expect(same_bits(y, y_bn_s), where("(b) y bitwise == BatchNorm on the full batch", step));
      expect(same_bits(g.input, dx_bn_s), where("(b) dx bitwise == BatchNorm", step));
      expect(same_bits(sync.running_mean(), bn.running_mean()),
             where("(b) running_mean bitwise", step));
      expect(same_bits(sync.running_var(), bn.running_var()),
             where("(b) running_var bitwise", step));
      expect(same_bits(g_self.weight, g_bn.weight) && same_bits(g_self.bias, g_bn.bias),
             where("(b) one process's dweight/dbias bitwise == BatchNorm's", step));
    } else {
      double wy = 0, wx = 0;
      expect(close(y, y_bn_s, tol, &wy), where("(b) y close to BatchNorm on the full batch", step));
      expect(close(g.input, dx_bn_s, tol, &wx, dx_floor), where("(b) dx close to BatchNorm", step));
      g_count.worst_y = std::max(g_count.worst_y, wy);
      g_count.worst_dx = std::max(g_count.worst_dx, wx);
      expect(close(sync.running_mean(), bn.running_mean(), tol),
             where("(b) running_mean close", step));
      expect(close(sync.running_var(), bn.running_var(), tol),
             where("(b) running_var close", step));
    }
    expect(sync.num_batches_tracked() == bn.num_batches_tracked(),
           where("(b) num_batches_tracked", step));

    // (c) the ranks' dweight/dbias contributions sum to BatchNorm's.
    if (opts.affine()) {
      for (int which = 0; which < 2; ++which) {
        const Vec& mine = which == 0 ? g.weight : g.bias;
        const Vec& want = which == 0 ? g_bn.weight : g_bn.bias;
        Vec sum(C), mag(C), abs_mine = mine.abs();
        MPI_Allreduce(mine.data(), sum.data(), static_cast<int>(C), mpi_type<T>(), MPI_SUM,
                      MPI_COMM_WORLD);
        MPI_Allreduce(abs_mine.data(), mag.data(), static_cast<int>(C), mpi_type<T>(), MPI_SUM,
                      MPI_COMM_WORLD);
        bool ok = true;
        for (Index c = 0; c < C; ++c) {
          const double err = std::abs(static_cast<double>(sum(c)) - static_cast<double>(want(c)));
          const double bound = std::abs(static_cast<double>(want(c))) + static_cast<double>(mag(c));
          g_count.worst_dw = std::max(g_count.worst_dw, err / (bound + 1e-300));
          ok = ok && err <= 4 * tol * bound;
        }
        expect(ok, where(which == 0 ? "(c) sum of dweight contributions"
                                    : "(c) sum of dbias contributions",
                         step));
      }
    } else {
      expect(g.weight.size() == 0 && g.bias.size() == 0,
             where("(c) no parameter gradients without affine", step));
    }

    // (e) backward(x, dy): kept statistics without a kept input, and recomputed statistics.
    sync_nokeep.forward(xs, dev);
    sync_nograd.forward(xs, dev);
    const auto g_nokeep = sync_nokeep.backward(xs, dys, dev);
    Eigen::TensorMap<const Tensor> xs_map(xs.data(), xs.dimensions());
    normkit::Gradients<T, R, L> g_nograd;
    sync_nograd.backward(xs_map, dys, g_nograd, dev);
    expect(
        same_bits(g_nokeep.input, g.input) && same_bits(g_nokeep.weight, g.weight) &&
            same_bits(g_nokeep.bias, g.bias),
        where("(e) backward(x, dy) with kept statistics (keep_input false) == backward(dy)", step));
    expect(same_bits(g_nograd.input, g.input) && same_bits(g_nograd.weight, g.weight) &&
               same_bits(g_nograd.bias, g.bias),
           where("(e) backward(x, dy) recomputing the statistics == backward(dy)", step));
    expect(same_bits(sync_nokeep.running_var(), sync.running_var()) &&
               same_bits(sync_nograd.running_var(), sync.running_var()),
           where("(e) running_var of the other modules", step));
  }

  // (d) evaluation mode: BatchNorm with the running statistics, no communication.
  if (tracking) {
    sync.eval();
    self.eval();
    bn.eval();
    normkit::BatchNorm<T, D> plain(opts);
    set_params(plain, C);
    plain.set_running_mean(sync.running_mean());
    plain.set_running_var(sync.running_var());
    plain.eval();
    fill(x, seed * 4 + 3, -2.0, 4.0);
    fill(dy, seed * 4 + 1, -1.0, 1.0);
    const Tensor xs = x.slice(off, ext), dys = dy.slice(off, ext);
    const Tensor y = sync.forward(xs, dev);
    const Tensor y_plain = plain.forward(xs);
    const Tensor y_self_s = self.forward(x).slice(off, ext);
    const Tensor y_bn_s = bn.forward(x).slice(off, ext);
    expect(same_bits(y, y_plain), where("(d) eval y == BatchNorm with the running statistics", 2));
    // Evaluation is BatchNorm's own forward on the shard, whose column-mode apply takes
    // float tables only from 4 rows per channel on (else double): below that the shard's
    // bits may differ from the full batch's by rounding.
    if (split_exact && (n == 0 || (n * sp >= 4 && N * sp >= 4))) {
      expect(same_bits(y, y_self_s), where("(d) eval y == SyncBatchNorm(MPI_COMM_SELF)", 2));
    } else {
      expect(close(y, y_self_s, tol), where("(d) eval y close to SyncBatchNorm(MPI_COMM_SELF)", 2));
    }
    if (exact) {
      expect(same_bits(y, y_bn_s),
             where("(d) eval y bitwise == BatchNorm trained on the full batch", 2));
    } else {
      expect(close(y, y_bn_s, tol),
             where("(d) eval y close to BatchNorm trained on the full batch", 2));
    }
    const auto g = sync.backward(xs, dys, dev);
    const auto g_plain = plain.backward(xs, dys);
    expect(same_bits(g.input, g_plain.input) && same_bits(g.weight, g_plain.weight) &&
               same_bits(g.bias, g_plain.bias),
           where("(d) eval backward == BatchNorm's", 2));
    expect(sync.num_batches_tracked() == 2, where("(d) eval leaves num_batches_tracked", 2));
  }
}

struct Split {
  std::string name;
  std::vector<Index> sizes;
};

std::vector<Split> splits() {
  std::vector<Split> s;
  const auto P = static_cast<std::size_t>(g_size);
  s.push_back({"even", std::vector<Index>(P, 2)});
  std::vector<Index> ramp(P);
  for (std::size_t r = 0; r < P; ++r) ramp[r] = static_cast<Index>(r + 1);  // {1,2,3,4} for 4
  if (P > 1)
    s.push_back({"ramp", ramp});
  s.push_back({"all-empty", std::vector<Index>(P, 0)});
  if (P == 2)
    s.push_back({"{0,5}", {0, 5}});
  if (P == 3)
    s.push_back({"{5,0,0}", {5, 0, 0}});
  return s;
}

std::string split_text(const std::vector<Index>& v) {
  std::string t = "{";
  for (std::size_t i = 0; i < v.size(); ++i) t += (i ? "," : "") + std::to_string(v[i]);
  return t + "}";
}

template <class T, int R, class Dev = Eigen::DefaultDevice>
void run_layouts(const std::array<Index, R - 2>& spatial,
                 Index C,
                 std::uint64_t& seed,
                 const Dev& dev = Dev()) {
  std::string sp;
  for (Index s : spatial) sp += "x" + std::to_string(s);
  for (const Split& s : splits()) {
    for (Layout lay : {Layout::nchw, Layout::colmajor, Layout::channels_last}) {
      if (lay == Layout::channels_last && R == 2)
        continue;  // (N, C) is its own channels-last form
      const int variant = static_cast<int>((seed + seed / 3) % 3);  // every layout gets each
      const std::string label =
          type_name<T>() + " rank " + std::to_string(R) + " " + layout_name(lay) +
          " C=" + std::to_string(C) + " spatial " + (sp.empty() ? "-" : sp.substr(1)) + " split " +
          s.name + " " + split_text(s.sizes) + " options " + std::to_string(variant) +
          (std::is_same<Dev, Eigen::DefaultDevice>::value ? "" : " thread pool");
      try {
        if (lay == Layout::colmajor) {
          run_case<T, R, Eigen::ColMajor>(label, s.sizes, C, spatial, false, variant, seed, dev);
        } else {
          run_case<T, R, Eigen::RowMajor>(label, s.sizes, C, spatial, lay == Layout::channels_last,
                                          variant, seed, dev);
        }
      } catch (const std::exception& e) {
        failf("%s: unexpected exception: %s", label.c_str(), e.what());
      }
      ++seed;
    }
  }
}

template <class T>
void run_all(std::uint64_t& seed, const Eigen::ThreadPoolDevice& pool) {
  if (NORMKIT_TEST_QUICK) {
    run_layouts<T, 2>({}, 5, seed);
    run_layouts<T, 3>({7}, 3, seed, pool);
    run_layouts<T, 4>({32, 33}, 3, seed);
    run_layouts<T, 5>({3, 4, 5}, 2, seed);
    return;
  }
  run_layouts<T, 2>({}, 5, seed);
  run_layouts<T, 3>({7}, 3, seed);
  run_layouts<T, 3>({1030}, 3, seed);
  run_layouts<T, 4>({5, 6}, 4, seed);
  run_layouts<T, 4>({32, 33}, 3, seed);
  run_layouts<T, 5>({3, 4, 5}, 2, seed);
  run_layouts<T, 5>({4, 16, 17}, 2, seed);
  // Runs longer than one reduction block (16 Ki elements: several blocks per sample), and the
  // local reductions on a thread pool.
  run_layouts<T, 3>({20000}, 2, seed, pool);
  run_layouts<T, 4>({32, 40}, 3, seed, pool);
  // Tensors past one apply chunk (32 Ki elements), cut at chunk edges that fall elsewhere in
  // a shard than in the full batch; 7x7 runs are not a whole number of vectors.
  run_layouts<T, 4>({7, 7}, 192, seed);
}

// ---------------------------------------------------------------------------------------
// Errors: every rank throws the same exception, nothing changes, nothing hangs.

using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
using Mod = normkit::SyncBatchNorm<float>;

struct Snapshot {
  Eigen::Tensor<float, 1> mean, var;
  std::int64_t nbt;
  explicit Snapshot(const Mod& m)
      : mean(m.running_mean()), var(m.running_var()), nbt(m.num_batches_tracked()) {}
  bool same(const Mod& m) const {
    return same_bits(mean, m.running_mean()) && same_bits(var, m.running_var()) &&
           nbt == m.num_batches_tracked();
  }
};

T4 make4(Index n, Index c, Index h, Index w, std::uint64_t seed) {
  T4 t(n, c, h, w);
  fill(t, seed, -1.0, 2.0);
  return t;
}

/// Runs f on every rank; expects exception E on every rank with a message containing `needle`
/// (and, where `bad` >= 0, naming "rank <bad>"), and m's statistics unchanged.
template <class E, class F>
void expect_throw(const char* what, Mod& m, int bad, const char* needle, F&& f) {
  const Snapshot before(m);
  std::string msg;
  bool thrown = false, other = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    msg = e.what();
  } catch (const std::exception& e) {
    other = true;
    msg = e.what();
  }
  std::string tag = std::string("error case '") + what + "'";
  expect(thrown, tag + ": expected " +
                     (std::is_same<E, normkit::shape_error>::value   ? "shape_error"
                      : std::is_same<E, normkit::value_error>::value ? "value_error"
                                                                     : "std::runtime_error") +
                     (other    ? ", got another exception: " + msg
                      : thrown ? ""
                               : ", nothing thrown"));
  if (thrown) {
    if (bad >= 0) {
      const std::string name = "rank " + std::to_string(bad);
      expect(msg.find(name) != std::string::npos, tag + ": message names " + name + ": " + msg);
    }
    expect(msg.find(needle) != std::string::npos,
           tag + ": message contains '" + needle + "': " + msg);
  }
  expect(before.same(m), tag + ": running statistics and num_batches_tracked unchanged");
  // Every rank threw (or none did): the outcome is the same everywhere.
  int mine = thrown ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  expect(all == 0 || all == g_size, tag + ": every rank threw");
}

void run_errors() {
  const int P = g_size;
  const int bad = P - 1;  // the rank with the odd input (not rank 0, which others compare to)
  const bool me = g_rank == bad;
  Mod m(normkit::BatchNormOptions(3));
  const T4 x = make4(2, 3, 4, 5, 1000 + static_cast<std::uint64_t>(g_rank));
  const T4 dy = make4(2, 3, 4, 5, 2000 + static_cast<std::uint64_t>(g_rank));
  m.forward(x);
  m.backward(dy);

  expect_throw<normkit::shape_error>("channel count", m, bad, "channels",
                                     [&] { m.forward(me ? make4(2, 4, 4, 5, 7) : x); });
  if (P > 1) {
    expect_throw<normkit::shape_error>("tensor rank", m, bad, "rank 3", [&] {
      if (me) {
        Eigen::Tensor<float, 3, Eigen::RowMajor> x3(2, 3, 20);
        fill(x3, 8, -1.0, 1.0);
        m.forward(x3);
      } else {
        m.forward(x);
      }
    });
    expect_throw<normkit::shape_error>("spatial size", m, bad, "spatial",
                                       [&] { m.forward(me ? make4(2, 3, 4, 6, 9) : x); });
    expect_throw<normkit::shape_error>("storage order", m, bad, "ColMajor", [&] {
      if (me) {
        Eigen::Tensor<float, 4, Eigen::ColMajor> xc(2, 3, 4, 5);
        fill(xc, 10, -1.0, 1.0);
        m.forward(xc);
      } else {
        m.forward(x);
      }
    });
    expect_throw<normkit::value_error>("one rank in evaluation mode", m, bad, "evaluation", [&] {
      if (me)
        m.eval();
      m.forward(x);
    });
    m.train();
  }
  // backward(dy) errors on one rank must not leave the others waiting in a collective.
  m.forward(x);
  expect_throw<normkit::shape_error>("backward(dy): grad_output size", m, bad, "grad_output",
                                     [&] { m.backward(me ? make4(2, 3, 4, 4, 11) : dy); });
  expect_throw<normkit::value_error>("backward(dy): no kept input", m, bad, "keep_input", [&] {
    if (me)
      m.set_keep_input(false);
    m.backward(dy);
  });
  m.set_keep_input(true);
  if (P > 1) {
    m.forward(x);
    expect_throw<normkit::value_error>("backward(x, dy): kept vs recomputed statistics", m, bad,
                                       "statistics", [&] {
                                         if (me)
                                           m.set_requires_grad(false);
                                         m.backward(x, dy);
                                       });
    m.set_requires_grad(true);
  }
  // A TensorMap output of the wrong size on one rank: no rank updates its statistics.
  {
    T4 ybuf(2, 3, 4, me ? 4 : 5);
    Eigen::TensorMap<T4> y(ybuf.data(), ybuf.dimensions());
    expect_throw<normkit::shape_error>("output TensorMap size", m, bad, "output",
                                       [&] { m.forward(x, y); });
  }
  // "Expected more than 1 value per channel" is judged on the whole batch.
  {
    const T4 one = make4(g_rank == 0 ? 1 : 0, 3, 1, 1, 12);
    expect_throw<normkit::value_error>("one value per channel over the whole batch", m, -1,
                                       "Expected more than 1 value per channel",
                                       [&] { m.forward(one); });
    Mod fresh(normkit::BatchNormOptions(3));
    expect_throw<normkit::value_error>("backward(x, dy) recomputing, one value per channel", fresh,
                                       -1, "Expected more than 1 value per channel",
                                       [&] { fresh.backward(one, one); });
  }
  if (P > 1) {
    const T4 one = make4(1, 3, 1, 1, 13 + static_cast<std::uint64_t>(g_rank));
    try {
      const Snapshot before(m);
      const T4 y = m.forward(one);
      expect(m.num_batches_tracked() == before.nbt + 1, "one value per channel per rank: tracked");
      const auto g = m.backward(one);
      expect(y.size() == 3 && g.input.size() == 3, "one value per channel per rank: sizes");
    } catch (const std::exception& e) {
      failf("one value per channel on every rank (P values per channel in all): %s", e.what());
    }
  }
  // MPI errors become std::runtime_error where the communicator returns them.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  {
    Mod null_comm(normkit::BatchNormOptions(3), MPI_COMM_NULL);
    expect_throw<std::runtime_error>("MPI_COMM_NULL with MPI_ERRORS_RETURN", null_comm, -1, "MPI_",
                                     [&] { null_comm.forward(x); });
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);

  // Still usable and in step on every rank.
  m.forward(x);
  m.backward(dy);
  std::vector<float> all(static_cast<std::size_t>(3 * P));
  MPI_Allgather(m.running_var().data(), 3, MPI_FLOAT, all.data(), 3, MPI_FLOAT, MPI_COMM_WORLD);
  bool same = true;
  for (int r = 1; r < P; ++r)
    same = same && std::memcmp(all.data(), all.data() + 3 * r, 3 * sizeof(float)) == 0;
  expect(same, "after the errors: the same running_var on every rank");
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  if (provided < MPI_THREAD_FUNNELED)
    failf("MPI provides thread level %d, below MPI_THREAD_FUNNELED", provided);

  Eigen::ThreadPool threads(2);
  Eigen::ThreadPoolDevice pool(&threads, 2);
  std::uint64_t seed = 1;
  try {
    run_all<float>(seed, pool);
    if (!NORMKIT_TEST_QUICK)
      run_all<double>(seed, pool);
    run_errors();
  } catch (const std::exception& e) {
    failf("unexpected exception: %s", e.what());
  }

  long totals[2] = {g_failures, g_checks}, sums[2] = {0, 0};
  MPI_Allreduce(totals, sums, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
  double worst[3] = {g_count.worst_y, g_count.worst_dx, g_count.worst_dw}, wmax[3] = {0, 0, 0};
  MPI_Reduce(worst, wmax, 3, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  if (g_rank == 0) {
    std::printf(
        "sync_batch_norm_test%s, %d rank(s): %ld cases (%ld bitwise-to-BatchNorm), %ld checks over "
        "all ranks, %ld failed\n"
        "largest relative difference to BatchNorm where not bitwise: y %.2e, dx %.2e, summed "
        "dweight/dbias %.2e\n",
        NORMKIT_TEST_QUICK ? " (sanitizer build: reduced matrix)" : "", g_size, g_count.cases,
        g_count.exact, sums[1], sums[0], wmax[0], wmax[1], wmax[2]);
    std::printf("%s\n", sums[0] == 0 ? "OK" : "FAILED");
  }
  MPI_Finalize();
  return sums[0] == 0 ? 0 : 1;
}
