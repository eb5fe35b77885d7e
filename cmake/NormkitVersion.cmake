# Reads the version from include/normkit/version.hpp, the one place it lives (as fmt does).
file(READ "${CMAKE_CURRENT_LIST_DIR}/../include/normkit/version.hpp" _normkit_version_hpp)
foreach(part MAJOR MINOR PATCH)
  string(REGEX MATCH "#define NORMKIT_VERSION_${part} ([0-9]+)" _m "${_normkit_version_hpp}")
  set(NORMKIT_VERSION_${part} "${CMAKE_MATCH_1}")
endforeach()
set(NORMKIT_VERSION "${NORMKIT_VERSION_MAJOR}.${NORMKIT_VERSION_MINOR}.${NORMKIT_VERSION_PATCH}")
