// normkit/detail/kernels/isa_begin.hpp: opens the compiler target region and the namespace of
// one ISA copy of the kernels (NORMKIT_KERNEL_ISA: 0 baseline, 1 AVX2 + FMA, 2 AVX-512).
// Included only by detail/dispatch.hpp, before kernels/leaves.hpp; no include guard.
// SPDX-License-Identifier: MIT
// IWYU pragma: private, include <normkit/normkit.hpp>

// NB: the technique of simdjson and Highway (foreach_target.h): the kernel source is included
// once per ISA, each time inside a target region and a namespace of its own. GCC applies
// `#pragma GCC target` to every function defined in the region, Clang's
// `#pragma clang attribute ... apply_to = function` likewise (lambdas included; checked with
// GCC 12 and Clang 14). In C++ the pragma does not define __AVX2__ and friends, so kernels
// test NORMKIT_KERNEL_ISA instead. Only pointers and scalars cross from baseline code into a
// region (a 32/64-byte vector passed across would change the calling convention).
#if NORMKIT_KERNEL_ISA == 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#endif
#define NORMKIT_KERNEL_NS isa_avx2
#elif NORMKIT_KERNEL_ISA == 2
#if defined(__clang__)
#pragma clang attribute push(                                                                    \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#endif
#define NORMKIT_KERNEL_NS isa_avx512
#else
#define NORMKIT_KERNEL_NS isa_base
#endif

NORMKIT_BEGIN_NAMESPACE
namespace detail {
namespace NORMKIT_KERNEL_NS {
