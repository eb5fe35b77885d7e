// normkit probe: how long a task scheduled on an Eigen::ThreadPool waits before it starts,
// after the pool has been idle for a given time. Explains why a call of ~100 us gains little
// from a second thread (benchmarks/results/2026-11-30-profiles.md): an idle worker spins
// briefly, then sleeps, and waking it costs tens of microseconds on a VM.
// Build: scripts/bench.sh (target probe_pool_wake); run: build/bench/benchmarks/probe_pool_wake
#define EIGEN_USE_THREADS
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <vector>

#include <unsupported/Eigen/CXX11/Tensor>

int main() {
  using clk = std::chrono::steady_clock;
  Eigen::ThreadPool pool(2);
  for (double gap_us : {0.0, 10.0, 20.0, 50.0, 200.0, 1000.0}) {
    std::vector<double> lat;
    for (int i = 0; i < 400; ++i) {
      const auto g0 = clk::now();
      while (std::chrono::duration<double, std::micro>(clk::now() - g0).count() < gap_us) {
      }
      std::atomic<long long> started{0};
      const auto t0 = clk::now();
      pool.Schedule([&] { started.store(std::max<long long>(1, (clk::now() - t0).count())); });
      while (started.load() == 0) {
      }
      lat.push_back(static_cast<double>(started.load()) / 1000.0);
    }
    std::sort(lat.begin(), lat.end());
    std::printf("pool idle %6.0f us: task start latency median %6.1f us, p90 %6.1f us\n", gap_us,
                lat[lat.size() / 2], lat[lat.size() * 9 / 10]);
  }
}
