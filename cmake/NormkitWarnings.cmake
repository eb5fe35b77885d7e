# Developer warnings, on a non-exported INTERFACE target that tests, examples and
# benchmarks link PRIVATE. Never on normkit::normkit: consumers pay nothing.
if(TARGET normkit_warnings)
  return()
endif()
add_library(normkit_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(normkit_warnings INTERFACE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion)
  if(NORMKIT_WERROR)
    target_compile_options(normkit_warnings INTERFACE -Werror)
  endif()
elseif(MSVC)
  target_compile_options(normkit_warnings INTERFACE /W4)
endif()
