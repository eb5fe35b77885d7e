// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_SIMD_HPP_
#define NORMKIT_DETAIL_SIMD_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cstring>  // std::memcpy

#include <normkit/config.hpp>

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
  f8 f;
  std::memcpy(&f, p, sizeof f);
  out = __builtin_convertvector(f, d8);
}
NORMKIT_ALWAYS_INLINE void load(d8& out, const double* p) {
  std::memcpy(&out, p, sizeof out);
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
inline void splat(d8& out, double v) {
  for (double& e : out.v) e = v;
}
inline void zero(d8& out) {
  splat(out, 0.0);
}
#endif

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
