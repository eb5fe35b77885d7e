// normkit fuzz target (libFuzzer) for the safetensors file path: the input is the file.
// parse_safetensors, the serialize -> parse round trip, and load_state_dict into every module
// kind (float and double); the invariants are in safetensors_check.hpp. A failed invariant
// traps, so libFuzzer keeps the input as a finding. Set NORMKIT_FUZZ_VERBOSE=1 to print what
// each input did. Run by tests/fuzz/run_fuzz.sh (target "safetensors").
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "fuzz/safetensors_check.hpp"

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

namespace {

// One part of the file (header or data) mutated by libFuzzer, with `room` bytes to grow into.
std::vector<std::uint8_t> mutate_part(std::vector<std::uint8_t> part, std::size_t room) {
  const std::size_t n = part.size();
  part.resize(room);
  part.resize(LLVMFuzzerMutate(part.data(), n, room));
  return part;
}

}  // namespace

// NB: byte-level mutations of a safetensors file mostly break the 8-byte header length (one
// inserted byte in the JSON and the length no longer fits), so most inputs would die at the
// first check. A quarter of the mutations stay raw (the length field is attack surface too); the
// rest mutate the JSON header or the data section alone and then rewrite the length to match.
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data,
                                               std::size_t size,
                                               std::size_t max_size,
                                               unsigned int seed) {
  std::minstd_rand rng(seed);
  const unsigned mode = static_cast<unsigned>(rng() % 4);
  if (mode == 0 || size < 8 || size > max_size)
    return LLVMFuzzerMutate(data, size, max_size);
  const auto n = normkit::detail::load_le<std::uint64_t>(data);
  if (n > size - 8)
    return LLVMFuzzerMutate(data, size, max_size);
  std::vector<std::uint8_t> header(data + 8, data + 8 + n), body(data + 8 + n, data + size);
  if (mode == 3 && !body.empty())
    body = mutate_part(std::move(body), max_size - 8 - header.size());
  else
    header = mutate_part(std::move(header), max_size - 8 - body.size());
  normkit::detail::store_le(static_cast<std::uint64_t>(header.size()), data);
  if (!header.empty())
    std::memcpy(data + 8, header.data(), header.size());
  if (!body.empty())
    std::memcpy(data + 8 + header.size(), body.data(), body.size());
  return 8 + header.size() + body.size();
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const bool verbose = std::getenv("NORMKIT_FUZZ_VERBOSE") != nullptr;
  const normkit_fuzz::Bytes file(data, data + size);
  const normkit_fuzz::FileCheck r = normkit_fuzz::check_safetensors_file(file);
  if (verbose) {
    std::fprintf(stderr, "normkit fuzz_safetensors: %zu bytes, %s, loads accepted %d rejected %d\n",
                 size, r.parsed ? "parsed" : "rejected", r.loads_accepted, r.loads_rejected);
  }
  if (!r.failure.empty()) {
    std::fprintf(stderr, "\n*** normkit fuzz check failed: %s\n", r.failure.c_str());
    std::fflush(stderr);
    __builtin_trap();
  }
  return 0;
}
