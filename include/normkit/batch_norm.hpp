// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_BATCH_NORM_HPP_
#define NORMKIT_BATCH_NORM_HPP_

#include <cstdint>   // std::int64_t
#include <optional>  // std::optional
#include <string>    // std::string
#include <vector>    // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

namespace normkit {

/// Options of the functional batch_norm (torch.nn.functional.batch_norm): parameters and
/// running statistics are the caller's storage, passed as VectorRef (an Eigen::Tensor<T, 1>,
/// a TensorMap of one, or a (pointer, size) pair); absent ones are simply not set.
template <class Scalar>
class BatchNormFuncOptions {
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  NORMKIT_ARG(VectorRef<Scalar>, running_mean);
  NORMKIT_ARG(VectorRef<Scalar>, running_var);
  /// Batch statistics (and running-statistic update) when true; running statistics when false.
  NORMKIT_ARG(bool, training) = false;
  /// Update factor f: running = (1 - f) * running + f * batch.
  NORMKIT_ARG(double, momentum) = 0.1;
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...).
  NORMKIT_ARG(bool, channels_last) = false;
};

/// Batch normalization of x into y (Ioffe & Szegedy 2015), as F.batch_norm:
/// y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c, with mean and biased variance
/// over all axes but the channel axis 1 (training, or no running statistics given), or the
/// running statistics (evaluation). In training the running statistics given are updated
/// with the unbiased batch variance. Logical dims are PyTorch's (N, C, *) for RowMajor and
/// ColMajor alike; y gets x's dims (a Tensor is resized, a TensorMap must match).
/// @param saved if not null, receives the per-channel mean and rstd used (for backward).
/// @throws shape_error if a parameter or statistic does not have C elements;
///         value_error for one value per channel in training, or evaluation without
///         running statistics. Nothing is modified when it throws.
template <class X, class Y, class Device = Eigen::DefaultDevice>
void batch_norm(const X& x,
                Y& y,
                const BatchNormFuncOptions<detail::scalar_of<X>>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::batch_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "batch_norm");
  detail::ChannelNormArgs<detail::scalar_of<X>> a = detail::batch_norm_args(options);
  detail::channel_norm_check("batch_norm", detail::ChannelNormKind::batch, sh, a);
  auto* y_ptr = detail::prepare_output(x, y, "batch_norm");
  detail::channel_norm_forward(detail::ChannelNormKind::batch, sh, x.data(), y_ptr, a, saved,
                               device);
}

/// Allocating form of batch_norm: returns y.
template <class X>
auto batch_norm(const X& x, const BatchNormFuncOptions<detail::scalar_of<X>>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  batch_norm(x, y, options);
  return y;
}

/// Gradients of batch_norm given the statistics its forward saved (SEMANTICS.md §8):
/// batch statistics: dx = r*w*(dy - mean(dy) - (x - mean)*r^2*mean(dy*(x - mean)));
/// running statistics: dx = dy*w*r. dweight_c = sum(dy*(x - mean)*r), dbias_c = sum(dy).
/// dx, dweight and dbias may each be absent (not computed).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void batch_norm_backward(const X& x,
                         const DY& dy,
                         DX& dx,
                         const SavedStats& saved,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  const detail::Shape sh = detail::logical_shape(x, channels_last, "batch_norm_backward");
  detail::check_grad_args("batch_norm_backward", detail::ChannelNormKind::batch, sh, x, dy, saved,
                          weight, grad_weight, grad_bias);
  auto* dx_ptr = detail::prepare_output(x, dx, "batch_norm_backward", "grad_input");
  detail::channel_norm_backward(detail::ChannelNormKind::batch, sh, x.data(), dy.data(), dx_ptr,
                                saved, weight, grad_weight, grad_bias, device);
}

/// BatchNorm over (N, C, *) inputs: `Dim` = 1 takes (N, C) or (N, C, L), 2 takes
/// (N, C, H, W), 3 takes (N, C, D, H, W), as torch.nn.BatchNorm1d/2d/3d. Parameters weight
/// (init 1) and bias (init 0) when affine; buffers running_mean (0), running_var (1) and
/// num_batches_tracked (0) when track_running_stats. Training mode normalizes with the batch
/// statistics (biased variance) and updates the buffers with momentum (unbiased variance;
/// momentum none = cumulative average); evaluation mode uses the buffers.
/// @code
/// normkit::BatchNorm2d<float> bn(normkit::BatchNormOptions(64).momentum(0.1));
/// Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);  // x: (N, 64, H, W)
/// @endcode
/// @tparam Scalar float or double.
template <class Scalar, int Dim>
class BatchNorm : public detail::ModuleBase<Scalar> {
  static_assert(Dim >= 1 && Dim <= 3, "BatchNorm: Dim is 1, 2 or 3");
  using Base = detail::ModuleBase<Scalar>;

 public:
  /// 1-D tensor type of the parameters and running statistics.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch (e.g. "BatchNorm2d"), used in error messages.
  static constexpr const char* kName = Dim == 1   ? "BatchNorm1d"
                                       : Dim == 2 ? "BatchNorm2d"
                                                  : "BatchNorm3d";

  /// @throws value_error for negative num_features or eps, or momentum outside [0, 1].
  explicit BatchNorm(const BatchNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }
  /// A module with PyTorch's defaults for `num_features` channels.
  explicit BatchNorm(Index num_features) : BatchNorm(BatchNormOptions(num_features)) {}

  /// The options the module was constructed with.
  const BatchNormOptions& options() const { return options_; }

  /// Normalizes x; in training mode also updates the running statistics.
  /// @throws shape_error for a wrong channel count; value_error for one value per channel
  ///         in training. The module is unchanged when it throws.
  template <class X, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward: writes into y (a Tensor is resized, a TensorMap must match).
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    constexpr int R = detail::tensor_traits<X>::rank;
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "BatchNorm: input scalar type differs from the module's");
    static_assert(Dim != 1 || R == 2 || R == 3, "BatchNorm1d: expected 2D or 3D input");
    static_assert(Dim != 2 || R == 4, "BatchNorm2d: expected 4D input");
    static_assert(Dim != 3 || R == 5, "BatchNorm3d: expected 5D input");
    const detail::Shape sh = detail::logical_shape(x, options_.channels_last(), kName);
    detail::check_channels(kName, "num_features", options_.num_features(), sh);
    // SEMANTICS.md §2.1: the counter moves (and sets the momentum-none factor) in training
    // with tracking, even for an empty batch; it is committed only after success.
    const bool tracking = options_.track_running_stats();
    std::int64_t nbt = num_batches_tracked_;
    double factor = options_.momentum().value_or(0.0);
    if (this->training_ && tracking) {
      ++nbt;
      if (!options_.momentum())
        factor = 1.0 / static_cast<double>(nbt);
    }
    BatchNormFuncOptions<Scalar> f;
    f.training(this->training_ || !tracking)
        .momentum(factor)
        .eps(options_.eps())
        .channels_last(options_.channels_last());
    if (options_.affine())
      f.weight(weight_).bias(bias_);
    if (tracking)
      f.running_mean(running_mean_).running_var(running_var_);
    detail::ChannelNormArgs<Scalar> a = detail::batch_norm_args(f);
    a.update_running = this->training_ && tracking;
    detail::channel_norm_check(kName, detail::ChannelNormKind::batch, sh, a);
    auto* y_ptr = detail::prepare_output(x, y, kName);
    SavedStats saved;
    detail::channel_norm_forward(detail::ChannelNormKind::batch, sh, x.data(), y_ptr, a,
                                 this->requires_grad_ ? &saved : nullptr, device);
    if (this->training_ && tracking)
      num_batches_tracked_ = nbt;
    // Inference (requires_grad() false) writes nothing to the module: concurrent eval
    // forwards are then pure reads (ThreadSanitizer-checked in threading_test).
    if (this->requires_grad_) {
      this->saved_ = std::move(saved);
      this->remember_input(x);
    }
  }

  /// Gradients for the last forward, using its saved statistics and input copy.
  /// @throws value_error before any forward or when the input was not kept;
  ///         shape_error when dy's dims or storage order differ from the last input's.
  template <class DY, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    auto x = this->saved_input(dy, kName);
    return backward(x, dy, device);
  }

  /// Gradients for the last forward with its input x given again (no copy needed).
  template <class X, class DY, class Device = Eigen::DefaultDevice, detail::if_tensor<DY> = 0>
  auto backward(const X& x, const DY& dy, const Device& device = Device()) {
    this->check_same(x, kName);
    this->check_same(dy, kName);
    Gradients<Scalar, detail::tensor_traits<DY>::rank, detail::tensor_traits<DY>::layout> g;
    if (options_.affine()) {
      g.weight.resize(options_.num_features());
      g.bias.resize(options_.num_features());
    }
    const detail::Shape sh = detail::logical_shape(x, options_.channels_last(), kName);
    detail::prepare_output(x, g.input, kName);
    VectorRef<const Scalar> w;
    if (options_.affine())
      w = VectorRef<const Scalar>(weight_);
    detail::channel_norm_backward(
        detail::ChannelNormKind::batch, sh, x.data(), dy.data(), g.input.data(), this->saved_, w,
        options_.affine() ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
        options_.affine() ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), device);
    return g;
  }

  /// Per-channel scale, num_features elements (init 1); empty when not affine.
  const Vector& weight() const { return weight_; }
  /// Per-channel shift, num_features elements (init 0); empty when not affine.
  const Vector& bias() const { return bias_; }
  /// Running mean, num_features elements (init 0); empty without track_running_stats.
  const Vector& running_mean() const { return running_mean_; }
  /// Running variance (init 1), updated with the unbiased batch variance; empty without
  /// track_running_stats.
  const Vector& running_var() const { return running_var_; }
  /// Training forwards with track_running_stats so far, counting empty batches too (as PyTorch); a
  /// failed forward does not count.
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }

  /// Setters check the size (num_features; empty when the module has no such tensor).
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
  /// Sets the counter (e.g. from a checkpoint); with momentum none the next training update
  /// uses f = 1/(n + 1).
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
  void set_checked(Vector& dst, const Vector& v, const char* name, bool exists) {
    const Index want = exists ? options_.num_features() : 0;
    if (v.size() != want) {
      detail::throw_shape(kName, std::string("expected ") + name + " of " + std::to_string(want) +
                                     " elements but got " + std::to_string(v.size()));
    }
    dst = v;
  }

  BatchNormOptions options_;
  Vector weight_, bias_, running_mean_, running_var_;
  std::int64_t num_batches_tracked_ = 0;
};

template <class Scalar>
using BatchNorm1d = BatchNorm<Scalar, 1>;
template <class Scalar>
using BatchNorm2d = BatchNorm<Scalar, 2>;
template <class Scalar>
using BatchNorm3d = BatchNorm<Scalar, 3>;

}  // namespace normkit

#endif  // NORMKIT_BATCH_NORM_HPP_
