// normkit/detail/kernels/isa_end.hpp: closes what kernels/isa_begin.hpp opened.
// SPDX-License-Identifier: MIT
// IWYU pragma: private, include <normkit/normkit.hpp>
}  // namespace NORMKIT_KERNEL_NS
}  // namespace detail
NORMKIT_END_NAMESPACE

#if NORMKIT_KERNEL_ISA == 1 || NORMKIT_KERNEL_ISA == 2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#undef NORMKIT_KERNEL_NS
#undef NORMKIT_KERNEL_ISA
