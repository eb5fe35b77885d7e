// normkit benchmarks — normkit's free functions and the floor probes (memcpy and a streaming
// loop over the same bytes).
// SPDX-License-Identifier: MIT
#define EIGEN_USE_THREADS  // Eigen::ThreadPoolDevice for the 2-thread runs
#include <algorithm>       // std::min, std::max
#include <array>           // std::array
#include <chrono>          // std::chrono
#include <cstring>         // std::memcpy
#include <exception>       // std::exception
#include <functional>      // std::function
#include <map>             // std::map
#include <stdexcept>       // std::runtime_error
#include <string>          // std::string
#include <type_traits>     // std::is_same, std::integral_constant
#include <utility>         // std::pair
#include <vector>          // std::vector

#include <normkit/normkit.hpp>

#include "bench_common.hpp"
#include "bench_eigen.hpp"

namespace nkbench {
namespace {

// NB: below 256 KiB (normkit's 64 Ki-element parallel threshold) the floor probes stay on
// one thread even in a 2-thread run: splitting a few-KiB copy only measures the hand-off.
int probe_threads(std::size_t bytes, int threads) {
  return bytes >= (std::size_t{1} << 18) ? threads : 1;
}

/// Runs part(begin, end) over [0, bytes) split into `threads` 64-byte aligned parts, one on
/// the calling thread and the rest on the pool.
template <class Part>
void split_run(std::size_t bytes, int threads, const Part& part) {
  if (threads <= 1) {
    part(std::size_t{0}, bytes);
    return;
  }
  const std::size_t chunk = (bytes / static_cast<std::size_t>(threads) + 63) / 64 * 64;
  Eigen::Barrier barrier(static_cast<unsigned>(threads - 1));
  for (int t = 1; t < threads; ++t) {
    const std::size_t b = std::min(bytes, chunk * static_cast<std::size_t>(t));
    const std::size_t e = t + 1 == threads ? bytes : std::min(bytes, b + chunk);
    pool().Schedule([&part, &barrier, b, e] {
      part(b, e);
      barrier.Notify();
    });
  }
  part(std::size_t{0}, std::min(bytes, chunk));
  barrier.Wait();
}

void copy_memcpy(const char* src, char* dst, std::size_t bytes, int threads) {
  split_run(bytes, threads,
            [src, dst](std::size_t b, std::size_t e) { std::memcpy(dst + b, src + b, e - b); });
}

void copy_stream(const char* src, char* dst, std::size_t bytes, int threads, float s) {
  // STREAM "scale": y = s * x, the same traffic as a copy, as a loop the compiler vectorizes
  // (a plain copy loop would be turned back into a memcpy call).
  split_run(bytes, threads, [src, dst, s](std::size_t b, std::size_t e) {
    const float* x = reinterpret_cast<const float*>(src + b);
    float* y = reinterpret_cast<float*>(dst + b);
    const std::size_t n = (e - b) / sizeof(float);
    for (std::size_t i = 0; i < n; ++i) y[i] = s * x[i];
  });
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------
// normkit

/// fill_random into storage of type D (float, or bfloat16 rounded once from the float).
template <class D>
void fill_as(D* p, std::size_t n, std::uint32_t seed, float offset = 0.0f) {
  if constexpr (std::is_same<D, float>::value) {
    fill_random(p, n, seed, offset);
  } else {
    std::vector<float> f(n);
    fill_random(f.data(), n, seed, offset);
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<D>(f[i]);
  }
}

template <class D>
Eigen::Tensor<D, 1> param_vector(Index n, std::uint32_t seed, float offset) {
  Eigen::Tensor<D, 1> v(n);
  fill_as(v.data(), static_cast<std::size_t>(n), seed, offset);
  return v;
}

[[noreturn]] void not_registered(const Case& c) {
  throw std::runtime_error("normkit_bench: no " + std::string(dtype_name(c.dtype)) + " rank-" +
                           std::to_string(c.shape.size()) + " path for case " + c.id);
}

// The free functions. D = float, or bfloat16 for the all-bfloat16 form (x, y, dy, dx,
// weight, bias, running statistics and parameter gradients all bfloat16: the only form the
// free functions have). bfloat16 is instantiated for the ranks of its cases only (LayerNorm
// and RMSNorm rank 2, BatchNorm2d rank 4), which keeps this file's compile time in check.
template <class D, int R>
void run_normkit(benchmark::State& st, const Case& c, Mode m, int threads) {
  constexpr bool kLow = !std::is_same<D, float>::value;
  using T = Eigen::Tensor<D, R, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<T>;
  using CMap = Eigen::TensorMap<const T>;
  const auto dims = dims_of<R>(c);
  const CMap x(shared<const D>(c, Buf::x), dims);
  Map y(shared<D>(c, Buf::y), dims);
  const bool bwd = m == Mode::backward;
  const CMap dy(bwd ? shared<const D>(c, Buf::dy) : nullptr, dims);
  Map dx(bwd ? shared<D>(c, Buf::dx) : nullptr, dims);
  const bool rowwise = c.kind == Kind::layer || c.kind == Kind::rms;
  const Index P = rowwise ? static_cast<Index>(c.last()) : static_cast<Index>(c.channels());
  Eigen::Tensor<D, 1> w = param_vector<D>(P, 3, 1.0f), b = param_vector<D>(P, 4, 0.0f), gw(P),
                      gb(P);
  Eigen::Tensor<D, 1> rm(P), rv(P);
  rm.setConstant(D(0.0f));
  rv.setConstant(D(1.0f));
  normkit::SavedStats saved;
  const bool train = m != Mode::eval;  // forward (RMSNorm) saves its statistics, as train
  with_device(threads, [&](const auto& dev) {
    std::function<void()> call;  // built once; the std::function call is noise next to a norm
    switch (c.kind) {
      case Kind::batch: {
        if constexpr (!kLow || R == 4) {
          normkit::BatchNormFuncOptions<D> o;
          o.weight(w)
              .bias(b)
              .running_mean(rm)
              .running_var(rv)
              .training(train)
              .momentum(0.1)
              .eps(1e-5)
              .channels_last(c.channels_last);
          if (m == Mode::backward) {
            normkit::batch_norm(x, y, o, &saved, dev);
            call = [&] {
              normkit::batch_norm_backward(x, dy, dx, saved, w, gw, gb, c.channels_last, dev);
            };
          } else {
            call = [&, o] { normkit::batch_norm(x, y, o, train ? &saved : nullptr, dev); };
          }
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::instance: {
        if constexpr (!kLow) {
          normkit::InstanceNormFuncOptions<D> o;
          o.eps(1e-5);
          if (m == Mode::backward) {
            normkit::instance_norm(x, y, o, &saved, dev);
            call = [&] {
              normkit::instance_norm_backward(x, dy, dx, saved, normkit::VectorRef<const D>(),
                                              normkit::VectorRef<D>(), normkit::VectorRef<D>(),
                                              false, dev);
            };
          } else {
            call = [&, o] { normkit::instance_norm(x, y, o, train ? &saved : nullptr, dev); };
          }
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::layer: {
        if constexpr (!kLow || R == 2) {
          normkit::LayerNormFuncOptions<D> o({P});
          o.weight(w).bias(b).eps(1e-5);
          if (m == Mode::backward) {
            normkit::layer_norm(x, y, o, &saved, dev);
            call = [&] { normkit::layer_norm_backward(x, dy, dx, saved, {P}, w, gw, gb, dev); };
          } else {
            call = [&, o] { normkit::layer_norm(x, y, o, train ? &saved : nullptr, dev); };
          }
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::rms: {
        if constexpr (!kLow || R == 2) {
          normkit::RMSNormFuncOptions<D> o({P});
          o.weight(w).eps(kRmsEps);
          if (m == Mode::backward) {
            normkit::rms_norm(x, y, o, &saved, dev);
            call = [&] { normkit::rms_norm_backward(x, dy, dx, saved, {P}, w, gw, dev); };
          } else {
            call = [&, o] { normkit::rms_norm(x, y, o, train ? &saved : nullptr, dev); };
          }
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::group: {
        if constexpr (!kLow) {
          const Index G = static_cast<Index>(c.groups);
          normkit::GroupNormFuncOptions<D> o(G);
          o.weight(w).bias(b).eps(1e-5);
          if (m == Mode::backward) {
            normkit::group_norm(x, y, o, &saved, dev);
            call = [&, G] {
              normkit::group_norm_backward(x, dy, dx, saved, G, w, gw, gb, false, dev);
            };
          } else {
            call = [&, o] { normkit::group_norm(x, y, o, train ? &saved : nullptr, dev); };
          }
        } else {
          not_registered(c);
        }
        break;
      }
    }
    call();  // warm-up: first touch of y/dx, code and caches
    for (auto _ : st) {
      call();
      benchmark::DoNotOptimize(m == Mode::backward ? dx.data() : y.data());
      benchmark::ClobberMemory();
    }
  });
  set_counters(st, c, m, threads);
}

// The modules, as a user runs them: training forward with set_keep_input(false) (statistics
// kept, no input copy), evaluation forward, and backward(x, dy) into reused gradients.
// Always the float module: D = bfloat16 is its mixed mode (float parameters and running
// statistics, bfloat16 x, y, dy, dx; parameter gradients float). RMSNorm's forward mode is
// a training forward (statistics kept for the backward).
template <class D, int R>
void run_module(benchmark::State& st, const Case& c, Mode m, int threads) {
  constexpr bool kLow = !std::is_same<D, float>::value;
  using T = Eigen::Tensor<D, R, Eigen::RowMajor>;
  const auto dims = dims_of<R>(c);
  const Eigen::TensorMap<const T> x(shared<const D>(c, Buf::x), dims);
  Eigen::TensorMap<T> y(shared<D>(c, Buf::y), dims);
  const Eigen::TensorMap<const T> dy(m == Mode::backward ? shared<const D>(c, Buf::dy) : nullptr,
                                     dims);
  const bool rowwise = c.kind == Kind::layer || c.kind == Kind::rms;
  const Index P = rowwise ? static_cast<Index>(c.last()) : static_cast<Index>(c.channels());
  with_device(threads, [&](const auto& dev) {
    auto go = [&](auto& mod) {
      mod.set_keep_input(false);
      mod.train(m != Mode::eval);
      normkit::Gradients<D, R, Eigen::RowMajor, float> g;
      if (m == Mode::backward)
        mod.forward(x, y, dev);
      auto call = [&] {
        if (m == Mode::backward) {
          mod.backward(x, dy, g, dev);
        } else {
          mod.forward(x, y, dev);
        }
      };
      call();
      for (auto _ : st) {
        call();
        benchmark::DoNotOptimize(m == Mode::backward ? g.input.data() : y.data());
        benchmark::ClobberMemory();
      }
    };
    switch (c.kind) {
      case Kind::batch: {
        if constexpr (!kLow && (R == 2 || R == 3)) {
          normkit::BatchNorm1d<float> mod(
              normkit::BatchNormOptions(P).channels_last(c.channels_last));
          go(mod);
        } else if constexpr (R == 4) {
          normkit::BatchNorm2d<float> mod(
              normkit::BatchNormOptions(P).channels_last(c.channels_last));
          go(mod);
        } else if constexpr (!kLow && R == 5) {
          normkit::BatchNorm3d<float> mod(
              normkit::BatchNormOptions(P).channels_last(c.channels_last));
          go(mod);
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::instance: {
        if constexpr (!kLow && R == 4) {
          normkit::InstanceNorm2d<float> mod(P);
          go(mod);
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::layer: {
        if constexpr (!kLow || R == 2) {
          normkit::LayerNorm<float> mod(normkit::LayerNormOptions({P}));
          go(mod);
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::rms: {
        if constexpr (!kLow || R == 2) {
          normkit::RMSNorm<float> mod(normkit::RMSNormOptions({P}).eps(kRmsEps));
          go(mod);
        } else {
          not_registered(c);
        }
        break;
      }
      case Kind::group: {
        if constexpr (!kLow) {
          normkit::GroupNorm<float> mod(normkit::GroupNormOptions(static_cast<Index>(c.groups), P));
          go(mod);
        } else {
          not_registered(c);
        }
        break;
      }
    }
  });
  set_counters(st, c, m, threads);
}

/// The epilogue cases (float32): fused = the module's forward_fused / forward_add; unfused =
/// what a user writes without them: the module's forward, then the add (and ReLU) as a
/// separate pass over raw pointers (LayerNorm: the add first, then forward(h)).
template <int R>
void run_epilogue(benchmark::State& st, const Case& c, Mode m, int threads, bool fused) {
  using Map = Eigen::TensorMap<Eigen::Tensor<float, R, Eigen::RowMajor>>;
  using CMap = Eigen::TensorMap<const Eigen::Tensor<float, R, Eigen::RowMajor>>;
  const auto dims = dims_of<R>(c);
  const CMap x(shared<const float>(c, Buf::x), dims),
      r(shared<const float>(c, Buf::residual), dims);
  Map y(shared<float>(c, Buf::y), dims), h(shared<float>(c, Buf::h), dims);
  const Index n = x.size();
  with_device(threads, [&](const auto& dev) {
    auto loop = [&](auto& mod, auto&& call) {
      mod.set_keep_input(false);
      mod.train(m != Mode::eval);
      call();
      for (auto _ : st) {
        call();
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      }
    };
    if constexpr (R == 4) {
      if (c.epi != Epi::add_relu)
        not_registered(c);
      normkit::BatchNorm2d<float> mod(static_cast<Index>(c.channels()));
      loop(mod, [&] {
        if (fused) {
          mod.forward_fused(x, r, normkit::Activation::relu, y, dev);
        } else {
          mod.forward(x, y, dev);
          float* yp = y.data();
          const float* rp = r.data();
          for (Index i = 0; i < n; ++i) yp[i] = std::max(yp[i] + rp[i], 0.0f);
        }
      });
    } else if constexpr (R == 2) {
      if (c.epi != Epi::add)
        not_registered(c);
      normkit::LayerNorm<float> mod(normkit::LayerNormOptions({static_cast<Index>(c.last())}));
      loop(mod, [&] {
        if (fused) {
          mod.forward_add(x, r, h, y, dev);
        } else {
          float* hp = h.data();
          const float* xp = x.data();
          const float* rp = r.data();
          for (Index i = 0; i < n; ++i) hp[i] = xp[i] + rp[i];
          mod.forward(h, y, dev);
        }
      });
    } else {
      not_registered(c);
    }
  });
  set_counters(st, c, m, threads);
}

/// Runs Run<D, R> for the case's dtype and rank: float for ranks 2-5, bfloat16 for ranks 2
/// and 4 (the bfloat16 cases' ranks).
template <class Run>
void dispatch(benchmark::State& st, const Case& c, const Run& run) {
  const std::size_t r = c.shape.size();
  if (c.dtype == Dtype::bf16) {
    if (r == 2) {
      run(std::integral_constant<int, 2>(), Eigen::bfloat16());
    } else if (r == 4) {
      run(std::integral_constant<int, 4>(), Eigen::bfloat16());
    } else {
      fail(st, "unsupported rank for bfloat16");
    }
    return;
  }
  switch (r) {
    case 2:
      run(std::integral_constant<int, 2>(), 0.0f);
      break;
    case 3:
      run(std::integral_constant<int, 3>(), 0.0f);
      break;
    case 4:
      run(std::integral_constant<int, 4>(), 0.0f);
      break;
    case 5:
      run(std::integral_constant<int, 5>(), 0.0f);
      break;
    default:
      fail(st, "unsupported rank");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------

Eigen::ThreadPool& pool() {
  static Eigen::ThreadPool p(2);
  return p;
}

double memcpy_seconds(const Case& c, int threads) {
  static std::map<std::pair<std::string, int>, double> cache;
  const auto bytes = static_cast<std::size_t>(c.bytes());
  const int t = probe_threads(bytes, threads);
  const auto key = std::make_pair(c.id, t);
  const auto it = cache.find(key);
  if (it != cache.end())
    return it->second;
  const char* src = shared<const char>(c, Buf::x);
  char* dst = shared<char>(c, Buf::y);
  copy_memcpy(src, dst, bytes, t);
  double t0 = now_s();
  copy_memcpy(src, dst, bytes, t);
  const double one = std::max(now_s() - t0, 1e-9);
  const long reps = std::max(1L, static_cast<long>(0.005 / one));  // ~5 ms batches
  double best = 1e30;
  for (int batch = 0; batch < 7; ++batch) {
    t0 = now_s();
    for (long r = 0; r < reps; ++r) {
      copy_memcpy(src, dst, bytes, t);
      benchmark::ClobberMemory();
    }
    best = std::min(best, (now_s() - t0) / static_cast<double>(reps));
  }
  cache[key] = best;
  return best;
}

void register_floor(const Case& c, int threads) {
  for (const char* impl : {"memcpy", "stream"}) {
    const std::string what = impl;
    add("BM_Floor/" + c.name + "/copy/threads:" + std::to_string(threads) + "/" + what,
        [c, threads, what](benchmark::State& st) {
          const auto bytes = static_cast<std::size_t>(c.bytes());
          const int t = probe_threads(bytes, threads);
          const char* src = shared<const char>(c, Buf::x);
          char* dst = shared<char>(c, Buf::y);
          volatile float one = 1.0f;
          const float s = one;
          auto call = [&] {
            if (what == "memcpy") {
              copy_memcpy(src, dst, bytes, t);
            } else {
              copy_stream(src, dst, bytes, t, s);
            }
          };
          call();
          for (auto _ : st) {
            call();
            benchmark::ClobberMemory();
          }
          using benchmark::Counter;
          const double mb = 2.0 * c.bytes();  // read B + write B
          st.SetBytesProcessed(static_cast<std::int64_t>(mb) *
                               static_cast<std::int64_t>(st.iterations()));
          st.counters["floor_ratio"] = Counter(
              memcpy_seconds(c, threads),
              static_cast<Counter::Flags>(Counter::kIsIterationInvariantRate | Counter::kInvert));
          st.counters["model_bytes"] = Counter(mb);
          st.counters["B"] = Counter(c.bytes());
          st.SetLabel(c.id);
        });
  }
}

void register_module(const Case& c, Mode m, int threads) {
  add(bench_name(c, mode_name(m), threads, "normkit_module"),
      [c, m, threads](benchmark::State& st) {
        guarded(st, [&] {
          if (c.epi != Epi::none) {  // the unfused sequence
            if (c.shape.size() == 4)
              run_epilogue<4>(st, c, m, threads, false);
            else
              run_epilogue<2>(st, c, m, threads, false);
            return;
          }
          dispatch(st, c, [&](auto rank, auto scalar) {
            run_module<decltype(scalar), decltype(rank)::value>(st, c, m, threads);
          });
        });
      });
}

void register_normkit(const Case& c, Mode m, int threads) {
  add(bench_name(c, mode_name(m), threads, "normkit"), [c, m, threads](benchmark::State& st) {
    guarded(st, [&] {
      if (c.epi != Epi::none) {  // the fused module call
        if (c.shape.size() == 4)
          run_epilogue<4>(st, c, m, threads, true);
        else
          run_epilogue<2>(st, c, m, threads, true);
        return;
      }
      dispatch(st, c, [&](auto rank, auto scalar) {
        run_normkit<decltype(scalar), decltype(rank)::value>(st, c, m, threads);
      });
    });
  });
}

}  // namespace nkbench
