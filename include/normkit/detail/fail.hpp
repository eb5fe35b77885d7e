// normkit/detail/fail.hpp: how checks report bad input -- one out-of-line call that formats
// the message and throws shape_error or value_error.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_FAIL_HPP_
#define NORMKIT_DETAIL_FAIL_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cstdarg>  // va_list
#include <cstddef>  // std::size_t
#include <cstdio>   // std::snprintf, std::vsnprintf

#include <normkit/config.hpp>
#include <normkit/error.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: error paths. A check is a compare and, when it fails, one call to fail() with a format
// and plain numbers or Text pieces: no std::string code at every check (it was most of the
// size of the argument-checking code, and compile time follows size).
#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define NORMKIT_PRINTF(f, a)
#endif

/// A short message piece on the stack.
struct Text {
  char s[400];
};

/// "[d0, d1, ...]" of d[from, n).
NORMKIT_NOINLINE inline Text dims_text(const Index* d, int n, int from = 0) {
  Text t;
  std::size_t k = 0;
  t.s[k++] = '[';
  for (int i = from; i < n && k + 32 < sizeof t.s; ++i) {
    const int w = std::snprintf(t.s + k, sizeof t.s - k, "%s%lld", i > from ? ", " : "",
                                static_cast<long long>(d[i]));
    k += static_cast<std::size_t>(w > 0 ? w : 0);
  }
  t.s[k++] = ']';
  t.s[k] = 0;
  return t;
}
enum class Fail { shape, value };

/// Throws shape_error or value_error "[normkit.<who>] <printf(fmt, ...)>".
[[noreturn]] NORMKIT_NOINLINE NORMKIT_PRINTF(3, 4) inline void fail(Fail kind,
                                                                    const char* who,
                                                                    const char* fmt,
                                                                    ...) {
  char msg[1200];
  const int k = std::snprintf(msg, sizeof msg, "[normkit.%s] ", who);
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(msg + (k > 0 ? k : 0), sizeof msg - static_cast<std::size_t>(k > 0 ? k : 0), fmt,
                 args);
  va_end(args);
  if (kind == Fail::shape)
    throw shape_error(msg);
  throw value_error(msg);
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_FAIL_HPP_
