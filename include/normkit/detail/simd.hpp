// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_SIMD_HPP_
#define NORMKIT_DETAIL_SIMD_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cstddef>  // std::size_t
#include <cstring>  // std::memcpy
#include <utility>  // std::index_sequence

#include <normkit/config.hpp>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
#include <immintrin.h>  // _mm512_cvtps_pd
#endif

namespace normkit {
namespace detail {
namespace simd {

// The only place that names a vector type. A d8 is 8 doubles: the accumulator of the
// reduction kernels, fed by 8 floats (or doubles) converted on load.
//
// NB: GCC 12 does not turn the reduction loops written over `double acc[8]` lane arrays into
// vector code (it keeps 8 scalar dependency chains: measured 3x slower than the bandwidth
// floor on a 25.7 MB BatchNorm statistics pass). GCC/Clang vector extensions say it directly
// and compile to whatever the target has (SSE2 pairs by default, AVX2 or AVX-512 with
// -march). Helpers take and return vectors by reference only: passing 64-byte vectors by
// value changes the ABI without AVX-512 (-Wpsabi). Other compilers get a plain struct.
#if defined(__GNUC__) || defined(__clang__)
typedef double d8 __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));

NORMKIT_ALWAYS_INLINE void load(d8& out, const float* p) {
#if defined(__AVX512F__)
  // NB: GCC 12 lowers __builtin_convertvector(f8 -> d8) to four 128-bit conversions and two
  // inserts when it prefers 256-bit vectors (its default tuning for -march=native on
  // AVX-512 Xeons); one vcvtps2pd zmm is what we want (LayerNorm statistics pass: ~15%).
  // (maskz form: the plain intrinsic trips GCC 12's -Wmaybe-uninitialized on its own
  // _mm512_undefined_pd.)
  out = _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_loadu_ps(p));
#else
  f8 f;
  std::memcpy(&f, p, sizeof f);
  out = __builtin_convertvector(f, d8);
#endif
}
NORMKIT_ALWAYS_INLINE void load(d8& out, const double* p) {
  std::memcpy(&out, p, sizeof out);
}
NORMKIT_ALWAYS_INLINE void store(float* p, const d8& v) {
#if defined(__AVX512F__)
  _mm256_storeu_ps(p, _mm512_maskz_cvtpd_ps(static_cast<__mmask8>(0xFF), v));
#else
  const f8 f = __builtin_convertvector(v, f8);
  std::memcpy(p, &f, sizeof f);
#endif
}
NORMKIT_ALWAYS_INLINE void store(double* p, const d8& v) {
  std::memcpy(p, &v, sizeof v);
}
NORMKIT_ALWAYS_INLINE void splat(d8& out, double v) {
  out = d8{v, v, v, v, v, v, v, v};
}
NORMKIT_ALWAYS_INLINE void zero(d8& out) {
  out = d8{0, 0, 0, 0, 0, 0, 0, 0};
}
#else
struct d8 {
  double v[8];
  d8& operator+=(const d8& o) {
    for (int i = 0; i < 8; ++i) v[i] += o.v[i];
    return *this;
  }
  d8& operator-=(const d8& o) {
    for (int i = 0; i < 8; ++i) v[i] -= o.v[i];
    return *this;
  }
  friend d8 operator*(const d8& a, const d8& b) {
    d8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  friend d8 operator+(const d8& a, const d8& b) {
    d8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  friend d8 operator-(const d8& a, const d8& b) {
    d8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
};
template <class T>
inline void load(d8& out, const T* p) {
  for (int i = 0; i < 8; ++i) out.v[i] = static_cast<double>(p[i]);
}
template <class T>
inline void store(T* p, const d8& v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<T>(v.v[i]);
}
inline void splat(d8& out, double v) {
  for (double& e : out.v) e = v;
}
inline void zero(d8& out) {
  splat(out, 0.0);
}
#endif

// NB: float maps. y[j] = f(in[j]...) over a run, 16 floats at a time. GCC vectorizes the
// plain loops at its preferred width (256 bits on AVX-512 Xeons); a 64-byte vector type
// says 512 where the target has it (LayerNorm forward: ~8%) and splits into halves or
// quarters elsewhere. `f(out, in...)` is generic: called with f16 vectors for the body and
// with floats for the tail -- the same IEEE operations either way, so where a run is cut
// does not change any result. Vectors go by reference (-Wpsabi).
#if defined(__GNUC__) || defined(__clang__)
typedef float f16 __attribute__((vector_size(64)));

template <class F, class Ptrs, std::size_t... I>
NORMKIT_ALWAYS_INLINE void map_impl(
    Index len, float* y, F& f, const Ptrs& in, std::index_sequence<I...>) {
  Index j = 0;
  for (; j + 16 <= len; j += 16) {
    f16 v[sizeof...(I)], r;
    (std::memcpy(&v[I], in[I] + j, sizeof(f16)), ...);  // unrolled: v stays in registers
    f(r, v[I]...);
    std::memcpy(y + j, &r, sizeof r);
  }
  for (; j < len; ++j) f(y[j], in[I][j]...);
}

/// y[j] = f(in[0][j], in[1][j], ...) for j < len (see NB above).
template <class F, class... P>
NORMKIT_ALWAYS_INLINE void map(Index len, float* y, F&& f, const P*... in) {
  const float* const ptr[sizeof...(P)] = {in...};
  map_impl(len, y, f, ptr, std::index_sequence_for<P...>{});
}

/// One 16-float chunk of map_acc() at j (for loops that interleave it with other work).
template <class F>
NORMKIT_ALWAYS_INLINE void acc16(
    Index j, float* y, float* u, float* v, F& f, const float* a, const float* b, const float* c) {
  f16 va, vb, vc, vu, vv, r;
  std::memcpy(&va, a + j, sizeof va);
  std::memcpy(&vb, b + j, sizeof vb);
  std::memcpy(&vc, c + j, sizeof vc);
  std::memcpy(&vu, u + j, sizeof vu);
  std::memcpy(&vv, v + j, sizeof vv);
  f(r, vu, vv, va, vb, vc);
  std::memcpy(y + j, &r, sizeof r);
  std::memcpy(u + j, &vu, sizeof vu);
  std::memcpy(v + j, &vv, sizeof vv);
}
#else
template <class F, class... P>
inline void map(Index len, float* y, F&& f, const P*... in) {
  for (Index j = 0; j < len; ++j) f(y[j], in[j]...);
}
#endif

/// f(o, p, q, a, b, c) over [0, len) with o in y, p in u and q in v read-modify-write
/// (accumulators), a, b, c read only; vectors then scalars as map().
template <class F>
NORMKIT_ALWAYS_INLINE void map_acc(Index len,
                                   float* y,
                                   float* u,
                                   float* v,
                                   F&& f,
                                   const float* a,
                                   const float* b,
                                   const float* c) {
  Index j = 0;
#if defined(__GNUC__) || defined(__clang__)
  for (; j + 16 <= len; j += 16) acc16(j, y, u, v, f, a, b, c);
#endif
  for (; j < len; ++j) f(y[j], u[j], v[j], a[j], b[j], c[j]);
}

/// Fixed-order horizontal sum (a tree, the same on every target).
NORMKIT_ALWAYS_INLINE double hsum(const d8& a) {
  double o[8];
  std::memcpy(o, &a, sizeof o);
  return ((o[0] + o[4]) + (o[2] + o[6])) + ((o[1] + o[5]) + (o[3] + o[7]));
}

}  // namespace simd
}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_SIMD_HPP_
