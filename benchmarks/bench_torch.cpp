// normkit benchmarks — libtorch (ATen) peers. Compiled only when find_package(Torch)
// succeeds (NORMKIT_BENCH_TORCH). Forward: the functional ops (torch::batch_norm, ...; the
// torch namespace re-exports at::) under NoGradGuard. Backward: ATen's native backward
// kernels, fed with the statistics of a native forward, as autograd would call them.
// RMSNorm (no op in libtorch 1.13; torch.nn.RMSNorm arrived in 2.4): composed as users wrote
// it before, y = x * rsqrt(x.pow(2).mean(-1, keepdim) + eps) * w, forward under NoGradGuard;
// backward: autograd through that expression (torch::autograd::grad on a graph recorded once,
// retain_graph), see run().
// bfloat16 cases: LayerNorm and RMSNorm all-bfloat16 (x, w, b bfloat16; 1.13 rejects a float
// weight with bfloat16 input in layer_norm), BatchNorm mixed (bfloat16 x, dy; float weight,
// bias and running statistics: supported by 1.13 on CPU).
// Threads: at::set_num_threads(n), checked with at::get_num_threads().
// SPDX-License-Identifier: MIT
#include <cstdint>     // std::int64_t
#include <exception>   // std::exception
#include <functional>  // std::function
#include <sstream>     // std::istringstream
#include <string>      // std::string
#include <tuple>       // std::get
#include <vector>      // std::vector

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>

#include "bench_common.hpp"

namespace nkbench {
namespace {

at::ScalarType scalar_type(const Case& c) {
  return c.dtype == Dtype::bf16 ? at::kBFloat16 : at::kFloat;
}

/// The case's shared activation buffer (bench_common.hpp: the x or dy every implementation
/// reads) as a tensor of the case's dtype, logical shape and layout (channels-last strides
/// where the case is): no copy, the values normkit and oneDNN get.
at::Tensor make(const Case& c, Buf b) {
  std::vector<std::int64_t> strides(c.shape.size());
  std::int64_t s = 1;
  if (c.channels_last) {  // storage (N, spatial..., C)
    strides[1] = s;
    s *= c.shape[1];
    for (std::size_t i = c.shape.size() - 1; i >= 2; --i) {
      strides[i] = s;
      s *= c.shape[i];
    }
    strides[0] = s;
  } else {
    for (std::size_t i = c.shape.size(); i-- > 0;) {
      strides[i] = s;
      s *= c.shape[i];
    }
  }
  return at::from_blob(shared_buffer(c, b), c.shape, strides,
                       at::TensorOptions().dtype(scalar_type(c)));
}

at::Tensor vec(std::int64_t n, std::uint32_t seed, float offset, at::ScalarType type = at::kFloat) {
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  fill_random(t.data_ptr<float>(), static_cast<std::size_t>(n), seed, offset);
  return type == at::kFloat ? t : t.to(type);
}

/// RMSNorm as composed before torch.nn.RMSNorm (pow, mean, add, rsqrt, mul, mul).
at::Tensor rms_composed(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

void run(benchmark::State& st, const Case& c, Mode m, int threads) {
  at::set_num_threads(threads);
  if (at::get_num_threads() != threads) {
    fail(st, "at::get_num_threads() = " + std::to_string(at::get_num_threads()) + ", wanted " +
                 std::to_string(threads));
    return;
  }
  at::NoGradGuard no_grad;
  const double eps = 1e-5, momentum = 0.1;
  const bool train = m != Mode::eval;
  const bool bwd = m == Mode::backward;
  at::Tensor x = make(c, Buf::x);
  at::Tensor dy = bwd ? make(c, Buf::dy) : at::Tensor();
  at::Tensor w, b, rm, rv, save1, save2, xv, dyv, yg;
  std::function<at::Tensor()> call;
  // Parameters: the case's dtype for LayerNorm and RMSNorm (all-bfloat16), float for
  // BatchNorm (mixed when x is bfloat16).
  const at::ScalarType ptype = scalar_type(c);
  switch (c.kind) {
    case Kind::batch: {
      const std::int64_t C = c.channels();
      w = vec(C, 3, 1.0f);
      b = vec(C, 4, 0.0f);
      rm = at::zeros({C});
      rv = at::ones({C});
      if (bwd) {
        auto r = at::native_batch_norm(x, w, b, rm, rv, true, momentum, eps);
        save1 = std::get<1>(r);
        save2 = std::get<2>(r);
        call = [&] {
          return std::get<0>(at::native_batch_norm_backward(dy, x, w, rm, rv, save1, save2, true,
                                                            eps, {true, true, true}));
        };
      } else if (c.epi == Epi::add_relu) {
        // What an eager ResNet block runs: bn, then out += shortcut, relu_ in place.
        xv = make(c, Buf::residual);
        call = [&] {
          return at::relu_(at::batch_norm(x, w, b, rm, rv, train, momentum, eps, false).add_(xv));
        };
      } else {
        call = [&] { return at::batch_norm(x, w, b, rm, rv, train, momentum, eps, false); };
      }
      break;
    }
    case Kind::instance: {
      if (bwd) {
        // What autograd runs for instance_norm: batch norm on the (1, N*C, *) view.
        std::vector<std::int64_t> v = c.shape;
        v[1] *= v[0];
        v[0] = 1;
        xv = x.view(v);
        dyv = dy.view(v);
        auto r = at::native_batch_norm(xv, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt,
                                       true, momentum, eps);
        save1 = std::get<1>(r);
        save2 = std::get<2>(r);
        call = [&] {
          return std::get<0>(at::native_batch_norm_backward(dyv, xv, c10::nullopt, c10::nullopt,
                                                            c10::nullopt, save1, save2, true, eps,
                                                            {true, false, false}));
        };
      } else {
        call = [&] {
          return at::instance_norm(x, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true,
                                   momentum, eps, false);
        };
      }
      break;
    }
    case Kind::layer: {
      const std::int64_t D = c.last();
      w = vec(D, 3, 1.0f, ptype);
      b = vec(D, 4, 0.0f, ptype);
      if (bwd) {
        auto r = at::native_layer_norm(x, {D}, w, b, eps);
        save1 = std::get<1>(r);
        save2 = std::get<2>(r);
        call = [&, D] {
          return std::get<0>(
              at::native_layer_norm_backward(dy, x, {D}, save1, save2, w, b, {true, true, true}));
        };
      } else if (c.epi == Epi::add) {
        // h = x + residual (the residual stream, kept), then layer_norm(h).
        xv = make(c, Buf::residual);
        yg = make(c, Buf::h);
        call = [&, D] {
          at::add_out(yg, x, xv);
          return at::layer_norm(yg, {D}, w, b, eps, false);
        };
      } else {
        call = [&, D] { return at::layer_norm(x, {D}, w, b, eps, false); };
      }
      break;
    }
    case Kind::group: {
      const std::int64_t N = c.shape[0], C = c.channels(), G = c.groups;
      const std::int64_t HxW = c.numel() / (N * C);
      w = vec(C, 3, 1.0f);
      b = vec(C, 4, 0.0f);
      if (bwd) {
        auto r = at::native_group_norm(x, w, b, N, C, HxW, G, eps);
        save1 = std::get<1>(r);
        save2 = std::get<2>(r);
        call = [&, N, C, HxW, G] {
          return std::get<0>(at::native_group_norm_backward(dy, x, save1, save2, w, N, C, HxW, G,
                                                            {true, true, true}));
        };
      } else {
        call = [&, G] { return at::group_norm(x, G, w, b, eps, false); };
      }
      break;
    }
    case Kind::rms: {
      w = vec(c.last(), 3, 1.0f, ptype);
      if (bwd) {
        // The graph of the composed expression is recorded once, untimed (x and w require
        // grad); the timed call is autograd's backward through its six nodes (mul by w, mul,
        // rsqrt, add, mean, pow: the engine, the saved tensors' kernels and the accumulation
        // of x's two paths) giving dx and dw, retain_graph so the graph can be replayed.
        // torch::autograd::grad returns fresh gradients (no .grad accumulation).
        x.requires_grad_(true);
        w.requires_grad_(true);
        {
          at::AutoGradMode grad_on(true);
          yg = rms_composed(x, w, kRmsEps);
        }
        call = [&] {
          at::AutoGradMode grad_on(true);
          return torch::autograd::grad({yg}, {x, w}, {dy}, /*retain_graph=*/true)[0];
        };
      } else {
        call = [&] { return rms_composed(x, w, kRmsEps); };
      }
      break;
    }
  }
  call();  // warm-up
  for (auto _ : st) {
    at::Tensor r = call();
    benchmark::DoNotOptimize(r.data_ptr());
  }
  set_counters(st, c, m, threads);
}

}  // namespace

std::string torch_context() {
  std::string backend = "?";
  std::istringstream in(at::get_parallel_info());
  std::string line;
  while (std::getline(in, line)) {
    if (line.find("ATen parallel backend") != std::string::npos)
      backend = line.substr(line.find(':') + 2);
  }
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH) + " (intra-op: " + backend + ")";
}

void register_torch(const Case& c, Mode m, int threads) {
  add(bench_name(c, mode_name(m), threads, "libtorch"), [c, m, threads](benchmark::State& st) {
    try {
      run(st, c, m, threads);
    } catch (const std::exception& e) {
      fail(st, e.what());
    }
  });
}

}  // namespace nkbench
