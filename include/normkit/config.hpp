// normkit — normalization layers over Eigen tensors
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

namespace normkit {
/// Signed index type used everywhere (Eigen's).
using Index = Eigen::Index;
}  // namespace normkit

#endif  // NORMKIT_CONFIG_HPP_
