// normkit/version.hpp: the library version (parsed by cmake/NormkitVersion.cmake).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_VERSION_HPP_
#define NORMKIT_VERSION_HPP_

// The one place the version lives; cmake/NormkitVersion.cmake parses these lines.
#define NORMKIT_VERSION_MAJOR 0
#define NORMKIT_VERSION_MINOR 1
#define NORMKIT_VERSION_PATCH 0
#define NORMKIT_VERSION \
  (NORMKIT_VERSION_MAJOR * 10000 + NORMKIT_VERSION_MINOR * 100 + NORMKIT_VERSION_PATCH)

#endif  // NORMKIT_VERSION_HPP_
