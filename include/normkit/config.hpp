// normkit/config.hpp: compiler macros, the ABI namespace and the index type.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_CONFIG_HPP_
#define NORMKIT_CONFIG_HPP_

#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/version.hpp>

#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_ALWAYS_INLINE inline __attribute__((always_inline))
#define NORMKIT_NOINLINE __attribute__((noinline))
#else
#define NORMKIT_ALWAYS_INLINE inline
#define NORMKIT_NOINLINE
#endif

// Internal invariants only (never user input): compiled out under NDEBUG, like eigen_assert.
#define NORMKIT_ASSERT(cond) eigen_assert(cond)

// NB: runtime ISA dispatch. On x86-64 with GCC or Clang the vector kernels
// (detail/kernels/leaves.hpp) are compiled once per ISA level in compiler target regions and
// chosen at run time (normkit::isa()); elsewhere (aarch64, other compilers) one portable copy
// is compiled with the translation unit's own flags. Define NORMKIT_NO_DISPATCH to compile
// only that portable copy on x86-64 too.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(NORMKIT_NO_DISPATCH)
#define NORMKIT_X86_DISPATCH 1
#else
#define NORMKIT_X86_DISPATCH 0
#endif

// NB: the ABI namespace. Everything normkit defines is inline code, compiled with each
// translation unit's own flags. If one TU of a program is built with -mavx2 and another
// without, the linker keeps one copy of each inline function -- possibly the AVX2 one,
// which then faults on an older CPU in code the other TU meant to be baseline. Naming the
// inline namespace after the baseline the TU was compiled for gives the two builds distinct
// symbols (tests/isa/ checks it under qemu as a Westmere CPU). It also serves as the version
// hook (v0).
#if defined(NORMKIT_ABI)
// (set by the build: only tests/isa uses this, to show what goes wrong without it)
#elif defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__)
#define NORMKIT_ABI v0_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define NORMKIT_ABI v0_avx2
#elif defined(__x86_64__) || defined(_M_X64)
#define NORMKIT_ABI v0_x86_64
#elif defined(__aarch64__)
#define NORMKIT_ABI v0_aarch64
#else
#define NORMKIT_ABI v0_generic
#endif

/// Opens namespace normkit (and its ABI namespace, see above).
#define NORMKIT_BEGIN_NAMESPACE \
  namespace normkit {           \
  inline namespace NORMKIT_ABI {
/// Closes what NORMKIT_BEGIN_NAMESPACE opened.
#define NORMKIT_END_NAMESPACE \
  }                           \
  }

NORMKIT_BEGIN_NAMESPACE
/// Signed index type used everywhere (Eigen's).
using Index = Eigen::Index;
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_CONFIG_HPP_
