// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_INSTANCE_NORM_HPP_
#define NORMKIT_INSTANCE_NORM_HPP_

#include <cstdint>  // std::int64_t
#include <string>   // std::string

#include <normkit/config.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

namespace normkit {

/// Options of the functional instance_norm (torch.nn.functional.instance_norm).
template <class Scalar>
class InstanceNormFuncOptions {
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  NORMKIT_ARG(VectorRef<Scalar>, running_mean);
  NORMKIT_ARG(VectorRef<Scalar>, running_var);
  /// Per-instance statistics (and running update, when running statistics are given) when
  /// true; the running statistics when false.
  NORMKIT_ARG(bool, use_input_stats) = true;
  NORMKIT_ARG(double, momentum) = 0.1;
  NORMKIT_ARG(double, eps) = 1e-5;
  NORMKIT_ARG(bool, channels_last) = false;
};

namespace detail {
template <class T, template <class> class O>
ChannelNormArgs<T> instance_norm_args(const O<T>& o) {
  ChannelNormArgs<T> a;
  a.weight = o.weight();
  a.bias = o.bias();
  a.running_mean = o.running_mean();
  a.running_var = o.running_var();
  a.batch_stats = o.use_input_stats();
  a.update_running = o.use_input_stats() && (o.running_mean() || o.running_var());
  a.momentum = o.momentum();
  a.eps = o.eps();
  return a;
}
}  // namespace detail

/// Instance normalization (Ulyanov et al. 2016), as F.instance_norm on batched (N, C, *)
/// input: y = (x - mean_nc) / sqrt(var_nc + eps) * weight_c + bias_c with the mean and
/// biased variance of each (n, c) over the spatial axes. Given running statistics are
/// updated with the batch average of the per-instance mean and unbiased variance.
/// @throws shape_error, value_error (one spatial element with input statistics).
template <class X, class Y, class Device = Eigen::DefaultDevice>
void instance_norm(const X& x,
                   Y& y,
                   const InstanceNormFuncOptions<detail::scalar_of<X>>& options,
                   SavedStats* saved = nullptr,
                   const Device& device = Device()) {
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::instance_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "instance_norm");
  const auto a = detail::instance_norm_args(options);
  detail::channel_norm_check("instance_norm", detail::ChannelNormKind::instance, sh, a);
  auto* y_ptr = detail::prepare_output(x, y, "instance_norm");
  detail::channel_norm_forward(detail::ChannelNormKind::instance, sh, x.data(), y_ptr, a, saved,
                               device);
}

/// Allocating form of instance_norm.
template <class X>
auto instance_norm(const X& x, const InstanceNormFuncOptions<detail::scalar_of<X>>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  instance_norm(x, y, options);
  return y;
}

/// Gradients of instance_norm from its saved statistics (SEMANTICS.md §8); dweight and
/// dbias sum over the batch.
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void instance_norm_backward(const X& x,
                            const DY& dy,
                            DX& dx,
                            const SavedStats& saved,
                            VectorRef<const detail::scalar_of<X>> weight,
                            VectorRef<detail::scalar_of<X>> grad_weight,
                            VectorRef<detail::scalar_of<X>> grad_bias,
                            bool channels_last = false,
                            const Device& device = Device()) {
  const detail::Shape sh = detail::logical_shape(x, channels_last, "instance_norm_backward");
  detail::check_grad_args("instance_norm_backward", detail::ChannelNormKind::instance, sh, x, dy,
                          saved, weight, grad_weight, grad_bias);
  auto* dx_ptr = detail::prepare_output(x, dx, "instance_norm_backward", "grad_input");
  detail::channel_norm_backward(detail::ChannelNormKind::instance, sh, x.data(), dy.data(), dx_ptr,
                                saved, weight, grad_weight, grad_bias, device);
}

/// InstanceNorm over (N, C, *) or unbatched (C, *) input, as torch.nn.InstanceNorm1d/2d/3d:
/// `Dim` spatial dims; ranks Dim + 2 (batched) and Dim + 1 (unbatched: InstanceNorm1d on a
/// 2-D tensor treats it as (C, L), as PyTorch). No affine and no running statistics by
/// default; with track_running_stats, training updates per-channel running statistics and
/// evaluation uses them (num_batches_tracked exists but never moves, as in PyTorch).
/// @code
/// normkit::InstanceNorm2d<float> in(normkit::InstanceNormOptions(3).affine(true));
/// auto y = in.forward(x);  // x: (N, 3, H, W) or (3, H, W)
/// @endcode
template <class Scalar, int Dim>
class InstanceNorm : public detail::ModuleBase<Scalar> {
  static_assert(Dim >= 1 && Dim <= 3, "InstanceNorm: Dim is 1, 2 or 3");

 public:
  /// 1-D tensor type of the parameters and running statistics.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch (e.g. "InstanceNorm2d"), used in error messages.
  static constexpr const char* kName = Dim == 1   ? "InstanceNorm1d"
                                       : Dim == 2 ? "InstanceNorm2d"
                                                  : "InstanceNorm3d";

  /// @throws value_error for negative num_features or eps, momentum outside [0, 1] or none.
  explicit InstanceNorm(const InstanceNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }
  /// A module with PyTorch's defaults (no affine, no running statistics) for num_features channels.
  explicit InstanceNorm(Index num_features) : InstanceNorm(InstanceNormOptions(num_features)) {}

  /// The options the module was constructed with.
  const InstanceNormOptions& options() const { return options_; }

  template <class X, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Normalizes x with per-instance statistics, or with the running statistics in evaluation with
  /// track_running_stats; training with track_running_stats also updates them. Returns y; throws as
  /// the non-allocating forward.
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward into y (a Tensor is resized, a TensorMap must match).
  /// @throws shape_error for a wrong channel count; value_error for one spatial element
  ///         with instance statistics. The module is unchanged when it throws.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    const detail::Shape sh = shape(x);
    detail::check_channels(kName, "num_features", options_.num_features(), sh);
    const bool tracking = options_.track_running_stats();
    detail::ChannelNormArgs<Scalar> a;
    if (options_.affine()) {
      a.weight = weight_;
      a.bias = bias_;
    }
    if (tracking) {
      a.running_mean = running_mean_;
      a.running_var = running_var_;
    }
    a.batch_stats = this->training_ || !tracking;
    a.update_running = this->training_ && tracking;
    a.momentum = *options_.momentum();
    a.eps = options_.eps();
    detail::channel_norm_check(kName, detail::ChannelNormKind::instance, sh, a);
    auto* y_ptr = detail::prepare_output(x, y, kName);
    SavedStats saved;
    detail::channel_norm_forward(detail::ChannelNormKind::instance, sh, x.data(), y_ptr, a,
                                 this->requires_grad_ ? &saved : nullptr, device);
    // Inference (requires_grad() false) writes nothing to the module: concurrent eval
    // forwards are then pure reads (ThreadSanitizer-checked in threading_test).
    if (this->requires_grad_) {
      this->saved_ = std::move(saved);
      this->remember_input(x);
    }
  }

  template <class DY, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Gradients for the last forward, using its saved statistics and input copy.
  /// @throws value_error before any forward or when the input was not kept; shape_error when dy's
  ///         dims or storage order differ from the last input's.
  auto backward(const DY& dy, const Device& device = Device()) {
    auto x = this->saved_input(dy, kName);
    return backward(x, dy, device);
  }

  template <class X, class DY, class Device = Eigen::DefaultDevice, detail::if_tensor<DY> = 0>
  /// Gradients for the last forward with its input x given again (no copy needed).
  /// @throws value_error without a preceding forward with requires_grad() true; shape_error when
  ///         x's or dy's dims or storage order differ from the last input's.
  auto backward(const X& x, const DY& dy, const Device& device = Device()) {
    this->check_same(x, kName);
    this->check_same(dy, kName);
    Gradients<Scalar, detail::tensor_traits<DY>::rank, detail::tensor_traits<DY>::layout> g;
    const bool affine = options_.affine();
    if (affine) {
      g.weight.resize(options_.num_features());
      g.bias.resize(options_.num_features());
    }
    const detail::Shape sh = shape(x);
    detail::prepare_output(x, g.input, kName);
    VectorRef<const Scalar> w;
    if (affine)
      w = VectorRef<const Scalar>(weight_);
    detail::channel_norm_backward(detail::ChannelNormKind::instance, sh, x.data(), dy.data(),
                                  g.input.data(), this->saved_, w,
                                  affine ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                                  affine ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), device);
    return g;
  }

  /// Per-channel scale, num_features elements (init 1); empty when not affine.
  const Vector& weight() const { return weight_; }
  /// Per-channel shift, num_features elements (init 0); empty when not affine.
  const Vector& bias() const { return bias_; }
  /// Running mean, num_features elements (init 0), updated with the batch average of the
  /// per-instance means; empty without track_running_stats.
  const Vector& running_mean() const { return running_mean_; }
  /// Running variance (init 1), updated with the batch average of the per-instance unbiased
  /// variances; empty without track_running_stats.
  const Vector& running_var() const { return running_var_; }
  /// In the state dict with track_running_stats, but forward never changes it, as in PyTorch (0
  /// unless set).
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }

  /// Sets weight.
  /// @throws shape_error unless v has num_features elements (0 when not affine).
  void set_weight(const Vector& v) { set_checked(weight_, v, "weight", options_.affine()); }
  /// Sets bias.
  /// @throws shape_error unless v has num_features elements (0 when not affine).
  void set_bias(const Vector& v) { set_checked(bias_, v, "bias", options_.affine()); }
  /// Sets running_mean.
  /// @throws shape_error unless v has num_features elements (0 without track_running_stats).
  void set_running_mean(const Vector& v) {
    set_checked(running_mean_, v, "running_mean", options_.track_running_stats());
  }
  /// Sets running_var.
  /// @throws shape_error unless v has num_features elements (0 without track_running_stats).
  void set_running_var(const Vector& v) {
    set_checked(running_var_, v, "running_var", options_.track_running_stats());
  }
  /// Sets the counter (e.g. from a checkpoint); forward ignores it.
  void set_num_batches_tracked(std::int64_t n) { num_batches_tracked_ = n; }

  /// running_mean = 0, running_var = 1, num_batches_tracked = 0.
  void reset_running_stats() {
    if (options_.track_running_stats()) {
      running_mean_ = detail::filled<Scalar>(options_.num_features(), Scalar(0));
      running_var_ = detail::filled<Scalar>(options_.num_features(), Scalar(1));
    }
    num_batches_tracked_ = 0;
  }
  /// reset_running_stats(), and weight = 1, bias = 0.
  void reset_parameters() {
    reset_running_stats();
    if (options_.affine()) {
      weight_ = detail::filled<Scalar>(options_.num_features(), Scalar(1));
      bias_ = detail::filled<Scalar>(options_.num_features(), Scalar(0));
    }
  }

 private:
  template <class X>
  detail::Shape shape(const X& x) const {
    constexpr int R = detail::tensor_traits<X>::rank;
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "InstanceNorm: input scalar type differs from the module's");
    static_assert(R == Dim + 1 || R == Dim + 2,
                  "InstanceNorm: expected (C, *) or (N, C, *) input with Dim spatial dims");
    if constexpr (R == Dim + 1) {
      return detail::unsqueeze0(detail::logical_shape(x, options_.channels_last(), kName, false));
    } else {
      return detail::logical_shape(x, options_.channels_last(), kName);
    }
  }

  void set_checked(Vector& dst, const Vector& v, const char* name, bool exists) {
    const Index want = exists ? options_.num_features() : 0;
    if (v.size() != want) {
      detail::throw_shape(kName, std::string("expected ") + name + " of " + std::to_string(want) +
                                     " elements but got " + std::to_string(v.size()));
    }
    dst = v;
  }

  InstanceNormOptions options_;
  Vector weight_, bias_, running_mean_, running_var_;
  std::int64_t num_batches_tracked_ = 0;
};

template <class Scalar>
using InstanceNorm1d = InstanceNorm<Scalar, 1>;
template <class Scalar>
using InstanceNorm2d = InstanceNorm<Scalar, 2>;
template <class Scalar>
using InstanceNorm3d = InstanceNorm<Scalar, 3>;

}  // namespace normkit

#endif  // NORMKIT_INSTANCE_NORM_HPP_
