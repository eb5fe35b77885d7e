// normkit benchmarks — helpers shared by the Eigen-based translation units (normkit and the
// naive Eigen baseline). Include after defining EIGEN_USE_THREADS.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_BENCH_EIGEN_HPP_
#define NORMKIT_BENCH_EIGEN_HPP_

#ifndef EIGEN_USE_THREADS
#error "define EIGEN_USE_THREADS before including bench_eigen.hpp"
#endif
#include <array>      // std::array
#include <exception>  // std::exception

#include <unsupported/Eigen/CXX11/Tensor>

#include "bench_common.hpp"

namespace nkbench {

using Index = Eigen::Index;

/// One 2-thread pool for every threaded Eigen run (normkit, naive Eigen, the floor probes);
/// defined in bench_normkit.cpp. Eigen's parallelFor runs one block on the calling thread,
/// so a 2-thread device keeps both cores busy.
Eigen::ThreadPool& pool();

/// Calls f(device): Eigen::DefaultDevice for 1 thread (normkit's default, inline path),
/// an Eigen::ThreadPoolDevice otherwise.
template <class F>
void with_device(int threads, F&& f) {
  if (threads <= 1) {
    const Eigen::DefaultDevice d;
    f(d);
  } else {
    const Eigen::ThreadPoolDevice d(&pool(), threads);
    f(d);
  }
}

template <int R>
std::array<Index, R> dims_of(const Case& c) {
  const auto d = c.storage_dims();
  std::array<Index, R> a{};
  for (int i = 0; i < R; ++i)
    a[static_cast<std::size_t>(i)] = static_cast<Index>(d[static_cast<std::size_t>(i)]);
  return a;
}

template <int Layout = Eigen::ColMajor>
Eigen::Tensor<float, 1, Layout> random_vector(Index n, std::uint32_t seed, float offset) {
  Eigen::Tensor<float, 1, Layout> v(n);
  fill_random(v.data(), static_cast<std::size_t>(n), seed, offset);
  return v;
}

/// Runs f, turning an exception into a benchmark error.
template <class F>
void guarded(benchmark::State& st, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    fail(st, e.what());
  }
}

}  // namespace nkbench

#endif  // NORMKIT_BENCH_EIGEN_HPP_
