#!/usr/bin/env bash
# Builds the benchmark suite against libtorch and oneDNN (installing them when missing) with
# a user's Release flags (no -march), runs it on the ISA path the CPU picks, and -- on an
# AVX-512 CPU -- once more with all three libraries capped at AVX2 (a proxy for an AVX2-only
# CPU). Writes benchmarks/results/<date>-<cpu>-<isa>.{md,json,svg}.
# Usage: scripts/bench.sh [repetitions] [extra tools/bench_report.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh cmake g++ ninja-build libeigen3-dev libbenchmark-dev libtorch-dev libdnnl-dev python3 \
  libopenmpi-dev openmpi-bin
reps=${1:-3}
shift || true
build=build/bench
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=OFF \
  -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCHMARKS=ON -DNORMKIT_BENCH_NATIVE=OFF >/dev/null
cmake --build "$build" --target normkit_bench bench_sync_bn probe_pool_wake probe_layer_norm_costs probe_module_overhead probe_layer_norm_vs_onednn probe_nhwc_backward_vs_torch -j "$(nproc)"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
day=$(date +%Y-%m-%d)
mkdir -p benchmarks/results
levels=(default)
if grep -q avx512f /proc/cpuinfo && grep -q avx512bw /proc/cpuinfo; then
  levels+=(avx2)
fi
for isa in "${levels[@]}"; do
  out="benchmarks/results/$day-$cpu-$isa"
  args=(--binary "$build/benchmarks/normkit_bench" --repetitions "$reps"
        --filter='-.*eigen_naive.*' --json-out "$out.json" --markdown "$out.md" --svg "$out.svg")
  [ "$isa" = default ] || args+=(--isa "$isa")
  python3 tools/bench_report.py "${args[@]}" "$@"
  echo "wrote $out.md"
done
# SyncBatchNorm over MPI, 2 processes on this machine (benchmarks/bench_sync_bn.cpp): its
# table goes at the end of the default run's results.
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
mpirun -np 2 --oversubscribe "${root[@]}" "$build/benchmarks/bench_sync_bn" >> "benchmarks/results/$day-$cpu-default.md"
echo "appended the SyncBatchNorm table to benchmarks/results/$day-$cpu-default.md"
