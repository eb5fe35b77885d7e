// normkit/isa.hpp: which vector instruction set normkit's kernels run on, and how to choose.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_ISA_HPP_
#define NORMKIT_ISA_HPP_

#include <atomic>   // std::atomic
#include <cctype>   // std::tolower
#include <cstdio>   // std::fprintf
#include <cstdlib>  // std::getenv
#include <string>   // std::string
#include <vector>   // std::vector

#include <normkit/config.hpp>
#include <normkit/error.hpp>

namespace normkit {
namespace process_state {
// Process-wide settings, shared by every translation unit whatever its compile flags: plain
// data outside the ABI namespace (config.hpp), read and written through the inline
// functions below. -1: not chosen yet.
inline std::atomic<int> active_isa{-1};
}  // namespace process_state
}  // namespace normkit

NORMKIT_BEGIN_NAMESPACE

/// The instruction-set levels normkit's kernels are compiled for. On x86-64 (GCC, Clang)
/// every level is compiled into the program and the best one the CPU supports runs; on
/// other targets only `baseline` exists (compiled with the translation unit's flags: NEON on
/// aarch64).
enum class Isa : int {
  baseline = 0,  ///< x86-64 baseline (SSE2), or the portable code on other targets
  avx2 = 1,      ///< AVX2 + FMA (Intel Haswell and later, AMD Zen 1 to 3)
  avx512 = 2,    ///< AVX-512 F, VL, BW, DQ (Intel Skylake-SP and later, AMD Zen 4)
};

/// Name of an ISA level: "avx512", "avx2", or for the baseline "x86-64", "aarch64" or
/// "generic" (what the baseline means on this target).
inline const char* isa_name(Isa level) {
  switch (level) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
#if defined(__x86_64__) || defined(_M_X64)
      return "x86-64";
#elif defined(__aarch64__)
      return "aarch64";
#else
      return "generic";
#endif
  }
}

namespace detail {

/// The best level this CPU (and OS: __builtin_cpu_supports checks that the OS saves the
/// AVX / AVX-512 registers) supports among those compiled in.
inline Isa detect_cpu_isa() {
#if NORMKIT_X86_DISPATCH
  __builtin_cpu_init();
  // The AVX2 copy is compiled for AVX2, FMA, F16C (half conversions), BMI/BMI2 and POPCNT
  // (kernels/isa_begin.hpp). F16C has no __builtin_cpu_supports name in Clang 14: CPUID
  // leaf 1, ECX bit 29 (every AVX2 CPU has it, but a hypervisor may hide it).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
  const bool f16c = (ecx >> 29) & 1u;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  // As PyTorch's AVX512 capability: F plus the VL, BW and DQ extensions.
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::baseline;
#else
  return Isa::baseline;
#endif
}

/// Parses NORMKIT_ISA ("avx512", "avx2", "baseline"; also "x86-64", "sse2", "generic");
/// returns false for anything else.
inline bool parse_isa(const char* s, Isa& out) {
  std::string v;
  for (const char* p = s; *p; ++p)
    v += static_cast<char>(std::tolower(static_cast<unsigned char>(*p)));
  if (v == "avx512" || v == "avx-512" || v == "avx512f") {
    out = Isa::avx512;
  } else if (v == "avx2") {
    out = Isa::avx2;
  } else if (v == "baseline" || v == "x86-64" || v == "x86_64" || v == "sse2" || v == "generic" ||
             v == "aarch64" || v == "neon" || v == "default") {
    out = Isa::baseline;
  } else {
    return false;
  }
  return true;
}

/// The level chosen when nothing was forced: the CPU's best, capped by NORMKIT_ISA.
inline Isa initial_isa() {
  const Isa cpu = detect_cpu_isa();
  const char* env = std::getenv("NORMKIT_ISA");
  if (env == nullptr || *env == 0)
    return cpu;
  Isa want = cpu;
  if (!parse_isa(env, want)) {
    std::fprintf(stderr,
                 "normkit: NORMKIT_ISA=%s not recognized (avx512, avx2, baseline); using %s\n", env,
                 isa_name(cpu));
    return cpu;
  }
  return static_cast<int>(want) < static_cast<int>(cpu) ? want : cpu;
}

/// The active level as an int (the dispatcher's one load per call).
NORMKIT_ALWAYS_INLINE int active_isa_index() {
  int v = process_state::active_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    // Detection is deterministic, so threads racing here all store the same value.
    int expected = -1;
    const int chosen = static_cast<int>(initial_isa());
    process_state::active_isa.compare_exchange_strong(expected, chosen, std::memory_order_relaxed);
    v = process_state::active_isa.load(std::memory_order_relaxed);
  }
  return v;
}

}  // namespace detail

/// The ISA level normkit's kernels run on in this process: chosen on first use as the best
/// the CPU supports, capped by the environment variable NORMKIT_ISA (avx512, avx2,
/// baseline) when set; set_isa() changes it.
inline Isa isa() {
  return static_cast<Isa>(detail::active_isa_index());
}

/// The best level this CPU supports (what isa() is without NORMKIT_ISA or set_isa()).
inline Isa cpu_isa() {
  return detail::detect_cpu_isa();
}

/// Every level this CPU supports, lowest first (tests run each of them).
inline std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (int i = 0; i <= static_cast<int>(cpu_isa()); ++i) v.push_back(static_cast<Isa>(i));
  return v;
}

/// Forces the kernels onto `level` for the whole process (tests and benchmarks compare
/// levels this way). Takes effect for calls that start afterwards; safe to call at any time,
/// but results of calls racing with it may come from either level.
/// @throws value_error if this CPU does not support `level`.
inline void set_isa(Isa level) {
  if (static_cast<int>(level) < 0 || static_cast<int>(level) > static_cast<int>(cpu_isa())) {
    throw value_error(std::string("[normkit.set_isa] this CPU supports up to ") +
                      isa_name(cpu_isa()) + ", but got " + isa_name(level));
  }
  process_state::active_isa.store(static_cast<int>(level), std::memory_order_relaxed);
}

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_ISA_HPP_
