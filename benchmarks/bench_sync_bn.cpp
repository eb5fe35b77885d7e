// bench_sync_bn: SyncBatchNorm (normkit/mpi.hpp) over MPI processes on one machine against
// BatchNorm2d in one process, (32, 64, 56, 56) float NCHW, training forward and backward.
// Run under the launcher: `mpirun -np 2 bench_sync_bn [reps]` (any process count dividing 32:
// each process takes an equal shard). A timed loop, not Google Benchmark: every call is
// collective, so each repetition starts at a barrier and its time is the slowest process's;
// rank 0 prints medians and minima as a Markdown table (scripts/bench.sh appends it to the
// results).
// SPDX-License-Identifier: MIT
#include <algorithm>  // std::sort, std::max
#include <chrono>     // std::chrono::steady_clock
#include <cstdio>     // std::printf, std::snprintf
#include <cstdlib>    // std::atoi
#include <fstream>    // std::ifstream
#include <string>     // std::string
#include <thread>     // std::this_thread::sleep_for
#include <vector>     // std::vector

#include <mpi.h>
#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

namespace {

using Index = Eigen::Index;
using Tensor4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;

constexpr Index kN = 32, kC = 64, kH = 56, kW = 56;

int g_rank = 0;

/// A barrier that does not spin (MPI_Ibarrier tested every 50 us): processes that only wait
/// leave the machine to the one being timed (Open MPI's blocking calls busy-poll).
void quiet_barrier() {
  MPI_Request req;
  MPI_Ibarrier(MPI_COMM_WORLD, &req);
  int done = 0;
  for (MPI_Test(&req, &done, MPI_STATUS_IGNORE); !done; MPI_Test(&req, &done, MPI_STATUS_IGNORE))
    std::this_thread::sleep_for(std::chrono::microseconds(50));
}

struct Timing {
  double median, min;  // milliseconds
};

/// `reps` timed calls of f (after 3 untimed ones) on the processes that run it (`all`: every
/// process; otherwise rank 0 while the others wait): each call starts at a barrier and takes
/// as long as its slowest process. The median, and the minimum (what the code can do when
/// the machine is not shared).
template <class F>
Timing time_ms(int reps, bool all, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps + 3; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    double mine = 0;
    if (all || g_rank == 0) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      mine =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    if (!all)
      quiet_barrier();
    double slowest = 0;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (i >= 3)
      t.push_back(slowest);
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front()};
}

std::string cell(const Timing& t) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f (%.2f)", t.median, t.min);
  return buf;
}

void fill(Tensor4& t, float scale, float offset, unsigned seed) {
  for (Index i = 0; i < t.size(); ++i) {
    const unsigned h = (static_cast<unsigned>(i) + seed) * 2654435761u;
    t.data()[i] = offset + scale * static_cast<float>(h >> 8) / 16777216.0f;
  }
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0, size = 1;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 30;
  if (kN % size != 0) {
    if (g_rank == 0)
      std::printf("bench_sync_bn: %d processes do not divide the batch of %ld\n", size,
                  static_cast<long>(kN));
    MPI_Finalize();
    return 1;
  }
  const Index n = kN / size;
  Tensor4 shard(n, kC, kH, kW), dshard(n, kC, kH, kW), y(n, kC, kH, kW);
  fill(shard, 4.0f, 1.0f, static_cast<unsigned>(g_rank) * 7919u);
  fill(dshard, 2.0f, -1.0f, static_cast<unsigned>(g_rank) * 104729u + 1u);

  // SyncBatchNorm: every process, its shard.
  normkit::SyncBatchNorm<float> sync(normkit::BatchNormOptions(kC), MPI_COMM_WORLD);
  const Timing sync_fwd = time_ms(reps, true, [&] { sync.forward(shard, y); });
  const long long fwd_bytes = sync.last_exchange_bytes();
  normkit::Gradients<float, 4, Eigen::RowMajor> g;
  const Timing sync_bwd = time_ms(reps, true, [&] { sync.backward(dshard, g); });
  const long long bwd_bytes = sync.last_exchange_bytes();

  // BatchNorm2d on every process's shard at once, no communication: the local share.
  normkit::BatchNorm2d<float> local(kC);
  const Timing local_fwd = time_ms(reps, true, [&] { local.forward(shard, y); });
  const Timing local_bwd = time_ms(reps, true, [&] { local.backward(dshard, g); });

  // BatchNorm2d in one process on the whole batch (rank 0; the others wait).
  Timing one_fwd{}, one_bwd{};
  {
    Tensor4 x(g_rank == 0 ? kN : 0, kC, kH, kW), dy(x.dimensions()), yy(x.dimensions());
    fill(x, 4.0f, 1.0f, 7u);
    fill(dy, 2.0f, -1.0f, 11u);
    normkit::BatchNorm2d<float> bn(kC);
    normkit::Gradients<float, 4, Eigen::RowMajor> gg;
    one_fwd = time_ms(reps, false, [&] { bn.forward(x, yy); });
    one_bwd = time_ms(reps, false, [&] { bn.backward(dy, gg); });
  }

  if (g_rank == 0) {
    char version[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string lib(version);
    lib = lib.substr(0, lib.find_first_of(",\n"));
    std::string load = "?";
    std::ifstream("/proc/loadavg") >> load;  // a shared machine's load skews the medians
    const std::size_t agree = sizeof(normkit::detail::SyncHeader);
    std::printf(
        "\n### SyncBatchNorm over MPI (benchmarks/bench_sync_bn.cpp)\n\n"
        "(%ld, %ld, %ld, %ld) float, NCHW, training mode; %d processes on one machine (%s), "
        "%ld samples each, one thread each. Milliseconds per call, median (minimum) of %d "
        "calls, a call's time being its slowest process's; load average (1 min) at the end: "
        "%s. Bytes: the per-sample statistics each process sends per call "
        "(SyncBatchNorm::last_exchange_bytes()) plus the %zu-byte agreement every call starts "
        "with.\n\n"
        "| implementation | processes x samples | forward (training) | backward | bytes sent per "
        "call per process |\n"
        "|---|---|---:|---:|---:|\n",
        static_cast<long>(kN), static_cast<long>(kC), static_cast<long>(kH), static_cast<long>(kW),
        size, lib.c_str(), static_cast<long>(n), reps, load.c_str(), agree);
    std::printf("| BatchNorm2d, whole batch | 1 x %ld | %s | %s | - |\n", static_cast<long>(kN),
                cell(one_fwd).c_str(), cell(one_bwd).c_str());
    std::printf("| BatchNorm2d on each shard, no communication | %d x %ld | %s | %s | - |\n", size,
                static_cast<long>(n), cell(local_fwd).c_str(), cell(local_bwd).c_str());
    std::printf(
        "| SyncBatchNorm | %d x %ld | %s | %s | %lld + %zu forward, %lld + %zu backward |\n", size,
        static_cast<long>(n), cell(sync_fwd).c_str(), cell(sync_bwd).c_str(), fwd_bytes, agree,
        bwd_bytes, agree);
  }
  MPI_Finalize();
  return 0;
}
