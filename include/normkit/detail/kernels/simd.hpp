// normkit/detail/kernels/simd.hpp: the vector types of one ISA copy of the kernels -- the only
// file that names vector registers or intrinsics. Included by kernels/leaves.hpp inside an
// ISA namespace and target region (kernels/isa_begin.hpp); no include guard.
// SPDX-License-Identifier: MIT
// IWYU pragma: private, include <normkit/normkit.hpp>

// NB: lanes and widths. Kernels accumulate in *logical* vectors of 8 doubles (D8) and map
// floats 16 at a time (F16); each ISA builds them from its native registers: one zmm
// (AVX-512), two ymm (AVX2), four xmm (SSE2, NEON), or plain scalars (other compilers). The
// logical lane of every element, and the horizontal-sum tree, are the same on every ISA, so
// the ISA copies differ only where FMA contraction rounds once instead of twice.
// GCC 12 keeps generic vector types wider than the target's registers (a 64-byte
// vector_size type under AVX2) in memory, a store and a load per operation: measured on
// the AVX2 path that is what made the -march=native build slower than the baseline one on
// AMD Zen 3 (issue #10); hence arrays of native vectors. NORMKIT_SIMD is the level of the
// registers used: the ISA copy's, or the translation unit's own flags when they go further
// (the baseline copy of a -mavx2 build uses AVX2).

#if NORMKIT_KERNEL_ISA == 2 || (defined(__AVX512F__) && defined(__AVX512VL__) && \
                                defined(__AVX512BW__) && defined(__AVX512DQ__))
#define NORMKIT_SIMD 3
#elif NORMKIT_KERNEL_ISA == 1 || (defined(__AVX2__) && defined(__FMA__))
#define NORMKIT_SIMD 2
#elif defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
#define NORMKIT_SIMD 1
#elif defined(__GNUC__) || defined(__clang__)
#define NORMKIT_SIMD 0  // GCC/Clang generic 16-byte vectors (NEON on aarch64)
#else
#define NORMKIT_SIMD -1  // scalars
#endif

#define NORMKIT_KINLINE NORMKIT_ALWAYS_INLINE
// For lambdas in hot loops: GCC does not always inline a lambda called from two places, and
// then the accumulators it takes by reference live in memory.
#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_KLAMBDA __attribute__((always_inline))
#else
#define NORMKIT_KLAMBDA
#endif

#if NORMKIT_SIMD >= 0
// NB: GCC/Clang generic vectors of the register's width (arithmetic, unaligned loads through
// an under-aligned typedef), plus the one operation they lower badly: GCC 12 splits a
// float -> double __builtin_convertvector into 128-bit pieces and inserts, so on GCC the
// conversions call the compiler's own builtins (what <immintrin.h>'s _mm256_cvtps_pd and
// _mm512_cvtps_pd expand to). Not including <immintrin.h> saves 0.4 s of every translation
// unit's compile time (issue #14); <emmintrin.h>, which Eigen includes anyway, is enough
// for the SSE2 copy.
#if NORMKIT_SIMD == 3
inline constexpr int kDW = 8;
#elif NORMKIT_SIMD == 2
inline constexpr int kDW = 4;
#else
inline constexpr int kDW = 2;
#endif
inline constexpr int kFW = 2 * kDW;
typedef double dvec __attribute__((vector_size(8 * kDW)));
typedef float fvec __attribute__((vector_size(4 * kFW)));
typedef float fnarrow __attribute__((vector_size(4 * kDW)));  // kDW floats (SSE2: 2, padded)
typedef double dvec_u __attribute__((vector_size(8 * kDW), aligned(8)));
typedef float fvec_u __attribute__((vector_size(4 * kFW), aligned(4)));

NORMKIT_KINLINE dvec dload(const double* p) {
  return *reinterpret_cast<const dvec_u*>(p);
}
NORMKIT_KINLINE void dstore(double* p, dvec v) {
  *reinterpret_cast<dvec_u*>(p) = v;
}
NORMKIT_KINLINE dvec dsplat(double v) {
  return dvec{} + v;
}
NORMKIT_KINLINE fvec fload(const float* p) {
  return *reinterpret_cast<const fvec_u*>(p);
}
NORMKIT_KINLINE void fstore(float* p, fvec v) {
  *reinterpret_cast<fvec_u*>(p) = v;
}
NORMKIT_KINLINE fvec fsplat(float v) {
  return fvec{} + v;
}

#if NORMKIT_SIMD == 1
typedef float v4sf __attribute__((vector_size(16)));
NORMKIT_KINLINE dvec dload(const float* p) {
  // (__m128i loads and stores may alias anything; a double* access to floats may not.)
  return _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
NORMKIT_KINLINE void dstore(float* p, dvec v) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_castps_si128(_mm_cvtpd_ps(v)));
}
#elif NORMKIT_SIMD == 0
typedef float f2 __attribute__((vector_size(8)));
typedef float f2_u __attribute__((vector_size(8), aligned(4)));
NORMKIT_KINLINE dvec dload(const float* p) {
  return __builtin_convertvector(*reinterpret_cast<const f2_u*>(p), dvec);
}
NORMKIT_KINLINE void dstore(float* p, dvec v) {
  *reinterpret_cast<f2_u*>(p) = __builtin_convertvector(v, f2);
}
#else
typedef float fnarrow_u __attribute__((vector_size(4 * kDW), aligned(4)));
NORMKIT_KINLINE dvec dload(const float* p) {
  const fnarrow f = *reinterpret_cast<const fnarrow_u*>(p);
#if defined(__clang__)
  return __builtin_convertvector(f, dvec);
#elif NORMKIT_SIMD == 3
  return __builtin_ia32_cvtps2pd512_mask(f, dvec{}, static_cast<unsigned char>(0xFF), 4);
#else
  return __builtin_ia32_cvtps2pd256(f);
#endif
}
NORMKIT_KINLINE void dstore(float* p, dvec v) {
#if defined(__clang__)
  *reinterpret_cast<fnarrow_u*>(p) = __builtin_convertvector(v, fnarrow);
#elif NORMKIT_SIMD == 3
  *reinterpret_cast<fnarrow_u*>(p) =
      __builtin_ia32_cvtpd2ps512_mask(v, fnarrow{}, static_cast<unsigned char>(0xFF), 4);
#else
  *reinterpret_cast<fnarrow_u*>(p) = __builtin_ia32_cvtpd2ps256(v);
#endif
}
#endif
#else
using dvec = double;
using fvec = float;
inline constexpr int kDW = 1;
inline constexpr int kFW = 1;
NORMKIT_KINLINE dvec dload(const double* p) {
  return *p;
}
NORMKIT_KINLINE dvec dload(const float* p) {
  return static_cast<double>(*p);
}
NORMKIT_KINLINE void dstore(double* p, dvec v) {
  *p = v;
}
NORMKIT_KINLINE void dstore(float* p, dvec v) {
  *p = static_cast<float>(v);
}
NORMKIT_KINLINE dvec dsplat(double v) {
  return v;
}
NORMKIT_KINLINE fvec fload(const float* p) {
  return *p;
}
NORMKIT_KINLINE void fstore(float* p, fvec v) {
  *p = v;
}
NORMKIT_KINLINE fvec fsplat(float v) {
  return v;
}
#endif

// ---------------------------------------------------------------------------------------
// Low-precision storage: Eigen::bfloat16 and Eigen::half load to float exactly and store
// rounded to nearest even, once. Scalar and vector conversions give the same bits (NaN:
// bfloat16 as Eigen's conversion, quiet with the sign kept; half: IEEE, as F16C).

typedef Eigen::bfloat16 bf16_t;
typedef Eigen::half f16_t;

NORMKIT_KINLINE float to_f(float v) {
  return v;
}
NORMKIT_KINLINE double to_f(double v) {
  return v;
}
NORMKIT_KINLINE float to_f(bf16_t v) {
  const std::uint32_t u = static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(v))
                          << 16;
  return Eigen::numext::bit_cast<float>(u);
}
// half: Eigen's software conversion (what GCC builds get, with or without F16C) keeps a
// signalling NaN signalling and stores every NaN as 0x7e00; F16C quiets and keeps the payload.
// The scalar conversions here give F16C's bits, so a tail element matches the vector body.
NORMKIT_KINLINE float to_f(f16_t v) {
  const float f = static_cast<float>(v);
  return f != f ? Eigen::numext::bit_cast<float>(Eigen::numext::bit_cast<std::uint32_t>(f) |
                                                 0x00400000u)
                : f;
}

template <class T>
NORMKIT_KINLINE T from_f(float v);
template <>
NORMKIT_KINLINE float from_f<float>(float v) {
  return v;
}
template <>
NORMKIT_KINLINE bf16_t from_f<bf16_t>(float v) {
  const std::uint32_t u = Eigen::numext::bit_cast<std::uint32_t>(v);
  const std::uint32_t r =
      v != v ? (((u >> 16) & 0x8000u) | 0x7fc0u) : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return Eigen::numext::bit_cast<bf16_t>(static_cast<std::uint16_t>(r));
}
template <>
NORMKIT_KINLINE f16_t from_f<f16_t>(float v) {
  if (v != v) {  // quiet, sign and the payload's top bits kept (F16C)
    const std::uint32_t u = Eigen::numext::bit_cast<std::uint32_t>(v);
    const std::uint32_t h = ((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu);
    return Eigen::numext::bit_cast<f16_t>(static_cast<std::uint16_t>(h));
  }
  return f16_t(v);
}
/// A double result stored as T (for the low types through float: the rare double path).
template <class T>
NORMKIT_KINLINE T from_d(double v) {
  if constexpr (std::is_same<T, double>::value)
    return v;
  else
    return from_f<T>(static_cast<float>(v));
}

#if NORMKIT_SIMD >= 0
// Vector loads and stores of 16-bit storage by memcpy (one move; no aliasing questions).
template <class V, class T>
NORMKIT_KINLINE V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, static_cast<const void*>(p), sizeof v);
  return v;
}
template <class T, class V>
NORMKIT_KINLINE void vstore(T* p, const V& v) {
  __builtin_memcpy(static_cast<void*>(p), &v, sizeof v);
}

// F16C: the AVX2 and AVX-512 copies (their target regions enable it), or a translation unit
// built with it.
#if NORMKIT_KERNEL_ISA >= 1 || (NORMKIT_SIMD >= 2 && defined(__F16C__))
#define NORMKIT_F16C 1
#else
#define NORMKIT_F16C 0
#endif
typedef unsigned short u16f __attribute__((vector_size(2 * kFW)));
typedef unsigned int u32f __attribute__((vector_size(4 * kFW)));
typedef unsigned short u16n __attribute__((vector_size(2 * kDW)));
typedef unsigned int u32n __attribute__((vector_size(4 * kDW)));

NORMKIT_KINLINE dvec widen(fnarrow f) {
#if defined(__clang__) || NORMKIT_SIMD <= 1
  return __builtin_convertvector(f, dvec);
#elif NORMKIT_SIMD == 3
  return __builtin_ia32_cvtps2pd512_mask(f, dvec{}, static_cast<unsigned char>(0xFF), 4);
#else
  return __builtin_ia32_cvtps2pd256(f);
#endif
}

// NB: bfloat16 widening and narrowing. GCC 12 lowers the generic 16-lane u16 -> u32
// conversion as two 8-lane vpmovzxwd plus extract and insert, reloading the bytes (a quarter
// of the bfloat16 BatchNorm evaluation's samples), so GCC gets its one-instruction builtin
// (what _mm512_cvtepu16_epi32 / _mm256_cvtepu16_epi32 expand to); Clang already emits it.
// The narrowing rounds to nearest even in the high half of each lane and selects the NaN
// pattern with the vector `?:` (one masked blend on AVX-512, one vpblendvb on AVX2).
typedef short s16f __attribute__((vector_size(2 * kFW)));
typedef short s16n __attribute__((vector_size(2 * kDW)));
#if !defined(__clang__) && NORMKIT_SIMD == 3
typedef int s32f __attribute__((vector_size(4 * kFW)));
NORMKIT_KINLINE u32f widen_u16(const bf16_t* p) {
  return (u32f)__builtin_ia32_pmovzxwd512_mask(vload<s16f>(p), s32f{},
                                               static_cast<unsigned short>(0xFFFF));
}
NORMKIT_KINLINE u32n widen_u16n(const bf16_t* p) {
  return (u32n)__builtin_ia32_pmovzxwd256(vload<s16n>(p));
}
#elif !defined(__clang__) && NORMKIT_SIMD == 2
NORMKIT_KINLINE u32f widen_u16(const bf16_t* p) {
  return (u32f)__builtin_ia32_pmovzxwd256(vload<s16f>(p));
}
NORMKIT_KINLINE u32n widen_u16n(const bf16_t* p) {
  typedef short s16x8 __attribute__((vector_size(16)));
  const s16n h = vload<s16n>(p);  // 4 values in the low half of an xmm
  return (u32n)__builtin_ia32_pmovzxwd128(s16x8{h[0], h[1], h[2], h[3], 0, 0, 0, 0});
}
#else
NORMKIT_KINLINE u32f widen_u16(const bf16_t* p) {
  return __builtin_convertvector(vload<u16f>(p), u32f);
}
NORMKIT_KINLINE u32n widen_u16n(const bf16_t* p) {
  return __builtin_convertvector(vload<u16n>(p), u32n);
}
#endif
NORMKIT_KINLINE fvec fload(const bf16_t* p) {
  return (fvec)(widen_u16(p) << 16);  // a bit cast (GCC/Clang vector casts)
}
// The bfloat16 bits of f in the high half of each lane: rounded to nearest even; a NaN keeps
// its sign and becomes the quiet NaN 0x7fc0 (Eigen's conversion).
NORMKIT_KINLINE u32f bf16_high(fvec f) {
  const u32f u = (u32f)f;
  const u32f q = (u & 0x80000000u) | 0x7fc00000u;
  return f != f ? q : u + 0x7fffu + ((u >> 16) & 1u);
}
NORMKIT_KINLINE void fstore(bf16_t* p, fvec f) {
  vstore(p, __builtin_convertvector(bf16_high(f) >> 16, u16f));
}
NORMKIT_KINLINE dvec dload(const bf16_t* p) {
  return widen((fnarrow)(widen_u16n(p) << 16));
}

#if NORMKIT_F16C && NORMKIT_SIMD == 3
typedef short h16 __attribute__((vector_size(32)));
typedef short h8 __attribute__((vector_size(16)));
NORMKIT_KINLINE fvec fload(const f16_t* p) {
  return __builtin_ia32_vcvtph2ps512_mask(vload<h16>(p), fvec{},
                                          static_cast<unsigned short>(0xFFFF), 4);
}
NORMKIT_KINLINE void fstore(f16_t* p, fvec f) {
  vstore(p, __builtin_ia32_vcvtps2ph512_mask(f, 0, h16{}, static_cast<unsigned short>(0xFFFF)));
}
NORMKIT_KINLINE dvec dload(const f16_t* p) {
  return widen(__builtin_ia32_vcvtph2ps256(vload<h8>(p)));
}
#elif NORMKIT_F16C && NORMKIT_SIMD == 2
typedef short h8 __attribute__((vector_size(16)));
typedef long long i2 __attribute__((vector_size(16)));
NORMKIT_KINLINE fvec fload(const f16_t* p) {
  return __builtin_ia32_vcvtph2ps256(vload<h8>(p));
}
NORMKIT_KINLINE void fstore(f16_t* p, fvec f) {
  vstore(p, __builtin_ia32_vcvtps2ph256(f, 0));
}
NORMKIT_KINLINE dvec dload(const f16_t* p) {
  // 4 halves (8 bytes) in the low half of an xmm, converted to 4 floats.
  long long lo;
  __builtin_memcpy(&lo, p, 8);
  const i2 w = {lo, 0};
  return widen(__builtin_ia32_vcvtph2ps((h8)w));
}
#else
NORMKIT_KINLINE fvec fload(const f16_t* p) {
  fvec f;
  for (int k = 0; k < kFW; ++k) f[k] = to_f(p[k]);
  return f;
}
NORMKIT_KINLINE void fstore(f16_t* p, fvec f) {
  for (int k = 0; k < kFW; ++k) p[k] = from_f<f16_t>(f[k]);
}
NORMKIT_KINLINE dvec dload(const f16_t* p) {
  fnarrow f;
  for (int k = 0; k < kDW; ++k) f[k] = to_f(p[k]);
  return widen(f);
}
#endif
#undef NORMKIT_F16C
#else
NORMKIT_KINLINE fvec fload(const bf16_t* p) {
  return to_f(*p);
}
NORMKIT_KINLINE fvec fload(const f16_t* p) {
  return to_f(*p);
}
NORMKIT_KINLINE void fstore(bf16_t* p, fvec v) {
  *p = from_f<bf16_t>(v);
}
NORMKIT_KINLINE void fstore(f16_t* p, fvec v) {
  *p = from_f<f16_t>(v);
}
NORMKIT_KINLINE dvec dload(const bf16_t* p) {
  return static_cast<double>(to_f(*p));
}
NORMKIT_KINLINE dvec dload(const f16_t* p) {
  return static_cast<double>(to_f(*p));
}
#endif

inline constexpr int kDK = 8 / kDW;  // native registers per D8
// Two accumulator pairs (elements 0-7 and 8-15 of every 16 in different registers) hide the
// add latency where a D8 is one or two registers; with 16 xmm registers (SSE2) they spill,
// so the narrow copies use one pair (their results differ in the last bits anyway: no FMA).
inline constexpr bool kTwoPairs = kDW >= 4;
inline constexpr int kFK = 16 / kFW;  // native registers per F16

/// 8 logical double lanes.
struct D8 {
  dvec v[kDK];
};
/// 16 logical float lanes.
struct F16 {
  fvec v[kFK];
};

template <class T>
NORMKIT_KINLINE void load(D8& o, const T* p) {
  for (int k = 0; k < kDK; ++k) o.v[k] = dload(p + k * kDW);
}
template <class T>
NORMKIT_KINLINE void store(T* p, const D8& a) {
  for (int k = 0; k < kDK; ++k) dstore(p + k * kDW, a.v[k]);
}
NORMKIT_KINLINE void splat(D8& o, double v) {
  const dvec s = dsplat(v);
  for (int k = 0; k < kDK; ++k) o.v[k] = s;
}
NORMKIT_KINLINE void zero(D8& o) {
  splat(o, 0.0);
}
NORMKIT_KINLINE D8 operator+(const D8& a, const D8& b) {
  D8 r;
  for (int k = 0; k < kDK; ++k) r.v[k] = a.v[k] + b.v[k];
  return r;
}
NORMKIT_KINLINE D8 operator-(const D8& a, const D8& b) {
  D8 r;
  for (int k = 0; k < kDK; ++k) r.v[k] = a.v[k] - b.v[k];
  return r;
}
NORMKIT_KINLINE D8 operator*(const D8& a, const D8& b) {
  D8 r;
  for (int k = 0; k < kDK; ++k) r.v[k] = a.v[k] * b.v[k];
  return r;
}
NORMKIT_KINLINE D8& operator+=(D8& a, const D8& b) {
  for (int k = 0; k < kDK; ++k) a.v[k] += b.v[k];
  return a;
}
NORMKIT_KINLINE D8& operator-=(D8& a, const D8& b) {
  for (int k = 0; k < kDK; ++k) a.v[k] -= b.v[k];
  return a;
}

// Mixed operands (a scalar splat), so that one generic lambda serves vector bodies and
// scalar tails alike.
NORMKIT_KINLINE D8 operator+(const D8& a, double b) {
  D8 s;
  splat(s, b);
  return a + s;
}
NORMKIT_KINLINE D8 operator-(const D8& a, double b) {
  D8 s;
  splat(s, b);
  return a - s;
}
NORMKIT_KINLINE D8 operator*(const D8& a, double b) {
  D8 s;
  splat(s, b);
  return a * s;
}
NORMKIT_KINLINE D8 operator*(double a, const D8& b) {
  return b * a;
}

template <class T>
NORMKIT_KINLINE void load(F16& o, const T* p) {
  for (int k = 0; k < kFK; ++k) o.v[k] = fload(p + k * kFW);
}
template <class T>
NORMKIT_KINLINE void store(T* p, const F16& a) {
  for (int k = 0; k < kFK; ++k) fstore(p + k * kFW, a.v[k]);
}
#if NORMKIT_SIMD == 2
// bfloat16 from two 8-lane registers: narrowed together, one vpackusdw (in 128-bit lanes,
// values <= 0xffff so it does not saturate) and one vpermq to put the quadwords in order.
NORMKIT_KINLINE void store(bf16_t* p, const F16& a) {
  typedef int s32x8 __attribute__((vector_size(32)));
  typedef long long s64x4 __attribute__((vector_size(32)));
  const s32x8 lo = (s32x8)(bf16_high(a.v[0]) >> 16), hi = (s32x8)(bf16_high(a.v[1]) >> 16);
  vstore(p, __builtin_ia32_permdi256((s64x4)__builtin_ia32_packusdw256(lo, hi), 0xd8));
}
#endif
template <class T>
NORMKIT_KINLINE F16 load16(const T* p) {
  F16 r;
  load(r, p);
  return r;
}

NORMKIT_KINLINE F16 splat16(float v) {
  F16 r;
  const fvec s = fsplat(v);
  for (int k = 0; k < kFK; ++k) r.v[k] = s;
  return r;
}
NORMKIT_KINLINE F16 operator+(const F16& a, const F16& b) {
  F16 r;
  for (int k = 0; k < kFK; ++k) r.v[k] = a.v[k] + b.v[k];
  return r;
}
NORMKIT_KINLINE F16 operator-(const F16& a, const F16& b) {
  F16 r;
  for (int k = 0; k < kFK; ++k) r.v[k] = a.v[k] - b.v[k];
  return r;
}
NORMKIT_KINLINE F16 operator*(const F16& a, const F16& b) {
  F16 r;
  for (int k = 0; k < kFK; ++k) r.v[k] = a.v[k] * b.v[k];
  return r;
}
NORMKIT_KINLINE F16& operator+=(F16& a, const F16& b) {
  for (int k = 0; k < kFK; ++k) a.v[k] += b.v[k];
  return a;
}

NORMKIT_KINLINE F16 operator+(const F16& a, float b) {
  return a + splat16(b);
}
NORMKIT_KINLINE F16 operator-(const F16& a, float b) {
  return a - splat16(b);
}
NORMKIT_KINLINE F16 operator*(const F16& a, float b) {
  return a * splat16(b);
}
NORMKIT_KINLINE F16 operator*(float a, const F16& b) {
  return b * splat16(a);
}
template <class T>
NORMKIT_KINLINE D8 load8d(const T* p) {
  D8 r;
  load(r, p);
  return r;
}

// ---------------------------------------------------------------------------------------
// Streaming (non-temporal) stores of 16 floats to a 64-byte-aligned address: written
// around the caches, without the read-for-ownership a normal store of a line not in cache
// costs (leaves.hpp: fmap). stream_fence() orders them before what the thread stores next
// (x86: they are weakly ordered, and a release store does not order them); each leaf that
// streamed calls it before it returns. Other targets and compilers store normally.
#if (NORMKIT_SIMD >= 1 || (NORMKIT_SIMD == 0 && defined(__clang__))) && \
    (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__))
inline constexpr bool kStream = true;
#else
inline constexpr bool kStream = false;
#endif
NORMKIT_KINLINE void stream(float* p, const F16& a) {
#if defined(__clang__) && NORMKIT_SIMD >= 0
  for (int k = 0; k < kFK; ++k)
    __builtin_nontemporal_store(a.v[k], reinterpret_cast<fvec*>(p + Index{k} * kFW));
#elif NORMKIT_SIMD == 3
  __builtin_ia32_movntps512(p, a.v[0]);
#elif NORMKIT_SIMD == 2
  for (int k = 0; k < kFK; ++k) __builtin_ia32_movntps256(p + Index{k} * kFW, a.v[k]);
#elif NORMKIT_SIMD == 1
  for (int k = 0; k < kFK; ++k) __builtin_ia32_movntps(p + Index{k} * kFW, a.v[k]);
#else
  store(p, a);
#endif
}
// 16 bfloat16 or half values (32 bytes) to a 32-byte-aligned address: narrowed as store()
// narrows them, then one 256-bit streaming store. AVX2 and AVX-512 copies only.
inline constexpr bool kStreamLow = kStream && NORMKIT_SIMD >= 2;
template <class Y>
NORMKIT_KINLINE void stream(Y* p, const F16& a) {
#if NORMKIT_SIMD >= 2
  typedef long long q4 __attribute__((vector_size(32)));
  alignas(32) Y t[16];
  store(t, a);
  q4 v;
  std::memcpy(&v, t, sizeof v);
#if defined(__clang__)
  __builtin_nontemporal_store(v, reinterpret_cast<q4*>(p));
#else
  __builtin_ia32_movntdq256(reinterpret_cast<q4*>(p), v);
#endif
#else
  store(p, a);
#endif
}
/// Whether outputs of type Y can be streamed (see stream()).
template <class Y>
inline constexpr bool kStreamable = (kStream && std::is_same<Y, float>::value) ||
                                    (kStreamLow && is_low_v<Y>);
NORMKIT_KINLINE void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_sfence();
#endif
}

// ---------------------------------------------------------------------------------------
// Activations of the fused epilogues (kernels/leaves.hpp: affine_rows_epi). Float lanes use
// vector polynomials (exp as Cephes' expf, erf as Abramowitz & Stegun 7.1.26 -- ATen's
// vectorized erf -- about 1e-7 absolute); double lanes and scalars use <cmath>.
// Codes: 0 identity, 1 ReLU, 2 SiLU, 3 GELU (erf), 4 GELU (tanh approximation).

#if NORMKIT_SIMD >= 0
typedef int ivec __attribute__((vector_size(4 * kFW)));
NORMKIT_KINLINE fvec vrelu(fvec z) {
  // max(z, 0) with NaN kept (as torch.relu): clear the lanes where z < 0.
  return (fvec)((ivec)z & ~(ivec)(z < 0.0f));
}
NORMKIT_KINLINE fvec vsel(ivec m, fvec a, fvec b) {
  return (fvec)(((ivec)a & m) | ((ivec)b & ~m));
}
NORMKIT_KINLINE fvec vexp(fvec x) {
  const fvec hi = fsplat(88.3762626647949f), lo = fsplat(-87.3365447504019f);
  x = vsel(x > hi, hi, x);
  x = vsel(x < lo, lo, x);
  // n = round(x / ln 2) (the 1.5 * 2^23 trick), r = x - n ln 2 in two steps.
  const fvec magic = fsplat(12582912.0f);
  fvec n = (x * 1.44269504088896341f + magic) - magic;
  fvec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  fvec p = fsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * (fvec)e;
}
NORMKIT_KINLINE fvec vabs(fvec x) {
  return (fvec)((ivec)x & 0x7fffffff);
}
NORMKIT_KINLINE fvec verf(fvec x) {
  const fvec a = vabs(x);
  const fvec t = 1.0f / (a * 0.3275911f + 1.0f);
  fvec p = fsplat(1.061405429f);
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  const fvec y = 1.0f - p * t * vexp(-(a * a));
  return (fvec)((ivec)y | ((ivec)x & (int)0x80000000u));  // erf(-x) = -erf(x)
}
NORMKIT_KINLINE fvec act_lanes(int code, fvec z) {
  switch (code) {
    case 1:
      return vrelu(z);
    case 2:
      return z / (vexp(-z) + 1.0f);
    case 3:
      return 0.5f * z * (verf(z * 0.70710678118654752f) + 1.0f);
    case 4: {
      const fvec u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      const fvec th = 1.0f - 2.0f / (vexp(u + u) + 1.0f);
      return 0.5f * z * (th + 1.0f);
    }
    default:
      return z;
  }
}
#endif

/// The activation of code `code` in double (double lanes, scalars, the rare double path).
NORMKIT_KINLINE double act_scalar(int code, double z) {
  switch (code) {
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

template <int kAct>
NORMKIT_KINLINE void activate(F16& z) {
  if constexpr (kAct != 0) {
#if NORMKIT_SIMD >= 0
    for (int k = 0; k < kFK; ++k) z.v[k] = act_lanes(kAct, z.v[k]);
#else
    for (int k = 0; k < kFK; ++k) z.v[k] = static_cast<float>(act_scalar(kAct, z.v[k]));
#endif
  }
}
template <int kAct>
NORMKIT_KINLINE void activate(D8& z) {
  if constexpr (kAct != 0) {
    alignas(64) double t[8];
    store(t, z);
    for (int k = 0; k < 8; ++k) t[k] = act_scalar(kAct, t[k]);
    load(z, static_cast<const double*>(t));
  }
}
template <int kAct>
NORMKIT_KINLINE void activate(double& z) {
  z = act_scalar(kAct, z);
}

/// Loads a RowAcc pair of logical vectors and its tail.
NORMKIT_KINLINE void load_acc(const RowAcc& s, D8& a1, D8& a2, D8& b1, D8& b2) {
  load(a1, s.a1);
  load(a2, s.a2);
  load(b1, s.b1);
  load(b2, s.b2);
}
NORMKIT_KINLINE void store_acc(RowAcc& s, const D8& a1, const D8& a2, const D8& b1, const D8& b2) {
  store(s.a1, a1);
  store(s.a2, a2);
  store(s.b1, b1);
  store(s.b2, b2);
}

/// Prefetches the cache lines of p[0, len) (a hint: never faults, no effect on results).
template <class T>
NORMKIT_KINLINE void prefetch_lines(const T* p, Index len) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr Index kLine = 64 / static_cast<Index>(sizeof(T));
  for (Index j = 0; j < len; j += kLine) __builtin_prefetch(p + j);
  __builtin_prefetch(p + len - 1);
#else
  (void)p, (void)len;
#endif
}

#undef NORMKIT_SIMD
