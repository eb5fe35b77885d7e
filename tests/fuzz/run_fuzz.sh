#!/usr/bin/env bash
# Builds normkit's libFuzzer targets with clang (ASan + UBSan) and fuzzes each for N seconds
# (default 60) with a fixed seed, on a copy of its committed corpus. Exits non-zero on any
# finding. Targets:
#   modules      fuzz_modules      tests/fuzz/corpus              (module calls, -max_len=512)
#   safetensors  fuzz_safetensors  tests/fuzz/corpus_safetensors  (the file path, -max_len=8192,
#                                                                  -dict=tests/fuzz/safetensors.dict)
# Usage: tests/fuzz/run_fuzz.sh [seconds] [target...]   (default: every target, one after another)
# A finding is left in build/fuzz/run-<target>/artifacts/; copy it into the target's corpus as
# finding-<what> (and add a regression test) once fixed.
set -euo pipefail
SECONDS_TO_RUN="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
  TARGETS=(modules safetensors)
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${NORMKIT_FUZZ_BUILD_DIR:-$ROOT/build/fuzz}"
JOBS="${NORMKIT_FUZZ_JOBS:-2}"

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_CXX_COMPILER="${CXX_FUZZ:-clang++}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DNORMKIT_BUILD_FUZZERS=ON -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCHMARKS=OFF >/dev/null

status=0
for target in "${TARGETS[@]}"; do
  case "$target" in
    modules) corpus=corpus; opts=(-max_len=512) ;;
    safetensors) corpus=corpus_safetensors; opts=(-max_len=8192 -dict="$ROOT/tests/fuzz/safetensors.dict") ;;
    *) echo "run_fuzz.sh: unknown target '$target' (modules, safetensors)" >&2; exit 2 ;;
  esac
  cmake --build "$BUILD" --target "fuzz_$target" -j "$JOBS"
  FUZZER="$(find "$BUILD" -type f -name "fuzz_$target" -perm -u+x | head -n1)"
  WORK="$BUILD/run-$target"
  rm -rf "$WORK"
  mkdir -p "$WORK/corpus" "$WORK/artifacts"
  cp "$ROOT/tests/fuzz/$corpus/"* "$WORK/corpus/" 2>/dev/null || true

  set +e
  "$FUZZER" "$WORK/corpus" -seed=1 -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 "${opts[@]}" \
    -timeout=20 -rss_limit_mb=2048 -artifact_prefix="$WORK/artifacts/" 2>&1 | tee "$WORK/fuzz.log"
  rc=${PIPESTATUS[0]}
  set -e
  execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$WORK/fuzz.log" | grep -Eo '[0-9]+$' | tail -n1)"
  echo "normkit fuzz ($target): executions = ${execs:-unknown}, exit code = $rc"
  if [ "$rc" -ne 0 ] || ls "$WORK/artifacts/"* >/dev/null 2>&1; then
    echo "normkit fuzz ($target): FINDINGS in $WORK/artifacts (reproduce: NORMKIT_FUZZ_VERBOSE=1 $FUZZER <file>)" >&2
    status=1
  else
    echo "normkit fuzz ($target): no findings"
  fi
done
exit "$status"
