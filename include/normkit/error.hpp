// normkit/error.hpp: the exceptions normkit throws for bad input (all std::invalid_argument).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_ERROR_HPP_
#define NORMKIT_ERROR_HPP_

#include <stdexcept>  // std::invalid_argument
#include <string>     // std::string

namespace normkit {

/// Base of every exception normkit throws for bad input. Messages start with a stable
/// tag naming the module or function, e.g. "[normkit.BatchNorm2d] Expected more than 1 value
/// per channel when training, got input size [1, 3, 1, 1]". Outside the ABI namespace
/// (config.hpp), so that translation units built with different flags catch each other's.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A tensor of the wrong rank or shape, or a parameter/buffer of the wrong size.
class shape_error : public error {
 public:
  using error::error;
};

/// An invalid option or a value that makes the call ill-defined (e.g. one value per
/// channel in training, momentum outside [0, 1]).
class value_error : public error {
 public:
  using error::error;
};

}  // namespace normkit

#endif  // NORMKIT_ERROR_HPP_
