// normkit benchmarks — the naive Eigen-expression baseline: what one writes without a
// library (x.mean over dims, broadcasts, one expression per step), for BatchNorm2d (NCHW)
// and LayerNorm. Same devices as normkit (DefaultDevice / 2-thread ThreadPoolDevice).
// SPDX-License-Identifier: MIT
//
// NB: built with -Wno-maybe-uninitialized (CMakeLists.txt): with -march=native on an
// AVX-512 machine, GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_ps,
// GCC PR 105593, fixed in 13) when Eigen's tensor broadcasting/rsqrt packets inline here.
#define EIGEN_USE_THREADS
#include <string>  // std::string

#include <unsupported/Eigen/CXX11/Tensor>

#include "bench_common.hpp"
#include "bench_eigen.hpp"

namespace nkbench {
namespace {

using V = Eigen::Tensor<float, 1, Eigen::RowMajor>;

V rvec(Index n, std::uint32_t seed, float offset) {
  return random_vector<Eigen::RowMajor>(n, seed, offset);
}

void run_naive_bn(benchmark::State& st, const Case& c, Mode m, int threads) {
  using T = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const auto dims = dims_of<4>(c);
  const Index N = dims[0], C = dims[1], H = dims[2], W = dims[3];
  const float M = static_cast<float>(N * H * W), eps = 1e-5f;
  T x(dims), y(dims), dy, dx;
  fill_random(x.data(), static_cast<std::size_t>(x.size()), 1, 0.5f);
  if (m == Mode::backward) {
    dy.resize(dims);
    dx.resize(dims);
    fill_random(dy.data(), static_cast<std::size_t>(dy.size()), 2);
  }
  V w = rvec(C, 3, 1.0f), b = rvec(C, 4, 0.0f), rm(C), rv(C), mean(C), var(C), scale(C), shift(C);
  V sdy(C), sdyx(C), gw(C), gb(C), k1(C), k2(C), k3(C);
  rm.setZero();
  rv.setConstant(1.0f);
  const Eigen::array<Index, 3> red{{0, 2, 3}};
  const Eigen::array<Index, 4> bs{{1, C, 1, 1}}, bc{{N, 1, H, W}};
  with_device(threads, [&](const auto& d) {
    auto stats = [&] {
      mean.device(d) = x.mean(red);
      var.device(d) = (x - mean.reshape(bs).broadcast(bc)).square().mean(red);
    };
    auto forward = [&](bool training) {
      if (training) {
        stats();
        rm = rm * 0.9f + mean * 0.1f;
        rv = rv * 0.9f + var * (0.1f * M / (M - 1));
        scale = w * (var + eps).rsqrt();
        shift = b - mean * scale;
      } else {
        scale = w * (rv + eps).rsqrt();
        shift = b - rm * scale;
      }
      y.device(d) = x * scale.reshape(bs).broadcast(bc) + shift.reshape(bs).broadcast(bc);
    };
    auto backward = [&] {
      const V rstd = (var + eps).rsqrt();
      sdy.device(d) = dy.sum(red);
      sdyx.device(d) = (dy * (x - mean.reshape(bs).broadcast(bc))).sum(red);
      gb = sdy;
      gw = sdyx * rstd;
      k1 = w * rstd;
      k2 = w * rstd.cube() * sdyx * (1.0f / M);
      k3 = w * rstd * sdy * (1.0f / M);
      dx.device(d) = dy * k1.reshape(bs).broadcast(bc) -
                     (x - mean.reshape(bs).broadcast(bc)) * k2.reshape(bs).broadcast(bc) -
                     k3.reshape(bs).broadcast(bc);
    };
    if (m == Mode::backward)
      stats();
    auto call = [&] { m == Mode::backward ? backward() : forward(m == Mode::train); };
    call();
    for (auto _ : st) {
      call();
      benchmark::DoNotOptimize(m == Mode::backward ? dx.data() : y.data());
      benchmark::ClobberMemory();
    }
  });
  set_counters(st, c, m, threads);
}

void run_naive_ln(benchmark::State& st, const Case& c, Mode m, int threads) {
  using T = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  const Index D = static_cast<Index>(c.last()), rows = static_cast<Index>(c.numel()) / D;
  const float eps = 1e-5f, invD = 1.0f / static_cast<float>(D);
  T x(rows, D), y(rows, D), dy, dx;
  fill_random(x.data(), static_cast<std::size_t>(x.size()), 1, 0.5f);
  if (m == Mode::backward) {
    dy.resize(rows, D);
    dx.resize(rows, D);
    fill_random(dy.data(), static_cast<std::size_t>(dy.size()), 2);
  }
  V w = rvec(D, 3, 1.0f), b = rvec(D, 4, 0.0f), gw(D), gb(D), mean(rows), rstd(rows), s1(rows),
    s2(rows);
  const Eigen::array<Index, 1> red1{{1}}, red0{{0}};
  const Eigen::array<Index, 2> bs{{rows, 1}}, bc{{1, D}}, ps{{1, D}}, pc{{rows, 1}};
  with_device(threads, [&](const auto& d) {
    auto forward = [&] {
      mean.device(d) = x.mean(red1);
      rstd.device(d) = ((x - mean.reshape(bs).broadcast(bc)).square().mean(red1) + eps).rsqrt();
      y.device(d) = (x - mean.reshape(bs).broadcast(bc)) * rstd.reshape(bs).broadcast(bc) *
                        w.reshape(ps).broadcast(pc) +
                    b.reshape(ps).broadcast(pc);
    };
    auto backward = [&] {
      auto xhat = (x - mean.reshape(bs).broadcast(bc)) * rstd.reshape(bs).broadcast(bc);
      auto g = dy * w.reshape(ps).broadcast(pc);
      s1.device(d) = g.sum(red1);
      s2.device(d) = (g * xhat).sum(red1);
      dx.device(d) =
          rstd.reshape(bs).broadcast(bc) * (g - (s1 * invD).reshape(bs).broadcast(bc) -
                                            xhat * (s2 * invD).reshape(bs).broadcast(bc));
      gw.device(d) = (dy * xhat).sum(red0);
      gb.device(d) = dy.sum(red0);
    };
    if (m == Mode::backward)
      forward();
    auto call = [&] { m == Mode::backward ? backward() : forward(); };
    call();
    for (auto _ : st) {
      call();
      benchmark::DoNotOptimize(m == Mode::backward ? dx.data() : y.data());
      benchmark::ClobberMemory();
    }
  });
  set_counters(st, c, m, threads);
}

}  // namespace

void register_naive(const Case& c, Mode m, int threads) {
  const bool bn = c.kind == Kind::batch && c.shape.size() == 4 && !c.channels_last;
  if ((!bn && c.kind != Kind::layer) || c.dtype != Dtype::f32)
    return;  // float32 NCHW BatchNorm2d and LayerNorm only
  add(bench_name(c, mode_name(m), threads, "eigen_naive"), [c, m, threads,
                                                            bn](benchmark::State& st) {
    guarded(st, [&] { bn ? run_naive_bn(st, c, m, threads) : run_naive_ln(st, c, m, threads); });
  });
}

}  // namespace nkbench
