// normkit/detail/kernels/types.hpp: what crosses between the baseline code and the ISA copies
// of the leaf kernels -- plain structs of pointers and scalars, and the table of leaves.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_KERNELS_TYPES_HPP_
#define NORMKIT_DETAIL_KERNELS_TYPES_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cmath>        // std::abs
#include <type_traits>  // std::is_same

#include <normkit/config.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// Low-precision storage types: loaded to float, computed in float or double, stored rounded
/// once (docs/semantics.md §13).
template <class T>
inline constexpr bool is_low_v =
    std::is_same<T, Eigen::bfloat16>::value || std::is_same<T, Eigen::half>::value;
/// Storage types whose elementwise passes run in float (float itself and the low types).
template <class T>
inline constexpr bool is_floatlike_v = std::is_same<T, float>::value || is_low_v<T>;
/// The type elementwise work on T runs in: double for double, float otherwise.
template <class T>
using compute_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

/// Whether a coefficient can take the float apply path: zero, or of a magnitude within
/// [2^-100, 2^100], so that no product overflows, a denormal (x - mean) contributes below
/// 2^-49 (found by the fuzzer: denormal inputs with eps = 0 give rstd ~ 5e44, beyond float),
/// and no coefficient is itself a float denormal (RMSNorm of |x| ~ 1e20 has a dx coefficient
/// ~1e-40, whose float copy would keep a few bits). NaN fails (double path).
NORMKIT_ALWAYS_INLINE bool fits_float(double v) {
  const double a = std::abs(v);
  return a == 0 || (a >= 0x1p-100 && a <= 0x1p100);
}

/// Accumulator of a row reduction (a run of elements of one slot, or many runs in turn):
/// two logical 8-lane double vectors per sum (elements 0-7 and 8-15 of every 16) and a
/// scalar tail. Value-initialize to zero; reduce with finish_acc().
struct alignas(64) RowAcc {
  double a1[8];
  double a2[8];
  double b1[8];
  double b2[8];
  double t1;
  double t2;
};

/// Per-slot coefficients of the forward apply y = (x - m) * a + b: in double, and for float
/// input also as float (m split into hi + lo) when use_float (see apply.hpp).
struct AffineCoef {
  double m, a, b;
  float hi, lo, af, bf;
  int use_float;
};

/// Per-slot coefficients of the backward apply dx = a * dy + b * (x - m) + c.
struct GradCoef {
  double m, a, b, c;
  float hi, lo, af, bf, cf;
  int use_float;
};

/// Column-mode coefficient tables, pointers already at the run's first slot. Affine:
/// f = {hi, lo, a, b}, d = {m, a, b}; gradient: f = {hi, lo, a, b, c}, d = {m, a, b, c}.
struct ColTables {
  const float* f[5];
  const double* d[4];
  int use_float;
};

/// LayerNorm's one-pass backward over whole contiguous rows of n elements (row r at x + r*n,
/// statistics slot r).
template <class T>
struct LnBwdArgs {
  const T* x;
  const T* dy;
  T* dx;
  const double* mean;
  const double* rstd;
  const double* gamma;          // per position, or null
  const compute_t<T>* gamma_t;  // per position in float (float path; ones without weight)
  Index n;
  int want_dg;
  int rms;     // RMSNorm: no mean term (the mean is 0 and dx has no -r * mean(g) part)
  int stream;  // dx written with streaming stores (see apply.hpp: streaming_store_bytes())
};

/// The leaf kernels of one ISA copy for scalar type T (detail/kernels/leaves.hpp documents
/// each). Baseline code picks the table once per call (detail/dispatch.hpp).
template <class T>
struct Leaves {
  void (*mom_rows)(const T* x,
                   Index len,
                   Index count,
                   Index stride,
                   const double* c,
                   Index c_step,
                   RowAcc* st,
                   Index st_step);
  void (*grad_rows)(const T* x,
                    const T* dy,
                    Index len,
                    Index count,
                    Index stride,
                    const double* c,
                    Index c_step,
                    RowAcc* st,
                    Index st_step);
  void (*mom_cols)(
      const T* x, Index row_stride, Index rows, Index len, const double* c, double* s1, double* s2);
  void (*grad_cols)(const T* x,
                    const T* dy,
                    Index row_stride,
                    Index rows,
                    Index len,
                    const double* c,
                    double* s1,
                    double* s2);
  // The apply leaves' last argument, nt: stream the output (see apply.hpp).
  void (*affine_rows)(const T* x,
                      T* y,
                      Index len,
                      Index count,
                      Index stride,
                      const AffineCoef* k,
                      Index k_step,
                      int nt);
  void (*affine_cols)(
      const T* x, T* y, Index row_stride, Index rows, Index len, const ColTables& k, int nt);
  void (*gradin_rows)(const T* x,
                      const T* dy,
                      T* dx,
                      Index len,
                      Index count,
                      Index stride,
                      const GradCoef* k,
                      Index k_step,
                      int nt);
  void (*gradin_cols)(const T* x,
                      const T* dy,
                      T* dx,
                      Index row_stride,
                      Index rows,
                      Index len,
                      const ColTables& k,
                      int nt);
};

/// The leaves only LayerNorm uses (a table of their own, so that a program using BatchNorm
/// alone does not compile them).
template <class T>
struct LnLeaves {
  void (*ln_affine_rows)(const T* x,
                         T* y,
                         Index len,
                         Index count,
                         Index stride,
                         const AffineCoef* k,
                         Index k_step,
                         const compute_t<T>* gamma,
                         const compute_t<T>* beta,
                         int nt);
  void (*ln_bwd_rows)(const LnBwdArgs<T>& a, Index r0, Index r1, double* pg, double* pb);
};

/// The fused-epilogue leaves (a table of their own: compiled only where a fused forward is
/// called).
template <class T>
struct EpiLeaves {
  void (*affine_rows_epi)(const T* x,
                          const T* res,
                          T* y,
                          Index len,
                          Index count,
                          Index stride,
                          const AffineCoef* k,
                          Index k_step,
                          int act,
                          int nt);
  void (*affine_cols_epi)(const T* x,
                          const T* res,
                          T* y,
                          Index row_stride,
                          Index rows,
                          Index len,
                          const ColTables& k,
                          int act,
                          int nt);
};

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_KERNELS_TYPES_HPP_
