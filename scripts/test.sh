#!/usr/bin/env bash
# Builds and runs normkit's whole test suite (unit, fixture, gradient, threading tests,
# examples, consumer projects, and a smoke run of the benchmarks) with warnings as errors.
# Installs missing Debian packages first. Usage: scripts/test.sh [build-dir] [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh cmake g++ make ninja-build libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev
# Peers for the benchmark comparison (compiled in when present); not needed by the tests.
bash scripts/deps.sh libtorch-dev libdnnl-dev || echo "normkit: benchmarks build without libtorch/oneDNN"
build=${1:-build/test}
shift || true
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNORMKIT_WERROR=ON "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)"
