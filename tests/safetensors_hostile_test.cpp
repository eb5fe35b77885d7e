// Hostile safetensors files and state dicts (issue #15). Every structurally invalid input is
// rejected with a normkit::value_error whose message starts with a stable tag
// ("[normkit.read_safetensors] ", "[normkit.load_state_dict] <Module>: ", ...), names the tensor
// at fault and gives the numbers; a failed load leaves the module bit-identical; what PyTorch
// accepts (NaN or negative running_var, empty tensors with large extents) still loads.
//
// The seeds of the file fuzzer (tests/fuzz/corpus_safetensors) are replayed here through the
// fuzzer's own invariants (tests/fuzz/safetensors_check.hpp). They are written by this file:
//   NORMKIT_WRITE_SAFETENSORS_CORPUS=tests/fuzz/corpus_safetensors
//   build/h/tests/safetensors_hostile_test --gtest_filter='SafetensorsCorpus.WriteSeeds'
// (one command line)
// (reject-* from hostile_files() below, valid-* from valid_files()); fuzzer findings are added
// by hand as finding-* and stay.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>
#include <normkit/state_dict.hpp>

#include "fuzz/safetensors_check.hpp"
#include "support/state.hpp"

namespace {

using Bytes = std::vector<unsigned char>;
const std::string kRead = "[normkit.read_safetensors] ";

Bytes le64(std::uint64_t n) {
  Bytes b(8);
  normkit::detail::store_le(n, b.data());
  return b;
}

Bytes cat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Bytes text(const std::string& s) {
  return Bytes(s.begin(), s.end());
}

// A safetensors file: the header's length, the header, the data.
Bytes file_of(const std::string& header, const Bytes& data = {}) {
  return cat(cat(le64(header.size()), text(header)), data);
}

// One header entry; dtype, shape and offsets are JSON text.
std::string entry(const std::string& name,
                  const std::string& dtype,
                  const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":" + dtype + ",\"shape\":" + shape +
         ",\"data_offsets\":" + offsets + "}";
}

// The common case: "w", F32 [3], 12 bytes.
const std::string kW = entry("w", "\"F32\"", "[3]", "[0,12]");

struct Hostile {
  std::string seed;     // corpus name: reject-<seed>
  Bytes file;           //
  std::string key;      // the tensor the message must name ("" for file-level errors)
  std::string message;  // the text after the tag (a part of it for nlohmann's JSON errors)
};

// One file per rejected case of parse_safetensors (docs/reliability-safetensors.md's table).
std::vector<Hostile> hostile_files() {
  const Bytes d12(12, 0);
  const std::string big = "9223372036854775807";  // 2^63 - 1
  std::vector<Hostile> h;
  // File and header length.
  h.push_back(
      {"short-file", Bytes(5, 0), "", "file of 5 bytes is shorter than the 8-byte header length"});
  h.push_back({"header-length-past-end", cat(le64(1000), text("{}")), "",
               "header length 1000 exceeds the 2 bytes after the length field"});
  h.push_back({"header-length-2e64-minus-1", cat(le64(~std::uint64_t{0}), text("{}")), "",
               "header length 18446744073709551615 exceeds the 2 bytes after the length field"});
  h.push_back({"header-length-wraps", cat(le64(~std::uint64_t{0} - 7), text("{}")), "",
               "header length 18446744073709551608 exceeds the 2 bytes after the length field"});
  {
    const Bytes full = file_of("{" + kW + "}", d12);
    h.push_back({"truncated-header", Bytes(full.begin(), full.begin() + 30), "",
                 "header length " + std::to_string(full.size() - 20) +
                     " exceeds the 22 bytes after the length field"});
  }
  h.push_back({"truncated-data", file_of("{" + kW + "}", Bytes(8, 0)), "w",
               "tensor \"w\": data_offsets [0, 12] run past the data section of 8 bytes"});
  // JSON.
  h.push_back({"invalid-json", file_of("{\"w\":"), "", "invalid JSON header: "});
  h.push_back({"invalid-utf8", file_of("{\"\xff\":1}"), "", "invalid JSON header: "});
  h.push_back({"header-trailing-garbage", file_of("{} x"), "", "invalid JSON header: "});
  // nlohmann's lexer ends the input at a NUL byte: "{}\0junk" would parse as "{}".
  h.push_back({"header-nul", file_of(std::string("{}\0junk", 7)), "",
               "the header holds a NUL byte at offset 2"});
  h.push_back({"header-array", file_of("[1,2]"), "", "the header is an array, not a JSON object"});
  h.push_back({"header-string", file_of("\"w\""), "", "the header is a string, not a JSON object"});
  h.push_back({"deep-arrays", file_of(std::string(4096, '[')), "",
               "the header nests deeper than 16 levels"});
  {
    std::string deep;
    for (int i = 0; i < 1000; ++i) deep += "{\"a\":";
    h.push_back(
        {"deep-objects", file_of(deep), "a", "the header nests deeper than 16 levels in \"a\""});
  }
  h.push_back(
      {"deep-in-shape",
       file_of("{" + entry("w", "\"F32\"", std::string(20, '[') + std::string(20, ']'), "[0,0]") +
               "}"),
       "w", "the header nests deeper than 16 levels in \"w\""});
  h.push_back({"duplicate-tensor", file_of("{" + kW + "," + kW + "}", d12), "w",
               "duplicate tensor name \"w\" in the header"});
  h.push_back({"duplicate-field",
               file_of("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F64\",\"shape\":[3],"
                       "\"data_offsets\":[0,12]}}",
                       d12),
               "w", "tensor \"w\": duplicate key \"dtype\""});
  h.push_back({"duplicate-metadata-key", file_of("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}"),
               "__metadata__", "\"__metadata__\": duplicate key \"a\""});
  // __metadata__.
  h.push_back({"metadata-array", file_of("{\"__metadata__\":[\"pt\"]}"), "__metadata__",
               "\"__metadata__\" is an array, not an object of strings"});
  h.push_back({"metadata-value-integer", file_of("{\"__metadata__\":{\"format\":1}}"),
               "__metadata__", "\"__metadata__\" entry \"format\" is an integer, not a string"});
  // Entries.
  h.push_back(
      {"entry-array", file_of("{\"w\":[1]}"), "w",
       "tensor \"w\": expected an object with dtype, shape and data_offsets, got an array"});
  h.push_back({"missing-dtype", file_of("{\"w\":{\"shape\":[3],\"data_offsets\":[0,12]}}", d12),
               "w", "tensor \"w\": no \"dtype\" field"});
  h.push_back({"missing-shape", file_of("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,12]}}", d12),
               "w", "tensor \"w\": no \"shape\" field"});
  h.push_back({"missing-data-offsets", file_of("{\"w\":{\"dtype\":\"F32\",\"shape\":[3]}}", d12),
               "w", "tensor \"w\": no \"data_offsets\" field"});
  h.push_back({"dtype-integer", file_of("{" + entry("w", "4", "[3]", "[0,12]") + "}", d12), "w",
               "tensor \"w\": dtype is an integer, not a string"});
  h.push_back({"unknown-dtype", file_of("{" + entry("w", "\"F128\"", "[3]", "[0,12]") + "}", d12),
               "w", "tensor \"w\": unknown dtype \"F128\""});
  // Shapes.
  h.push_back({"shape-integer", file_of("{" + entry("w", "\"F32\"", "3", "[0,12]") + "}", d12), "w",
               "tensor \"w\": shape is an integer, not an array"});
  h.push_back({"negative-extent", file_of("{" + entry("w", "\"F32\"", "[-3]", "[0,12]") + "}", d12),
               "w", "tensor \"w\": shape[0] = -3 is not a non-negative integer"});
  h.push_back({"float-extent", file_of("{" + entry("w", "\"F32\"", "[3.0]", "[0,12]") + "}", d12),
               "w", "tensor \"w\": shape[0] = 3.0 is not a non-negative integer"});
  h.push_back({"string-extent",
               file_of("{" + entry("w", "\"F32\"", "[\"3\"]", "[0,12]") + "}", d12), "w",
               "tensor \"w\": shape[0] = \"3\" is not a non-negative integer"});
  h.push_back({"bool-extent", file_of("{" + entry("w", "\"F32\"", "[true]", "[0,4]") + "}", d12),
               "w", "tensor \"w\": shape[0] = true is not a non-negative integer"});
  h.push_back({"extent-over-int64",
               file_of("{" + entry("w", "\"F32\"", "[9223372036854775808]", "[0,0]") + "}"), "w",
               "tensor \"w\": shape[0] = 9223372036854775808 exceeds 2^63 - 1"});
  h.push_back({"extent-over-uint64",
               file_of("{" + entry("w", "\"F32\"", "[18446744073709551616]", "[0,0]") + "}"), "w",
               "tensor \"w\": shape[0] = 1.8446744073709552e+19 is not a non-negative integer"});
  // The file: 2^32 x 2^32 elements wrapped to 0 and passed the size check.
  h.push_back({"shape-overflow",
               file_of("{" + entry("w", "\"F32\"", "[4294967296,4294967296]", "[0,0]") + "}"), "w",
               "tensor \"w\": F32 shape [4294967296, 4294967296] overflows: its byte count at 4 "
               "bytes per element exceeds 2^63 - 1 = " +
                   big});
  h.push_back({"shape-overflow-behind-zero",
               file_of("{" + entry("w", "\"F32\"", "[0,4294967296,4294967296]", "[0,0]") + "}"),
               "w",
               "tensor \"w\": F32 shape [0, 4294967296, 4294967296] overflows: its byte count at "
               "4 bytes per element exceeds 2^63 - 1 = " +
                   big});
  h.push_back({"byte-count-overflow",
               file_of("{" + entry("w", "\"F64\"", "[1152921504606846976]", "[0,0]") + "}"), "w",
               "tensor \"w\": F64 shape [1152921504606846976] overflows: its byte count at 8 "
               "bytes per element exceeds 2^63 - 1 = " +
                   big});
  h.push_back({"byte-count-overflow-f16",
               file_of("{" + entry("w", "\"F16\"", "[4611686018427387904]", "[0,0]") + "}"), "w",
               "tensor \"w\": F16 shape [4611686018427387904] overflows: its byte count at 2 "
               "bytes per element exceeds 2^63 - 1 = " +
                   big});
  // Offsets.
  h.push_back({"offsets-single", file_of("{" + entry("w", "\"F32\"", "[3]", "[0]") + "}", d12), "w",
               "tensor \"w\": data_offsets = [0] is not [begin, end]"});
  h.push_back({"offsets-integer", file_of("{" + entry("w", "\"F32\"", "[3]", "12") + "}", d12), "w",
               "tensor \"w\": data_offsets = 12 is not [begin, end]"});
  h.push_back({"negative-offset", file_of("{" + entry("w", "\"F32\"", "[3]", "[-1,11]") + "}", d12),
               "w", "tensor \"w\": data_offsets[0] = -1 is not a non-negative integer"});
  h.push_back({"float-offset", file_of("{" + entry("w", "\"F32\"", "[3]", "[0,12.0]") + "}", d12),
               "w", "tensor \"w\": data_offsets[1] = 12.0 is not a non-negative integer"});
  h.push_back(
      {"offset-over-uint64",
       file_of("{" + entry("w", "\"F32\"", "[3]", "[0,18446744073709551616]") + "}", d12), "w",
       "tensor \"w\": data_offsets[1] = 1.8446744073709552e+19 is not a non-negative integer"});
  h.push_back({"offsets-reversed", file_of("{" + entry("w", "\"F32\"", "[3]", "[12,0]") + "}", d12),
               "w", "tensor \"w\": data_offsets [12, 0] end before they begin"});
  h.push_back({"offset-past-data",
               file_of("{" + entry("w", "\"F32\"", "[3]", "[0,18446744073709551615]") + "}", d12),
               "w",
               "tensor \"w\": data_offsets [0, 18446744073709551615] run past the data section "
               "of 12 bytes"});
  h.push_back({"span-mismatch",
               file_of("{" + entry("w", "\"F32\"", "[3]", "[0,8]") + "}", Bytes(8, 0)), "w",
               "tensor \"w\": data_offsets [0, 8] span 8 bytes, but F32 of shape [3] needs 12"});
  // 16-bit floats: 2 bytes per element.
  h.push_back({"span-mismatch-bf16",
               file_of("{" + entry("w", "\"BF16\"", "[3]", "[0,12]") + "}", d12), "w",
               "tensor \"w\": data_offsets [0, 12] span 12 bytes, but BF16 of shape [3] needs 6"});
  h.push_back({"span-mismatch-f16",
               file_of("{" + entry("w", "\"F16\"", "[2,3]", "[0,6]") + "}", Bytes(6, 0)), "w",
               "tensor \"w\": data_offsets [0, 6] span 6 bytes, but F16 of shape [2, 3] needs 12"});
  // Tiling of the data section.
  h.push_back({"overlap",
               file_of("{" + entry("a", "\"F32\"", "[3]", "[0,12]") + "," +
                           entry("b", "\"F32\"", "[3]", "[8,20]") + "}",
                       Bytes(20, 0)),
               "b", "tensor \"b\": data_offsets [8, 20] overlap tensor \"a\" at [0, 12]"});
  h.push_back({"aliased",
               file_of("{" + entry("a", "\"F32\"", "[3]", "[0,12]") + "," +
                           entry("b", "\"F32\"", "[3]", "[0,12]") + "}",
                       d12),
               "b", "tensor \"b\": data_offsets [0, 12] overlap tensor \"a\" at [0, 12]"});
  h.push_back({"gap",
               file_of("{" + entry("a", "\"F32\"", "[3]", "[0,12]") + "," +
                           entry("b", "\"F32\"", "[3]", "[16,28]") + "}",
                       Bytes(28, 0)),
               "b",
               "tensor \"b\": data_offsets [16, 28] leave a gap of 4 bytes after tensor \"a\""});
  h.push_back({"gap-at-start",
               file_of("{" + entry("a", "\"F32\"", "[3]", "[4,16]") + "}", Bytes(16, 0)), "a",
               "tensor \"a\": data_offsets [4, 16] leave a gap of 4 bytes after the header"});
  h.push_back({"trailing-bytes",
               file_of("{" + entry("a", "\"F32\"", "[3]", "[0,12]") + "}", Bytes(16, 0)), "a",
               "the data section has 4 trailing bytes after tensor \"a\" ends at 12"});
  h.push_back({"data-without-tensors", file_of("{}", Bytes(4, 0)), "",
               "the data section has 4 trailing bytes after an empty header"});
  // Keys are quoted, escaped and cut in messages.
  h.push_back({"long-key",
               file_of("{" + entry(std::string(300, 'k'), "\"F128\"", "[3]", "[0,12]") + "}", d12),
               std::string(300, 'k'), "unknown dtype \"F128\""});
  h.push_back({"control-key", file_of("{" + entry("a\\nb", "\"F128\"", "[3]", "[0,12]") + "}", d12),
               "a\nb", "tensor \"a\\x0ab\": unknown dtype \"F128\""});
  return h;
}

normkit::StateDict sd_of(std::initializer_list<std::pair<std::string, normkit::StateTensor>> l) {
  return normkit::StateDict(l);
}

normkit::StateTensor raw_tensor(std::string dtype, std::vector<std::int64_t> shape, Bytes bytes) {
  normkit::StateTensor t;
  t.dtype = std::move(dtype);
  t.shape = std::move(shape);
  t.bytes = std::move(bytes);
  return t;
}

// Distinct, non-default values everywhere, so that a partial load would show.
template <class M>
M& perturbed(M& m) {
  normkit_fuzz::perturb(m);
  return m;
}

// Valid files: what normkit, the libtorch fixture tool and hand-written edge cases produce. All
// of them load into the modules the fuzzer's invariants infer from them.
std::vector<std::pair<std::string, Bytes>> valid_files() {
  std::vector<std::pair<std::string, Bytes>> v;
  {
    std::ifstream in(std::string(NORMKIT_FIXTURE_DIR) + "/bn2d_state.safetensors",
                     std::ios::binary);
    v.emplace_back("libtorch-bn2d",
                   Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  }
  auto add = [&v](const std::string& name, const normkit::StateDict& sd,
                  const std::map<std::string, std::string>& meta = {}) {
    v.emplace_back(name, normkit::serialize_safetensors(sd, meta));
  };
  {
    normkit::BatchNorm1d<float> m(4);
    add("bn1d-float", normkit::state_dict(perturbed(m), "bn."), {{"format", "pt"}});
  }
  {
    normkit::BatchNorm2d<double> m(3);
    add("bn2d-double", normkit::state_dict(perturbed(m), "layer1.0.bn1."));
  }
  {
    normkit::BatchNorm3d<float> m(normkit::BatchNormOptions(2).affine(false));
    add("bn3d-noaffine", normkit::state_dict(perturbed(m)));
  }
  {
    normkit::InstanceNorm1d<float> m(
        normkit::InstanceNormOptions(3).affine(true).track_running_stats(true));
    add("in1d-affine-track", normkit::state_dict(perturbed(m), "in."));
  }
  {
    normkit::InstanceNorm2d<double> m(normkit::InstanceNormOptions(2).affine(true));
    add("in2d-affine", normkit::state_dict(perturbed(m)));
  }
  {
    normkit::LayerNorm<float> m(normkit::LayerNormOptions({2, 3}));
    add("ln-2x3", normkit::state_dict(perturbed(m), "ln."));
  }
  {
    normkit::LayerNorm<double> m(normkit::LayerNormOptions({5}).bias(false));
    add("ln-nobias-double", normkit::state_dict(perturbed(m)));
  }
  {
    normkit::GroupNorm<float> m(normkit::GroupNormOptions(2, 4));
    add("gn-float", normkit::state_dict(perturbed(m), "gn."));
  }
  {
    normkit::BatchNorm2d<float> a(2), b(3);
    normkit::StateDict sd = normkit::state_dict(perturbed(a), "bn1.");
    const normkit::StateDict sb = normkit::state_dict(perturbed(b), "bn2.");
    sd.insert(sd.end(), sb.begin(), sb.end());
    add("two-prefixes", sd);
  }
  add("empty", {});
  add("metadata-only", {}, {{"format", "pt"}, {"note", "no tensors"}});
  {
    // PyTorch loads non-finite and negative statistics as they are; so does normkit.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    add("nonfinite-values",
        sd_of({{"weight", normkit::make_state_tensor(std::vector<float>{nan, inf, -inf}, {3})},
               {"bias", normkit::make_state_tensor(std::vector<float>{-0.0f, 1e-45f, 3e38f}, {3})},
               {"running_mean", normkit::make_state_tensor(std::vector<float>{nan, 0, 1}, {3})},
               {"running_var", normkit::make_state_tensor(std::vector<float>{-1, nan, inf}, {3})},
               {"num_batches_tracked",
                normkit::make_state_tensor(std::vector<std::int64_t>{-5}, {})}}));
  }
  {
    // F64 into float modules (cast as torch's copy_), I32 counter, LayerNorm's flat weight.
    add("mixed-dtypes",
        sd_of(
            {{"weight", normkit::make_state_tensor(std::vector<double>{1e300, -1e-300, 0.1}, {3})},
             {"bias", normkit::make_state_tensor(std::vector<float>{1, 2, 3}, {3})},
             {"running_mean", normkit::make_state_tensor(std::vector<double>{1, 2, 3}, {3})},
             {"running_var", normkit::make_state_tensor(std::vector<float>{1, 2, 3}, {3})},
             {"num_batches_tracked", raw_tensor("I32", {}, {7, 0, 0, 0})}}));
  }
  {
    // BF16 and F16 entries (load exactly into float and double modules): subnormals,
    // infinities, a signaling NaN and a NaN with a payload.
    auto raw16 = [](const std::string& dtype, const std::vector<std::uint16_t>& p) {
      Bytes b;
      for (std::uint16_t u : p) {
        b.push_back(static_cast<unsigned char>(u & 0xffu));
        b.push_back(static_cast<unsigned char>(u >> 8));
      }
      return raw_tensor(dtype, {static_cast<std::int64_t>(p.size())}, b);
    };
    add("bf16-f16-dtypes", sd_of({{"bn.weight", raw16("BF16", {0x3f81, 0x0001, 0xff80})},
                                  {"bn.bias", raw16("F16", {0x3c01, 0x03ff, 0x7c00})},
                                  {"bn.running_mean", raw16("BF16", {0x7f81, 0x8000, 0x7f7f})},
                                  {"bn.running_var", raw16("F16", {0xfe01, 0x0001, 0x7bff})},
                                  {"bn.num_batches_tracked",
                                   normkit::make_state_tensor(std::vector<std::int64_t>{4}, {})}}));
  }
  {
    // What modules over Eigen::bfloat16 and Eigen::half save.
    normkit::BatchNorm2d<Eigen::bfloat16> bn(3);
    add("bn2d-bfloat16", normkit::state_dict(perturbed(bn), "bn."));
    normkit::LayerNorm<Eigen::half> ln(normkit::LayerNormOptions({2, 3}));
    add("ln-half", normkit::state_dict(perturbed(ln)));
  }
  {
    // Empty tensors: a large extent next to a zero one, several at one offset.
    add("empty-tensors", sd_of({{"a", raw_tensor("F32", {0, 4294967296}, {})},
                                {"b", raw_tensor("F64", {0}, {})},
                                {"c", normkit::make_state_tensor(std::vector<float>{1}, {1})},
                                {"d", raw_tensor("I64", {3, 0}, {})}}));
  }
  // Hand-written: extra fields ignored, "-0" read as 0, header padded with spaces.
  v.emplace_back("extra-fields",
                 file_of("{\"w\":{\"dtype\":\"F32\",\"shape\":[-0],\"data_offsets\":[-0,0],"
                         "\"note\":{\"x\":[1,2]}}}     "));
  return v;
}

// ---- parse_safetensors ----

TEST(SafetensorsHostile, EveryRejectedCaseIsATaggedValueErrorNamingTheTensor) {
  for (const Hostile& h : hostile_files()) {
    SCOPED_TRACE("case " + h.seed);
    std::map<std::string, std::string> meta{{"kept", "yes"}};
    try {
      normkit::parse_safetensors(h.file, &meta);
      ADD_FAILURE() << "accepted";
    } catch (const normkit::value_error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.compare(0, kRead.size(), kRead), 0) << msg;
      EXPECT_NE(msg.find(h.message), std::string::npos) << msg << "\nexpected: " << h.message;
      if (!h.key.empty()) {
        EXPECT_NE(msg.find(normkit::detail::quote(h.key)), std::string::npos) << msg;
      }
      EXPECT_LT(msg.size(), 400u) << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a value_error: " << e.what();
    }
    EXPECT_EQ(meta, (std::map<std::string, std::string>{{"kept", "yes"}}));
  }
}

// The example, spelled out: numel() used to wrap 2^64 to 0 (UBSan: signed overflow).
TEST(SafetensorsHostile, ShapeProductOverflowIsRejectedNotWrapped) {
  const Bytes f = file_of(
      "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}");
  EXPECT_THROW(normkit::parse_safetensors(f), normkit::value_error);
  const normkit::StateTensor t = raw_tensor("F32", {4294967296, 4294967296}, {});
  try {
    (void)t.numel();
    ADD_FAILURE() << "numel() returned";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.StateTensor] numel(): shape [4294967296, 4294967296] overflows: its "
              "element count exceeds 2^63 - 1 = 9223372036854775807");
  }
  EXPECT_THROW((void)raw_tensor("F32", {2, -1}, {}).numel(), normkit::value_error);
  EXPECT_THROW((void)raw_tensor("F32", {0, 1LL << 40, 1LL << 40}, {}).numel(),
               normkit::value_error);
  EXPECT_EQ(raw_tensor("F32", {0, 1LL << 40}, {}).numel(), 0);
  EXPECT_EQ(raw_tensor("F32", {}, {}).numel(), 1);
  EXPECT_EQ(raw_tensor("F32", {3037000499, 3037000499}, {}).numel(), 9223372030926249001);
}

TEST(SafetensorsHostile, AMegabyteOfBracketsIsRejectedWithoutRecursion) {
  std::string objects;
  while (objects.size() < (1u << 20)) objects += "{\"a\":";
  for (const std::string& header : {std::string(1 << 20, '['), objects}) {
    const Bytes f = file_of(header);
    try {
      normkit::parse_safetensors(f);
      ADD_FAILURE() << "accepted";
    } catch (const normkit::value_error& e) {
      EXPECT_NE(std::string(e.what()).find("nests deeper than 16 levels"), std::string::npos)
          << e.what();
    }
  }
  // Balanced and deep: also rejected before anything deep is built.
  EXPECT_THROW(
      normkit::parse_safetensors(file_of(std::string(1 << 19, '[') + std::string(1 << 19, ']'))),
      normkit::value_error);
  // 16 levels are fine as JSON (an ignored field); 17 are not.
  const auto nested = [](int levels) {
    return file_of("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0],\"x\":" +
                   std::string(static_cast<std::size_t>(levels - 2), '[') +
                   std::string(static_cast<std::size_t>(levels - 2), ']') + "}}");
  };
  EXPECT_NO_THROW(normkit::parse_safetensors(nested(16)));
  EXPECT_THROW(normkit::parse_safetensors(nested(17)), normkit::value_error);
}

TEST(SafetensorsHostile, HeaderOverTheReferenceLimitIsRejected) {
  const std::uint64_t n = 100000001;
  Bytes f(8 + n, ' ');
  normkit::detail::store_le(n, f.data());
  f[8] = '{';
  f[9] = '}';
  try {
    normkit::parse_safetensors(f);
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              kRead + "header length 100000001 exceeds the limit of 100000000 bytes");
  }
}

TEST(SafetensorsHostile, WhatPyTorchWritesStillParses) {
  for (const auto& [name, file] : valid_files()) {
    SCOPED_TRACE(name);
    std::map<std::string, std::string> meta{{"stale", "entry"}};
    EXPECT_NO_THROW(normkit::parse_safetensors(file, &meta));
    EXPECT_EQ(meta.count("stale"), 0u);
  }
  const normkit::StateDict sd = normkit::parse_safetensors(valid_files().back().second);
  ASSERT_EQ(sd.size(), 1u);
  EXPECT_EQ(sd[0].second.shape, (std::vector<std::int64_t>{0}));
}

// ---- load_state_dict / load_safetensors: all or nothing ----

std::string temp_file(const std::string& name, const Bytes& bytes) {
  const std::string path = ::testing::TempDir() + "normkit_hostile_" + name + ".safetensors";
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST(SafetensorsHostile, FailedFileLoadLeavesTheModuleBitIdentical) {
  normkit::BatchNorm2d<float> bn(3);
  perturbed(bn);
  const normkit_test::State before = normkit_test::snapshot(bn);
  for (const Hostile& h : hostile_files()) {
    SCOPED_TRACE("case " + h.seed);
    const std::string path = temp_file(h.seed, h.file);
    EXPECT_THROW(normkit::load_safetensors(bn, path, ""), normkit::value_error);
    std::remove(path.c_str());
    EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));
  }
}

// A file that parses, whose last entry (in load order) is wrong: nothing before it is applied.
TEST(SafetensorsHostile, LateFailureInALoadAppliesNothing) {
  normkit::BatchNorm2d<float> src(3);
  const normkit::StateDict good = normkit::state_dict(perturbed(src), "bn.");
  normkit::BatchNorm2d<float> bn(3);
  bn.set_num_batches_tracked(77);
  const normkit_test::State before = normkit_test::snapshot(bn);

  normkit::StateDict bad_dtype = good;
  bad_dtype.back().second = normkit::make_state_tensor(std::vector<float>{1}, {});
  const std::string path = temp_file("late_dtype", normkit::serialize_safetensors(bad_dtype));
  try {
    normkit::load_safetensors(bn, path, "bn.");
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.load_state_dict] BatchNorm2d: unsupported dtype \"F32\" for "
              "bn.num_batches_tracked (expected I64 or I32)");
  }
  std::remove(path.c_str());
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));

  normkit::StateDict bad_shape = good;
  bad_shape[3].second = normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4}, {4});
  EXPECT_THROW(normkit::load_state_dict(bn, bad_shape, "bn."), normkit::shape_error);
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));

  normkit::StateDict short_bytes = good;
  short_bytes[3].second.bytes.pop_back();
  try {
    normkit::load_state_dict(bn, short_bytes, "bn.");
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.load_state_dict] BatchNorm2d: bn.running_var: 11 bytes, but F32 of shape "
              "[3] needs 12");
  }
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));

  normkit::load_state_dict(bn, good, "bn.");  // and the good dict loads
  EXPECT_EQ(bn.num_batches_tracked(), 12345);
}

TEST(SafetensorsHostile, DuplicateKeysAreRejected) {
  normkit::GroupNorm<double> gn(normkit::GroupNormOptions(1, 2));
  perturbed(gn);
  const normkit_test::State before = normkit_test::snapshot(gn);
  const normkit::GroupNorm<double> fresh(normkit::GroupNormOptions(1, 2));
  normkit::StateDict sd = normkit::state_dict(fresh, "gn.");
  const auto first = sd[0];
  sd.push_back(first);
  try {
    normkit::load_state_dict(gn, sd, "gn.");
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.load_state_dict] GroupNorm: duplicate key \"gn.weight\" in the state dict");
  }
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(gn)));
  // Keys under other prefixes are not ours to judge.
  normkit::StateDict other = normkit::state_dict(fresh, "x.");
  other.push_back(other.front());
  sd.pop_back();
  sd.insert(sd.end(), other.begin(), other.end());
  EXPECT_NO_THROW(normkit::load_state_dict(gn, sd, "gn."));
  // The writer refuses them too.
  sd.push_back(first);
  EXPECT_THROW(normkit::serialize_safetensors(sd), normkit::value_error);
}

TEST(SafetensorsHostile, NonFiniteAndNegativeStatisticsLoadAsInPyTorch) {
  const Bytes file = [] {
    for (auto& [name, f] : valid_files())
      if (name == "nonfinite-values")
        return f;
    return Bytes();
  }();
  normkit::BatchNorm1d<float> bn(3);
  normkit::load_state_dict(bn, normkit::parse_safetensors(file));
  EXPECT_TRUE(std::isnan(bn.weight()(0)));
  EXPECT_TRUE(std::isinf(bn.weight()(1)));
  EXPECT_EQ(bn.running_var()(0), -1.0f);
  EXPECT_TRUE(std::isnan(bn.running_var()(1)));
  EXPECT_TRUE(std::signbit(bn.bias()(0)));
  EXPECT_EQ(bn.num_batches_tracked(), -5);
}

TEST(SafetensorsHostile, OtherEntryPointsCheckShapesToo) {
  // to_vector and the writer used numel() unchecked: an overflowing shape with no bytes passed.
  const normkit::StateTensor t = raw_tensor("F32", {4294967296, 4294967296}, {});
  EXPECT_THROW(normkit::to_vector<float>(t), normkit::value_error);
  try {
    normkit::serialize_safetensors(sd_of({{"w", t}}));
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.write_safetensors] tensor \"w\": shape [4294967296, 4294967296] "
              "overflows: its byte count at 4 bytes per element exceeds 2^63 - 1 = "
              "9223372036854775807");
  }
  EXPECT_THROW(normkit::serialize_safetensors(sd_of({{"w", raw_tensor("F32", {-1}, {})}})),
               normkit::value_error);
  EXPECT_THROW(normkit::serialize_safetensors(sd_of({{"w\xff", raw_tensor("F32", {0}, {})}})),
               normkit::value_error);
  EXPECT_THROW(normkit::serialize_safetensors(sd_of({{"w", raw_tensor("X9", {0}, {})}})),
               normkit::value_error);
  EXPECT_THROW(normkit::make_state_tensor(std::vector<float>{1, 2}, {3}), normkit::value_error);
  EXPECT_THROW(normkit::make_state_tensor(std::vector<float>{}, {-1}), normkit::value_error);
  // Error messages list at most 32 unexpected keys.
  normkit::StateDict many;
  for (int i = 0; i < 40; ++i)
    many.emplace_back("k" + std::to_string(i),
                      normkit::make_state_tensor(std::vector<float>{}, {0}));
  normkit::InstanceNorm2d<float> in(3);
  try {
    normkit::load_state_dict(in, many);
    ADD_FAILURE() << "accepted";
  } catch (const normkit::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("\"k31\" and 8 more."), std::string::npos) << e.what();
  }
}

// ---- the fuzzer's corpus ----

#ifndef NORMKIT_SAFETENSORS_CORPUS_DIR
#error "NORMKIT_SAFETENSORS_CORPUS_DIR must name tests/fuzz/corpus_safetensors"
#endif

Bytes read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Every seed and past finding through the fuzzer's invariants, with every compiler.
TEST(SafetensorsCorpus, EverySeedKeepsTheFuzzInvariants) {
  int files = 0, rejected = 0;
  for (const auto& de : std::filesystem::directory_iterator(NORMKIT_SAFETENSORS_CORPUS_DIR)) {
    const std::string name = de.path().filename().string();
    SCOPED_TRACE(name);
    const normkit_fuzz::FileCheck r = normkit_fuzz::check_safetensors_file(read_file(de.path()));
    EXPECT_EQ(r.failure, "");
    if (name.rfind("reject-", 0) == 0) {
      EXPECT_FALSE(r.parsed);
    }
    if (name.rfind("valid-", 0) == 0) {
      EXPECT_TRUE(r.parsed);
      // Module dicts load somewhere; the two odd ones hold no module's keys.
      if (name != "valid-empty-tensors" && name != "valid-extra-fields") {
        EXPECT_GT(r.loads_accepted, 0);
      }
    }
    ++files;
    rejected += r.parsed ? 0 : 1;
  }
  EXPECT_GE(files, static_cast<int>(hostile_files().size() + valid_files().size()));
  EXPECT_GE(rejected, static_cast<int>(hostile_files().size()));
}

// The generated seeds are committed; this checks they are up to date (and rewrites them when
// NORMKIT_WRITE_SAFETENSORS_CORPUS names a directory).
TEST(SafetensorsCorpus, WriteSeeds) {
  const char* out = std::getenv("NORMKIT_WRITE_SAFETENSORS_CORPUS");
  std::vector<std::pair<std::string, Bytes>> seeds;
  for (const Hostile& h : hostile_files()) seeds.emplace_back("reject-" + h.seed, h.file);
  for (auto& [name, f] : valid_files()) seeds.emplace_back("valid-" + name, f);
  for (const auto& [name, bytes] : seeds) {
    SCOPED_TRACE(name);
    if (out) {
      std::ofstream o(std::filesystem::path(out) / name, std::ios::binary | std::ios::trunc);
      o.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
      ASSERT_TRUE(o.good());
    } else {
      EXPECT_EQ(read_file(std::filesystem::path(NORMKIT_SAFETENSORS_CORPUS_DIR) / name), bytes)
          << "stale seed: rewrite the corpus (see the top of this file)";
    }
  }
}

}  // namespace
