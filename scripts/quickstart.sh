#!/usr/bin/env bash
# Builds and runs examples/quickstart.cpp (the BatchNorm hand check) on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh cmake g++ make libeigen3-dev
cmake -S . -B build/quickstart -DCMAKE_BUILD_TYPE=Release \
  -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_BENCHMARKS=OFF -DNORMKIT_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/quickstart --target quickstart -j "$(nproc)"
./build/quickstart/examples/quickstart
