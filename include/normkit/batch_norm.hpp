// normkit/batch_norm.hpp: BatchNorm1d/2d/3d and the functional batch_norm, forward and
// backward (statistics per channel over the batch and spatial axes).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_BATCH_NORM_HPP_
#define NORMKIT_BATCH_NORM_HPP_

#include <cstdint>   // std::int64_t
#include <optional>  // std::optional
#include <string>    // std::string

#include <normkit/config.hpp>
#include <normkit/detail/channel_module.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE

/// Options of the functional batch_norm (torch.nn.functional.batch_norm): parameters and
/// running statistics are the caller's storage, passed as VectorRef (an Eigen::Tensor<T, 1>,
/// a TensorMap of one, or a (pointer, size) pair); absent ones are simply not set.
template <class Scalar>
class BatchNormFuncOptions {
  /// Per-channel scale (C elements); not set = 1.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Per-channel shift (C elements); not set = 0.
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  /// Running mean (C elements): read in evaluation, updated in training; may be absent.
  NORMKIT_ARG(VectorRef<Scalar>, running_mean);
  /// Running variance (C elements), as running_mean.
  NORMKIT_ARG(VectorRef<Scalar>, running_var);
  /// Batch statistics (and running-statistic update) when true; running statistics when false.
  NORMKIT_ARG(bool, training) = false;
  /// Update factor f: running = (1 - f) * running + f * batch.
  NORMKIT_ARG(double, momentum) = 0.1;
  /// Added to the variance inside the square root.
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...).
  NORMKIT_ARG(bool, channels_last) = false;
};

namespace detail {
template <class T>
ChannelNormArgs<T> batch_norm_args(const BatchNormFuncOptions<T>& o) {
  ChannelNormArgs<T> a;
  a.weight = o.weight();
  a.bias = o.bias();
  a.running_mean = o.running_mean();
  a.running_var = o.running_var();
  a.batch_stats = o.training();
  a.update_running = o.training() && (o.running_mean() || o.running_var());
  a.momentum = o.momentum();
  a.eps = o.eps();
  return a;
}
}  // namespace detail

/// Batch normalization of x into y (Ioffe & Szegedy 2015), as F.batch_norm:
/// y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c, with mean and biased variance
/// over all axes but the channel axis 1 (training, or no running statistics given), or the
/// running statistics (evaluation). In training the running statistics given are updated
/// with the unbiased batch variance. Logical dims are PyTorch's (N, C, *) for RowMajor and
/// ColMajor alike; y gets x's dims (a Tensor is resized, a TensorMap must match).
/// @param saved if not null, receives the per-channel mean and rstd used (for backward).
/// @param device Eigen::DefaultDevice, or an Eigen::ThreadPoolDevice to use its threads.
/// @throws shape_error if a parameter or statistic does not have C elements;
///         value_error for one value per channel in training, or evaluation without
///         running statistics. Nothing is modified when it throws.
/// @code
/// normkit::batch_norm(x, y, normkit::BatchNormFuncOptions<float>().training(true)
///                               .running_mean(rm).running_var(rv), &saved);
/// @endcode
template <class X, class Y, class P = detail::scalar_of<X>, class Device = Eigen::DefaultDevice>
void batch_norm(const X& x,
                Y&& y,
                const BatchNormFuncOptions<P>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  static_assert(detail::accepts_v<P, detail::scalar_of<X>>,
                "normkit::batch_norm: parameters of the input's type, or float parameters with "
                "bfloat16/half input");
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::batch_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "batch_norm");
  const auto a = detail::batch_norm_args(options);
  detail::channel_norm_check("batch_norm", detail::ChannelNormKind::batch, sh, a);
  auto* y_ptr = detail::prepare_output(x, y, "batch_norm");
  detail::channel_norm_forward(detail::ChannelNormKind::batch, sh, x.data(), y_ptr, a, saved,
                               static_cast<detail::scalar_of<X>*>(nullptr),
                               detail::make_exec(device));
}

/// batch_norm on a device, without saved statistics.
template <class X,
          class Y,
          class P = detail::scalar_of<X>,
          class Device,
          detail::if_device<Device> = 0>
void batch_norm(const X& x, Y&& y, const BatchNormFuncOptions<P>& options, const Device& device) {
  batch_norm(x, y, options, nullptr, device);
}

/// Allocating form of batch_norm: returns y.
template <class X, class P = detail::scalar_of<X>>
auto batch_norm(const X& x, const BatchNormFuncOptions<P>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  batch_norm(x, y, options);
  return y;
}

namespace detail {

/// batch_norm_backward with parameters of type P (the input's, or float for bfloat16/half
/// input).
template <class P, class X, class DY, class DX, class Device>
void batch_norm_backward_with(const X& x,
                              const DY& dy,
                              DX&& dx,
                              const SavedStats& saved,
                              VectorRef<const P> weight,
                              VectorRef<P> grad_weight,
                              VectorRef<P> grad_bias,
                              bool channels_last,
                              const Device& device) {
  const char* who = "batch_norm_backward";
  const detail::Shape sh = detail::logical_shape(x, channels_last, who);
  detail::check_same_dims(who, "grad_output", x, dy);
  detail::check_grad_args(who, detail::ChannelNormKind::batch, sh, saved, weight, grad_weight,
                          grad_bias);
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  detail::channel_norm_backward(detail::ChannelNormKind::batch, sh, x.data(), dy.data(), dx_ptr,
                                saved, weight, grad_weight, grad_bias, detail::make_exec(device));
}

}  // namespace detail

/// Gradients of batch_norm given the statistics its forward saved (docs/semantics.md §8):
/// batch statistics: dx = r*w*(dy - mean(dy) - (x - mean)*r^2*mean(dy*(x - mean)));
/// running statistics: dx = dy*w*r. dweight_c = sum(dy*(x - mean)*r), dbias_c = sum(dy).
/// dx, dweight and dbias may each be absent (not computed): pass a default VectorRef, or
/// an empty Eigen::Tensor as dx.
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void batch_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  detail::batch_norm_backward_with<detail::scalar_of<X>>(x, dy, dx, saved, weight, grad_weight,
                                                         grad_bias, channels_last, device);
}

/// batch_norm_backward of bfloat16/half input with float parameters (mixed precision: dx in the
/// input's type, grad_weight/grad_bias in float).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice, detail::if_low<X> = 0>
void batch_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         VectorRef<const float> weight,
                         VectorRef<float> grad_weight,
                         VectorRef<float> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  detail::batch_norm_backward_with<float>(x, dy, dx, saved, weight, grad_weight, grad_bias,
                                          channels_last, device);
}

/// batch_norm_backward on a device (NCHW-like layout).
template <class X, class DY, class DX, class Device, detail::if_device<Device> = 0>
void batch_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         const Device& device) {
  batch_norm_backward(x, dy, dx, saved, weight, grad_weight, grad_bias, false, device);
}

/// BatchNorm over (N, C, *) inputs: `Dim` = 1 takes (N, C) or (N, C, L), 2 takes
/// (N, C, H, W), 3 takes (N, C, D, H, W), as torch.nn.BatchNorm1d/2d/3d. Parameters weight
/// (init 1) and bias (init 0) when affine; buffers running_mean (0), running_var (1) and
/// num_batches_tracked (0) when track_running_stats. Training mode normalizes with the batch
/// statistics (biased variance) and updates the buffers with momentum (unbiased variance;
/// momentum none = cumulative average); evaluation mode uses the buffers.
/// @code
/// normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{64}.momentum(0.1)};
/// Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);  // x: (N, 64, H, W)
/// auto g = bn.backward(dy);                                    // g.input, g.weight, g.bias
/// @endcode
/// @tparam Scalar float or double.
template <class Scalar, int Dim>
class BatchNorm : public detail::ChannelModule<Scalar, BatchNormOptions> {
  static_assert(Dim >= 1 && Dim <= 3, "BatchNorm: Dim is 1, 2 or 3");
  using Base = detail::ChannelModule<Scalar, BatchNormOptions>;

 public:
  /// Class name as in PyTorch (e.g. "BatchNorm2d"), used in error messages.
  static constexpr const char* kName = Dim == 1   ? "BatchNorm1d"
                                       : Dim == 2 ? "BatchNorm2d"
                                                  : "BatchNorm3d";

  /// @throws value_error for negative num_features or eps, or momentum outside [0, 1].
  explicit BatchNorm(const BatchNormOptions& options) : Base(kName, options) {}
  /// A module with PyTorch's defaults for `num_features` channels.
  explicit BatchNorm(Index num_features) : BatchNorm(BatchNormOptions(num_features)) {}

  /// Normalizes x; in training mode also updates the running statistics.
  /// @throws shape_error for a wrong channel count; value_error for one value per channel
  ///         in training. The module is unchanged when it throws.
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward: writes into y (a Tensor is resized, a TensorMap must match).
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    this->forward_impl(detail::ChannelNormKind::batch, shape(x), x, y, detail::make_exec(device));
  }

  /// Gradients for the last training forward from its kept input (keep_input()).
  /// @throws value_error when no input is kept (then call backward(x, dy)); shape_error when
  ///         dy differs from the kept input's dims.
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(this->kept_input(dy, kName), dy, device);
  }

  /// Gradients at x (the last forward's input given again, or any input: see
  /// ModuleBase): batch statistics in training mode, running statistics in evaluation mode
  /// with track_running_stats.
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

  /// Non-allocating backward into caller-owned gradients (resized only when their sizes
  /// differ, so a reused Gradients allocates nothing).
  template <class X,
            class DY,
            class G,
            class Device = Eigen::DefaultDevice,
            detail::if_gradients<G> = 0>
  void backward(const X& x, const DY& dy, G& grads, const Device& device = Device()) {
    this->backward_impl(detail::ChannelNormKind::batch, shape(x), x, dy, grads,
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
    this->fused_impl(detail::ChannelNormKind::batch, shape(x), x, &residual, act, y,
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
    this->fused_impl(detail::ChannelNormKind::batch, shape(x), x, &residual, act, y,
                     detail::make_exec(device));
    return y;
  }
  /// forward_fused without a residual into y: y = act(norm(x)).
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward_fused(const X& x, Activation act, Y&& y, const Device& device = Device()) {
    this->fused_impl(detail::ChannelNormKind::batch, shape(x), x, static_cast<const X*>(nullptr),
                     act, y, detail::make_exec(device));
  }
  /// Allocating forward_fused without a residual: y = act(norm(x)).
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward_fused(const X& x, Activation act, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    this->fused_impl(detail::ChannelNormKind::batch, shape(x), x, static_cast<const X*>(nullptr),
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
                  "BatchNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    static_assert(Dim != 1 || R == 2 || R == 3, "BatchNorm1d: expected 2D or 3D input");
    static_assert(Dim != 2 || R == 4, "BatchNorm2d: expected 4D input");
    static_assert(Dim != 3 || R == 5, "BatchNorm3d: expected 5D input");
    return detail::logical_shape(x, this->options_.channels_last(), kName);
  }
};

/// torch.nn.BatchNorm1d: (N, C) or (N, C, L) input.
template <class Scalar>
using BatchNorm1d = BatchNorm<Scalar, 1>;
/// torch.nn.BatchNorm2d: (N, C, H, W) input.
template <class Scalar>
using BatchNorm2d = BatchNorm<Scalar, 2>;
/// torch.nn.BatchNorm3d: (N, C, D, H, W) input.
template <class Scalar>
using BatchNorm3d = BatchNorm<Scalar, 3>;

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_BATCH_NORM_HPP_
