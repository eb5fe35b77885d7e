// normkit/detail/dispatch.hpp: compiles the leaf kernels once per ISA level and picks the
// active level's table (normkit::isa()) once per call.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_DISPATCH_HPP_
#define NORMKIT_DETAIL_DISPATCH_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

// Everything the kernels use is included here, outside the target regions and namespaces.
#include <algorithm>    // std::fill
#include <cmath>        // std::abs
#include <cstdint>      // std::uint16_t, std::uint32_t
#include <cstring>      // std::memcpy
#include <type_traits>  // std::is_same
#include <vector>       // std::vector

#if defined(__SSE2__)
#include <emmintrin.h>  // the SSE2 copy's conversions (kernels/simd.hpp)
#endif

#include <normkit/config.hpp>
#include <normkit/detail/kernels/types.hpp>
#include <normkit/isa.hpp>

// Each kernel copy is isa_begin, leaves, isa_end in this order: no include sorting here.
// clang-format off
// The baseline copy: the translation unit's own flags.
#define NORMKIT_KERNEL_ISA 0
#include <normkit/detail/kernels/isa_begin.hpp>
#include <normkit/detail/kernels/leaves.hpp>
#include <normkit/detail/kernels/isa_end.hpp>

// NB: when the translation unit is itself compiled for AVX2 or AVX-512 (-march=native, say),
// the baseline copy already uses those registers (kernels/simd.hpp), so the higher copies
// are not compiled again: compile time stays that of one copy.
#if NORMKIT_X86_DISPATCH
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__)
#define NORMKIT_AVX2_NS isa_base
#define NORMKIT_AVX512_NS isa_base
#elif defined(__AVX2__) && defined(__FMA__)
#define NORMKIT_AVX2_NS isa_base
#define NORMKIT_AVX512_NS isa_avx512
#define NORMKIT_KERNEL_ISA 2
#include <normkit/detail/kernels/isa_begin.hpp>
#include <normkit/detail/kernels/leaves.hpp>
#include <normkit/detail/kernels/isa_end.hpp>
#else
#define NORMKIT_AVX2_NS isa_avx2
#define NORMKIT_AVX512_NS isa_avx512
#define NORMKIT_KERNEL_ISA 1
#include <normkit/detail/kernels/isa_begin.hpp>
#include <normkit/detail/kernels/leaves.hpp>
#include <normkit/detail/kernels/isa_end.hpp>
#define NORMKIT_KERNEL_ISA 2
#include <normkit/detail/kernels/isa_begin.hpp>
#include <normkit/detail/kernels/leaves.hpp>
#include <normkit/detail/kernels/isa_end.hpp>
#endif
#endif
// clang-format on

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// The active ISA level's leaves for T (one atomic load; see isa.hpp).
template <class T>
const Leaves<T>& leaves() {
#if NORMKIT_X86_DISPATCH
  switch (active_isa_index()) {
    case 2:
      return NORMKIT_AVX512_NS::kLeaves<T>;
    case 1:
      return NORMKIT_AVX2_NS::kLeaves<T>;
    default:
      break;
  }
#endif
  return isa_base::kLeaves<T>;
}

/// The active ISA level's LayerNorm leaves for T.
template <class T>
const LnLeaves<T>& ln_leaves() {
#if NORMKIT_X86_DISPATCH
  switch (active_isa_index()) {
    case 2:
      return NORMKIT_AVX512_NS::kLnLeaves<T>;
    case 1:
      return NORMKIT_AVX2_NS::kLnLeaves<T>;
    default:
      break;
  }
#endif
  return isa_base::kLnLeaves<T>;
}

/// The active ISA level's fused-epilogue leaves for T.
template <class T>
const EpiLeaves<T>& epi_leaves() {
#if NORMKIT_X86_DISPATCH
  switch (active_isa_index()) {
    case 2:
      return NORMKIT_AVX512_NS::kEpiLeaves<T>;
    case 1:
      return NORMKIT_AVX2_NS::kEpiLeaves<T>;
    default:
      break;
  }
#endif
  return isa_base::kEpiLeaves<T>;
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_DISPATCH_HPP_
