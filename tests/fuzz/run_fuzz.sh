#!/usr/bin/env bash
# Builds the normkit libFuzzer target with clang (ASan + UBSan) and fuzzes it for N seconds
# (default 60) on a copy of tests/fuzz/corpus. Exits non-zero on any finding.
# Usage: tests/fuzz/run_fuzz.sh [seconds]
set -euo pipefail
SECONDS_TO_RUN="${1:-60}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${NORMKIT_FUZZ_BUILD_DIR:-$ROOT/build/fuzz}"
JOBS="${NORMKIT_FUZZ_JOBS:-2}"

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_CXX_COMPILER="${CXX_FUZZ:-clang++}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DNORMKIT_BUILD_FUZZERS=ON -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD" --target fuzz_modules -j "$JOBS"
FUZZER="$(find "$BUILD" -type f -name fuzz_modules -perm -u+x | head -n1)"

WORK="$BUILD/run"
rm -rf "$WORK"
mkdir -p "$WORK/corpus" "$WORK/artifacts"
cp "$ROOT/tests/fuzz/corpus/"* "$WORK/corpus/" 2>/dev/null || true

set +e
"$FUZZER" "$WORK/corpus" -seed=1 -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 -max_len=512 \
  -timeout=20 -rss_limit_mb=2048 -artifact_prefix="$WORK/artifacts/" 2>&1 | tee "$WORK/fuzz.log"
rc=${PIPESTATUS[0]}
set -e
execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$WORK/fuzz.log" | grep -Eo '[0-9]+$' | tail -n1)"
echo "normkit fuzz: executions = ${execs:-unknown}, exit code = $rc"
if [ "$rc" -ne 0 ] || ls "$WORK/artifacts/"* >/dev/null 2>&1; then
  echo "normkit fuzz: FINDINGS in $WORK/artifacts (reproduce: NORMKIT_FUZZ_VERBOSE=1 $FUZZER <file>)" >&2
  exit 1
fi
echo "normkit fuzz: no findings"
