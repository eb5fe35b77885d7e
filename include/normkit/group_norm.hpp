// normkit/group_norm.hpp: GroupNorm and the functional group_norm, forward and backward
// (statistics per (n, group) over the group's channels and positions, per-channel affine).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_GROUP_NORM_HPP_
#define NORMKIT_GROUP_NORM_HPP_

#include <algorithm>    // std::fill
#include <string>       // std::string
#include <type_traits>  // std::is_same
#include <vector>       // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/group_norm_impl.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE

/// Options of the functional group_norm (torch.nn.functional.group_norm).
template <class Scalar>
class GroupNormFuncOptions {
 public:
  /// num_groups groups; no weight or bias, eps at PyTorch's default.
  explicit GroupNormFuncOptions(Index num_groups) : num_groups_(num_groups) {}
  /// G, the number of contiguous channel groups (no default); must be > 0 and divide C.
  NORMKIT_ARG(Index, num_groups);
  /// Per-channel scale of C elements; not set = no scaling.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Per-channel shift of C elements; not set = no shift.
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  /// Added to the variance inside the square root (default 1e-5).
  NORMKIT_ARG(double, eps) = 1e-5;
  /// Input dims are (N, spatial..., C) instead of (N, C, spatial...) (default false).
  NORMKIT_ARG(bool, channels_last) = false;
};

/// Group normalization (Wu & He 2018), as F.group_norm: channels split into num_groups
/// contiguous groups; y = (x - mean_ng) / sqrt(var_ng + eps) * weight_c + bias_c with the
/// mean and biased variance of each (n, g) over its C/G channels and all spatial positions.
/// Same in training and evaluation. Unlike PyTorch there is no "more than 1 value" guard
/// (a deliberate difference, docs/semantics.md §11): a one-element group returns bias.
/// @throws value_error for num_groups <= 0; shape_error if C is not divisible by
///         num_groups or weight/bias do not have C elements.
template <class X, class Y, class P = detail::scalar_of<X>, class Device = Eigen::DefaultDevice>
void group_norm(const X& x,
                Y&& y,
                const GroupNormFuncOptions<P>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  static_assert(detail::accepts_v<P, detail::scalar_of<X>>,
                "normkit::group_norm: parameters of the input's type, or float parameters with "
                "bfloat16/half input");
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::group_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "group_norm");
  detail::group_norm_check("group_norm", sh, options.num_groups(), options.weight(),
                           options.bias());
  auto* y_ptr = detail::prepare_output(x, y, "group_norm");
  if (sh.numel() == 0)
    return;
  detail::group_norm_forward(
      sh, options.num_groups(), x.data(), y_ptr, options.weight(), options.bias(), options.eps(),
      saved, static_cast<detail::scalar_of<X>*>(nullptr), detail::make_exec(device));
}

/// group_norm on a device, without saved statistics.
template <class X,
          class Y,
          class P = detail::scalar_of<X>,
          class Device,
          detail::if_device<Device> = 0>
void group_norm(const X& x, Y&& y, const GroupNormFuncOptions<P>& options, const Device& device) {
  group_norm(x, y, options, nullptr, device);
}

/// Allocating form of group_norm.
template <class X, class P = detail::scalar_of<X>>
auto group_norm(const X& x, const GroupNormFuncOptions<P>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  group_norm(x, y, options);
  return y;
}

namespace detail {

/// group_norm_backward with parameters of type P (the input's, or float for bfloat16/half
/// input).
template <class P, class X, class DY, class DX, class Device>
void group_norm_backward_with(const X& x,
                              const DY& dy,
                              DX&& dx,
                              const SavedStats& saved,
                              Index num_groups,
                              VectorRef<const P> weight,
                              VectorRef<P> grad_weight,
                              VectorRef<P> grad_bias,
                              bool channels_last,
                              const Device& device) {
  const detail::Shape sh = detail::logical_shape(x, channels_last, "group_norm_backward");
  detail::group_norm_check("group_norm_backward", sh, num_groups, weight, VectorRef<const P>());
  detail::check_same_dims("group_norm_backward", "grad_output", x, dy);
  if (saved.mean.size() != sh.dim[0] * num_groups || saved.rstd.size() != saved.mean.size()) {
    detail::fail(detail::Fail::shape, "group_norm_backward",
                 "expected saved statistics of %lld slots but got %lld",
                 static_cast<long long>(sh.dim[0]) * static_cast<long long>(num_groups),
                 static_cast<long long>(saved.mean.size()));
  }
  detail::check_size("group_norm_backward", "grad_weight", grad_weight, sh.dim[1]);
  detail::check_size("group_norm_backward", "grad_bias", grad_bias, sh.dim[1]);
  auto* dx_ptr = detail::prepare_output(x, dx, "group_norm_backward", "grad_input");
  if (sh.numel() == 0) {
    for (Index c = 0; grad_weight && c < grad_weight.size(); ++c) grad_weight.data()[c] = P(0);
    for (Index c = 0; grad_bias && c < grad_bias.size(); ++c) grad_bias.data()[c] = P(0);
    return;
  }
  detail::group_norm_backward(sh, num_groups, x.data(), dy.data(), dx_ptr, saved, weight,
                              grad_weight, grad_bias, detail::make_exec(device));
}

}  // namespace detail

/// Gradients of group_norm from its saved statistics (docs/semantics.md §8).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void group_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         Index num_groups,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  detail::group_norm_backward_with<detail::scalar_of<X>>(
      x, dy, dx, saved, num_groups, weight, grad_weight, grad_bias, channels_last, device);
}

/// group_norm_backward of bfloat16/half input with float parameters (mixed precision: dx in the
/// input's type, grad_weight/grad_bias in float).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice, detail::if_low<X> = 0>
void group_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         Index num_groups,
                         VectorRef<const float> weight,
                         VectorRef<float> grad_weight,
                         VectorRef<float> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  detail::group_norm_backward_with<float>(x, dy, dx, saved, num_groups, weight, grad_weight,
                                          grad_bias, channels_last, device);
}

/// group_norm_backward on a device (NCHW-like layout).
template <class X, class DY, class DX, class Device, detail::if_device<Device> = 0>
void group_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         Index num_groups,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         const Device& device) {
  group_norm_backward(x, dy, dx, saved, num_groups, weight, grad_weight, grad_bias, false, device);
}

/// GroupNorm over (N, C, *) input, as torch.nn.GroupNorm; weight (1) and bias (0) of
/// num_channels elements when affine. No running statistics: training and evaluation agree.
/// @code
/// normkit::GroupNorm<float> gn{normkit::GroupNormOptions{/*num_groups=*/32,
/// /*num_channels=*/256}}; auto y = gn.forward(x);  // x: (N, 256, H, W)
/// @endcode
template <class Scalar>
class GroupNorm : public detail::ModuleBase<Scalar> {
 public:
  /// 1-D tensor type of the parameters.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch (e.g. "GroupNorm"), used in error messages.
  static constexpr const char* kName = "GroupNorm";

  /// @throws value_error for num_groups <= 0, num_channels not divisible, negative eps.
  explicit GroupNorm(const GroupNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }

  /// The options the module was constructed with.
  const GroupNormOptions& options() const { return options_; }

  /// Normalizes x with the statistics of each (sample, group); same in training and
  /// evaluation. Returns y; throws as the non-allocating forward.
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward into y (a Tensor is resized, a TensorMap must match).
  /// @throws shape_error for a wrong channel count. The module is unchanged when it throws.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    fused_impl<false>(shape(x), x, static_cast<const X*>(nullptr), Activation::identity, y,
                      detail::make_exec(device));
  }

  /// Gradients for the last training forward from its kept input (keep_input()).
  /// @throws value_error when no input is kept (then call backward(x, dy)); shape_error when
  ///         dy differs from the kept input's dims.
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(this->kept_input(dy, kName), dy, device);
  }

  /// Gradients at x (the group statistics the last training forward kept for an input of
  /// x's shape, else x's own).
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
  void backward(const X& x, const DY& dy, G& g, const Device& device = Device()) {
    const detail::Shape sh = shape(x);
    detail::check_same_dims(kName, "grad_output", x, dy);
    detail::check_channels(kName, "num_channels", options_.num_channels(), sh);
    const detail::Exec ex = detail::make_exec(device);
    SavedStats local;
    const SavedStats* st = &this->saved_;
    if (!this->kept_for(x) && sh.numel() != 0) {
      detail::group_norm_stats(sh, options_.num_groups(), x.data(), options_.eps(), local, ex);
      st = &local;
    }
    const Index C = options_.affine() ? options_.num_channels() : 0;
    detail::prepare_gradients(g, x, C, C);
    if (sh.numel() == 0) {
      std::fill(g.weight.data(), g.weight.data() + g.weight.size(), Scalar(0));
      std::fill(g.bias.data(), g.bias.data() + g.bias.size(), Scalar(0));
      return;
    }
    detail::group_norm_backward(sh, options_.num_groups(), x.data(), dy.data(), g.input.data(), *st,
                                wref(), C ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                                C ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), ex);
  }

  /// backward(dy) into caller-owned gradients.
  template <class DY, class G, class Device = Eigen::DefaultDevice, detail::if_gradients<G> = 0>
  void backward(const DY& dy, G& g, const Device& device = Device()) {
    backward(this->kept_input(dy, kName), dy, g, device);
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
    fused_impl<true>(shape(x), x, &residual, act, y, detail::make_exec(device));
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
    fused_impl<true>(shape(x), x, &residual, act, y, detail::make_exec(device));
    return y;
  }
  /// forward_fused without a residual into y: y = act(norm(x)).
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward_fused(const X& x, Activation act, Y&& y, const Device& device = Device()) {
    fused_impl<true>(shape(x), x, static_cast<const X*>(nullptr), act, y,
                     detail::make_exec(device));
  }
  /// Allocating forward_fused without a residual: y = act(norm(x)).
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward_fused(const X& x, Activation act, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    fused_impl<true>(shape(x), x, static_cast<const X*>(nullptr), act, y,
                     detail::make_exec(device));
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

  /// Per-channel scale, num_channels elements (init 1); empty when not affine.
  const Vector& weight() const { return weight_; }
  /// Per-channel shift, num_channels elements (init 0); empty when not affine.
  const Vector& bias() const { return bias_; }
  /// Sets weight.
  /// @throws shape_error unless v has num_channels elements (0 when not affine).
  void set_weight(const Vector& v) { set_checked(weight_, v, "weight"); }
  /// Sets bias.
  /// @throws shape_error unless v has num_channels elements (0 when not affine).
  void set_bias(const Vector& v) { set_checked(bias_, v, "bias"); }
  /// weight = 1, bias = 0 (when affine).
  void reset_parameters() {
    if (options_.affine()) {
      weight_ = detail::filled<Scalar>(options_.num_channels(), Scalar(1));
      bias_ = detail::filled<Scalar>(options_.num_channels(), Scalar(0));
    }
  }

 private:
  /// forward with the fused epilogue y = act(norm(x) + *residual) (residual may be null).
  template <bool kEpi, class X, class R, class Y>
  void fused_impl(const detail::Shape& sh,
                  const X& x,
                  const R* residual,
                  Activation act,
                  Y& y,
                  const detail::Exec& ex) {
    static_assert(std::is_same<detail::scalar_of<X>, detail::scalar_of<R>>::value &&
                      detail::tensor_traits<X>::rank == detail::tensor_traits<R>::rank &&
                      detail::tensor_traits<X>::layout == detail::tensor_traits<R>::layout,
                  "forward_fused: the residual must have the input's type, rank and storage order");
    detail::check_channels(kName, "num_channels", options_.num_channels(), sh);
    if (residual)
      detail::check_same_dims(kName, "residual", x, *residual);
    auto* y_ptr = detail::prepare_output(x, y, kName);
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    // The epilogue kernels are instantiated only where forward_fused is called.
    const detail::EpiLeaves<detail::scalar_of<X>>* epi = nullptr;
    if constexpr (kEpi)
      epi = &detail::epi_leaves<detail::scalar_of<X>>();
    if (sh.numel() != 0) {
      detail::group_norm_forward(sh, options_.num_groups(), x.data(), y_ptr, wref(), bref(),
                                 options_.eps(), keep ? &saved : nullptr, copy, ex,
                                 residual ? residual->data() : nullptr, static_cast<int>(act), epi);
    }
    if (keep)
      this->commit(x, std::move(saved), this->keep_input_);
  }
  template <class X>
  detail::Shape shape(const X& x) const {
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "GroupNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    static_assert(detail::tensor_traits<X>::rank >= 2,
                  "GroupNorm: expected input of rank >= 2 (N, C, *)");
    return detail::logical_shape(x, options_.channels_last(), kName);
  }
  VectorRef<const Scalar> wref() const {
    return options_.affine() ? VectorRef<const Scalar>(weight_) : VectorRef<const Scalar>();
  }
  VectorRef<const Scalar> bref() const {
    return options_.affine() ? VectorRef<const Scalar>(bias_) : VectorRef<const Scalar>();
  }
  void set_checked(Vector& dst, const Vector& v, const char* name) {
    const Index want = options_.affine() ? options_.num_channels() : 0;
    if (v.size() != want) {
      detail::fail(detail::Fail::shape, kName, "expected %s of %lld elements but got %lld", name,
                   static_cast<long long>(want), static_cast<long long>(v.size()));
    }
    dst = v;
  }

  GroupNormOptions options_;
  Vector weight_, bias_;
};

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_GROUP_NORM_HPP_
