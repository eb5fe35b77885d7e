// normkit/detail/float16.hpp: 16-bit floats (Eigen::bfloat16, Eigen::half) bit by bit -- exact
// widening, and one round-to-nearest-even step from double (state dicts, precise BatchNorm).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_FLOAT16_HPP_
#define NORMKIT_DETAIL_FLOAT16_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::max
#include <cmath>        // std::ldexp
#include <cstdint>      // std::uint16_t, std::uint64_t
#include <cstring>      // std::memcpy
#include <limits>       // std::numeric_limits
#include <type_traits>  // std::is_same, std::conditional_t

#include <normkit/config.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// Whether T is one of the 16-bit floats, Eigen::bfloat16 or Eigen::half.
template <class T>
inline constexpr bool is_float16_v =
    std::is_same<T, Eigen::bfloat16>::value || std::is_same<T, Eigen::half>::value;

/// The layout of a 16-bit float: kExp exponent bits and kMan stored significand bits (bias
/// 2^(kExp-1) - 1, one sign bit on top).
template <class T>
struct Float16Format;
template <>
struct Float16Format<Eigen::bfloat16> {
  static constexpr int kExp = 8, kMan = 7;
};
template <>
struct Float16Format<Eigen::half> {
  static constexpr int kExp = 5, kMan = 10;
};

/// The bit pattern of a 16-bit float (T = Eigen::bfloat16 or Eigen::half), and back.
template <class T>
std::uint16_t float16_bits(T v) {
  static_assert(is_float16_v<T> && sizeof(T) == 2 && std::is_trivially_copyable<T>::value,
                "a 16-bit float");
  std::uint16_t u = 0;
  std::memcpy(&u, &v, 2);
  return u;
}
template <class T>
T float16_from_bits(std::uint16_t u) {
  static_assert(is_float16_v<T> && sizeof(T) == 2 && std::is_trivially_copyable<T>::value,
                "a 16-bit float");
  T v;
  std::memcpy(static_cast<void*>(&v), &u, 2);
  return v;
}

/// The exact value of the 16-bit float with bits h (layout Float16Format<F>) as T (float or
/// double: every such value is representable). Infinities stay infinite; a NaN keeps its sign
/// and its payload, moved to the top of T's significand and not quieted (as PyTorch's bit-shift
/// bfloat16 -> float does).
template <class T, class F>
T widen_float16(std::uint16_t h) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "widen to float or double");
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr int kExp = Float16Format<F>::kExp, kMan = Float16Format<F>::kMan;
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  constexpr int kTMan = std::numeric_limits<T>::digits - 1;  // stored significand bits of T
  constexpr int kTBits = static_cast<int>(sizeof(T)) * 8;
  const bool negative = (h >> 15) != 0;
  const int e = (h >> kMan) & ((1 << kExp) - 1);
  const auto m = static_cast<unsigned>(h & ((1u << kMan) - 1));
  if (e == (1 << kExp) - 1) {  // infinity or NaN: built bit by bit, so that nothing quiets it
    const U exp_all = ((U{1} << (kTBits - 1 - kTMan)) - 1) << kTMan;
    const U u = (negative ? U{1} << (kTBits - 1) : U{0}) | exp_all | (U{m} << (kTMan - kMan));
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
  }
  // m x 2^(1 - bias - kMan) for a subnormal, (2^kMan + m) x 2^(e - bias - kMan) otherwise: a
  // kMan + 1 bit integer scaled by a power of two within T's range, so exact.
  const T v =
      std::ldexp(static_cast<T>(e == 0 ? m : m + (1u << kMan)), (e == 0 ? 1 : e) - kBias - kMan);
  return negative ? -v : v;
}

/// x rounded to the nearest 16-bit float of layout Float16Format<F>, ties to even, in one step
/// (never through float, which would round twice): the bit pattern. Subnormal results are
/// rounded the same way; magnitudes from the largest finite value plus half an ulp up round to
/// infinity; infinities stay infinite. A NaN stays a NaN with its sign and the top bits of its
/// payload, quieted (as hardware conversions between binary formats do).
template <class F>
std::uint16_t round_to_float16_bits(double x) {
  constexpr int kExp = Float16Format<F>::kExp, kMan = Float16Format<F>::kMan;
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  constexpr std::uint64_t kDoubleInf = std::uint64_t{0x7ff} << 52;
  constexpr std::uint64_t kDoubleMan = (std::uint64_t{1} << 52) - 1;
  constexpr std::uint64_t kInf = ((std::uint64_t{1} << kExp) - 1) << kMan;  // F's infinity
  std::uint64_t u = 0;
  std::memcpy(&u, &x, 8);
  const std::uint64_t sign = (u >> 48) & 0x8000u;
  const std::uint64_t a = u & ~(std::uint64_t{1} << 63);  // |x|
  std::uint64_t r = 0;                                    // |result|
  if (a > kDoubleInf) {                                   // NaN
    r = kInf | (std::uint64_t{1} << (kMan - 1)) | ((a & kDoubleMan) >> (52 - kMan));
  } else if (a == kDoubleInf) {
    r = kInf;
  } else if (const int biased = static_cast<int>(a >> 52); biased != 0) {
    // Zero and double subnormals (below 2^-1022) round to zero: the smallest subnormal here
    // is 2^-133 (bfloat16) or 2^-24 (half).
    const int exp = biased - 1023;  // |x| = sig x 2^(exp - 52), sig in [2^52, 2^53)
    if (exp > kBias) {
      r = kInf;  // |x| >= 2^(emax + 1)
    } else {
      const std::uint64_t sig = (a & kDoubleMan) | (std::uint64_t{1} << 52);
      // The bits to drop: 52 - kMan, and more below the smallest normal exponent 1 - bias.
      const int shift = 52 - kMan + std::max(0, 1 - kBias - exp);
      // shift >= 54: sig < 2^53 <= 2^(shift - 1), so |x| is below half the smallest
      // subnormal and rounds to zero (and every shift below stays under 64).
      if (shift <= 53) {
        std::uint64_t q = sig >> shift;
        const std::uint64_t rest = sig & ((std::uint64_t{1} << shift) - 1);
        const std::uint64_t half = std::uint64_t{1} << (shift - 1);
        if (rest > half || (rest == half && (q & 1u) != 0))
          ++q;
        // q is the rounded significand with its leading bit. Normal: q in [2^kMan, 2^(kMan+1)]
        // and the encoding is ((exp + bias - 1) << kMan) + q, so that q's leading bit (or the
        // carry of rounding) adds one to the exponent field, and the carry past the largest
        // finite value gives exactly kInf. Subnormal: q in [0, 2^kMan] is the encoding (2^kMan:
        // the smallest normal).
        const bool normal = exp >= 1 - kBias;
        r = (normal ? static_cast<std::uint64_t>(exp + kBias - 1) << kMan : 0) + q;
      }
    }
  }
  return static_cast<std::uint16_t>(sign | r);
}

/// x converted to Scalar (float, double, Eigen::bfloat16 or Eigen::half) with one
/// round-to-nearest-even step: exact for double; the hardware's conversion for float;
/// round_to_float16_bits for the 16-bit floats (Eigen 3.4's own conversion from double goes
/// through float and can round twice).
template <class Scalar>
Scalar round_to(double x) {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value ||
                    is_float16_v<Scalar>,
                "round_to: Scalar is float, double, Eigen::bfloat16 or Eigen::half");
  if constexpr (is_float16_v<Scalar>)
    return float16_from_bits<Scalar>(round_to_float16_bits<Scalar>(x));
  else
    return static_cast<Scalar>(x);
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_FLOAT16_HPP_
