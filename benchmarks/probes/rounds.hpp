// normkit probes: timing callables in rotating rounds, for the probes that compare two or more
// calls on the same buffers (each round calls every one once, the starting one rotating, so
// all see the same neighbours on a shared machine).
#ifndef NORMKIT_BENCHMARKS_PROBES_ROUNDS_HPP_
#define NORMKIT_BENCHMARKS_PROBES_ROUNDS_HPP_

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <vector>

namespace probe {

/// Wall time of one call of f, in microseconds.
inline double us(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

/// The fastest of `reps` calls of f, in microseconds: on a shared VM the minimum is the
/// machine's cost of the call, the mean its neighbours'.
template <class F>
double best_us(F&& f, int reps) {
  double b = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    b = std::min(
        b,
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  return b;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

inline double minimum(const std::vector<double>& v) {
  return *std::min_element(v.begin(), v.end());
}

/// Calls each of fs once (warm-up), then `rounds` rounds of one call each, round r starting
/// at fs[r % size]; returns the times of fs[i] in element i (microseconds, in round order).
inline std::vector<std::vector<double>> rotating_rounds(
    const std::vector<std::function<void()>>& fs, int rounds) {
  const std::size_t k = fs.size();
  std::vector<std::vector<double>> t(k);
  for (const auto& f : fs) f();
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t i = 0; i < k; ++i) {
      const std::size_t j = (i + static_cast<std::size_t>(r)) % k;
      t[j].push_back(us(fs[j]));
    }
  }
  return t;
}

}  // namespace probe

#endif  // NORMKIT_BENCHMARKS_PROBES_ROUNDS_HPP_
