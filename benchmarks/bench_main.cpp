// normkit benchmarks — the shape suite, counters, and main().
// SPDX-License-Identifier: MIT
//
// Usage: normkit_bench [--smoke] [--isa=LEVEL] [google-benchmark flags]
//   --smoke      shrink every case (same family, rank, layout, code paths): the ctest run.
//   --linger-us=N  normkit::set_helper_linger_us(N) (default 100; 0: helpers do not linger).
//   --isa=LEVEL  run normkit on LEVEL (avx512, avx2, baseline: normkit::set_isa) and cap the
//                peers alike (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, unless already set):
//                on an AVX-512 machine --isa=avx2 is a proxy for an AVX2-only CPU.
// Environment: NORMKIT_BENCH_KEEP_MMAP=1 keeps glibc's default large-allocation policy
// (see the NB in main).
#include <algorithm>  // std::max
#include <atomic>     // std::atomic
#include <cstdint>    // std::uint32_t, std::int64_t, std::uint16_t
#include <cstdio>     // std::fprintf
#include <cstdlib>    // std::getenv, std::aligned_alloc, std::free
#include <cstring>    // std::strcmp, std::strncmp, std::memcpy, std::memset
#include <fstream>    // std::ifstream
#include <map>        // std::map
#include <memory>     // std::unique_ptr
#include <new>        // std::bad_alloc
#include <string>     // std::string
#include <utility>    // std::pair
#include <vector>     // std::vector

#include <malloc.h>  // mallopt (glibc)

#include <normkit/isa.hpp>
#include <normkit/normkit.hpp>

#include "bench_common.hpp"

namespace nkbench {
namespace {

std::atomic<int> g_failures{0};
bool g_smoke = false;

std::vector<Case> make_cases(bool smoke) {
  // {id, family, name, kind, shape, channels_last, groups, naive, dtype}
  // Smoke shapes keep each case's family, rank, layout and dtype; some of them (resnet, long,
  // llama, resnet-bf16) stay above normkit's 64 Ki-element parallel threshold so the
  // 2-thread paths run too.
  const Dtype f32 = Dtype::f32, bf16 = Dtype::bf16;
  auto S = [smoke](std::vector<std::int64_t> full, std::vector<std::int64_t> small) {
    return smoke ? small : full;
  };
  return {
      {"bn2d-resnet", "BatchNorm2d", "resnet", Kind::batch, S({32, 64, 56, 56}, {2, 16, 48, 48}),
       false, 0, true},
      {"bn2d-mid", "BatchNorm2d", "mid", Kind::batch, S({8, 256, 28, 28}, {2, 16, 5, 5}), false, 0,
       true},
      {"bn2d-late", "BatchNorm2d", "late", Kind::batch, S({64, 512, 7, 7}, {4, 32, 3, 3}), false, 0,
       true},
      {"bn1d-fc", "BatchNorm1d", "fc", Kind::batch, S({256, 1024}, {16, 64}), false, 0, false},
      {"bn2d-tiny", "BatchNorm2d", "tiny", Kind::batch, S({2, 3, 4, 4}, {2, 3, 4, 4}), false, 0,
       true},
      {"bn3d", "BatchNorm3d", "bn3d", Kind::batch, S({4, 32, 16, 32, 32}, {2, 4, 3, 4, 4}), false,
       0, false},
      {"bn2d-nhwc", "BatchNorm2d", "nhwc", Kind::batch, S({32, 64, 56, 56}, {2, 8, 6, 6}), true, 0,
       false},
      {"ln-bert", "LayerNorm", "bert", Kind::layer, S({4096, 768}, {16, 64}), false, 0, true},
      {"ln-long", "LayerNorm", "long", Kind::layer, S({64, 128, 1024}, {4, 32, 512}), false, 0,
       true},
      {"gn-32", "GroupNorm", "32", Kind::group, S({8, 256, 28, 28}, {2, 64, 3, 3}), false, 32,
       false},
      {"gn-32-big", "GroupNorm", "32-big", Kind::group, S({16, 64, 56, 56}, {2, 64, 4, 4}), false,
       32, false},
      {"in2d", "InstanceNorm2d", "in2d", Kind::instance, S({8, 64, 56, 56}, {2, 4, 5, 5}), false, 0,
       false},
      // Low precision and RMSNorm (issue 11 section 3). rms-llama: Llama-7B's hidden size.
      {"rms-llama", "RMSNorm", "llama", Kind::rms, S({4096, 4096}, {32, 4096}), false, 0, false,
       f32},
      {"rms-llama-bf16", "RMSNorm", "llama-bf16", Kind::rms, S({4096, 4096}, {32, 4096}), false, 0,
       false, bf16},
      {"ln-bert-bf16", "LayerNorm", "bert-bf16", Kind::layer, S({4096, 768}, {16, 64}), false, 0,
       false, bf16},
      {"bn2d-resnet-bf16", "BatchNorm2d", "resnet-bf16", Kind::batch,
       S({32, 64, 56, 56}, {2, 16, 48, 48}), false, 0, false, bf16},
      // Fused epilogues (issue 12 section 2): a ResNet block's BN + shortcut + ReLU, and the
      // pre-norm "add + LayerNorm" of a transformer block.
      {"bn2d-add-relu", "BatchNorm2d", "resnet-add-relu", Kind::batch,
       S({32, 64, 56, 56}, {2, 16, 48, 48}), false, 0, false, f32, Epi::add_relu},
      {"ln-add", "LayerNorm", "bert-add", Kind::layer, S({4096, 768}, {16, 64}), false, 0, false,
       f32, Epi::add},
  };
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto p = line.find(':');
      return p == std::string::npos ? line : line.substr(p + 2);
    }
  }
  return "unknown";
}

}  // namespace

std::int64_t Case::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::vector<std::int64_t> Case::storage_dims() const {
  if (!channels_last)
    return shape;
  std::vector<std::int64_t> d{shape[0]};
  for (std::size_t i = 2; i < shape.size(); ++i) d.push_back(shape[i]);
  d.push_back(shape[1]);
  return d;
}

std::vector<Mode> Case::modes() const {
  if (kind == Kind::rms)
    return {Mode::forward, Mode::backward};
  if (epi != Epi::none)
    return {Mode::train, Mode::eval};
  return {Mode::train, Mode::eval, Mode::backward};
}

const std::vector<Case>& cases() {
  static const std::vector<Case> full = make_cases(false);
  static const std::vector<Case> small = make_cases(true);
  return g_smoke ? small : full;
}
void use_smoke_shapes() {
  g_smoke = true;
}
bool smoke_shapes() {
  return g_smoke;
}

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::train:
      return "train";
    case Mode::eval:
      return "eval";
    case Mode::forward:
      return "forward";
    case Mode::backward:
      return "backward";
  }
  return "?";
}

const char* dtype_name(Dtype d) {
  return d == Dtype::bf16 ? "bfloat16" : "float32";
}

double model_bytes(const Case& c, Mode m) {
  const double B = c.bytes();
  // Epilogues: add_relu reads x and r and writes y, plus the statistics pass in training
  // (3B eval, 4B train); add reads x and r and writes h and y, its statistics from cache (4B).
  if (c.epi == Epi::add_relu)
    return m == Mode::eval ? 3 * B : 4 * B;
  if (c.epi == Epi::add)
    return 4 * B;
  switch (m) {
    case Mode::train:
      return 3 * B;
    case Mode::eval:
      // Only BatchNorm (with running statistics) skips the statistics pass in eval.
      return c.kind == Kind::batch ? 2 * B : 3 * B;
    case Mode::forward:  // RMSNorm: statistics pass + normalize pass + write
      return 3 * B;
    case Mode::backward:
      return 5 * B;
  }
  return B;
}

std::string bench_name(const Case& c, const char* mode, int threads, const char* impl) {
  return "BM_" + c.family + "/" + c.name + "/" + mode + "/threads:" + std::to_string(threads) +
         "/" + impl;
}

void set_counters(benchmark::State& state, const Case& c, Mode m, int threads) {
  using benchmark::Counter;
  const double mb = model_bytes(c, m);
  state.SetBytesProcessed(static_cast<std::int64_t>(mb) *
                          static_cast<std::int64_t>(state.iterations()));
  const double w = 2.0 * c.bytes() / memcpy_seconds(c, threads);
  const double floor_s = mb / w;
  // (floor_s * iterations / elapsed)^-1 = time per iteration / floor time.
  state.counters["floor_ratio"] = Counter(
      floor_s, static_cast<Counter::Flags>(Counter::kIsIterationInvariantRate | Counter::kInvert));
  state.counters["model_bytes"] = Counter(mb);
  state.counters["B"] = Counter(c.bytes());
  state.SetLabel(c.id);
}

void fail(benchmark::State& state, const std::string& what) {
  ++g_failures;
  state.SkipWithError(what.c_str());
}

void fill_random(float* p, std::size_t n, std::uint32_t seed, float offset) {
  std::uint32_t s = seed * 2654435761u + 12345u;
  if (s == 0)
    s = 1;
  for (std::size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    p[i] = offset + static_cast<float>(s >> 8) * (4.0f / 16777216.0f) - 2.0f;
  }
}

std::uint16_t to_bf16_bits(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

void* shared_buffer(const Case& c, Buf b) {
  struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
  };
  static std::map<std::pair<std::string, Buf>, std::unique_ptr<void, FreeDeleter>> buffers;
  auto& slot = buffers[std::make_pair(c.id, b)];
  if (slot)
    return slot.get();
  constexpr std::size_t kAlign = std::size_t{1} << 21;  // 2 MiB: a huge page where THP is on
  const auto n = static_cast<std::size_t>(c.numel());
  const auto bytes = static_cast<std::size_t>(c.bytes());
  slot.reset(std::aligned_alloc(kAlign, std::max(kAlign, (bytes + kAlign - 1) / kAlign * kAlign)));
  if (!slot)
    throw std::bad_alloc();
  void* p = slot.get();
  if (b == Buf::y || b == Buf::dx || b == Buf::h) {
    std::memset(p, 0, bytes);
    return p;
  }
  std::vector<float> f;
  float* dst = static_cast<float*>(p);
  if (c.dtype == Dtype::bf16) {
    f.resize(n);
    dst = f.data();
  }
  fill_random(dst, n, b == Buf::x ? 1 : 2, b == Buf::x ? 0.5f : 0.0f);
  if (c.dtype == Dtype::bf16) {
    auto* q = static_cast<unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t h = to_bf16_bits(f[i]);
      std::memcpy(q + 2 * i, &h, sizeof h);
    }
  }
  return p;
}

}  // namespace nkbench

int main(int argc, char** argv) {
  using namespace nkbench;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--smoke") == 0) {
      use_smoke_shapes();
    } else if (i > 0 && std::strncmp(argv[i], "--linger-us=", 12) == 0) {
      normkit::set_helper_linger_us(std::atoll(argv[i] + 12));
    } else if (i > 0 && std::strncmp(argv[i], "--isa=", 6) == 0) {
      normkit::Isa level = normkit::Isa::baseline;
      if (!normkit::detail::parse_isa(argv[i] + 6, level)) {
        std::fprintf(stderr, "normkit_bench: unknown --isa value %s (avx512, avx2, baseline)\n",
                     argv[i] + 6);
        return 2;
      }
      normkit::set_isa(level);  // throws when the CPU lacks it
      // The peers read these when they first dispatch, after this point.
      const char* aten = level == normkit::Isa::avx512 ? "avx512"
                         : level == normkit::Isa::avx2 ? "avx2"
                                                       : "default";
      const char* dnnl = level == normkit::Isa::avx512 ? "AVX512_CORE"
                         : level == normkit::Isa::avx2 ? "AVX2"
                                                       : "SSE41";
      setenv("ATEN_CPU_CAPABILITY", aten, 0);
      setenv("ONEDNN_MAX_CPU_ISA", dnnl, 0);
    } else {
      args.push_back(argv[i]);
    }
  }
  // NB: every large allocation comes from the (never trimmed) heap instead of a fresh
  // mmap. libtorch's functional forms allocate their outputs on every call; with glibc's
  // default policy each such call would also pay a page fault per 4 KiB of output, which
  // measures the kernel's page-zeroing, not the normalization. normkit writes into
  // preallocated outputs, so this only makes the comparison fairer to its peers.
  if (std::getenv("NORMKIT_BENCH_KEEP_MMAP") == nullptr) {
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, -1);
  }
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data()))
    return 1;

  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("shapes", smoke_shapes() ? "smoke" : "suite");
  benchmark::AddCustomContext("normkit_isa", normkit::isa_name(normkit::isa()));
  benchmark::AddCustomContext("normkit_cpu_isa", normkit::isa_name(normkit::cpu_isa()));
  benchmark::AddCustomContext("normkit_helper_linger_us",
                              std::to_string(normkit::helper_linger_us()));
  // (NORMKIT_STREAMING_STORE_BYTES sets it; default: the last-level cache the OS reports)
  const std::size_t stream_bytes = normkit::streaming_store_bytes();
  benchmark::AddCustomContext("normkit_streaming_store_bytes", stream_bytes == normkit::kNeverStream
                                                                   ? std::string("never")
                                                                   : std::to_string(stream_bytes));
  const char* aten_cap = std::getenv("ATEN_CPU_CAPABILITY");
  const char* dnnl_isa = std::getenv("ONEDNN_MAX_CPU_ISA");
  benchmark::AddCustomContext("ATEN_CPU_CAPABILITY", aten_cap ? aten_cap : "(unset: best)");
  benchmark::AddCustomContext("ONEDNN_MAX_CPU_ISA", dnnl_isa ? dnnl_isa : "(unset: best)");
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  benchmark::AddCustomContext("glibc_tunables", tunables ? tunables : "(unset)");
  benchmark::AddCustomContext("floor_model",
                              "eval 2B (BatchNorm) / 3B (norms computing stats), train and "
                              "forward (RMSNorm) 3B, backward 5B; B = elements x dtype size "
                              "(4 float32, 2 bfloat16); floor = model bytes / memcpy bandwidth "
                              "(same B, same threads)");
#ifdef NORMKIT_BENCH_NATIVE
  benchmark::AddCustomContext("normkit_flags", "-O3 -march=native");
#else
  benchmark::AddCustomContext("normkit_flags", "-O3");
#endif
#ifdef NORMKIT_BENCH_TORCH
  benchmark::AddCustomContext("libtorch", torch_context());
#endif
#ifdef NORMKIT_BENCH_DNNL
  benchmark::AddCustomContext("onednn", dnnl_context());
#endif

  for (const Case& c : cases()) {
    for (int threads : {1, 2}) register_floor(c, threads);
    for (Mode m : c.modes()) {
      for (int threads : {1, 2}) {
        register_normkit(c, m, threads);
        register_module(c, m, threads);
        if (c.naive)
          register_naive(c, m, threads);
#ifdef NORMKIT_BENCH_TORCH
        register_torch(c, m, threads);
#endif
#ifdef NORMKIT_BENCH_DNNL
        register_dnnl(c, m, threads);
#endif
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return g_failures.load() == 0 ? 0 : 1;
}
