# Cross-compiling normkit for aarch64 Linux with Debian's cross toolchain
# (g++-aarch64-linux-gnu), the test programs run under qemu-user:
#   cmake -S . -B build/aarch64 --toolchain cmake/toolchains/aarch64-linux-gnu.cmake
# (or -DCMAKE_TOOLCHAIN_FILE=...). scripts/cross_aarch64.sh drives a whole build and test run.
#
# CMAKE_CROSSCOMPILING_EMULATOR prefixes every add_test whose command is a target, and
# gtest_discover_tests runs the test binaries through it too (CMake's GoogleTest module
# passes it to the discovery step as TEST_EXECUTOR and to the tests it adds). The emulator
# and the target's sysroot can be changed with -DNORMKIT_AARCH64_EMULATOR and
# -DNORMKIT_AARCH64_SYSROOT.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(_nk_triple aarch64-linux-gnu)
if(NOT DEFINED NORMKIT_AARCH64_SYSROOT)
  set(NORMKIT_AARCH64_SYSROOT /usr/${_nk_triple})
endif()
set(CMAKE_C_COMPILER ${_nk_triple}-gcc)
set(CMAKE_CXX_COMPILER ${_nk_triple}-g++)

if(NOT DEFINED NORMKIT_AARCH64_EMULATOR)
  find_program(_nk_qemu qemu-aarch64)
  if(_nk_qemu)
    set(NORMKIT_AARCH64_EMULATOR ${_nk_qemu})
  endif()
endif()
if(NORMKIT_AARCH64_EMULATOR)
  # -L: where qemu finds the dynamic loader and the aarch64 shared libraries.
  set(CMAKE_CROSSCOMPILING_EMULATOR ${NORMKIT_AARCH64_EMULATOR} -L ${NORMKIT_AARCH64_SYSROOT})
endif()

# Libraries and headers come from the aarch64 tree only; programs (git, objdump, ...) from
# the host.
set(CMAKE_FIND_ROOT_PATH ${NORMKIT_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Eigen is headers only, architecture-independent, and its CMake package lives outside the
# aarch64 tree (Debian libeigen3-dev): point find_package at it. Its include directory,
# /usr/include/eigen3, holds nothing else. (nlohmann_json's package adds /usr/include itself,
# which must not come before the cross compiler's own C and C++ headers:
# scripts/cross_aarch64.sh gives it a prefix of its own.)
if(NOT DEFINED Eigen3_DIR AND EXISTS /usr/share/eigen3/cmake/Eigen3Config.cmake)
  set(Eigen3_DIR /usr/share/eigen3/cmake CACHE PATH "Eigen3's CMake package (architecture-independent)")
endif()
