// normkit benchmarks — oneDNN peers. Compiled only when find_package(dnnl) succeeds
// (NORMKIT_BENCH_DNNL). Primitives are created once per benchmark run (as a framework's
// primitive cache would); the timed loop is execute + stream wait.
//   BatchNorm: batch_normalization forward training / inference (global stats) / backward,
//              scale and shift on (use_scale | use_shift), formats nc, nchw, ncdhw, nhwc.
//   LayerNorm: layer_normalization forward training / inference / backward, scale + shift.
//   InstanceNorm (no affine, as the suite's case): batch_normalization on the (1, N*C, H, W)
//              view -- exactly InstanceNorm's statistics, as ATen computes it.
//   GroupNorm: no oneDNN 2.6 primitive (group_normalization arrived in 3.x): not run.
//   RMSNorm: no flag for it in 2.6 (normalization_flags::rms arrived in 3.x): not run.
//   bfloat16 cases: src/dst (and diff_dst/diff_src) bf16, scale/shift and statistics f32 --
//              the only bf16 form 2.6 has (like PyTorch's mixed mode). The implementation
//              oneDNN picked is appended to the label (" onednn:<impl_info_str>"): under
//              ONEDNN_MAX_CPU_ISA=AVX2 the bf16 primitives may fall back to a reference kernel.
// Threads: oneDNN's CPU runtime (DNNL_CPU_RUNTIME) is OpenMP in Debian's build, so the
// thread count is omp_set_num_threads(n), checked with omp_get_max_threads().
// SPDX-License-Identifier: MIT
#include <oneapi/dnnl/dnnl.hpp>
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

#include <cstdint>        // std::int64_t, std::uint16_t, std::uint32_t
#include <cstring>        // std::memcpy
#include <exception>      // std::exception
#include <string>         // std::string
#include <unordered_map>  // std::unordered_map
#include <vector>         // std::vector

#include "bench_common.hpp"

namespace nkbench {
namespace {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;
using nf = dnnl::normalization_flags;

// Returns the thread count oneDNN will use after asking for n.
int set_threads(int n) {
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
  omp_set_num_threads(n);
  return omp_get_max_threads();
#else
  (void)n;
  return -1;  // not controllable from here: the run reports an error
#endif
}

tag data_tag(std::size_t rank, bool channels_last) {
  switch (rank) {
    case 2:
      return tag::ab;
    case 3:
      return channels_last ? tag::acb : tag::abc;
    case 4:
      return channels_last ? tag::acdb : tag::abcd;
    case 5:
      return channels_last ? tag::acdeb : tag::abcde;
    default:
      return tag::undef;
  }
}

dt data_type(const Case& c) {
  return c.dtype == Dtype::bf16 ? dt::bf16 : dt::f32;
}

/// The case's shared buffer (bench_common.hpp) as oneDNN memory: inputs hold the values
/// normkit and libtorch read, and outputs are the buffers normkit writes.
memory shared_memory(const Case& c, Buf b, const memory::desc& md, const dnnl::engine& eng) {
  return memory(md, eng, shared_buffer(c, b));
}

/// fill_random's values for a float parameter vector.
memory filled(const memory::desc& md, const dnnl::engine& eng, std::uint32_t seed, float offset) {
  memory mem(md, eng);
  fill_random(static_cast<float*>(mem.get_data_handle()), md.get_size() / sizeof(float), seed,
              offset);
  return mem;
}

memory constant(const memory::desc& md, const dnnl::engine& eng, float v) {
  memory mem(md, eng);
  float* p = static_cast<float*>(mem.get_data_handle());
  for (std::size_t i = 0; i < md.get_size() / sizeof(float); ++i) p[i] = v;
  return mem;
}

void run(benchmark::State& st, const Case& c, Mode m, int threads) {
  const int got = set_threads(threads);
  if (got != threads) {
    fail(st, "oneDNN threads: got " + std::to_string(got) + ", wanted " + std::to_string(threads));
    return;
  }
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream s(eng);
  const float eps = 1e-5f;
  std::unordered_map<int, memory> args;
  dnnl::primitive prim;
  std::string impl;  // impl_info_str of the timed primitive
  // Epilogue cases: a binary add primitive runs after the norm (BatchNorm: dst += residual
  // with a ReLU post-op; oneDNN 2.6's batch normalization fuses ReLU only without the add)
  // or before it (LayerNorm: h = x + residual into the norm's src).
  dnnl::primitive add_prim;
  std::unordered_map<int, memory> add_args;
  auto make_add = [&](const memory::desc& md, const memory& a, const memory& out, bool relu) {
    dnnl::primitive_attr attr;
    if (relu) {
      dnnl::post_ops po;
      po.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
      attr.set_post_ops(po);
    }
    const dnnl::binary::primitive_desc pd(
        dnnl::binary::desc(dnnl::algorithm::binary_add, md, md, md), attr, eng);
    add_prim = dnnl::binary(pd);
    add_args[DNNL_ARG_SRC_0] = a;
    add_args[DNNL_ARG_SRC_1] = shared_memory(c, Buf::residual, md, eng);
    add_args[DNNL_ARG_DST] = out;
    impl += " + " + std::string(pd.impl_info_str());
  };

  if (c.kind == Kind::batch || c.kind == Kind::instance) {
    const bool affine = c.kind == Kind::batch;
    memory::dims dims(c.shape.begin(), c.shape.end());
    if (!affine) {
      dims[1] *= dims[0];
      dims[0] = 1;
    }
    const memory::desc md(dims, data_type(c), data_tag(dims.size(), c.channels_last));
    const memory::desc pmd({c.shape[1]}, dt::f32, tag::a);
    const nf flags = affine ? (nf::use_scale | nf::use_shift) : nf::none;
    using fwd = dnnl::batch_normalization_forward;
    const fwd::primitive_desc train_pd(fwd::desc(dnnl::prop_kind::forward_training, md, eps, flags),
                                       eng);
    args[DNNL_ARG_SRC] = shared_memory(c, Buf::x, md, eng);
    if (affine) {
      args[DNNL_ARG_SCALE] = filled(pmd, eng, 3, 1.0f);
      args[DNNL_ARG_SHIFT] = filled(pmd, eng, 4, 0.0f);
    }
    if (m == Mode::train || m == Mode::backward) {
      args[DNNL_ARG_DST] = shared_memory(c, Buf::y, md, eng);
      args[DNNL_ARG_MEAN] = memory(train_pd.mean_desc(), eng);
      args[DNNL_ARG_VARIANCE] = memory(train_pd.variance_desc(), eng);
      prim = fwd(train_pd);
      impl = train_pd.impl_info_str();
    } else if (affine) {  // eval with running (global) statistics
      const fwd::primitive_desc pd(
          fwd::desc(dnnl::prop_kind::forward_inference, md, eps, flags | nf::use_global_stats),
          eng);
      args[DNNL_ARG_DST] = shared_memory(c, Buf::y, md, eng);
      args[DNNL_ARG_MEAN] = constant(pd.mean_desc(), eng, 0.0f);
      args[DNNL_ARG_VARIANCE] = constant(pd.variance_desc(), eng, 1.0f);
      prim = fwd(pd);
      impl = pd.impl_info_str();
    } else {  // InstanceNorm eval still computes its statistics
      const fwd::primitive_desc pd(fwd::desc(dnnl::prop_kind::forward_inference, md, eps, flags),
                                   eng);
      args[DNNL_ARG_DST] = shared_memory(c, Buf::y, md, eng);
      prim = fwd(pd);
      impl = pd.impl_info_str();
    }
    if (m == Mode::backward) {
      prim.execute(s, args);  // statistics for the backward
      s.wait();
      using bwd = dnnl::batch_normalization_backward;
      const bwd::primitive_desc pd(
          bwd::desc(affine ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data, md, md,
                    eps, flags),
          eng, train_pd);
      args.erase(DNNL_ARG_DST);  // SHIFT stays: 2.6 lists it among the backward's exec args
      args[DNNL_ARG_DIFF_DST] = shared_memory(c, Buf::dy, md, eng);
      args[DNNL_ARG_DIFF_SRC] = shared_memory(c, Buf::dx, md, eng);
      if (affine) {
        args[DNNL_ARG_DIFF_SCALE] = memory(pmd, eng);
        args[DNNL_ARG_DIFF_SHIFT] = memory(pmd, eng);
      }
      prim = bwd(pd);
      impl = pd.impl_info_str();
    }
    if (c.epi == Epi::add_relu)
      make_add(md, args[DNNL_ARG_DST], args[DNNL_ARG_DST], true);
  } else if (c.kind == Kind::layer) {
    const memory::dims dims(c.shape.begin(), c.shape.end());
    const memory::dims sdims(c.shape.begin(), c.shape.end() - 1);
    const memory::desc md(dims, data_type(c), data_tag(dims.size(), false));
    const memory::desc smd(sdims, dt::f32, sdims.size() == 1 ? tag::a : tag::ab);
    const memory::desc pmd({c.last()}, dt::f32, tag::a);
    const nf flags = nf::use_scale | nf::use_shift;
    using fwd = dnnl::layer_normalization_forward;
    const fwd::primitive_desc train_pd(
        fwd::desc(dnnl::prop_kind::forward_training, md, smd, eps, flags), eng);
    // LayerNorm after the residual add normalizes h (the add writes it), else x.
    args[DNNL_ARG_SRC] = shared_memory(c, c.epi == Epi::add ? Buf::h : Buf::x, md, eng);
    args[DNNL_ARG_SCALE] = filled(pmd, eng, 3, 1.0f);
    args[DNNL_ARG_SHIFT] = filled(pmd, eng, 4, 0.0f);
    args[DNNL_ARG_DST] = shared_memory(c, Buf::y, md, eng);
    args[DNNL_ARG_MEAN] = memory(smd, eng);
    args[DNNL_ARG_VARIANCE] = memory(smd, eng);
    if (m == Mode::eval) {
      const fwd::primitive_desc pd(
          fwd::desc(dnnl::prop_kind::forward_inference, md, smd, eps, flags), eng);
      prim = fwd(pd);
      impl = pd.impl_info_str();
    } else {
      prim = fwd(train_pd);
      impl = train_pd.impl_info_str();
    }
    if (m == Mode::backward) {
      prim.execute(s, args);
      s.wait();
      using bwd = dnnl::layer_normalization_backward;
      const bwd::primitive_desc pd(bwd::desc(dnnl::prop_kind::backward, md, md, smd, eps, flags),
                                   eng, train_pd);
      args.erase(DNNL_ARG_DST);  // SHIFT stays: 2.6 lists it among the backward's exec args
      args[DNNL_ARG_DIFF_DST] = shared_memory(c, Buf::dy, md, eng);
      args[DNNL_ARG_DIFF_SRC] = shared_memory(c, Buf::dx, md, eng);
      args[DNNL_ARG_DIFF_SCALE] = memory(pmd, eng);
      args[DNNL_ARG_DIFF_SHIFT] = memory(pmd, eng);
      prim = bwd(pd);
      impl = pd.impl_info_str();
    }
    if (c.epi == Epi::add) {  // h = x + residual into the norm's src (the kept stream)
      const std::string norm_impl = impl;
      impl.clear();
      make_add(md, shared_memory(c, Buf::x, md, eng), args[DNNL_ARG_SRC], false);
      impl = norm_impl + impl;
    }
  } else {
    fail(st, "no oneDNN 2.6 primitive for this norm");
    return;
  }
  const bool add_first = c.epi == Epi::add, add_after = c.epi == Epi::add_relu;
  auto call = [&] {
    if (add_first)
      add_prim.execute(s, add_args);
    prim.execute(s, args);
    if (add_after)
      add_prim.execute(s, add_args);
    s.wait();
  };
  call();  // warm-up
  for (auto _ : st) call();
  set_counters(st, c, m, threads);
  st.SetLabel(c.id + " onednn:" + impl);  // tools/bench_report.py lists the implementations
}

}  // namespace

std::string dnnl_context() {
  const dnnl_version_t* v = dnnl_version();
  std::string rt;
  switch (v->cpu_runtime) {
    case DNNL_RUNTIME_OMP:
      rt = "OpenMP";
      break;
    case DNNL_RUNTIME_TBB:
      rt = "TBB";
      break;
    case DNNL_RUNTIME_SEQ:
      rt = "sequential";
      break;
    case DNNL_RUNTIME_THREADPOOL:
      rt = "threadpool";
      break;
    default:
      rt = "other";
  }
  std::string isa;
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::avx512_core_amx:
      isa = "avx512_core_amx";
      break;
    case dnnl::cpu_isa::avx512_core_bf16:
      isa = "avx512_core_bf16";
      break;
    case dnnl::cpu_isa::avx512_core_vnni:
      isa = "avx512_core_vnni";
      break;
    case dnnl::cpu_isa::avx512_core:
      isa = "avx512_core";
      break;
    case dnnl::cpu_isa::avx2:
      isa = "avx2";
      break;
    default:
      isa = "other";
  }
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + " (CPU runtime: " + rt + ", ISA: " + isa + ")";
}

void register_dnnl(const Case& c, Mode m, int threads) {
  if (c.kind == Kind::group || c.kind == Kind::rms)
    return;  // not expressible in oneDNN 2.6
  // oneDNN 2.6's bfloat16 normalizations need AVX-512 (avx512_core); capped at AVX2
  // (--isa=avx2) it has no implementation: no entry rather than an error.
  if (c.dtype == Dtype::bf16 && dnnl::get_effective_cpu_isa() != dnnl::cpu_isa::avx512_core &&
      dnnl::get_effective_cpu_isa() != dnnl::cpu_isa::avx512_core_vnni &&
      dnnl::get_effective_cpu_isa() != dnnl::cpu_isa::avx512_core_bf16 &&
      dnnl::get_effective_cpu_isa() != dnnl::cpu_isa::avx512_core_amx)
    return;
  add(bench_name(c, mode_name(m), threads, "onednn"), [c, m, threads](benchmark::State& st) {
    try {
      run(st, c, m, threads);
    } catch (const std::exception& e) {
      fail(st, e.what());
    }
  });
}

}  // namespace nkbench
