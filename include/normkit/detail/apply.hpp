// normkit/detail/apply.hpp: the apply step -- one pass over memory that maps every element
// with its slot's coefficients: forward normalize + affine, LayerNorm's elementwise affine,
// and the backward dx are all this walk with a different ApplyOp.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_APPLY_HPP_
#define NORMKIT_DETAIL_APPLY_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::min
#include <atomic>     // std::atomic
#include <cmath>      // std::exp, std::erf, std::tanh
#include <cstddef>    // std::size_t
#include <cstdio>     // std::fprintf
#include <cstdlib>    // std::getenv, std::strtoull
#include <cstring>    // std::memcpy, std::strcmp
#include <limits>     // std::numeric_limits
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#include <normkit/config.hpp>
#include <normkit/detail/dispatch.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/kernels/types.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/scratch.hpp>

namespace normkit {
namespace process_state {
// See isa.hpp: process-wide, outside the ABI namespace. 0: not chosen yet (the setting's
// value is stored plus one, so that "stream every output" is 1).
inline std::atomic<unsigned long long> streaming_store_bytes{0};
}  // namespace process_state
}  // namespace normkit

NORMKIT_BEGIN_NAMESPACE

/// "Never stream" for set_streaming_store_bytes().
inline constexpr std::size_t kNeverStream = std::numeric_limits<std::size_t>::max();

namespace detail {

/// The initial streaming_store_bytes(): NORMKIT_STREAMING_STORE_BYTES (a byte count, with
/// an optional K, M or G suffix, or "never"), else the last-level cache size the OS
/// reports, else never.
inline std::size_t initial_streaming_store_bytes() {
  const char* env = std::getenv("NORMKIT_STREAMING_STORE_BYTES");
  if (env != nullptr && *env != 0) {
    if (std::strcmp(env, "never") == 0)
      return kNeverStream;
    char* end = nullptr;
    unsigned long long v = std::strtoull(env, &end, 10);
    const char u = end ? *end : '\0';
    const int shift = u == 'K' || u == 'k'   ? 10
                      : u == 'M' || u == 'm' ? 20
                      : u == 'G' || u == 'g' ? 30
                                             : 0;
    if (end != env && (shift == 0 ? u == 0 : end[1] == 0) && v <= (kNeverStream >> shift))
      return static_cast<std::size_t>(v << shift);
    std::fprintf(stderr,
                 "normkit: NORMKIT_STREAMING_STORE_BYTES=%s not recognized (a byte count such as "
                 "64M, or never); using the last-level cache size\n",
                 env);
  }
  long llc = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (llc <= 0)
    llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return llc > 0 ? static_cast<std::size_t>(llc) : kNeverStream;
}

}  // namespace detail

/// Outputs (y of a forward, dx of a backward) of at least this many bytes are written with
/// streaming (non-temporal) stores, which go around the caches: an output larger than the
/// last-level cache would not stay there for its reader anyway, and a normal store first
/// reads every line it writes (one more pass over memory). Default: the last-level cache
/// size the OS reports (sysconf; never where it reports none), or the environment variable
/// NORMKIT_STREAMING_STORE_BYTES (a byte count with an optional K, M or G suffix, or
/// "never"). Streaming changes no result bit, only where y is when the call returns. One
/// setting for the whole process. Streamed: float outputs on x86-64 (every ISA level) and
/// aarch64 (Clang), bfloat16 and half outputs on the AVX2 and AVX-512 levels; runs shorter
/// than 64 elements and in-place outputs are stored normally.
inline std::size_t streaming_store_bytes() {
  unsigned long long v = process_state::streaming_store_bytes.load(std::memory_order_relaxed);
  if (v == 0) {
    // Deterministic, so threads racing here store the same value.
    const std::size_t b = detail::initial_streaming_store_bytes();
    unsigned long long expected = 0;
    process_state::streaming_store_bytes.compare_exchange_strong(
        expected, b == kNeverStream ? b : static_cast<unsigned long long>(b) + 1,
        std::memory_order_relaxed);
    v = process_state::streaming_store_bytes.load(std::memory_order_relaxed);
  }
  return v == kNeverStream ? kNeverStream : static_cast<std::size_t>(v - 1);
}
/// Sets streaming_store_bytes(): 0 streams every output, kNeverStream none.
inline void set_streaming_store_bytes(std::size_t bytes) {
  process_state::streaming_store_bytes.store(
      bytes == kNeverStream ? bytes : static_cast<unsigned long long>(bytes) + 1,
      std::memory_order_relaxed);
}

namespace detail {

/// Whether a call writing `numel` elements of T streams them (streaming_store_bytes()): the
/// one rule for every apply and LayerNorm's one-pass backward.
template <class T>
int streams_output(Index numel) {
  return static_cast<std::size_t>(numel) * sizeof(T) >= streaming_store_bytes() ? 1 : 0;
}

/// A double mean as float hi + lo, for a float-speed, double-accurate x - mean.
///
/// NB: for float input the apply runs in float (16 lanes, no conversions: the conversions
/// bound the double version). (x - hi) is exact whenever x is within a factor 2 of the mean
/// (Sterbenz) -- the large-offset case where float arithmetic usually loses everything --
/// and otherwise |x - mean| >= |mean|/2 keeps its rounding relative; then subtracting lo
/// restores the double mean's digits. The result is within ~2 ulp of the double computation,
/// and exact for constant slices (x == mean gives 0, y == beta). Only when every coefficient
/// fits_float(); otherwise the double path runs.
NORMKIT_ALWAYS_INLINE void split_mean(double m, float& hi, float& lo) {
  hi = static_cast<float>(m);
  lo = static_cast<float>(m - static_cast<double>(hi));
}

/// y = (x - m) * a + b.
///
/// NB: the centred form (x - mean) * scale + shift rather than ATen's x * scale + (shift -
/// mean * scale): one subtraction per element (free in a memory-bound loop), and exactly beta
/// for constant slices and one-element LayerNorm rows, where the folded form leaves rounding
/// residue (#108072).
inline AffineCoef affine_coef(double m, double a, double b) {
  AffineCoef k{m, a, b, 0, 0, 0, 0, 0};
  if (fits_float(m) && fits_float(a) && fits_float(b)) {
    split_mean(m, k.hi, k.lo);
    k.af = static_cast<float>(a);
    k.bf = static_cast<float>(b);
    k.use_float = 1;
  }
  return k;
}

/// dx = a * dy + b * (x - m) + c.
inline GradCoef grad_coef(double m, double a, double b, double c) {
  GradCoef k{m, a, b, c, 0, 0, 0, 0, 0, 0};
  if (fits_float(m) && fits_float(a) && fits_float(b) && fits_float(c)) {
    split_mean(m, k.hi, k.lo);
    k.af = static_cast<float>(a);
    k.bf = static_cast<float>(b);
    k.cf = static_cast<float>(c);
    k.use_float = 1;
  }
  return k;
}

enum class ApplyKind {
  affine,     // y = (x - m[s]) * a[s] + b[s]                        (AffineCoef per slot)
  ln_affine,  // y = (x - m[s]) * a[s] * gamma[aux] + beta[aux]      (a = rstd)
  gradin,     // dx = a[s] * w[aux] * dy + b[s] * (x - m[s]) + c[s]  (GradCoef; w = 1 if null)
};

/// The activation of code `act` (kernels/simd.hpp's act_scalar, in baseline code).
inline double act_value(int act, double z) {
  switch (act) {
    case 1:
      return z < 0 ? 0.0 : z;
    case 2:
      return z / (1.0 + std::exp(-z));
    case 3:
      return 0.5 * z * (1.0 + std::erf(z * 0.70710678118654752));
    case 4:
      return 0.5 * z * (1.0 + std::tanh(0.79788456080286536 * (z + 0.044715 * z * z * z)));
    default:
      return z;
  }
}

/// What the apply walk does to a run; see ApplyKind. Coefficients are indexed by plan slot.
template <class T>
struct ApplyOp {
  ApplyKind kind = ApplyKind::affine;
  const Leaves<T>* leaf = nullptr;
  const LnLeaves<T>* ln_leaf = nullptr;  // ln_affine
  const T* x = nullptr;
  const T* dy = nullptr;
  T* y = nullptr;  // y, or dx
  const AffineCoef* ak = nullptr;
  const GradCoef* gk = nullptr;
  const compute_t<T>* gamma = nullptr;  // ln_affine
  const compute_t<T>* beta = nullptr;   // ln_affine
  const double* w = nullptr;            // gradin weight per aux (LayerNorm), or null
  // Column mode: per-slot tables (see column_tables()), used when tables_ready.
  ColTables tables{};
  bool tables_ready = false;
  T* copy = nullptr;  // when set, x is copied here as it is read (a kept input)
  // Fused epilogue (affine only): y = act(... + res); res null for none, act a code of
  // kernels/simd.hpp's activate() (0 = identity).
  const T* res = nullptr;
  int act = 0;
  const EpiLeaves<T>* epi = nullptr;
  // Streaming stores for y (see streaming_store_bytes()): set by streaming_for().
  int stream = 0;

  /// This op, streaming its output when `numel` elements of T reach streaming_store_bytes().
  ApplyOp streaming_for(Index numel) const {
    ApplyOp o = *this;
    o.stream = streams_output<T>(numel);
    return o;
  }

  /// count runs of len elements, stride apart: run r's first element at off + r*stride,
  /// slot slot + r*slot_step (column mode: that row's first slot; the slots of a row are
  /// consecutive), aux index aux + r*aux_outer (+ j*aux_inner along the run).
  void batch(bool column,
             Index off,
             Index len,
             Index count,
             Index stride,
             Index slot,
             Index slot_step,
             Index aux,
             Index aux_outer,
             Index aux_inner) const {
    if (kind == ApplyKind::affine && (res || act)) {
      epilogue(column, off, len, count, stride, slot, slot_step, aux, aux_outer, aux_inner);
    } else if (!column) {
      if (kind == ApplyKind::affine) {
        leaf->affine_rows(x + off, y + off, len, count, stride, ak + slot, slot_step, stream);
      } else if (kind == ApplyKind::ln_affine && aux_inner == 1 && aux_outer == 0) {
        ln_leaf->ln_affine_rows(x + off, y + off, len, count, stride, ak + slot, slot_step,
                                gamma + aux, beta + aux, stream);
      } else if (kind == ApplyKind::gradin && w == nullptr) {
        leaf->gradin_rows(x + off, dy + off, y + off, len, count, stride, gk + slot, slot_step,
                          stream);
      } else {
        for (Index r = 0; r < count; ++r)
          generic(false, off + r * stride, len, slot + r * slot_step, aux + r * aux_outer,
                  aux_inner);
      }
    } else if (tables_ready && slot_step == 0 && kind != ApplyKind::ln_affine && w == nullptr) {
      ColTables k = tables;
      for (int i = 0; i < 5; ++i) k.f[i] = tables.f[i] ? tables.f[i] + slot : nullptr;
      for (int i = 0; i < 4; ++i) k.d[i] = tables.d[i] ? tables.d[i] + slot : nullptr;
      if (kind == ApplyKind::affine) {
        leaf->affine_cols(x + off, y + off, stride, count, len, k, stream);
      } else {
        leaf->gradin_cols(x + off, dy + off, y + off, stride, count, len, k, stream);
      }
    } else {
      for (Index r = 0; r < count; ++r)
        generic(true, off + r * stride, len, slot + r * slot_step, aux + r * aux_outer, aux_inner);
    }
    if (copy) {
      for (Index r = 0; r < count; ++r)
        std::memcpy(copy + off + r * stride, x + off + r * stride,
                    static_cast<std::size_t>(len) * sizeof(T));
    }
  }

  /// batch() with the fused epilogue (res, act).
  void epilogue(bool column,
                Index off,
                Index len,
                Index count,
                Index stride,
                Index slot,
                Index slot_step,
                Index aux,
                Index aux_outer,
                Index aux_inner) const {
    const T* r = res ? res + off : nullptr;
    if (!column) {
      epi->affine_rows_epi(x + off, r, y + off, len, count, stride, ak + slot, slot_step, act,
                           stream);
    } else if (tables_ready && slot_step == 0) {
      ColTables k = tables;
      for (int i = 0; i < 5; ++i) k.f[i] = tables.f[i] ? tables.f[i] + slot : nullptr;
      for (int i = 0; i < 4; ++i) k.d[i] = tables.d[i] ? tables.d[i] + slot : nullptr;
      epi->affine_cols_epi(x + off, r, y + off, stride, count, len, k, act, stream);
    } else {
      for (Index q = 0; q < count; ++q)
        generic(true, off + q * stride, len, slot + q * slot_step, aux + q * aux_outer, aux_inner);
    }
  }

  /// Any layout, in double, one element at a time (layouts no leaf covers: strided aux
  /// indices, LayerNorm in column mode, LayerNorm's weighted dx).
  void generic(bool column, Index off, Index len, Index slot, Index aux, Index aux_inner) const {
    for (Index j = 0; j < len; ++j) {
      const Index s = column ? slot + j : slot;
      const Index k = aux + j * aux_inner;
      const double xv = static_cast<double>(x[off + j]);
      if (kind == ApplyKind::affine) {
        double z = (xv - ak[s].m) * ak[s].a + ak[s].b;
        if (res || act) {
          z += res ? static_cast<double>(res[off + j]) : 0.0;
          z = act_value(act, z);
        }
        y[off + j] = static_cast<T>(z);
      } else if (kind == ApplyKind::ln_affine) {
        y[off + j] = static_cast<T>((xv - ak[s].m) * ak[s].a * static_cast<double>(gamma[k]) +
                                    static_cast<double>(beta[k]));
      } else {
        const double g = static_cast<double>(dy[off + j]) * (w ? w[k] : 1.0);
        y[off + j] = static_cast<T>(gk[s].a * g + gk[s].b * (xv - gk[s].m) + gk[s].c);
      }
    }
  }
};

/// Per-slot column tables for an op in column mode (affine: {hi, lo, a, b} / {m, a, b};
/// gradin: {hi, lo, a, b, c} / {m, a, b, c}), stored in `store`; the float ones only when
/// every slot's coefficients fit float.
template <class T>
void column_tables(ApplyOp<T>& op,
                   Index slots,
                   SmallBuffer<double>& dstore,
                   SmallBuffer<float>& fstore) {
  if (op.kind == ApplyKind::ln_affine || op.w != nullptr)
    return;
  const bool grad = op.kind == ApplyKind::gradin;
  const int nd = grad ? 4 : 3;
  const auto n = static_cast<std::size_t>(slots);
  dstore.resize(static_cast<std::size_t>(nd) * n);
  bool fit = is_floatlike_v<T>;
  for (Index s = 0; s < slots; ++s) {
    const auto u = static_cast<std::size_t>(s);
    if (grad) {
      const GradCoef& k = op.gk[s];
      dstore[u] = k.m, dstore[n + u] = k.a, dstore[2 * n + u] = k.b, dstore[3 * n + u] = k.c;
      fit = fit && k.use_float;
    } else {
      const AffineCoef& k = op.ak[s];
      dstore[u] = k.m, dstore[n + u] = k.a, dstore[2 * n + u] = k.b;
      fit = fit && k.use_float;
    }
  }
  for (int i = 0; i < 4; ++i)
    op.tables.d[i] = i < nd ? dstore.data() + static_cast<std::size_t>(i) * n : nullptr;
  for (int i = 0; i < 5; ++i) op.tables.f[i] = nullptr;
  op.tables.use_float = 0;
  if (fit) {
    const int nf = grad ? 5 : 4;
    fstore.resize(static_cast<std::size_t>(nf) * n);
    for (Index s = 0; s < slots; ++s) {
      const auto u = static_cast<std::size_t>(s);
      if (grad) {
        const GradCoef& k = op.gk[s];
        fstore[u] = k.hi, fstore[n + u] = k.lo, fstore[2 * n + u] = k.af;
        fstore[3 * n + u] = k.bf, fstore[4 * n + u] = k.cf;
      } else {
        const AffineCoef& k = op.ak[s];
        fstore[u] = k.hi, fstore[n + u] = k.lo, fstore[2 * n + u] = k.af, fstore[3 * n + u] = k.bf;
      }
    }
    for (int i = 0; i < nf; ++i) op.tables.f[i] = fstore.data() + static_cast<std::size_t>(i) * n;
    op.tables.use_float = 1;
  }
  op.tables_ready = true;
}

// NB: apply chunks. The walk cuts the tensor into chunks of kApplyChunk elements in memory
// order (threads take chunks); a chunk's runs are handed to the op batched along the
// innermost outer axis, partial runs at chunk edges alone. Every element is mapped by
// itself, but the leaves' maps (fmap, dmap) take 16 floats or 8 doubles at a time and the
// rest of a run in a scalar tail, and under FMA contraction (GCC's default in GNU mode) the
// compiler may fuse the vector and the scalar copy of the element arithmetic differently:
// a cut that moved elements between body and tail changed their last bit with the number
// of threads (the single-threaded walk and the fused paths never cut a run). So a chunk
// edge inside a run moves back to a multiple of kApplyCutAlign elements from the run's
// start: the pieces' bodies and tail then hold the very elements of the uncut run's.
inline constexpr Index kApplyChunk = Index{1} << 15;
inline constexpr Index kApplyCutAlign = 16;

/// Runs `op` over every element of the plan. Column-mode tables must already be set
/// (column_tables()) for the leaf path.
template <class T>
void apply_plan(const Plan& p, const ApplyOp<T>& op_in, const Exec& ex) {
  if (p.numel == 0)
    return;
  const ApplyOp<T> op = op_in.streaming_for(p.numel);
  Odometer outer;
  for (int i = 0; i + 1 < p.rank; ++i) outer.add(p.axes[static_cast<std::size_t>(i)]);
  const LoopAxis& inner = p.inner();
  const Index L = inner.extent;
  const bool column = p.column_mode();
  const LoopAxis* last = outer.n > 0 ? outer.ax[static_cast<std::size_t>(outer.n - 1)] : nullptr;
  const Index stride = last ? last->stride : 0;
  const Index slot_step = last ? last->slot_stride : 0;
  const Index aux_outer = last ? last->aux_stride : 0;
  const Index chunks = (p.numel + kApplyChunk - 1) / kApplyChunk;
  auto edge = [&](Index chunk) {  // where chunk `chunk` starts (see kApplyCutAlign)
    const Index e = std::min(p.numel, chunk * kApplyChunk);
    return e - (e % L) % kApplyCutAlign;
  };
  auto body = [&](Index first, Index last_chunk) {
    Odometer od = outer;
    Index start = edge(first);
    const Index end = edge(last_chunk);
    od.seek(start / L);
    Index i0 = start % L;
    while (start < end) {
      if (i0 != 0 || end - start < L) {  // a partial run
        const Index len = std::min(L - i0, end - start);
        op.batch(column, od.offset + i0 * inner.stride, len, 1, 0, od.slot + (column ? i0 : 0), 0,
                 od.aux + i0 * inner.aux_stride, 0, inner.aux_stride);
        start += len;
        i0 = 0;
        od.next();
        continue;
      }
      const Index cnt = od.n == 0 ? 1 : std::min((end - start) / L, od.inner_room());
      op.batch(column, od.offset, L, cnt, stride, od.slot, slot_step, od.aux, aux_outer,
               inner.aux_stride);
      start += cnt * L;
      if (od.n > 0)
        od.advance(cnt);
    }
  };
  if (ex.parallel(p.numel) && chunks > 1) {
    run_ranges(ex, chunks, items_for(ex, chunks), body);
  } else {
    body(0, chunks);
  }
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_APPLY_HPP_
