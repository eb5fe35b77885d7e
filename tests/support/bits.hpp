// normkit tests — bitwise comparison of two tensors (or anything with size() and data()).
#ifndef NORMKIT_TESTS_BITS_HPP_
#define NORMKIT_TESTS_BITS_HPP_

#include <cstddef>
#include <cstring>

namespace normkit_test {

/// True when a and b have the same number of elements of the same size and the same bytes.
/// An empty tensor may have a null data(): memcmp is not called then (passing it a null
/// pointer is undefined even for zero bytes, and GCC uses that to drop later null checks).
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.size() != b.size() || sizeof(*a.data()) != sizeof(*b.data()))
    return false;
  const std::size_t bytes = sizeof(*a.data()) * static_cast<std::size_t>(a.size());
  return bytes == 0 || std::memcmp(a.data(), b.data(), bytes) == 0;
}

}  // namespace normkit_test

#endif  // NORMKIT_TESTS_BITS_HPP_
