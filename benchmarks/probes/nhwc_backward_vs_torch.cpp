// normkit probe: BatchNorm2d channels-last (NHWC) training backward, (32, 64, 56, 56) float,
// one thread, against libtorch's native_batch_norm_backward on the *same* x and dy buffers,
// timed in rotating rounds (bn2d-nhwc backward 1T was normkit's one miss against libtorch in
// the shape suite, 0.78x, where each library reads its own tensors).
//
// libtorch allocates dx, dweight and dbias in every call (its API); normkit writes into
// caller-owned dx, timed twice: into one buffer, and into a second one (the output buffer's
// placement alone moved a LayerNorm by 1.2-1.3x on this VM: 2026-11-30-module-overhead.md).
// Build: scripts/bench.sh (target probe_nhwc_backward_vs_torch, when libtorch is found).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <normkit/normkit.hpp>

#include "rounds.hpp"

int main() {
  at::set_num_threads(1);
  constexpr long N = 32, C = 64, H = 56, W = 56;
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  T4 x(N, H, W, C), dy(N, H, W, C), dx(N, H, W, C), dx2(N, H, W, C), y(N, H, W, C);
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.5f, 1.0f);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = d(g);
  for (Eigen::Index i = 0; i < dy.size(); ++i) dy.data()[i] = d(g) - 0.5f;
  Eigen::Tensor<float, 1> w(C), b(C), rm(C), rv(C), gw(C), gb(C);
  w.setConstant(1.0f);
  b.setZero();
  rm.setZero();
  rv.setConstant(1.0f);
  normkit::BatchNormFuncOptions<float> o;
  o.weight(w).bias(b).running_mean(rm).running_var(rv).training(true).channels_last(true);
  normkit::SavedStats saved;
  normkit::batch_norm(x, y, o, &saved);

  // The same memory as (N, C, H, W) tensors in channels-last strides.
  const std::vector<int64_t> sizes = {N, C, H, W}, strides = {H * W * C, 1, W * C, C};
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor tx = at::from_blob(x.data(), sizes, strides, f32);
  const at::Tensor tdy = at::from_blob(dy.data(), sizes, strides, f32);
  const at::Tensor tw = at::from_blob(w.data(), {C}, f32);
  at::Tensor trm = at::zeros({C}, f32), trv = at::ones({C}, f32);
  const auto fwd = at::native_batch_norm(tx, tw, at::zeros({C}, f32), trm, trv, true, 0.1, 1e-5);
  const at::Tensor save_mean = std::get<1>(fwd), save_invstd = std::get<2>(fwd);

  const std::vector<std::function<void()>> fs = {
      [&] { normkit::batch_norm_backward(x, dy, dx, saved, w, gw, gb, true); },
      [&] {
        const auto r = at::native_batch_norm_backward(tdy, tx, tw, trm, trv, save_mean, save_invstd,
                                                      true, 1e-5, {true, true, true});
        (void)std::get<0>(r).data_ptr<float>();
      },
      [&] { normkit::batch_norm_backward(x, dy, dx2, saved, w, gw, gb, true); },
  };
  const char* names[] = {"normkit (dx)", "libtorch (allocates dx)", "normkit (second dx buffer)"};
  const auto t = probe::rotating_rounds(fs, 60);
  std::printf(
      "normkit ISA path: %s; libtorch %s, 1 thread; bn2d-nhwc backward; medians of 60 rotating "
      "rounds\n\n",
      normkit::isa_name(normkit::isa()), TORCH_VERSION);
  std::printf("| call | median | min | speed-up vs libtorch |\n|---|---|---|---|\n");
  const double lt = probe::median(t[1]);
  for (std::size_t i = 0; i < fs.size(); ++i) {
    std::printf("| %s | %.0f us | %.0f us | %.2f |\n", names[i], probe::median(t[i]),
                probe::minimum(t[i]), lt / probe::median(t[i]));
  }
}
