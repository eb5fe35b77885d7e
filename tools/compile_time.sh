#!/usr/bin/env bash
# Compile time of normkit translation units, as ratios to a TU that only includes Eigen's
# Tensor module and reduces a tensor (the cost every Eigen tensor user already pays).
# Usage: tools/compile_time.sh [compiler] [repetitions]   (default: g++, 3; best of N)
# Prints a Markdown table. Flags: -std=c++17 -O2, no -march (a user's default Release-like build).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${1:-g++}
REPS=${2:-3}
FLAGS=(-std=c++17 -O2 -I include -I /usr/include/eigen3 -c -o /dev/null)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/eigen_only.cpp" <<'CPP'
#include <unsupported/Eigen/CXX11/Tensor>
float f(const Eigen::Tensor<float, 4, Eigen::RowMajor>& x) {
  Eigen::Tensor<float, 0, Eigen::RowMajor> s = x.sum();
  return s();
}
CPP
cat >"$tmp/include_only.cpp" <<'CPP'
#include <normkit/normkit.hpp>
int f() { return NORMKIT_VERSION_MAJOR; }
CPP
cat >"$tmp/one_module.cpp" <<'CPP'
#include <normkit/normkit.hpp>
float f(const Eigen::Tensor<float, 4, Eigen::RowMajor>& x) {
  normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{3}};
  Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
  auto g = bn.backward(x, y);
  return g.input(0, 0, 0, 0) + g.weight(0);
}
CPP
cat >"$tmp/all_modules.cpp" <<'CPP'
#include <normkit/normkit.hpp>
float f(const Eigen::Tensor<float, 4, Eigen::RowMajor>& x) {
  float s = 0;
  normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{3}};
  auto y = bn.forward(x);
  s += bn.backward(x, y).input(0, 0, 0, 0);
  normkit::InstanceNorm2d<float> in{normkit::InstanceNormOptions{3}};
  y = in.forward(x);
  s += in.backward(x, y).input(0, 0, 0, 0);
  normkit::LayerNorm<float> ln{normkit::LayerNormOptions{{4}}};
  y = ln.forward(x);
  s += ln.backward(x, y).input(0, 0, 0, 0);
  normkit::GroupNorm<float> gn{normkit::GroupNormOptions{1, 3}};
  y = gn.forward(x);
  s += gn.backward(x, y).input(0, 0, 0, 0);
  return s;
}
CPP
if [ -f include/normkit/rms_norm.hpp ]; then
  sed -i 's|  return s;|  normkit::RMSNorm<float> rms{normkit::RMSNormOptions{{4}}};\n  y = rms.forward(x);\n  s += rms.backward(x, y).input(0, 0, 0, 0);\n  return s;|' "$tmp/all_modules.cpp"
fi

best() {  # best wall time of REPS compilations, in seconds
  local b=""
  for _ in $(seq "$REPS"); do
    local s e t
    s=$(date +%s.%N)
    "$CXX" "${FLAGS[@]}" "$@"
    e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l)
    if [ -z "$b" ] || [ "$(echo "$t < $b" | bc -l)" = 1 ]; then b=$t; fi
  done
  printf '%.2f' "$b"
}

base=$(best "$tmp/eigen_only.cpp")
echo "| translation unit ($CXX -O2, best of $REPS) | seconds | ratio to Eigen-only |"
echo "|---|---|---|"
echo "| Eigen Tensor include + one reduction (the baseline) | $base | 1.00 |"
describe() {
  case $1 in
    include_only) echo "\`#include <normkit/normkit.hpp>\` only" ;;
    one_module) echo "BatchNorm2d<float> forward + backward" ;;
    all_modules) echo "every module (float) forward + backward" ;;
  esac
}
for tu in include_only one_module all_modules; do
  t=$(best "$tmp/$tu.cpp")
  printf '| %s, header-only | %s | %.2f |\n' "$(describe $tu)" "$t" "$(echo "$t / $base" | bc -l)"
done
# The compiled mode (normkit::compiled): translation units only declare the kernels; the
# library's one object is compiled once per project.
for tu in one_module all_modules; do
  t=$(best -DNORMKIT_SEPARATE_COMPILATION "$tmp/$tu.cpp")
  printf '| %s, compiled mode | %s | %.2f |\n' "$(describe $tu)" "$t" "$(echo "$t / $base" | bc -l)"
done
t=$(best src/normkit.cpp)
printf '| src/normkit.cpp (the compiled mode library, once per project) | %s | %.2f |\n' "$t" \
  "$(echo "$t / $base" | bc -l)"
