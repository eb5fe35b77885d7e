#!/usr/bin/env bash
# Where a benchmark entry spends its time: perf (software clock; VMs usually expose no
# hardware counters) over the Google Benchmark entries that match a filter, top symbols.
# Usage: tools/profile_case.sh FILTER [min_time_s] [perf report args...]
#   tools/profile_case.sh 'BM_BatchNorm1d/fc/train/threads:2/normkit/'
#   NORMKIT_ISA=avx2 tools/profile_case.sh 'BM_LayerNorm/bert/train/threads:1/normkit/'
# Needs build/bench (scripts/bench.sh builds it) and perf (Debian linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
filter=$1
min_time=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
bash scripts/deps.sh linux-perf >/dev/null
bin=build/bench/benchmarks/normkit_bench
data=$(mktemp /tmp/normkit-perf.XXXXXX)
perf record -q -F 4999 -e cpu-clock -o "$data" "$bin" --benchmark_filter="$filter" \
  --benchmark_min_time="$min_time" 2>/dev/null | grep -E '^BM_' || true
# Threads together; the benchmark's own setup (libtorch loading) is a few percent at most.
perf report -i "$data" --no-children --sort sym --percent-limit 1.5 --stdio "$@" 2>/dev/null |
  grep -E '^ +[0-9.]+%' | sed -E 's/normkit::v0_[a-z0-9_]+::detail:://; s/\(.*$//' | cut -c1-140
rm -f "$data"
