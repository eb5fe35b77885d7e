#!/usr/bin/env bash
# Builds and runs normkit's whole test suite (unit, fixture, gradient, threading and per-ISA
# tests, examples, consumer projects, SyncBatchNorm under mpiexec on 1-4 processes, and a
# smoke run of the benchmarks) with warnings as errors. Installs missing Debian packages first (not the benchmark peers: scripts/bench.sh
# installs libtorch and oneDNN for the comparisons). Usage: scripts/test.sh [build-dir] [extra
# cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh cmake g++ make ninja-build libeigen3-dev libgtest-dev libbenchmark-dev \
  nlohmann-json3-dev libopenmpi-dev openmpi-bin
build=${1:-build/test}
shift || true
# The benchmark peers are left out of the test build even when installed (the smoke run only
# checks that normkit's own benchmarks run). Debug info is line tables only (-g1): 8% less
# compile time than a full -g over the suite (1083 vs 1182 CPU-s in CI); failures still
# report file and line.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" -DNORMKIT_WERROR=ON \
  -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON -DCMAKE_DISABLE_FIND_PACKAGE_dnnl=ON "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)"
