// normkit benchmarks — shared declarations (no Eigen, no libtorch, no oneDNN here, so that
// every translation unit can include it cheaply).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_BENCH_COMMON_HPP_
#define NORMKIT_BENCH_COMMON_HPP_

#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t, std::uint32_t
#include <string>   // std::string
#include <utility>  // std::forward
#include <vector>   // std::vector

#include <benchmark/benchmark.h>

namespace nkbench {

// ---------------------------------------------------------------------------------------
// The shape suite: the cases listed in bench_main.cpp (described in benchmarks/README.md).

enum class Kind { batch, layer, group, instance, rms };
/// forward: the one forward mode of norms that behave the same in training and evaluation
/// (RMSNorm); the other norms are run in train and eval.
enum class Mode { train, eval, forward, backward };
/// Element type of the case's activations (x, y, dy, dx). bf16 cases run normkit's
/// all-bfloat16 free function (`normkit`) and the mixed float module (`normkit_module`);
/// see benchmarks/README.md for what each peer runs.
enum class Dtype { f32, bf16 };
/// A fused epilogue case (normkit's forward_fused / forward_add): add_relu runs
/// y = relu(norm(x) + r) (BatchNorm), add runs h = x + r, y = norm(h) (LayerNorm).
enum class Epi { none, add_relu, add };

struct Case {
  std::string id;      // shape-suite id, e.g. "bn2d-resnet" (also the benchmark's label)
  std::string family;  // "BatchNorm2d": the BM_<family> part of the name
  std::string name;    // "resnet": the case part of the name
  Kind kind = Kind::batch;
  // Logical PyTorch dims: (N, C, spatial...) for batch/group/instance; the full input shape
  // for LayerNorm, normalized over the last dim.
  std::vector<std::int64_t> shape;
  bool channels_last = false;  // storage (N, spatial..., C)
  std::int64_t groups = 0;     // GroupNorm
  bool naive = false;          // also run the naive Eigen-expression baseline
  Dtype dtype = Dtype::f32;    // activations' element type
  Epi epi = Epi::none;         // fused epilogue case (float32, train and eval only)

  std::int64_t numel() const;
  std::int64_t channels() const { return shape.at(1); }  // batch/group/instance
  std::int64_t last() const { return shape.back(); }     // LayerNorm's normalized size
  /// Storage dims (what Eigen and oneDNN see): the logical dims, C moved last if
  /// channels_last.
  std::vector<std::int64_t> storage_dims() const;
  /// Bytes per activation element: 4 (float32) or 2 (bfloat16).
  int elem_size() const { return dtype == Dtype::bf16 ? 2 : 4; }
  /// B: bytes of one activation tensor of this shape in the case's dtype.
  double bytes() const { return elem_size() * static_cast<double>(numel()); }
  /// The modes the case runs: forward and backward for RMSNorm, train and eval for the
  /// epilogue cases, else train, eval, backward.
  std::vector<Mode> modes() const;
};

/// The suite; `smoke` shrinks every case (same family, rank, layout and code paths) so
/// that the ctest smoke run takes a few seconds.
const std::vector<Case>& cases();
void use_smoke_shapes();
bool smoke_shapes();

const char* mode_name(Mode m);
const char* dtype_name(Dtype d);

/// RMSNorm's eps in every implementation (Llama's rms_norm_eps).
constexpr double kRmsEps = 1e-6;

/// Bytes the traffic model says a call moves (benchmarks/README.md, "What the numbers mean"):
/// eval forward 2B (read x, write y: statistics known), training forward 3B (statistics
/// pass + normalize pass + write), backward 5B (read x, dy twice, write dx). Norms whose
/// "eval" forward still computes statistics (LayerNorm, GroupNorm, InstanceNorm without
/// running statistics) are modelled at 3B in eval too: they cannot do less; RMSNorm's one
/// forward mode is 3B as well. B counts the case's dtype (2 bytes an element for bfloat16).
double model_bytes(const Case& c, Mode m);

/// BM_<family>/<case>/<mode>/threads:<n>/<impl>
std::string bench_name(const Case& c, const char* mode, int threads, const char* impl);

// ---------------------------------------------------------------------------------------
// Counters and errors.

/// Sets bytes_per_second (model bytes), floor_ratio (time / floor time, where the floor
/// time = model bytes / memcpy bandwidth measured for the same B and thread count in this
/// process), and the plain counters model_bytes and B used by tools/bench_report.py.
void set_counters(benchmark::State& state, const Case& c, Mode m, int threads);

/// Time of one memcpy of the case's B bytes, the shared x into the shared y, split over
/// `threads` threads (the floor probe, best of several batches, measured once per (case,
/// threads) and cached).
double memcpy_seconds(const Case& c, int threads);

/// SkipWithError that also makes main() return non-zero (so the ctest smoke run fails).
void fail(benchmark::State& state, const std::string& what);

/// Deterministic pseudo-random fill with values in [-2, 2) (+ offset).
void fill_random(float* p, std::size_t n, std::uint32_t seed, float offset = 0.0f);

/// float -> bfloat16 bits, rounded to nearest even (finite values: fill_random's range); the
/// rounding of Eigen::bfloat16, ATen's .to(kBFloat16) and oneDNN's reorder alike.
std::uint16_t to_bf16_bits(float f);

/// The activation-sized buffers of a case. Every implementation of the case (normkit's free
/// function and module, libtorch, oneDNN) and its floor probes read the same x and dy, and
/// normkit and oneDNN write the same y and dx (libtorch allocates its outputs: its API).
/// Why: on the machines measured, writing into one heap buffer ran up to 1.2-1.3x slower than
/// writing into another of the same size (benchmarks/README.md, "Shared buffers"), so
/// separately allocated tensors made every cross-library ratio partly a placement lottery.
///   x: fill_random(seed 1, offset 0.5); dy and residual: fill_random(seed 2);
///   y, dx, h: zeros (touched once).
/// Stored in the case's dtype (float32, or bfloat16 bits rounded once from the same floats),
/// 2 MiB aligned; made on first use and kept for the process, so that interleaved
/// repetitions see the same placement too.
enum class Buf { x, dy, residual, y, dx, h };
void* shared_buffer(const Case& c, Buf b);
template <class T>
T* shared(const Case& c, Buf b) {
  return static_cast<T*>(shared_buffer(c, b));
}

/// Registers a benchmark with the suite's common settings (real time, microseconds).
template <class F>
benchmark::internal::Benchmark* add(const std::string& name, F&& f) {
  return benchmark::RegisterBenchmark(name.c_str(), std::forward<F>(f))
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

// ---------------------------------------------------------------------------------------
// Registration hooks, one per translation unit (called by main in case order, so that
// every implementation of a case runs back to back).

void register_floor(const Case& c, int threads);            // bench_normkit.cpp
void register_normkit(const Case& c, Mode m, int threads);  // bench_normkit.cpp
void register_module(const Case& c, Mode m, int threads);   // bench_normkit.cpp
void register_naive(const Case& c, Mode m, int threads);    // bench_normkit.cpp
#ifdef NORMKIT_BENCH_TORCH
void register_torch(const Case& c, Mode m, int threads);  // bench_torch.cpp
std::string torch_context();
#endif
#ifdef NORMKIT_BENCH_DNNL
void register_dnnl(const Case& c, Mode m, int threads);  // bench_dnnl.cpp
std::string dnnl_context();
#endif

}  // namespace nkbench

#endif  // NORMKIT_BENCH_COMMON_HPP_
