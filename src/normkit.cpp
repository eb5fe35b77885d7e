// normkit/src/normkit.cpp: the compiled mode's one object -- every kernel entry point for
// float and double, with every ISA copy of the leaf kernels (detail/instantiate.hpp).
// SPDX-License-Identifier: MIT
#define NORMKIT_BUILDING_LIBRARY
#include <normkit/normkit.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {
NORMKIT_FOR_EACH_COMPILED_TYPE(NORMKIT_CHANNEL_NORM_ENTRY_POINTS, NORMKIT_INSTANTIATE_TEMPLATE)
NORMKIT_FOR_EACH_COMPILED_TYPE(NORMKIT_LAYER_NORM_ENTRY_POINTS, NORMKIT_INSTANTIATE_TEMPLATE)
NORMKIT_FOR_EACH_COMPILED_TYPE(NORMKIT_GROUP_NORM_ENTRY_POINTS, NORMKIT_INSTANTIATE_TEMPLATE)
}  // namespace detail
NORMKIT_END_NAMESPACE
