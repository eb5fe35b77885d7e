#!/usr/bin/env bash
# Builds normkit's libFuzzer targets with clang (ASan + UBSan) and fuzzes each for N seconds
# (default 60) with a fixed seed, on a copy of its committed corpus. Exits non-zero on any
# finding. Targets:
#   modules      fuzz_modules      tests/fuzz/corpus              (module calls, -max_len=512)
#   safetensors  fuzz_safetensors  tests/fuzz/corpus_safetensors  (the file path, -max_len=8192,
#                                                                  -dict=tests/fuzz/safetensors.dict)
# Usage: tests/fuzz/run_fuzz.sh [--per-isa] [seconds] [target...]
#   (default: every target, one after another)
# --per-isa: the modules target runs once per ISA level this CPU supports (baseline, avx2,
#   avx512: NORMKIT_ISA=<level>), seconds/levels each, each with -seed=1, its own copy of the
#   corpus and its own artifacts (build/fuzz/run-modules-<level>/); the levels run and those the
#   CPU lacks are printed, and each run must report that level at startup. The safetensors
#   target runs no kernels and gets one run of the full time.
# A finding is left in build/fuzz/run-<target>[-<level>]/artifacts/; copy it into the target's
# corpus as finding-<what> (and add a regression test) once fixed.
set -euo pipefail
PER_ISA=0
if [ "${1:-}" = "--per-isa" ]; then
  PER_ISA=1
  shift
fi
SECONDS_TO_RUN="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
  TARGETS=(modules safetensors)
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${NORMKIT_FUZZ_BUILD_DIR:-$ROOT/build/fuzz}"
JOBS="${NORMKIT_FUZZ_JOBS:-2}"

# Ninja (when there and the build directory is new) builds the two fuzzers side by side.
gen=()
if command -v ninja >/dev/null && [ ! -f "$BUILD/CMakeCache.txt" ]; then
  gen=(-G Ninja)
fi
cmake "${gen[@]}" -S "$ROOT" -B "$BUILD" -DCMAKE_CXX_COMPILER="${CXX_FUZZ:-clang++}" -DCMAKE_BUILD_TYPE= \
  -DNORMKIT_BUILD_FUZZERS=ON -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCHMARKS=OFF >/dev/null

# fuzz <target> <fuzzer> <label> <seconds> <work dir> [env...]: one libFuzzer run; sets status=1 on
# a finding. With an ISA level in the environment, the run must have started on that level.
status=0
fuzz() {
  local target="$1" fuzzer="$2" label="$3" secs="$4" work="$5"
  shift 5
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$ROOT/tests/fuzz/$corpus/"* "$work/corpus/" 2>/dev/null || true
  set +e
  env "$@" "$fuzzer" "$work/corpus" -seed=1 -max_total_time="$secs" -print_final_stats=1 "${opts[@]}" \
    -timeout=20 -rss_limit_mb=2048 -artifact_prefix="$work/artifacts/" 2>&1 | tee "$work/fuzz.log"
  local rc=${PIPESTATUS[0]}
  set -e
  local execs
  execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$work/fuzz.log" | grep -Eo '[0-9]+$' | tail -n1)"
  echo "normkit fuzz ($label): executions = ${execs:-unknown} in ${secs} s, exit code = $rc"
  echo "$label ${execs:-unknown} $secs $rc" >>"$SUMMARY"
  if [ "$rc" -ne 0 ] || ls "$work/artifacts/"* >/dev/null 2>&1; then
    echo "normkit fuzz ($label): FINDINGS in $work/artifacts (reproduce: $* NORMKIT_FUZZ_VERBOSE=1 $fuzzer <file>)" >&2
    status=1
  else
    echo "normkit fuzz ($label): no findings"
  fi
}

for target in "${TARGETS[@]}"; do
  case "$target" in
    modules | safetensors) ;;
    *) echo "run_fuzz.sh: unknown target '$target' (modules, safetensors)" >&2; exit 2 ;;
  esac
done
# Every target first, in one build: the two fuzzers compile side by side (each is one
# translation unit), not one after the other between the runs.
cmake --build "$BUILD" -j "$JOBS" --target $(printf 'fuzz_%s ' "${TARGETS[@]}")

SUMMARY="$BUILD/fuzz-summary.txt"
mkdir -p "$BUILD"
: >"$SUMMARY"
for target in "${TARGETS[@]}"; do
  case "$target" in
    modules) corpus=corpus; opts=(-max_len=512) ;;
    safetensors) corpus=corpus_safetensors; opts=(-max_len=8192 -dict="$ROOT/tests/fuzz/safetensors.dict") ;;
    *) echo "run_fuzz.sh: unknown target '$target' (modules, safetensors)" >&2; exit 2 ;;
  esac
  FUZZER="$(find "$BUILD" -type f -name "fuzz_$target" -perm -u+x | head -n1)"
  if [ "$PER_ISA" -eq 1 ] && [ "$target" = modules ]; then
    # The fuzzer itself says which levels this CPU supports (normkit::supported_isas()).
    listing="$(NORMKIT_FUZZ_LIST_ISAS=1 "$FUZZER" 2>/dev/null)"
    read -r -a levels <<<"$(sed -n 's/^normkit-isa-supported: *//p' <<<"$listing")"
    lacking="$(sed -n 's/^normkit-isa-lacking: *//p' <<<"$listing")"
    if [ "${#levels[@]}" -eq 0 ]; then
      echo "run_fuzz.sh: fuzz_modules listed no ISA level" >&2
      exit 2
    fi
    per=$(( SECONDS_TO_RUN / ${#levels[@]} ))
    [ "$per" -ge 1 ] || per=1
    echo "normkit fuzz (modules): ISA levels to run: ${levels[*]} (${per} s each); lacking on this CPU: ${lacking:-none}"
    for level in "${levels[@]}"; do
      work="$BUILD/run-modules-$level"
      fuzz modules "$FUZZER" "modules, $level" "$per" "$work" NORMKIT_ISA="$level"
      if ! grep -q "^normkit fuzz_modules: ISA level = $level " "$work/fuzz.log"; then
        echo "normkit fuzz (modules, $level): the run did not report ISA level $level:" >&2
        grep '^normkit fuzz_modules: ISA level' "$work/fuzz.log" >&2 || echo "  (no ISA line)" >&2
        status=1
      fi
      # Evidence from the coverage: the kernel copies (namespaces isa_base, isa_avx2,
      # isa_avx512 in detail/dispatch.hpp) whose functions libFuzzer reported as first covered.
      copies="$(grep 'NEW_FUNC' "$work/fuzz.log" | grep -oE 'isa_(base|avx2|avx512)::' | sort | uniq -c |
        awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1}' | tr -d ':')"
      echo "normkit fuzz (modules, $level): kernel functions first covered, by ISA copy: ${copies:-none reported}"
    done
    echo "normkit fuzz (modules): ISA levels run: ${levels[*]}; lacking on this CPU: ${lacking:-none}"
  else
    fuzz "$target" "$FUZZER" "$target" "$SECONDS_TO_RUN" "$BUILD/run-$target"
  fi
done
echo "normkit fuzz summary (label, executions, seconds, exit code):"
sed 's/^/  /' "$SUMMARY"
exit "$status"
