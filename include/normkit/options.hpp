// normkit/options.hpp: the modules' options (PyTorch's constructor arguments and defaults),
// validated at construction.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_OPTIONS_HPP_
#define NORMKIT_OPTIONS_HPP_

#include <cmath>             // std::isfinite
#include <cstdint>           // std::int64_t
#include <initializer_list>  // std::initializer_list
#include <optional>          // std::optional
#include <string>            // std::string
#include <utility>           // std::move
#include <vector>            // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/fail.hpp>
#include <normkit/error.hpp>

/// Declares an option in the style of libtorch's TORCH_ARG: `opts.name(value)` sets and
/// returns *this, `opts.name()` reads.
#define NORMKIT_ARG(T, name)           \
 public:                               \
  auto& name(const T& new_##name)& {   \
    name##_ = new_##name;              \
    return *this;                      \
  }                                    \
  auto&& name(const T& new_##name)&& { \
    name##_ = new_##name;              \
    return std::move(*this);           \
  }                                    \
  const T& name() const noexcept {     \
    return name##_;                    \
  }                                    \
                                       \
 private:                              \
  T name##_

NORMKIT_BEGIN_NAMESPACE

/// The activation of a fused forward (forward_fused): y = act(norm(x) + residual), as
/// torch.nn.ReLU, SiLU, GELU() and GELU(approximate="tanh").
enum class Activation {
  identity,   ///< y = z
  relu,       ///< y = max(z, 0) (NaN stays NaN)
  silu,       ///< y = z * sigmoid(z)
  gelu,       ///< y = z * Phi(z) = z/2 * (1 + erf(z / sqrt(2)))
  gelu_tanh,  ///< y = z/2 * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3)))
};

/// Options of BatchNorm1d/2d/3d (PyTorch defaults). `momentum(std::nullopt)` selects the
/// cumulative moving average (factor 1/num_batches_tracked). `channels_last(true)` means the
/// input's dims are (N, spatial..., C) instead of (N, C, spatial...): NHWC storage without a
/// transpose.
class BatchNormOptions {
 public:
  /// num_features channels; every other option at PyTorch's default.
  /* implicit */ BatchNormOptions(Index num_features) : num_features_(num_features) {}  // NOLINT
  /// C, the number of input channels (no default); must be >= 0.
  NORMKIT_ARG(Index, num_features);
  /// Added to the variance inside the square root (default 1e-5); must be finite and >= 0.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Running-statistics update factor f in [0, 1]: running = (1 - f) * running + f * batch (default
  /// 0.1); std::nullopt selects the cumulative moving average, f = 1/num_batches_tracked.
  NORMKIT_ARG(std::optional<double>, momentum) = 0.1;
  /// Learnable per-channel weight (init 1) and bias (init 0) (default true).
  NORMKIT_ARG(bool, affine) = true;
  /// Keep running_mean, running_var and num_batches_tracked, updated in training and used in
  /// evaluation (default true); when false, batch statistics are used in both modes.
  NORMKIT_ARG(bool, track_running_stats) = true;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...) (default false; a normkit
  /// addition, NHWC storage without a transpose).
  NORMKIT_ARG(bool, channels_last) = false;
};

/// Options of InstanceNorm1d/2d/3d (PyTorch defaults: no affine, no running statistics).
class InstanceNormOptions {
 public:
  /// num_features channels; every other option at PyTorch's default.
  /* implicit */ InstanceNormOptions(Index num_features) : num_features_(num_features) {}  // NOLINT
  /// C, the number of input channels (no default); must be >= 0.
  NORMKIT_ARG(Index, num_features);
  /// Added to the variance inside the square root (default 1e-5); must be finite and >= 0.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Running-statistics update factor f in [0, 1] (default 0.1); std::nullopt (cumulative average)
  /// is rejected with value_error, as PyTorch's instance_norm does not support it.
  NORMKIT_ARG(std::optional<double>, momentum) = 0.1;
  /// Learnable per-channel weight (init 1) and bias (init 0) (default false).
  NORMKIT_ARG(bool, affine) = false;
  /// Keep running_mean and running_var (default false): training updates them with the batch
  /// average of the per-instance mean and unbiased variance, evaluation normalizes with them.
  NORMKIT_ARG(bool, track_running_stats) = false;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...) (default false; a normkit
  /// addition, NHWC storage without a transpose).
  NORMKIT_ARG(bool, channels_last) = false;
};

/// Options of LayerNorm: statistics over the trailing dims equal to normalized_shape.
class LayerNormOptions {
 public:
  /// Normalizes over the trailing dims equal to normalized_shape; other options at PyTorch's
  /// defaults.
  /* implicit */ LayerNormOptions(std::vector<Index> normalized_shape)  // NOLINT
      : normalized_shape_(std::move(normalized_shape)) {}
  /// Normalizes over the trailing dims equal to normalized_shape, e.g. LayerNormOptions({768}).
  /* implicit */ LayerNormOptions(std::initializer_list<Index> normalized_shape)  // NOLINT
      : normalized_shape_(normalized_shape) {}
  /// Trailing input dims normalized over (no default); non-empty, extents >= 0.
  NORMKIT_ARG(std::vector<Index>, normalized_shape);
  /// Added to the variance inside the square root (default 1e-5); must be finite and >= 0.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Learnable elementwise weight (init 1) and bias (init 0), flat prod(normalized_shape) values,
  /// row-major over normalized_shape (default true).
  NORMKIT_ARG(bool, elementwise_affine) = true;
  /// With elementwise_affine, also learn the bias (default true); false keeps only weight, as
  /// PyTorch 2.1's bias=False.
  NORMKIT_ARG(bool, bias) = true;
};

/// Options of RMSNorm (torch.nn.RMSNorm, PyTorch >= 2.4): y = x / sqrt(mean(x^2) + eps) *
/// weight over the trailing dims equal to normalized_shape.
class RMSNormOptions {
 public:
  /// Normalizes over the trailing dims equal to normalized_shape; other options at PyTorch's
  /// defaults.
  /* implicit */ RMSNormOptions(std::vector<Index> normalized_shape)  // NOLINT
      : normalized_shape_(std::move(normalized_shape)) {}
  /// Normalizes over the trailing dims equal to normalized_shape, e.g. RMSNormOptions({4096}).
  /* implicit */ RMSNormOptions(std::initializer_list<Index> normalized_shape)  // NOLINT
      : normalized_shape_(normalized_shape) {}
  /// Trailing input dims normalized over (no default); non-empty, extents >= 0.
  NORMKIT_ARG(std::vector<Index>, normalized_shape);
  /// Added to the mean of squares inside the square root; std::nullopt (the default) means the
  /// machine epsilon of the computation type, as PyTorch: float's (1.1920929e-07) for float,
  /// half and bfloat16 input, double's (2.220446e-16) for double. When set: finite and >= 0.
  NORMKIT_ARG(std::optional<double>, eps);
  /// Learnable elementwise weight (init 1), flat prod(normalized_shape) values, row-major over
  /// normalized_shape (default true). RMSNorm has no bias.
  NORMKIT_ARG(bool, elementwise_affine) = true;
};

/// Options of GroupNorm: num_channels split into num_groups contiguous groups.
class GroupNormOptions {
 public:
  /// num_channels channels in num_groups groups; eps and affine at PyTorch's defaults.
  GroupNormOptions(Index num_groups, Index num_channels)
      : num_groups_(num_groups), num_channels_(num_channels) {}
  /// G, the number of contiguous channel groups (no default); > 0 and dividing num_channels.
  NORMKIT_ARG(Index, num_groups);
  /// C, the number of input channels (no default); must be >= 0.
  NORMKIT_ARG(Index, num_channels);
  /// Added to the variance inside the square root (default 1e-5); must be finite and >= 0.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Learnable per-channel weight (init 1) and bias (init 0) of num_channels elements (default
  /// true).
  NORMKIT_ARG(bool, affine) = true;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...) (default false; a normkit
  /// addition, NHWC storage without a transpose).
  NORMKIT_ARG(bool, channels_last) = false;
};

namespace detail {

// Options are validated at construction, with a clear exception (a deliberate difference:
// PyTorch fails later, at forward, or not at all; docs/semantics.md §11).
inline void check_eps(const char* who, double eps) {
  if (!(eps >= 0) || !std::isfinite(eps)) {
    fail(Fail::value, who, "expected eps to be finite and >= 0, but got eps = %g", eps);
  }
}
inline void check_momentum(const char* who, const std::optional<double>& m) {
  if (m && !(*m >= 0 && *m <= 1)) {
    fail(Fail::value, who, "expected momentum in [0, 1] or none, but got momentum = %g", *m);
  }
}
inline void check_features(const char* who, const char* name, Index n) {
  if (n < 0)
    fail(Fail::value, who, "expected %s >= 0, but got %lld", name, static_cast<long long>(n));
}

NORMKIT_NOINLINE inline void validate(const char* who, const BatchNormOptions& o) {
  check_features(who, "num_features", o.num_features());
  check_eps(who, o.eps());
  check_momentum(who, o.momentum());
}
NORMKIT_NOINLINE inline void validate(const char* who, const InstanceNormOptions& o) {
  check_features(who, "num_features", o.num_features());
  check_eps(who, o.eps());
  check_momentum(who, o.momentum());
  if (!o.momentum()) {
    fail(Fail::value, who,
         "momentum = none (cumulative average) is not supported by InstanceNorm; expected a "
         "number in [0, 1]");
  }
}
NORMKIT_NOINLINE inline void validate(const char* who, const LayerNormOptions& o) {
  if (o.normalized_shape().empty()) {
    fail(Fail::value, who,
         "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
         "element, but got normalized_shape = []");
  }
  for (Index d : o.normalized_shape()) {
    if (d < 0)
      fail(Fail::value, who, "expected normalized_shape extents >= 0, but got %lld",
           static_cast<long long>(d));
  }
  check_eps(who, o.eps());
}
NORMKIT_NOINLINE inline void validate(const char* who, const RMSNormOptions& o) {
  if (o.normalized_shape().empty()) {
    fail(Fail::value, who,
         "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
         "element, but got normalized_shape = []");
  }
  for (Index d : o.normalized_shape()) {
    if (d < 0)
      fail(Fail::value, who, "expected normalized_shape extents >= 0, but got %lld",
           static_cast<long long>(d));
  }
  if (o.eps())
    check_eps(who, *o.eps());
}
NORMKIT_NOINLINE inline void validate(const char* who, const GroupNormOptions& o) {
  if (o.num_groups() <= 0) {
    fail(Fail::value, who, "Expected num groups to be greater than 0, got %lld",
         static_cast<long long>(o.num_groups()));
  }
  check_features(who, "num_channels", o.num_channels());
  if (o.num_channels() % o.num_groups() != 0) {
    fail(Fail::value, who,
         "num_channels must be divisible by num_groups, but got num_channels = %lld and "
         "num_groups = %lld",
         static_cast<long long>(o.num_channels()), static_cast<long long>(o.num_groups()));
  }
  check_eps(who, o.eps());
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_OPTIONS_HPP_
