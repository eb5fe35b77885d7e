#!/usr/bin/env bash
# Cross-compiles a subset of normkit's tests and the quickstart example for aarch64 Linux
# with Debian's cross toolchain (cmake/toolchains/aarch64-linux-gnu.cmake), warnings as
# errors, and runs them under qemu-user through ctest (issue #10). The kernels take their
# portable path there (kernels/simd.hpp, NORMKIT_SIMD 0: GCC generic 16-byte vectors, NEON),
# with the baseline-only dispatch. GoogleTest is built from Debian's sources
# (/usr/src/googletest): Debian has no aarch64 GoogleTest library to link here.
# Usage: scripts/cross_aarch64.sh [build-dir] [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/deps.sh g++-aarch64-linux-gnu qemu-user libgtest-dev libeigen3-dev \
  nlohmann-json3-dev cmake ninja-build
build=${1:-build/aarch64}
shift || true
jobs=$(nproc)

# nlohmann_json's CMake package puts /usr/include on the include path, ahead of the cross
# compiler's own C and C++ headers (/usr/include's glibc headers would shadow libstdc++'s
# wrappers): give the package a prefix of its own that holds only nlohmann's headers.
json_prefix="$PWD/$build/host-headers"
if [ -f /usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake ]; then
  mkdir -p "$json_prefix/include" "$json_prefix/share/cmake/nlohmann_json"
  ln -sfn /usr/include/nlohmann "$json_prefix/include/nlohmann"
  cp /usr/share/cmake/nlohmann_json/*.cmake "$json_prefix/share/cmake/nlohmann_json/"
fi

# The test programs built and run (a subset: the whole suite takes too long to compile on a
# 2-core machine; the stage stays under 10 min there): the numerics against the PyTorch
# fixtures (fixture, accuracy, moments), the low-precision conversions of the portable
# kernels (low_precision), the fused epilogues' vector polynomials (fused), threads
# (threading), the baseline-only dispatch (isa), plans, and two examples.
tests=(fixture_test low_precision_test fused_test accuracy_test moments_test threading_test
       isa_test plan_test)
examples=(quickstart norms_compared)

# RelWithDebInfo's -O2 (as scripts/test.sh) without -g (faster to compile): at -O3 (Release)
# GCC 12 reports a false -Warray-bounds in Eigen's NEON packet loads (vld1q_f32) of a
# 2-element tensor's assignment, code its vectorized loop never runs, an error with
# NORMKIT_WERROR.
cmake -S . -B "$build" -G Ninja \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/toolchains/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -DNDEBUG" \
  -DNORMKIT_WERROR=ON \
  -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=ON -DNORMKIT_BUILD_BENCHMARKS=OFF \
  -DNORMKIT_CONSUMER_TESTS=OFF -DNORMKIT_GTEST_SOURCE_DIR=/usr/src/googletest \
  -Dnlohmann_json_DIR="$json_prefix/share/cmake/nlohmann_json" \
  -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON "$@" >/dev/null
echo "normkit aarch64: configured ($(( $(date +%s) - t0 )) s)"
nice cmake --build "$build" -j "$jobs" --target "${tests[@]}" "${examples[@]}"
echo "normkit aarch64: built ($(( $(date +%s) - t0 )) s)"

# Only what was built: the other test programs' gtest_discover_tests entries are
# <target>_NOT_BUILT placeholders, the other examples' binaries are missing.
ex_re=$(IFS='|'; echo "${examples[*]}")
built_examples_only="^example_($ex_re)\$"
all_examples=$(ctest --test-dir "$build" -N | sed -n 's/.*Test *#[0-9]*: \(example_[A-Za-z0-9_]*\)$/\1/p' \
  | grep -Ev "$built_examples_only" | paste -sd'|' || true)
exclude='_NOT_BUILT$'
[ -n "$all_examples" ] && exclude="$exclude|^($all_examples)\$"
nice ctest --test-dir "$build" --output-on-failure -j "$jobs" -E "$exclude"
echo "normkit aarch64: tests passed under qemu-aarch64 ($(( $(date +%s) - t0 )) s)"
