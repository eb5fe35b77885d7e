// normkit probe: LayerNorm forward against oneDNN's layer_normalization on the *same* x and y
// buffers, timed in alternating pairs (one thread, float, scale + shift, inference).
//
// normkit_bench gives every library its own tensors, and on the 2-vCPU VM writing one
// 12.6 MB output took 1.2-1.3x as long as writing another of the same size
// (results/2026-11-30-module-overhead.md). Here oneDNN's memory objects wrap the buffers
// normkit reads and writes (dnnl::memory over a user pointer), so the two differ only in
// their code. Also timed: a memcpy of x into y (the floor), and each library in place
// (y = x), where the output's read-for-ownership hits the lines just read.
// Build: scripts/bench.sh (target probe_layer_norm_vs_onednn, when oneDNN is found).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <normkit/normkit.hpp>

#include "rounds.hpp"

namespace {

void run(long rows, long n, int rounds) {
  const auto count = static_cast<std::size_t>(rows * n);
  std::vector<float> xs(count), ys(count), xi(count), w(static_cast<std::size_t>(n), 1.0f),
      b(static_cast<std::size_t>(n), 0.0f);
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.5f, 1.0f);
  for (float& v : xs) v = d(g);
  for (std::size_t j = 0; j < w.size(); ++j) {
    w[j] = 1.0f + 0.1f * d(g);
    b[j] = 0.1f * d(g);
  }

  using Map = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
  using CMap = Eigen::TensorMap<const Eigen::Tensor<const float, 1>>;
  Map x(xs.data(), rows, n), y(ys.data(), rows, n), xin(xi.data(), rows, n);
  normkit::LayerNormFuncOptions<float> o({n});
  o.weight(CMap(w.data(), n)).bias(CMap(b.data(), n));

  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream s(eng);
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  const dnnl::memory::desc md({rows, n}, dt::f32, tag::ab);
  const dnnl::memory::desc smd({rows}, dt::f32, tag::a);
  const dnnl::memory::desc pmd({n}, dt::f32, tag::a);
  using fwd = dnnl::layer_normalization_forward;
  const fwd::primitive_desc pd(
      fwd::desc(dnnl::prop_kind::forward_inference, md, smd, 1e-5f,
                dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift),
      eng);
  fwd prim(pd);
  dnnl::memory src(md, eng, xs.data()), dst(md, eng, ys.data()), in_place(md, eng, xi.data());
  dnnl::memory scale(pmd, eng, w.data()), shift(pmd, eng, b.data());
  auto onednn = [&](dnnl::memory& from, dnnl::memory& to) {
    prim.execute(s, {{DNNL_ARG_SRC, from},
                     {DNNL_ARG_DST, to},
                     {DNNL_ARG_SCALE, scale},
                     {DNNL_ARG_SHIFT, shift}});
    s.wait();
  };
  // In-place calls refresh xin from x first (a copy not timed: it runs outside us()).
  const std::vector<std::function<void()>> fs = {
      [&] { normkit::layer_norm(x, y, o); },
      [&] { onednn(src, dst); },
      [&] { std::memcpy(ys.data(), xs.data(), count * sizeof(float)); },
      [&] { normkit::layer_norm(xin, xin, o); },
      [&] { onednn(in_place, in_place); },
  };
  std::memcpy(xi.data(), xs.data(), count * sizeof(float));
  std::vector<double> m;
  for (const auto& t : probe::rotating_rounds(fs, rounds)) m.push_back(probe::median(t));
  std::printf(
      "| %ld x %ld | %.4g MB | %.1f us | %.1f us | **%.2f** | %.1f us | %.1f us | %.1f us | %.2f "
      "|\n",
      rows, n, 4e-6 * static_cast<double>(count), m[0], m[1], m[1] / m[0], m[2], m[3], m[4],
      m[4] / m[3]);
}

}  // namespace

int main() {
  omp_set_num_threads(1);
  const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  std::printf("normkit ISA path: %s; ONEDNN_MAX_CPU_ISA=%s; 1 thread; medians of paired rounds\n\n",
              normkit::isa_name(normkit::isa()), cap ? cap : "(unset: best)");
  std::printf(
      "| shape | x | normkit | oneDNN | speed-up (oneDNN / normkit) | memcpy | normkit in place | "
      "oneDNN in place | in place: speed-up |\n|---|---|---|---|---|---|---|---|---|\n");
  run(256, 768, 2000);   // in cache
  run(1024, 192, 2000);  // in cache, short rows
  run(4096, 768, 200);   // ln-bert
  run(8192, 1024, 100);  // ln-long
}
