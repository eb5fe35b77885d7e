// normkit tests — the oracle: plain double-precision two-pass reference implementations over
// logical (row-major) data, written for clarity, not speed.
#ifndef NORMKIT_TESTS_REFERENCE_HPP_
#define NORMKIT_TESTS_REFERENCE_HPP_

#include <cmath>
#include <vector>

namespace normkit_test {

/// Normalizes groups of elements given by a slot function: slot(i) in [0, slots).
/// Returns (x - mean) / sqrt(var + eps) in double (biased variance, two passes).
template <class T, class SlotFn>
std::vector<double> reference_normalize(const T* x,
                                        long n,
                                        long slots,
                                        SlotFn slot,
                                        double eps,
                                        std::vector<double>* mean_out = nullptr,
                                        std::vector<double>* var_out = nullptr) {
  std::vector<double> sum(static_cast<std::size_t>(slots), 0.0), cnt(sum.size(), 0.0),
      m2(sum.size(), 0.0);
  for (long i = 0; i < n; ++i) {
    sum[static_cast<std::size_t>(slot(i))] += static_cast<double>(x[i]);
    cnt[static_cast<std::size_t>(slot(i))] += 1;
  }
  std::vector<double> mean(sum.size());
  for (std::size_t s = 0; s < sum.size(); ++s) mean[s] = sum[s] / cnt[s];
  for (long i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - mean[static_cast<std::size_t>(slot(i))];
    m2[static_cast<std::size_t>(slot(i))] += d * d;
  }
  std::vector<double> y(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i) {
    const auto s = static_cast<std::size_t>(slot(i));
    y[static_cast<std::size_t>(i)] =
        (static_cast<double>(x[i]) - mean[s]) / std::sqrt(m2[s] / cnt[s] + eps);
  }
  if (mean_out)
    *mean_out = mean;
  if (var_out) {
    var_out->resize(sum.size());
    for (std::size_t s = 0; s < sum.size(); ++s) (*var_out)[s] = m2[s] / cnt[s];
  }
  return y;
}

}  // namespace normkit_test

#endif  // NORMKIT_TESTS_REFERENCE_HPP_
