// normkit/detail/kernels/leaves.hpp: the leaf kernels -- every loop that touches tensor data
// element by element, written once and compiled once per ISA (detail/dispatch.hpp includes
// this file inside each ISA's namespace and target region; no include guard, and no
// #include here: everything it uses is included before the region).
// SPDX-License-Identifier: MIT
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <normkit/detail/kernels/simd.hpp>

// NB: what a leaf is. The baseline code (reduction.hpp, apply.hpp, fused.hpp, the norms)
// decides which elements form a run, which runs belong to which statistic slot and block,
// which thread does what and in which order partial sums merge; a leaf only streams over
// `count` runs of `len` elements, `stride` apart -- one call per batch of runs, so the table
// call is paid per batch, not per element. A run's elements always land in the same logical
// lanes (simd.hpp), whether the batch holds one run or many: results depend on the blocking
// the baseline code chose, never on how it batched the calls.
//
// NB: short runs far apart (a (64, 512, 7, 7) BatchNorm channel: 64 runs of 196 bytes,
// 100 KB apart) defeat the hardware prefetchers; the run kPrefetchRuns ahead is requested.
inline constexpr Index kShortRun = 256;
inline constexpr Index kPrefetchRuns = 4;

// ---------------------------------------------------------------------------------------
// Row reductions: run r (at x + r*stride) accumulates into st[r*st_step] with shift
// c[r*c_step]. st_step == 0 keeps one accumulator in registers across the batch.

// NB: 16-bit storage (bfloat16, half) on the AVX2 and AVX-512 copies. The double work per
// element (widen, subtract, add, multiply-add, for every 8 elements) bound these sums: half
// the bytes of float took longer than float (bn2d-resnet-bf16 training 3.59 ms vs 2.86 ms).
// So the terms are formed and added in float, kLowBlock vectors of 16 at a time, and each
// block's sums are added to the double accumulators, lanes 0-7 into a and 8-15 into b:
// - a value of T is exact in float; so is x - c for the moments' shift (a value of T) when
//   the exponents of x and c differ by at most 16 (else it rounds once), and so is its square
//   or its product with dy when x - c has at most 12 significant bits;
// - a block adds kLowBlock terms per lane in float: at most kLowBlock - 1 roundings of its
//   own magnitude, 2^-24 each, before the double sums (against the outputs' 2^-8 or 2^-11);
// - the backward's shift (the mean, a double) is rounded to float and the difference is
//   added back per block in double (x - c = (x - cf) + (cf - c)); a moments shift that is
//   not a value of float (never, today: it is an element) keeps the run in double;
// - a run whose float sums are not finite (|x - c| beyond 1.8e19, bfloat16, or a NaN or
//   infinity in the data) is summed again in double from the state before it, as the other
//   types are, so overflow and NaN give exactly what they gave before.
// The order is fixed by the position in the run: thread counts and fused or two-pass
// statistics still agree bit for bit.
inline constexpr Index kLowBlock = 4;

// The AVX2 and AVX-512 copies (and a translation unit's own -mavx2 or wider baseline).
inline constexpr bool kLowFloatSums = kTwoPairs;
// Adds a block's float sums (16 lanes each) to the double accumulators; dc != 0 first adds
// dc * s1 to the second sums (the backward's shift correction, see the NB above).
NORMKIT_KINLINE void low_flush(
    const F16& s1, const F16& s2, double dc, D8& a1, D8& a2, D8& b1, D8& b2) {
  alignas(64) float o[32];
  store(o, s1);
  store(o + 16, s2);
  D8 u;
  load(u, o);
  a1 += u;
  if (dc != 0.0)
    a2 += u * dc;
  load(u, o + 8);
  b1 += u;
  if (dc != 0.0)
    b2 += u * dc;
  load(u, o + 16);
  a2 += u;
  load(u, o + 24);
  b2 += u;
}
// Whether every lane of four accumulators is finite.
NORMKIT_KINLINE bool all_finite(const D8& x1, const D8& x2, const D8& y1, const D8& y2) {
  D8 t = (x1 + x2) + (y1 + y2);
  t = t - t;  // 0 where finite, NaN where not
  alignas(64) double o[8];
  store(o, t);
  bool ok = true;
  for (int k = 0; k < 8; ++k) ok = ok && o[k] == 0.0;
  return ok;
}
// The accumulators at the start of a run: restored (and true returned) when the run's float
// sums left any lane non-finite, so that the caller sums the run again in double.
struct AccSnapshot {
  D8 a1, a2, b1, b2;
  NORMKIT_KINLINE bool restore_if_not_finite(D8& x1, D8& x2, D8& y1, D8& y2) const {
    const bool ok = all_finite(x1, x2, y1, y2);
    if (!ok) {
      x1 = a1;
      x2 = a2;
      y1 = b1;
      y2 = b2;
    }
    return !ok;
  }
};

// Moments: a1 += (x - c), a2 += (x - c)^2 (see MomentsOp NB in reduction.hpp).
template <class T>
NORMKIT_KINLINE void mom_run(
    const T* xp, Index len, double c, D8& a1, D8& a2, D8& b1, D8& b2, double& t1, double& t2) {
  D8 cv;
  splat(cv, c);
  Index i = 0;
  if constexpr (kLowFloatSums && is_low_v<T>) {
    // (the shift is the block's first element, a value of T; any other shift stays in double)
    const float cf = static_cast<float>(c);
    if (len >= 16 * kLowBlock && static_cast<double>(cf) == c) {
      const AccSnapshot start{a1, a2, b1, b2};
      const F16 cv16 = splat16(cf);
      for (; i + 16 * kLowBlock <= len; i += 16 * kLowBlock) {
        F16 s1 = load16(xp + i) - cv16;
        F16 s2 = s1 * s1;
        for (Index k = 1; k < kLowBlock; ++k) {
          const F16 d = load16(xp + i + 16 * k) - cv16;
          s1 += d;
          s2 += d * d;
        }
        low_flush(s1, s2, 0.0, a1, a2, b1, b2);
      }
      if (start.restore_if_not_finite(a1, a2, b1, b2))  // overflow or NaN: again, in double
        i = 0;
    }
  }
  if constexpr (kTwoPairs) {
    for (; i + 16 <= len; i += 16) {
      D8 d, e;
      load(d, xp + i);
      load(e, xp + i + 8);
      d -= cv;
      e -= cv;
      a1 += d;
      a2 += d * d;
      b1 += e;
      b2 += e * e;
    }
  } else {
    (void)b1, (void)b2;
  }
  for (; i + 8 <= len; i += 8) {
    D8 d;
    load(d, xp + i);
    d -= cv;
    a1 += d;
    a2 += d * d;
  }
  for (; i < len; ++i) {  // Scalar tail.
    const double d = static_cast<double>(to_f(xp[i])) - c;
    t1 += d;
    t2 += d * d;
  }
}

// Backward sums of 16-bit data in float blocks (see the NB above mom_run): per block,
// kLowBlock vectors of terms g and g * (x - cf), then low_flush into the double sums with the
// shift correction dc = cf - c. One 16-lane step at a time, so that LayerNorm's backward can
// interleave a row's sums with the previous row's dx; grad_run steps over whole blocks only.
struct LowGradSums {
  F16 s1, s2, cv;
  double dc;
  Index k;  // vectors in the open block
  NORMKIT_KINLINE void begin(double c) {
    const float cf = static_cast<float>(c);
    cv = splat16(cf);
    dc = static_cast<double>(cf) - c;
    k = 0;
  }
  NORMKIT_KINLINE void step(const F16& g, const F16& x, D8& a1, D8& a2, D8& b1, D8& b2) {
    const F16 d = x - cv;
    if (k == 0) {
      s1 = g;
      s2 = g * d;
    } else {
      s1 += g;
      s2 += g * d;
    }
    if (++k == kLowBlock) {  // sum g (x - c) = sum g (x - cf) + (cf - c) sum g, per lane
      low_flush(s1, s2, dc, a1, a2, b1, b2);
      k = 0;
    }
  }
  // Flushes a block left open by a run that is not a whole number of blocks.
  NORMKIT_KINLINE void close(D8& a1, D8& a2, D8& b1, D8& b2) {
    if (k != 0)
      low_flush(s1, s2, dc, a1, a2, b1, b2);
    k = 0;
  }
};

// Backward sums: a1 += dy, a2 += dy * (x - c).
template <class T>
NORMKIT_KINLINE void grad_run(const T* xp,
                              const T* gp,
                              Index len,
                              double c,
                              D8& a1,
                              D8& a2,
                              D8& b1,
                              D8& b2,
                              double& t1,
                              double& t2) {
  D8 cv;
  splat(cv, c);
  Index i = 0;
  if constexpr (kLowFloatSums && is_low_v<T>) {  // see the NB above mom_run
    if (len >= 16 * kLowBlock) {
      const AccSnapshot start{a1, a2, b1, b2};
      LowGradSums L;
      L.begin(c);
      const Index blocks_end = len - len % (16 * kLowBlock);
      for (; i < blocks_end; i += 16) L.step(load16(gp + i), load16(xp + i), a1, a2, b1, b2);
      if (start.restore_if_not_finite(a1, a2, b1, b2))  // overflow or NaN: again, in double
        i = 0;
    }
  }
  if constexpr (kTwoPairs) {
    for (; i + 16 <= len; i += 16) {
      D8 g, h, d, e;
      load(g, gp + i);
      load(h, gp + i + 8);
      load(d, xp + i);
      load(e, xp + i + 8);
      d -= cv;
      e -= cv;
      a1 += g;
      a2 += g * d;
      b1 += h;
      b2 += h * e;
    }
  } else {
    (void)b1, (void)b2;
  }
  for (; i + 8 <= len; i += 8) {
    D8 g, d;
    load(g, gp + i);
    load(d, xp + i);
    d -= cv;
    a1 += g;
    a2 += g * d;
  }
  for (; i < len; ++i) {
    const double g = static_cast<double>(to_f(gp[i]));
    t1 += g;
    t2 += g * (static_cast<double>(to_f(xp[i])) - c);
  }
}

// NB: one code path for one accumulator (st_step == 0, kept in registers across the batch)
// and for one accumulator per run: the element arithmetic must be compiled once per leaf,
// because GCC may contract a * b + c into an FMA in one inlined copy and not in another, and
// then two callers that must agree bit for bit (fused vs two-pass, one thread vs many) would
// not.
template <class T, class Run>
NORMKIT_KINLINE void rows_batch(Index len,
                                Index count,
                                const double* c,
                                Index c_step,
                                RowAcc* st,
                                Index st_step,
                                const Run& run) {
  const bool pf = count > 1 && len <= kShortRun;
  D8 a1, a2, b1, b2;  // (zeroed only to tell the compiler they are; loaded before use)
  zero(a1);
  zero(a2);
  zero(b1);
  zero(b2);
  double t1 = 0, t2 = 0;
  for (Index r = 0; r < count; ++r) {
    RowAcc& s = st[r * st_step];
    if (r == 0 || st_step != 0) {
      load_acc(s, a1, a2, b1, b2);
      t1 = s.t1;
      t2 = s.t2;
    }
    run(r, pf && r + kPrefetchRuns < count, c[r * c_step], a1, a2, b1, b2, t1, t2);
    if (r + 1 == count || st_step != 0) {
      store_acc(s, a1, a2, b1, b2);
      s.t1 = t1;
      s.t2 = t2;
    }
  }
}

/// Moments of `count` runs (see the section comment).
template <class T>
void mom_rows(const T* x,
              Index len,
              Index count,
              Index stride,
              const double* c,
              Index c_step,
              RowAcc* st,
              Index st_step) {
  rows_batch<T>(len, count, c, c_step, st, st_step,
                [&](Index r, bool pf, double cc, D8& a1, D8& a2, D8& b1, D8& b2, double& t1,
                    double& t2) NORMKIT_KLAMBDA {
                  const T* xp = x + r * stride;
                  if (pf)
                    prefetch_lines(xp + kPrefetchRuns * stride, len);
                  mom_run(xp, len, cc, a1, a2, b1, b2, t1, t2);
                });
}

/// Backward sums of `count` runs (see the section comment).
template <class T>
void grad_rows(const T* x,
               const T* dy,
               Index len,
               Index count,
               Index stride,
               const double* c,
               Index c_step,
               RowAcc* st,
               Index st_step) {
  rows_batch<T>(len, count, c, c_step, st, st_step,
                [&](Index r, bool pf, double cc, D8& a1, D8& a2, D8& b1, D8& b2, double& t1,
                    double& t2) NORMKIT_KLAMBDA {
                  const T* xp = x + r * stride;
                  const T* gp = dy + r * stride;
                  if (pf) {
                    prefetch_lines(xp + kPrefetchRuns * stride, len);
                    prefetch_lines(gp + kPrefetchRuns * stride, len);
                  }
                  grad_run(xp, gp, len, cc, a1, a2, b1, b2, t1, t2);
                });
}

// ---------------------------------------------------------------------------------------
// Column reductions: `rows` rows of `len` consecutive slots, row k at x + k*row_stride;
// column j adds its rows in order into s1[j], s2[j] (shift c[j]).
//
// NB: column strips. A strip of kStripD8 logical vectors of columns keeps its accumulators in
// registers down all the rows (the plain loop loaded and stored both accumulator arrays for
// every element, which bound BatchNorm1d and channels-last statistics at 2-3x the bandwidth
// floor). With 64 channels or fewer a strip is a whole row and the block is read in memory
// order. Each column still adds its rows in order into its own accumulator: the strip width
// changes no result.
#if NORMKIT_KERNEL_ISA == 2
inline constexpr Index kStripD8 = 8;  // 64 columns: 24 of the 32 zmm registers
#elif NORMKIT_KERNEL_ISA == 1
inline constexpr Index kStripD8 = 2;  // 16 columns: 12 of the 16 ymm registers
#else
inline constexpr Index kStripD8 = 1;  // 8 columns: 12 of the 16 xmm registers
#endif

template <Index kU, class Step8>
NORMKIT_KINLINE void column_strip(
    Index rows, Index j, const double* c, double* s1, double* s2, const Step8& step8) {
  D8 a[kU], q[kU], cv[kU];
  for (Index u = 0; u < kU; ++u) {
    load(a[u], s1 + j + 8 * u);
    load(q[u], s2 + j + 8 * u);
    load(cv[u], c + j + 8 * u);
  }
  for (Index k = 0; k < rows; ++k) {
    for (Index u = 0; u < kU; ++u) step8(k, j + 8 * u, cv[u], a[u], q[u]);
  }
  for (Index u = 0; u < kU; ++u) {
    store(s1 + j + 8 * u, a[u]);
    store(s2 + j + 8 * u, q[u]);
  }
}

template <class Step8, class Step1>
NORMKIT_KINLINE void column_strips(Index rows,
                                   Index len,
                                   const double* c,
                                   double* s1,
                                   double* s2,
                                   const Step8& step8,
                                   const Step1& step1) {
  constexpr Index kW = 8 * kStripD8;
  Index j = 0;
  for (; j + kW <= len; j += kW) column_strip<kStripD8>(rows, j, c, s1, s2, step8);
  for (; j + 8 <= len; j += 8) column_strip<1>(rows, j, c, s1, s2, step8);
  for (; j < len; ++j) {
    double a = s1[j], q = s2[j];
    for (Index k = 0; k < rows; ++k) step1(k, j, a, q);
    s1[j] = a;
    s2[j] = q;
  }
}

/// Column moments (see the section comment).
template <class T>
void mom_cols(
    const T* x, Index row_stride, Index rows, Index len, const double* c, double* s1, double* s2) {
  column_strips(
      rows, len, c, s1, s2,
      [&](Index k, Index j, const D8& cv, D8& a, D8& q) NORMKIT_KLAMBDA {
        D8 d;
        load(d, x + k * row_stride + j);
        d -= cv;
        a += d;
        q += d * d;
      },
      [&](Index k, Index j, double& a, double& q) NORMKIT_KLAMBDA {
        const double d = static_cast<double>(to_f(x[k * row_stride + j])) - c[j];
        a += d;
        q += d * d;
      });
}

/// Column backward sums (see the section comment).
template <class T>
void grad_cols(const T* x,
               const T* dy,
               Index row_stride,
               Index rows,
               Index len,
               const double* c,
               double* s1,
               double* s2) {
  column_strips(
      rows, len, c, s1, s2,
      [&](Index k, Index j, const D8& cv, D8& a, D8& q) NORMKIT_KLAMBDA {
        D8 g, d;
        load(g, dy + k * row_stride + j);
        load(d, x + k * row_stride + j);
        d -= cv;
        a += g;
        q += g * d;
      },
      [&](Index k, Index j, double& a, double& q) NORMKIT_KLAMBDA {
        const double g = static_cast<double>(to_f(dy[k * row_stride + j]));
        a += g;
        q += g * (static_cast<double>(to_f(x[k * row_stride + j])) - c[j]);
      });
}

// ---------------------------------------------------------------------------------------
// Maps: y[j] = f(in0[j], in1[j], ...), 16 floats (or 8 doubles) at a time, then a scalar
// tail through the same generic lambda: the same IEEE operations either way, so where a
// run is cut changes no result.

// NB: the tail goes through the vector code too (inputs widened into zero-padded buffers,
// the result's first `rest` lanes stored), so that every element is computed by the same
// instructions wherever its run is cut: a scalar tail would let the compiler contract
// a * b + c into an FMA differently than in the vector body (found by the soak test and the
// SyncBatchNorm splits: one-ulp differences between thread counts and shard sizes).
template <class P>
NORMKIT_KINLINE F16 load16_tail(const P* p, Index rest) {
  alignas(64) float t[16] = {};
  for (Index k = 0; k < rest; ++k) t[k] = to_f(p[k]);
  return load16(static_cast<const float*>(t));
}

// NB: a run of at least one full vector ends with that vector again, shifted back to the
// run's last element, when y shares no byte with any input: the elements it recomputes get
// the bits they already have (same instructions, same inputs), so the result is the
// padded tail's, without its staging copies. BatchNorm2d (64, 512, 7, 7) spends most of an
// evaluation forward in the 49-element runs' tails otherwise. In place (y aliasing an input)
// the padded tail stays: the overlap would re-read outputs.
template <class Y, class P>
NORMKIT_KINLINE bool apart(const Y* y, const P* x, Index len) {
  const auto yb = reinterpret_cast<std::uintptr_t>(y), xb = reinterpret_cast<std::uintptr_t>(x);
  const auto ye = yb + static_cast<std::uintptr_t>(len) * sizeof(Y);
  const auto xe = xb + static_cast<std::uintptr_t>(len) * sizeof(P);
  return ye <= xb || xe <= yb;
}

// NB: streaming stores (nt: the call's output is at least streaming_store_bytes(), see
// apply.hpp). A run of at least kStreamMin elements of a kStreamable type that shares no
// byte with an input stores its aligned vectors (64 bytes of float, 32 of bfloat16 or
// half) with stream(). The unaligned ends take normal stores: the run's first vector, the
// next one starting at the first boundary, and the last one shifted back (as above). Every
// element is still computed by the same vector instructions from the same inputs, so
// streaming changes no bit; the leaf calls stream_fence() before it returns.
inline constexpr Index kStreamMin = 64;

// A vector of results to p: streamed when s (then kStreamable<Y> and p is vector-aligned).
template <class Y>
NORMKIT_KINLINE void put16(Y* p, const F16& r, bool s) {
  if constexpr (kStreamable<Y>) {
    if (s) {
      stream(p, r);
      return;
    }
  } else {
    (void)s;
  }
  store(p, r);
}

template <class Y, class F, class... P>
NORMKIT_KINLINE void fmap(Index len, Y* y, bool nt, const F& f, const P*... in) {
  Index j = 0, step = 16;  // the first step: to the first vector boundary when streaming
  bool s = false, s0 = false;
  if constexpr (kStreamable<Y>) {
    if (nt && len >= kStreamMin) {  // (a call that does not stream pays this test only)
      constexpr std::uintptr_t kVB = 16 * sizeof(Y);  // a vector's bytes: 64, or 32 (16-bit)
      const auto mis = reinterpret_cast<std::uintptr_t>(y) % kVB;
      if (mis % sizeof(Y) == 0 && (apart(y, in, len) && ...)) {
        s = true;
        s0 = mis == 0;
        if (mis != 0)
          step = static_cast<Index>((kVB - mis) / sizeof(Y));
      }
    }
  } else {
    (void)nt;
  }
  // NB: one loop for every vector, streamed or not, the unaligned first one included. A
  // separate copy of the arithmetic for the first vector was contracted into FMAs
  // differently by GCC (the backward apply's dx differed in the last bit, AVX-512 copy).
  for (; j + 16 <= len; j += step, step = 16) {
    F16 r;
    f(r, load16(in + j)...);
    put16(y + j, r, s && (j != 0 || s0));
  }
  if (j < len && len >= 16 && (apart(y, in, len) && ...)) {
    const Index k = len - 16;
    F16 r;
    f(r, load16(in + k)...);
    store(y + k, r);
  } else if (j < len) {
    const Index rest = len - j;
    F16 r;
    f(r, load16_tail(in + j, rest)...);
    alignas(64) float o[16];
    store(o, r);
    for (Index k = 0; k < rest; ++k) y[j + k] = from_f<Y>(o[k]);
  }
}

// Orders a leaf's streaming stores (see fmap) before the leaf returns.
NORMKIT_KINLINE void end_stream(int nt) {
  if (kStream && nt)
    stream_fence();
}

template <class P>
NORMKIT_KINLINE D8 load8d_tail(const P* p, Index rest) {
  alignas(64) double t[8] = {};
  for (Index k = 0; k < rest; ++k) t[k] = static_cast<double>(p[k]);
  return load8d(static_cast<const double*>(t));
}

template <class T, class F, class... P>
NORMKIT_KINLINE void dmap(Index len, T* y, const F& f, const P*... in) {
  if constexpr (is_floatlike_v<T>) {
    for (Index j = 0; j < len; ++j) {
      double r;
      f(r, static_cast<double>(to_f(in[j]))...);
      y[j] = from_d<T>(r);
    }
  } else {
    Index j = 0;
    for (; j + 8 <= len; j += 8) {
      D8 r;
      f(r, load8d(in + j)...);
      store(y + j, r);
    }
    if (j < len && len >= 8 && (apart(y, in, len) && ...)) {  // see fmap
      const Index k = len - 8;
      D8 r;
      f(r, load8d(in + k)...);
      store(y + k, r);
    } else if (j < len) {  // the tail through the vector code (see fmap)
      const Index rest = len - j;
      D8 r;
      f(r, load8d_tail(in + j, rest)...);
      alignas(64) double o[8];
      store(o, r);
      for (Index k = 0; k < rest; ++k) y[j + k] = o[k];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward apply, rows: run r uses coefficients k[r*k_step] (AffineCoef: y = (x - m)*a + b).

template <class T>
void affine_rows(const T* x,
                 T* y,
                 Index len,
                 Index count,
                 Index stride,
                 const AffineCoef* k,
                 Index k_step,
                 int nt) {
  for (Index r = 0; r < count; ++r) {
    const AffineCoef& q = k[r * k_step];
    const T* xp = x + r * stride;
    T* yp = y + r * stride;
    if constexpr (is_floatlike_v<T>) {
      if (q.use_float) {
        const float hi = q.hi, lo = q.lo, a = q.af, b = q.bf;
        fmap(
            len, yp, nt,
            [&](auto& o, const auto& v) NORMKIT_KLAMBDA { o = ((v - hi) - lo) * a + b; }, xp);
        continue;
      }
    }
    const double m = q.m, a = q.a, b = q.b;
    dmap(
        len, yp, [&](auto& o, const auto& v) NORMKIT_KLAMBDA { o = (v - m) * a + b; }, xp);
  }
  end_stream(nt);
}

// ---------------------------------------------------------------------------------------
// Fused epilogue of the forward apply: y = act((x - m) * a + b + res), res optional (null),
// act a code of simd.hpp's activate(). One pass over x, res and y.

template <class T, int kAct, bool kRes>
void affine_rows_epi_impl(const T* x,
                          const T* res,
                          T* y,
                          Index len,
                          Index count,
                          Index stride,
                          const AffineCoef* k,
                          Index k_step,
                          int nt) {
  for (Index r = 0; r < count; ++r) {
    const AffineCoef& q = k[r * k_step];
    const T* xp = x + r * stride;
    const T* rp = kRes ? res + r * stride : nullptr;
    T* yp = y + r * stride;
    if constexpr (is_floatlike_v<T>) {
      if (q.use_float) {
        const float hi = q.hi, lo = q.lo, a = q.af, b = q.bf;
        if constexpr (kRes) {
          fmap(
              len, yp, nt,
              [&](auto& o, const auto& v, const auto& rv) NORMKIT_KLAMBDA {
                auto z = ((v - hi) - lo) * a + b + rv;
                activate<kAct>(z);
                o = z;
              },
              xp, rp);
        } else {
          fmap(
              len, yp, nt,
              [&](auto& o, const auto& v) NORMKIT_KLAMBDA {
                auto z = ((v - hi) - lo) * a + b;
                activate<kAct>(z);
                o = z;
              },
              xp);
        }
        continue;
      }
    }
    const double m = q.m, a = q.a, b = q.b;
    if constexpr (kRes) {
      dmap(
          len, yp,
          [&](auto& o, const auto& v, const auto& rv) NORMKIT_KLAMBDA {
            auto z = (v - m) * a + b + rv;
            activate<kAct>(z);
            o = z;
          },
          xp, rp);
    } else {
      dmap(
          len, yp,
          [&](auto& o, const auto& v) NORMKIT_KLAMBDA {
            auto z = (v - m) * a + b;
            activate<kAct>(z);
            o = z;
          },
          xp);
    }
  }
}

/// The fused epilogue of affine_rows (see the section comment); res may be null.
template <class T>
void affine_rows_epi(const T* x,
                     const T* res,
                     T* y,
                     Index len,
                     Index count,
                     Index stride,
                     const AffineCoef* k,
                     Index k_step,
                     int act,
                     int nt) {
#define NORMKIT_EPI_CASE(A)                                                            \
  case A:                                                                              \
    if (res)                                                                           \
      affine_rows_epi_impl<T, A, true>(x, res, y, len, count, stride, k, k_step, nt);  \
    else                                                                               \
      affine_rows_epi_impl<T, A, false>(x, res, y, len, count, stride, k, k_step, nt); \
    break;
  switch (act) {
    NORMKIT_EPI_CASE(0)
    NORMKIT_EPI_CASE(1)
    NORMKIT_EPI_CASE(2)
    NORMKIT_EPI_CASE(3)
    NORMKIT_EPI_CASE(4)
    default:
      break;
  }
#undef NORMKIT_EPI_CASE
  end_stream(nt);
}

/// LayerNorm's elementwise affine: y = (x - m) * r * gamma[j] + beta[j] (AffineCoef.a = r).
template <class T>
void ln_affine_rows(const T* x,
                    T* y,
                    Index len,
                    Index count,
                    Index stride,
                    const AffineCoef* k,
                    Index k_step,
                    const compute_t<T>* gamma,
                    const compute_t<T>* beta,
                    int nt) {
  for (Index r = 0; r < count; ++r) {
    const AffineCoef& q = k[r * k_step];
    const T* xp = x + r * stride;
    T* yp = y + r * stride;
    if constexpr (is_floatlike_v<T>) {
      if (q.use_float) {
        const float hi = q.hi, lo = q.lo, a = q.af;
        fmap(
            len, yp, nt,
            [&](auto& o, const auto& v, const auto& g, const auto& b)
                NORMKIT_KLAMBDA { o = ((v - hi) - lo) * a * g + b; },
            xp, gamma, beta);
        continue;
      }
    }
    const double m = q.m, a = q.a;
    dmap(
        len, yp,
        [&](auto& o, const auto& v, const auto& g, const auto& b)
            NORMKIT_KLAMBDA { o = (v - m) * a * g + b; },
        xp, gamma, beta);
  }
  end_stream(nt);
}

/// Forward apply, columns: row k at x + k*row_stride; column j uses the tables' entry j.
template <class T>
void affine_cols(
    const T* x, T* y, Index row_stride, Index rows, Index len, const ColTables& k, int nt) {
  for (Index r = 0; r < rows; ++r) {
    const T* xp = x + r * row_stride;
    T* yp = y + r * row_stride;
    if constexpr (is_floatlike_v<T>) {
      if (k.use_float) {
        fmap(
            len, yp, nt,
            [](auto& o, const auto& v, const auto& h, const auto& l, const auto& a, const auto& b)
                NORMKIT_KLAMBDA { o = ((v - h) - l) * a + b; },
            xp, k.f[0], k.f[1], k.f[2], k.f[3]);
        continue;
      }
    }
    dmap(
        len, yp,
        [](auto& o, const auto& v, const auto& m, const auto& a, const auto& b)
            NORMKIT_KLAMBDA { o = (v - m) * a + b; },
        xp, k.d[0], k.d[1], k.d[2]);
  }
  end_stream(nt);
}

// ---------------------------------------------------------------------------------------
// Backward apply: dx = a * dy + b * (x - m) + c.

template <class T>
void gradin_rows(const T* x,
                 const T* dy,
                 T* dx,
                 Index len,
                 Index count,
                 Index stride,
                 const GradCoef* k,
                 Index k_step,
                 int nt) {
  for (Index r = 0; r < count; ++r) {
    const GradCoef& q = k[r * k_step];
    const T* xp = x + r * stride;
    const T* gp = dy + r * stride;
    T* op = dx + r * stride;
    if constexpr (is_floatlike_v<T>) {
      if (q.use_float) {
        const float hi = q.hi, lo = q.lo, a = q.af, b = q.bf, c = q.cf;
        fmap(
            len, op, nt,
            [&](auto& o, const auto& g, const auto& v)
                NORMKIT_KLAMBDA { o = a * g + b * ((v - hi) - lo) + c; },
            gp, xp);
        continue;
      }
    }
    const double m = q.m, a = q.a, b = q.b, c = q.c;
    dmap(
        len, op,
        [&](auto& o, const auto& g, const auto& v) NORMKIT_KLAMBDA { o = a * g + b * (v - m) + c; },
        gp, xp);
  }
  end_stream(nt);
}

template <class T>
void gradin_cols(const T* x,
                 const T* dy,
                 T* dx,
                 Index row_stride,
                 Index rows,
                 Index len,
                 const ColTables& k,
                 int nt) {
  for (Index r = 0; r < rows; ++r) {
    const T* xp = x + r * row_stride;
    const T* gp = dy + r * row_stride;
    T* op = dx + r * row_stride;
    if constexpr (is_floatlike_v<T>) {
      if (k.use_float) {
        fmap(
            len, op, nt,
            [](auto& o, const auto& g, const auto& v, const auto& h, const auto& l, const auto& a,
               const auto& b, const auto& c) NORMKIT_KLAMBDA { o = a * g + b * ((v - h) - l) + c; },
            gp, xp, k.f[0], k.f[1], k.f[2], k.f[3], k.f[4]);
        continue;
      }
    }
    dmap(
        len, op,
        [](auto& o, const auto& g, const auto& v, const auto& m, const auto& a, const auto& b,
           const auto& c) NORMKIT_KLAMBDA { o = a * g + b * (v - m) + c; },
        gp, xp, k.d[0], k.d[1], k.d[2], k.d[3]);
  }
  end_stream(nt);
}

// ---------------------------------------------------------------------------------------
// LayerNorm backward in one pass over memory (see layer_norm_impl.hpp's NB): for rows
// [r0, r1) of one block, the row's sums, then -- while it is in L1 -- its dx and its
// contribution to the per-position sums pg (dy * xhat) and pb (dy), the next row's sums
// interleaved with this row's dx so that it streams in meanwhile.
//
// NB: for float input the per-position sums run in float over kLnFloatRows rows at a time
// and are then added to the block's double sums: 4 float terms add at most ~2 float ulps of
// their magnitude, and the double work per element drops 4x (it bounded this loop). dx is
// computed as the float forward apply is (split mean).
inline constexpr Index kLnFloatRows = 4;

// Sums of one row: s1 += w*dy, s2 += w*dy*(x - c) (w = gamma[j], or 1).
template <class T, bool kW>
NORMKIT_KINLINE void ln_sums_step8(
    const T* xp, const T* gp, const double* w, const D8& cv, Index j, D8& s1, D8& s2) {
  D8 g, d;
  load(g, gp + j);
  if constexpr (kW) {
    D8 wv;
    load(wv, w + j);
    g = g * wv;
  }
  load(d, xp + j);
  d -= cv;
  s1 += g;
  s2 += g * d;
}

template <class T, bool kW>
NORMKIT_KINLINE void ln_sums_range(const T* xp,
                                   const T* gp,
                                   const double* w,
                                   double c,
                                   Index j0,
                                   Index len,
                                   D8& a1,
                                   D8& a2,
                                   D8& b1,
                                   D8& b2,
                                   double& t1,
                                   double& t2) {
  D8 cv;
  splat(cv, c);
  Index j = j0;
  for (; j + 16 <= len; j += 16) {
    ln_sums_step8<T, kW>(xp, gp, w, cv, j, a1, a2);
    ln_sums_step8<T, kW>(xp, gp, w, cv, j + 8, b1, b2);
  }
  for (; j + 8 <= len; j += 8) ln_sums_step8<T, kW>(xp, gp, w, cv, j, a1, a2);
  for (; j < len; ++j) {
    const double g = static_cast<double>(to_f(gp[j])) * (kW ? w[j] : 1.0);
    t1 += g;
    t2 += g * (static_cast<double>(to_f(xp[j])) - c);
  }
}

struct LnRowSums {
  D8 a1, a2, b1, b2;
  double t1, t2;
  NORMKIT_KINLINE void clear() {
    zero(a1);
    zero(a2);
    zero(b1);
    zero(b2);
    t1 = t2 = 0;
  }
  NORMKIT_KINLINE void finish(double& s1, double& s2) const {
    double o1[8], o2[8];
    store(o1, a1 + b1);
    store(o2, a2 + b2);
    s1 = ((o1[0] + o1[4]) + (o1[2] + o1[6])) + ((o1[1] + o1[5]) + (o1[3] + o1[7])) + t1;
    s2 = ((o2[0] + o2[4]) + (o2[2] + o2[6])) + ((o2[1] + o2[5]) + (o2[3] + o2[7])) + t2;
  }
};

template <class T, bool kW>
void ln_bwd_impl(const LnBwdArgs<T>& A, Index r0, Index r1, double* pg, double* pb) {
  const Index n = A.n;
  const double m = static_cast<double>(n);
  const double* const w = A.gamma;
  constexpr bool kFloat = is_floatlike_v<T>;
  // Float accumulators of the pending rows (kFloat only), 64 apart so that they do not alias
  // in the 4 KiB sense.
  std::vector<float> fbuf(kFloat ? static_cast<std::size_t>(2 * n + 64) : 0);
  float* fg = fbuf.data();
  float* fb = kFloat ? fg + n + 64 : nullptr;
  Index pending = 0;
  auto flush = [&] {
    Index j = 0;
    for (; j + 8 <= n; j += 8) {
      D8 a, p;
      load(a, fg + j);
      load(p, pg + j);
      p += a;
      store(pg + j, p);
      load(a, fb + j);
      load(p, pb + j);
      p += a;
      store(pb + j, p);
    }
    for (; j < n; ++j) {
      pg[j] += static_cast<double>(fg[j]);
      pb[j] += static_cast<double>(fb[j]);
    }
    std::fill(fg, fg + n, 0.0f);
    std::fill(fb, fb + n, 0.0f);
    pending = 0;
  };
  if constexpr (kFloat) {
    std::fill(fg, fg + n, 0.0f);
    std::fill(fb, fb + n, 0.0f);
  }
  // Row sums of 16-bit data in float blocks (LowGradSums, terms gamma * dy), the same steps
  // whether a row is summed on its own or interleaved with the previous row's dx, so thread
  // counts agree bit for bit; a row whose float sums are not finite is summed in double.
  constexpr bool kLow = kLowFloatSums && is_low_v<T>;
  const bool low = kLow && n >= 16 * kLowBlock;
  auto low_step = [&](LowGradSums& L, const T* xp, const T* gp, Index j, LnRowSums& S)
                      NORMKIT_KLAMBDA {
                        if constexpr (kLow) {
                          F16 g = load16(gp + j);
                          if constexpr (kW)
                            g = g * load16(A.gamma_t + j);
                          L.step(g, load16(xp + j), S.a1, S.a2, S.b1, S.b2);
                        } else {
                          (void)L, (void)xp, (void)gp, (void)j, (void)S;
                        }
                      };
  // The open block closed, then the row's rest (from j) in double; false (S to be summed
  // again) when the float sums were not finite.
  auto low_end = [&](LowGradSums& L, const T* xp, const T* gp, double c, Index j, LnRowSums& S) {
    L.close(S.a1, S.a2, S.b1, S.b2);
    if (!all_finite(S.a1, S.a2, S.b1, S.b2))
      return false;
    ln_sums_range<T, kW>(xp, gp, w, c, j, n, S.a1, S.a2, S.b1, S.b2, S.t1, S.t2);
    return true;
  };
  // A whole row's sums into S (cleared).
  auto row_sums = [&](const T* xp, const T* gp, double c, LnRowSums& S) {
    S.clear();
    if constexpr (kLow) {
      if (low) {
        LowGradSums L;
        L.begin(c);
        Index j = 0;
        for (; j + 16 <= n; j += 16) low_step(L, xp, gp, j, S);
        if (low_end(L, xp, gp, c, j, S))
          return;
        S.clear();
      }
    }
    ln_sums_range<T, kW>(xp, gp, w, c, 0, n, S.a1, S.a2, S.b1, S.b2, S.t1, S.t2);
  };
  LnRowSums cur, nxt;
  row_sums(A.x + r0 * n, A.dy + r0 * n, A.mean[r0], cur);
  for (Index t = r0; t < r1; ++t) {
    const T* xp = A.x + t * n;
    const T* gp = A.dy + t * n;
    T* op = A.dx + t * n;
    // dx streamed (see fmap) when the call asks for it and the row starts on a vector
    // boundary and shares no byte with x or dy (put16 streams where kStreamable<T>).
    const bool nt = A.stream && n >= kStreamMin &&
                    reinterpret_cast<std::uintptr_t>(op) % (16 * sizeof(T)) == 0 &&
                    apart(op, xp, n) && apart(op, gp, n);
    double s1, s2;
    cur.finish(s1, s2);
    const double mu = A.mean[t], r = A.rstd[t];
    const double B = -r * r * r * s2 / m, C = A.rms ? 0.0 : -r * s1 / m;
    const bool more = t + 1 < r1;
    const T* nxp = xp + n;
    const T* ngp = gp + n;
    const double nc = more ? A.mean[t + 1] : 0.0;
    nxt.clear();
    bool next_done = false;
    bool float_done = false;
    if constexpr (kFloat) {
      if (fits_float(mu) && fits_float(r) && fits_float(B) && fits_float(C)) {
        const float hi = static_cast<float>(mu);
        const float lo = static_cast<float>(mu - static_cast<double>(hi));
        const float rf = static_cast<float>(r), bf = static_cast<float>(B),
                    cf = static_cast<float>(C);
        const float* wt = A.gamma_t;
        auto body = [&](auto& o, auto& ag, auto& ab, const auto& xv, const auto& g, const auto& wv)
                        NORMKIT_KLAMBDA {
                          const auto xc = (xv - hi) - lo;
                          o = (rf * wv) * g + bf * xc + cf;
                          ag += g * (xc * rf);
                          ab += g;
                        };
        Index j = 0;
        if (more && low) {
          // As below, the next row's sums in float blocks (see low_step).
          LowGradSums L;
          L.begin(nc);
          for (; j + 16 <= n; j += 16) {
            low_step(L, nxp, ngp, j, nxt);
            F16 vo, vg = load16(fg + j), vb = load16(fb + j);
            body(vo, vg, vb, load16(xp + j), load16(gp + j), load16(wt + j));
            put16(op + j, vo, nt);
            store(fg + j, vg);
            store(fb + j, vb);
          }
          next_done = low_end(L, nxp, ngp, nc, j, nxt);  // else summed again below
        } else if (more) {
          // This row's dx from L1, the next row's sums streaming in.
          D8 ncv;
          splat(ncv, nc);
          for (; j + 16 <= n; j += 16) {
            ln_sums_step8<T, kW>(nxp, ngp, w, ncv, j, nxt.a1, nxt.a2);
            ln_sums_step8<T, kW>(nxp, ngp, w, ncv, j + 8, nxt.b1, nxt.b2);
            F16 vo, vg = load16(fg + j), vb = load16(fb + j);
            body(vo, vg, vb, load16(xp + j), load16(gp + j), load16(wt + j));
            put16(op + j, vo, nt);
            store(fg + j, vg);
            store(fb + j, vb);
          }
          ln_sums_range<T, kW>(nxp, ngp, w, nc, j, n, nxt.a1, nxt.a2, nxt.b1, nxt.b2, nxt.t1,
                               nxt.t2);
          next_done = true;
        } else {
          for (; j + 16 <= n; j += 16) {
            F16 vo, vg = load16(fg + j), vb = load16(fb + j);
            body(vo, vg, vb, load16(xp + j), load16(gp + j), load16(wt + j));
            put16(op + j, vo, nt);
            store(fg + j, vg);
            store(fb + j, vb);
          }
        }
        for (; j < n; ++j) {
          float o;
          body(o, fg[j], fb[j], to_f(xp[j]), to_f(gp[j]), wt[j]);
          op[j] = from_f<T>(o);
        }
        if (++pending == kLnFloatRows)
          flush();
        float_done = true;
      }
    }
    if (!float_done) {
      // Double path: pg += dy * (x - m) * r, pb += dy, dx = (r * w) * dy + B * (x - m) + C.
      for (Index j = 0; j < n; ++j) {
        const double xd = static_cast<double>(to_f(xp[j])) - mu;
        const double g = static_cast<double>(to_f(gp[j]));
        if (A.want_dg)
          pg[j] += g * xd * r;
        pb[j] += g;
        const double a = kW ? r * w[j] : r;
        op[j] = from_d<T>(a * g + B * xd + C);
      }
    }
    if (more && !next_done)
      row_sums(nxp, ngp, nc, nxt);
    cur = nxt;
  }
  if constexpr (kFloat) {
    if (pending)
      flush();
  }
  end_stream(A.stream);
}

/// LayerNorm's one-pass backward over rows [r0, r1) into the block's per-position sums pg
/// (sum dy * xhat; only when want_dg) and pb (sum dy), which the caller zeroed.
template <class T>
void ln_bwd_rows(const LnBwdArgs<T>& a, Index r0, Index r1, double* pg, double* pb) {
  if (a.gamma) {
    ln_bwd_impl<T, true>(a, r0, r1, pg, pb);
  } else {
    ln_bwd_impl<T, false>(a, r0, r1, pg, pb);
  }
}

/// This ISA's table of leaves for T.
template <class T>
inline constexpr Leaves<T> kLeaves = {
    &mom_rows<T>,    &grad_rows<T>,   &mom_cols<T>,    &grad_cols<T>,
    &affine_rows<T>, &affine_cols<T>, &gradin_rows<T>, &gradin_cols<T>,
};
/// Column-mode fused epilogue: row k at x + k*row_stride, column j with the tables' entry j.
template <class T, int kAct, bool kRes>
void affine_cols_epi_impl(const T* x,
                          const T* res,
                          T* y,
                          Index row_stride,
                          Index rows,
                          Index len,
                          const ColTables& k,
                          int nt) {
  for (Index r = 0; r < rows; ++r) {
    const T* xp = x + r * row_stride;
    const T* rp = kRes ? res + r * row_stride : nullptr;
    T* yp = y + r * row_stride;
    if constexpr (is_floatlike_v<T>) {
      if (k.use_float) {
        auto f = [](auto& o, const auto& v, const auto& h, const auto& l, const auto& a,
                    const auto& b, const auto&... rv) NORMKIT_KLAMBDA {
          auto z = ((v - h) - l) * a + b;
          ((z = z + rv), ...);
          activate<kAct>(z);
          o = z;
        };
        if constexpr (kRes)
          fmap(len, yp, nt, f, xp, k.f[0], k.f[1], k.f[2], k.f[3], rp);
        else
          fmap(len, yp, nt, f, xp, k.f[0], k.f[1], k.f[2], k.f[3]);
        continue;
      }
    }
    auto f = [](auto& o, const auto& v, const auto& m, const auto& a, const auto& b,
                const auto&... rv) NORMKIT_KLAMBDA {
      auto z = (v - m) * a + b;
      ((z = z + rv), ...);
      activate<kAct>(z);
      o = z;
    };
    if constexpr (kRes)
      dmap(len, yp, f, xp, k.d[0], k.d[1], k.d[2], rp);
    else
      dmap(len, yp, f, xp, k.d[0], k.d[1], k.d[2]);
  }
}

template <class T>
void affine_cols_epi(const T* x,
                     const T* res,
                     T* y,
                     Index row_stride,
                     Index rows,
                     Index len,
                     const ColTables& k,
                     int act,
                     int nt) {
#define NORMKIT_EPI_CASE(A)                                                       \
  case A:                                                                         \
    if (res)                                                                      \
      affine_cols_epi_impl<T, A, true>(x, res, y, row_stride, rows, len, k, nt);  \
    else                                                                          \
      affine_cols_epi_impl<T, A, false>(x, res, y, row_stride, rows, len, k, nt); \
    break;
  switch (act) {
    NORMKIT_EPI_CASE(0)
    NORMKIT_EPI_CASE(1)
    NORMKIT_EPI_CASE(2)
    NORMKIT_EPI_CASE(3)
    NORMKIT_EPI_CASE(4)
    default:
      break;
  }
#undef NORMKIT_EPI_CASE
  end_stream(nt);
}

/// This ISA's fused-epilogue leaves for T.
template <class T>
inline constexpr EpiLeaves<T> kEpiLeaves = {&affine_rows_epi<T>, &affine_cols_epi<T>};
/// This ISA's LayerNorm leaves for T.
template <class T>
inline constexpr LnLeaves<T> kLnLeaves = {&ln_affine_rows<T>, &ln_bwd_rows<T>};

#undef NORMKIT_KINLINE
#undef NORMKIT_KLAMBDA
