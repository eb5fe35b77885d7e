// normkit/instance_norm.hpp: InstanceNorm1d/2d/3d and the functional instance_norm, forward
// and backward (statistics per (n, c) over the spatial axes).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_INSTANCE_NORM_HPP_
#define NORMKIT_INSTANCE_NORM_HPP_

#include <cstdint>  // std::int64_t
#include <string>   // std::string

#include <normkit/config.hpp>
#include <normkit/detail/channel_module.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE

/// Options of the functional instance_norm (torch.nn.functional.instance_norm).
template <class Scalar>
class InstanceNormFuncOptions {
  /// Per-channel scale (C elements); not set = 1.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Per-channel shift (C elements); not set = 0.
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  /// Running mean (C elements), updated with the batch average of per-instance means.
  NORMKIT_ARG(VectorRef<Scalar>, running_mean);
  /// Running variance (C elements), as running_mean.
  NORMKIT_ARG(VectorRef<Scalar>, running_var);
  /// Per-instance statistics (and running update, when running statistics are given) when
  /// true; the running statistics when false.
  NORMKIT_ARG(bool, use_input_stats) = true;
  /// Update factor f: running = (1 - f) * running + f * batch.
  NORMKIT_ARG(double, momentum) = 0.1;
  /// Added to the variance inside the square root.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...).
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
template <class X, class Y, class P = detail::scalar_of<X>, class Device = Eigen::DefaultDevice>
void instance_norm(const X& x,
                   Y&& y,
                   const InstanceNormFuncOptions<P>& options,
                   SavedStats* saved = nullptr,
                   const Device& device = Device()) {
  static_assert(detail::accepts_v<P, detail::scalar_of<X>>,
                "normkit::instance_norm: parameters of the input's type, or float parameters with "
                "bfloat16/half input");
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::instance_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "instance_norm");
  const auto a = detail::instance_norm_args(options);
  detail::channel_norm_check("instance_norm", detail::ChannelNormKind::instance, sh, a);
  auto* y_ptr = detail::prepare_output(x, y, "instance_norm");
  detail::channel_norm_forward(detail::ChannelNormKind::instance, sh, x.data(), y_ptr, a, saved,
                               static_cast<detail::scalar_of<X>*>(nullptr),
                               detail::make_exec(device));
}

/// instance_norm on a device, without saved statistics.
template <class X,
          class Y,
          class P = detail::scalar_of<X>,
          class Device,
          detail::if_device<Device> = 0>
void instance_norm(const X& x,
                   Y&& y,
                   const InstanceNormFuncOptions<P>& options,
                   const Device& device) {
  instance_norm(x, y, options, nullptr, device);
}

/// Allocating form of instance_norm.
template <class X, class P = detail::scalar_of<X>>
auto instance_norm(const X& x, const InstanceNormFuncOptions<P>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  instance_norm(x, y, options);
  return y;
}

namespace detail {

/// instance_norm_backward with parameters of type P (the input's, or float for bfloat16/half
/// input).
template <class P, class X, class DY, class DX, class Device>
void instance_norm_backward_with(const X& x,
                                 const DY& dy,
                                 DX&& dx,
                                 const SavedStats& saved,
                                 VectorRef<const P> weight,
                                 VectorRef<P> grad_weight,
                                 VectorRef<P> grad_bias,
                                 bool channels_last,
                                 const Device& device) {
  const char* who = "instance_norm_backward";
  const detail::Shape sh = detail::logical_shape(x, channels_last, who);
  detail::check_same_dims(who, "grad_output", x, dy);
  detail::check_grad_args(who, detail::ChannelNormKind::instance, sh, saved, weight, grad_weight,
                          grad_bias);
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  detail::channel_norm_backward(detail::ChannelNormKind::instance, sh, x.data(), dy.data(), dx_ptr,
                                saved, weight, grad_weight, grad_bias, detail::make_exec(device));
}

}  // namespace detail

/// Gradients of instance_norm from its saved statistics (docs/semantics.md §8); dweight
/// and dbias sum over the batch.
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void instance_norm_backward(const X& x,
                            const DY& dy,
                            DX&& dx,
                            const SavedStats& saved,
                            VectorRef<const detail::scalar_of<X>> weight,
                            VectorRef<detail::scalar_of<X>> grad_weight,
                            VectorRef<detail::scalar_of<X>> grad_bias,
                            bool channels_last = false,
                            const Device& device = Device()) {
  detail::instance_norm_backward_with<detail::scalar_of<X>>(x, dy, dx, saved, weight, grad_weight,
                                                            grad_bias, channels_last, device);
}

/// instance_norm_backward of bfloat16/half input with float parameters (mixed precision: dx in the
/// input's type, grad_weight/grad_bias in float).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice, detail::if_low<X> = 0>
void instance_norm_backward(const X& x,
                            const DY& dy,
                            DX&& dx,
                            const SavedStats& saved,
                            VectorRef<const float> weight,
                            VectorRef<float> grad_weight,
                            VectorRef<float> grad_bias,
                            bool channels_last = false,
                            const Device& device = Device()) {
  detail::instance_norm_backward_with<float>(x, dy, dx, saved, weight, grad_weight, grad_bias,
                                             channels_last, device);
}

/// instance_norm_backward on a device (NCHW-like layout).
template <class X, class DY, class DX, class Device, detail::if_device<Device> = 0>
void instance_norm_backward(const X& x,
                            const DY& dy,
                            DX&& dx,
                            const SavedStats& saved,
                            VectorRef<const detail::scalar_of<X>> weight,
                            VectorRef<detail::scalar_of<X>> grad_weight,
                            VectorRef<detail::scalar_of<X>> grad_bias,
                            const Device& device) {
  instance_norm_backward(x, dy, dx, saved, weight, grad_weight, grad_bias, false, device);
}

/// InstanceNorm over (N, C, *) or unbatched (C, *) input, as torch.nn.InstanceNorm1d/2d/3d:
/// `Dim` spatial dims; ranks Dim + 2 (batched) and Dim + 1 (unbatched: InstanceNorm1d on a
/// 2-D tensor treats it as (C, L), as PyTorch). No affine and no running statistics by
/// default; with track_running_stats, training updates per-channel running statistics and
/// evaluation uses them (num_batches_tracked exists but never moves, as in PyTorch).
/// @code
/// normkit::InstanceNorm2d<float> in{normkit::InstanceNormOptions{3}.affine(true)};
/// auto y = in.forward(x);  // x: (N, 3, H, W) or (3, H, W)
/// @endcode
template <class Scalar, int Dim>
class InstanceNorm : public detail::ChannelModule<Scalar, InstanceNormOptions> {
  static_assert(Dim >= 1 && Dim <= 3, "InstanceNorm: Dim is 1, 2 or 3");
  using Base = detail::ChannelModule<Scalar, InstanceNormOptions>;

 public:
  /// Class name as in PyTorch (e.g. "InstanceNorm2d"), used in error messages.
  static constexpr const char* kName = Dim == 1   ? "InstanceNorm1d"
                                       : Dim == 2 ? "InstanceNorm2d"
                                                  : "InstanceNorm3d";

  /// @throws value_error for negative num_features or eps, momentum outside [0, 1] or none.
  explicit InstanceNorm(const InstanceNormOptions& options) : Base(kName, options) {}
  /// A module with PyTorch's defaults (no affine, no running statistics) for num_features
  /// channels.
  explicit InstanceNorm(Index num_features) : InstanceNorm(InstanceNormOptions(num_features)) {}

  /// Normalizes x with per-instance statistics, or with the running statistics in evaluation
  /// with track_running_stats; training with track_running_stats also updates them. Returns y;
  /// throws as the non-allocating forward.
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward into y (a Tensor is resized, a TensorMap must match).
  /// @throws shape_error for a wrong channel count; value_error for one spatial element
  ///         with instance statistics. The module is unchanged when it throws.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    this->forward_impl(detail::ChannelNormKind::instance, shape(x), x, y,
                       detail::make_exec(device));
  }

  /// Gradients for the last training forward from its kept input (keep_input()).
  /// @throws value_error when no input is kept (then call backward(x, dy)); shape_error when
  ///         dy differs from the kept input's dims.
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(this->kept_input(dy, kName), dy, device);
  }

  /// Gradients at x: the statistics the last training forward kept for an input of x's
  /// shape, else those the current mode's forward would use.
  template <class X,
            class DY,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<DY> = 0,
            detail::if_device<Device> = 0>
  auto backward(const X& x, const DY& dy, const Device& device = Device()) {
    detail::gradients_for<Scalar, X> g;
    backward(x, dy, g, device);
    return g;
  }

  /// Non-allocating backward into caller-owned gradients.
  template <class X,
            class DY,
            class G,
            class Device = Eigen::DefaultDevice,
            detail::if_gradients<G> = 0>
  void backward(const X& x, const DY& dy, G& grads, const Device& device = Device()) {
    this->backward_impl(detail::ChannelNormKind::instance, shape(x), x, dy, grads,
                        detail::make_exec(device));
  }

  /// backward(dy) into caller-owned gradients.
  template <class DY, class G, class Device = Eigen::DefaultDevice, detail::if_gradients<G> = 0>
  void backward(const DY& dy, G& grads, const Device& device = Device()) {
    backward(this->kept_input(dy, kName), dy, grads, device);
  }

  /// Fused forward (deployment and ResNet-style blocks): y = act(norm(x) + residual) in one
  /// pass over x, residual and y (residual: x's dims, storage order and type; y may be the
  /// residual's storage). Otherwise as forward(): the same statistics, running updates and
  /// kept state; backward_fused() gives the gradients for ReLU and identity.
  /// @throws shape_error when the residual's dims differ from x's; as forward() otherwise.
  template <class X,
            class R,
            class Y,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<R> = 0,
            detail::if_tensor<Y> = 0>
  void forward_fused(
      const X& x, const R& residual, Activation act, Y&& y, const Device& device = Device()) {
    this->fused_impl(detail::ChannelNormKind::instance, shape(x), x, &residual, act, y,
                     detail::make_exec(device));
  }
  /// Allocating forward_fused with a residual.
  template <class X,
            class R,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<R> = 0,
            detail::if_device<Device> = 0>
  auto forward_fused(const X& x,
                     const R& residual,
                     Activation act,
                     const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    this->fused_impl(detail::ChannelNormKind::instance, shape(x), x, &residual, act, y,
                     detail::make_exec(device));
    return y;
  }
  /// forward_fused without a residual into y: y = act(norm(x)).
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward_fused(const X& x, Activation act, Y&& y, const Device& device = Device()) {
    this->fused_impl(detail::ChannelNormKind::instance, shape(x), x, static_cast<const X*>(nullptr),
                     act, y, detail::make_exec(device));
  }
  /// Allocating forward_fused without a residual: y = act(norm(x)).
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward_fused(const X& x, Activation act, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    this->fused_impl(detail::ChannelNormKind::instance, shape(x), x, static_cast<const X*>(nullptr),
                     act, y, detail::make_exec(device));
    return y;
  }
  /// Gradients of forward_fused at x from its output y and dy (ReLU: the mask y > 0, as
  /// oneDNN's fused norm + ReLU; identity). g.residual is dL/dresidual.
  /// @throws value_error for SiLU and GELU (their gradient needs the pre-activation).
  template <class X,
            class Y,
            class DY,
            class Device = Eigen::DefaultDevice,
            detail::if_device<Device> = 0>
  auto backward_fused(
      const X& x, const Y& y, const DY& dy, Activation act, const Device& device = Device()) {
    return detail::fused_backward<Scalar>(*this, kName, x, y, dy, act, device);
  }

 private:
  template <class X>
  detail::Shape shape(const X& x) const {
    constexpr int R = detail::tensor_traits<X>::rank;
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "InstanceNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    static_assert(R == Dim + 1 || R == Dim + 2,
                  "InstanceNorm: expected (C, *) or (N, C, *) input with Dim spatial dims");
    if constexpr (R == Dim + 1) {
      return detail::unsqueeze0(
          detail::logical_shape(x, this->options_.channels_last(), kName, false));
    } else {
      return detail::logical_shape(x, this->options_.channels_last(), kName);
    }
  }
};

/// torch.nn.InstanceNorm1d: (N, C, L) or unbatched (C, L) input.
template <class Scalar>
using InstanceNorm1d = InstanceNorm<Scalar, 1>;
/// torch.nn.InstanceNorm2d: (N, C, H, W) or unbatched (C, H, W) input.
template <class Scalar>
using InstanceNorm2d = InstanceNorm<Scalar, 2>;
/// torch.nn.InstanceNorm3d: (N, C, D, H, W) or unbatched (C, D, H, W) input.
template <class Scalar>
using InstanceNorm3d = InstanceNorm<Scalar, 3>;

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_INSTANCE_NORM_HPP_
