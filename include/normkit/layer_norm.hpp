// normkit/layer_norm.hpp: LayerNorm and the functional layer_norm, forward and backward
// (statistics per row over the trailing normalized_shape dims, elementwise affine).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_LAYER_NORM_HPP_
#define NORMKIT_LAYER_NORM_HPP_

#include <algorithm>  // std::fill
#include <string>     // std::string
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/layer_norm_impl.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE

/// Options of the functional layer_norm (torch.nn.functional.layer_norm). weight and bias
/// hold prod(normalized_shape) values in row-major (PyTorch) order of normalized_shape.
template <class Scalar>
class LayerNormFuncOptions {
 public:
  /// Normalizes over the trailing dims equal to normalized_shape; no weight or bias.
  /* implicit */ LayerNormFuncOptions(std::vector<Index> normalized_shape)  // NOLINT
      : normalized_shape_(std::move(normalized_shape)) {}
  /// Normalizes over the trailing dims equal to normalized_shape, e.g. {768}.
  /* implicit */ LayerNormFuncOptions(std::initializer_list<Index> normalized_shape)  // NOLINT
      : normalized_shape_(normalized_shape) {}
  /// Trailing input dims normalized over (no default); must be non-empty.
  NORMKIT_ARG(std::vector<Index>, normalized_shape);
  /// Elementwise scale of prod(normalized_shape) values, row-major over normalized_shape;
  /// not set = no scaling.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Elementwise shift of prod(normalized_shape) values, row-major over normalized_shape;
  /// not set = no shift.
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  /// Added to the variance inside the square root (default 1e-5).
  NORMKIT_ARG(double, eps) = 1e-5;
};

/// Layer normalization (Ba et al. 2016), as F.layer_norm: statistics of each row over the
/// trailing dims equal to normalized_shape; y = (x - mean) / sqrt(var + eps) * weight + bias
/// with elementwise weight/bias (biased variance). Any rank >= len(normalized_shape); dims
/// are the tensor's own (RowMajor or ColMajor alike).
/// @throws value_error for an empty normalized_shape; shape_error when the trailing dims
///         differ from normalized_shape or weight/bias have the wrong size.
/// @code
/// normkit::layer_norm(x, y, normkit::LayerNormFuncOptions<float>({768}).weight(w).bias(b));
/// @endcode
template <class X, class Y, class P = detail::scalar_of<X>, class Device = Eigen::DefaultDevice>
void layer_norm(const X& x,
                Y&& y,
                const LayerNormFuncOptions<P>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  static_assert(detail::accepts_v<P, detail::scalar_of<X>>,
                "normkit::layer_norm: parameters of the input's type, or float parameters with "
                "bfloat16/half input");
  const detail::Shape sh = detail::logical_shape(x, false, "layer_norm");
  detail::layer_norm_check("layer_norm", sh, options.normalized_shape(), options.weight(),
                           options.bias());
  auto* y_ptr = detail::prepare_output(x, y, "layer_norm");
  if (sh.numel() == 0)
    return;
  detail::layer_norm_forward(sh, static_cast<int>(options.normalized_shape().size()), x.data(),
                             y_ptr, options.weight(), options.bias(), options.eps(), saved,
                             static_cast<detail::scalar_of<X>*>(nullptr),
                             detail::make_exec(device));
}

/// layer_norm on a device, without saved statistics.
template <class X,
          class Y,
          class P = detail::scalar_of<X>,
          class Device,
          detail::if_device<Device> = 0>
void layer_norm(const X& x, Y&& y, const LayerNormFuncOptions<P>& options, const Device& device) {
  layer_norm(x, y, options, nullptr, device);
}

/// Allocating form of layer_norm.
template <class X, class P = detail::scalar_of<X>>
auto layer_norm(const X& x, const LayerNormFuncOptions<P>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  layer_norm(x, y, options);
  return y;
}

namespace detail {

/// layer_norm_backward with parameters of type P (the input's, or float for bfloat16/half
/// input).
template <class P, class X, class DY, class DX, class Device>
void layer_norm_backward_with(const X& x,
                              const DY& dy,
                              DX&& dx,
                              const SavedStats& saved,
                              const std::vector<Index>& normalized_shape,
                              VectorRef<const P> weight,
                              VectorRef<P> grad_weight,
                              VectorRef<P> grad_bias,
                              const Device& device) {
  using T = P;
  const char* who = "layer_norm_backward";
  const detail::Shape sh = detail::logical_shape(x, false, who);
  detail::layer_norm_check(who, sh, normalized_shape, weight, VectorRef<const T>());
  detail::check_same_dims(who, "grad_output", x, dy);
  const Index n = detail::product(normalized_shape);
  const Index rows = n == 0 ? 0 : sh.numel() / n;
  if (n != 0 && (saved.mean.size() != rows || saved.rstd.size() != rows)) {
    detail::fail(detail::Fail::shape, who, "expected saved statistics of %lld rows but got %lld",
                 static_cast<long long>(rows), static_cast<long long>(saved.mean.size()));
  }
  detail::check_size(who, "grad_weight", grad_weight, n);
  detail::check_size(who, "grad_bias", grad_bias, n);
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  if (sh.numel() == 0) {
    for (Index i = 0; grad_weight && i < grad_weight.size(); ++i) grad_weight.data()[i] = T(0);
    for (Index i = 0; grad_bias && i < grad_bias.size(); ++i) grad_bias.data()[i] = T(0);
    return;
  }
  detail::layer_norm_backward(sh, static_cast<int>(normalized_shape.size()), x.data(), dy.data(),
                              dx_ptr, saved, weight, grad_weight, grad_bias,
                              detail::make_exec(device));
}

}  // namespace detail

/// Gradients of layer_norm from its saved statistics: dx = r * (g - mean(g) - xhat *
/// mean(g * xhat)) with g = dy * weight; dweight = sum over rows of dy * xhat, dbias = sum dy
/// (docs/semantics.md §8).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void layer_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         const std::vector<Index>& normalized_shape,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         const Device& device = Device()) {
  detail::layer_norm_backward_with<detail::scalar_of<X>>(x, dy, dx, saved, normalized_shape, weight,
                                                         grad_weight, grad_bias, device);
}

/// layer_norm_backward of bfloat16/half input with float parameters (mixed precision: dx in the
/// input's type, grad_weight/grad_bias in float).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice, detail::if_low<X> = 0>
void layer_norm_backward(const X& x,
                         const DY& dy,
                         DX&& dx,
                         const SavedStats& saved,
                         const std::vector<Index>& normalized_shape,
                         VectorRef<const float> weight,
                         VectorRef<float> grad_weight,
                         VectorRef<float> grad_bias,
                         const Device& device = Device()) {
  detail::layer_norm_backward_with<float>(x, dy, dx, saved, normalized_shape, weight, grad_weight,
                                          grad_bias, device);
}

/// LayerNorm over the trailing dims equal to normalized_shape, as torch.nn.LayerNorm.
/// weight (1) and bias (0) hold prod(normalized_shape) values, row-major over
/// normalized_shape (PyTorch's flattening), when elementwise_affine (bias also needs
/// bias(true), the default). Same in training and evaluation.
/// @code
/// normkit::LayerNorm<float> ln{normkit::LayerNormOptions{{768}}};
/// auto y = ln.forward(x);  // x: (..., 768)
/// @endcode
template <class Scalar>
class LayerNorm : public detail::ModuleBase<Scalar> {
 public:
  /// 1-D tensor type of the parameters.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch (e.g. "LayerNorm"), used in error messages.
  static constexpr const char* kName = "LayerNorm";

  /// @throws value_error for an empty normalized_shape, negative extents or eps.
  explicit LayerNorm(const LayerNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }

  /// The options the module was constructed with.
  const LayerNormOptions& options() const { return options_; }

  /// Normalizes each row of x over the trailing normalized_shape dims; same in training and
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
  /// @throws shape_error when the trailing dims differ from normalized_shape.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "LayerNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(), bref());
    auto* y_ptr = detail::prepare_output(x, y, kName);
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_forward(sh, static_cast<int>(options_.normalized_shape().size()), x.data(),
                                 y_ptr, wref(), bref(), options_.eps(), keep ? &saved : nullptr,
                                 copy, detail::make_exec(device));
    }
    if (keep)
      this->commit(x, std::move(saved), this->keep_input_);
  }

  /// Pre-norm residual, fused ("add + norm" of transformer blocks): writes h = x + residual
  /// (the residual stream; computed in float and rounded once for bfloat16/half) and writes
  /// y = LayerNorm(h), each tensor crossing memory once. h may be x's or the residual's storage.
  /// Otherwise as forward(h): training keeps h's statistics (and a copy of h), so
  /// backward(dy) gives dL/dh.
  /// @throws shape_error when the residual's dims differ from x's; as forward() otherwise.
  template <class X,
            class R,
            class H,
            class Y,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<R> = 0,
            detail::if_tensor<H> = 0,
            detail::if_tensor<Y> = 0>
  void forward_add(const X& x, const R& residual, H&& h, Y&& y, const Device& device = Device()) {
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "LayerNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    static_assert(std::is_same<detail::scalar_of<X>, detail::scalar_of<R>>::value &&
                      detail::tensor_traits<X>::rank == detail::tensor_traits<R>::rank &&
                      detail::tensor_traits<X>::layout == detail::tensor_traits<R>::layout,
                  "forward_add: the residual must have the input's type, rank and storage order");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(), bref());
    detail::check_same_dims(kName, "residual", x, residual);
    auto* h_ptr = detail::prepare_output(x, h, kName, "h");
    auto* y_ptr = detail::prepare_output(x, y, kName);
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_add_forward(sh, static_cast<int>(options_.normalized_shape().size()),
                                     x.data(), residual.data(), h_ptr, y_ptr, wref(), bref(),
                                     options_.eps(), keep ? &saved : nullptr, copy,
                                     detail::make_exec(device), false);
    }
    if (keep)
      this->commit(x, std::move(saved), this->keep_input_);
  }
  /// Allocating forward_add: returns y.
  template <class X,
            class R,
            class H,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<R> = 0,
            detail::if_tensor<H> = 0,
            detail::if_device<Device> = 0>
  auto forward_add(const X& x, const R& residual, H&& h, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    forward_add(x, residual, h, y, device);
    return y;
  }

  /// Gradients for the last training forward from its kept input (keep_input()).
  /// @throws value_error when no input is kept (then call backward(x, dy)); shape_error when
  ///         dy differs from the kept input's dims.
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(this->kept_input(dy, kName), dy, device);
  }

  /// Gradients at x (the row statistics the last training forward kept for an input of x's
  /// shape, else x's own).
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
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "LayerNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(), bref());
    detail::check_same_dims(kName, "grad_output", x, dy);
    const detail::Exec ex = detail::make_exec(device);
    const int D = static_cast<int>(options_.normalized_shape().size());
    SavedStats local;
    const SavedStats* st = &this->saved_;
    if (!this->kept_for(x) && sh.numel() != 0) {
      detail::layer_norm_stats(sh, D, x.data(), options_.eps(), local, ex);
      st = &local;
    }
    const Index n = detail::product(options_.normalized_shape());
    const Index nw = options_.elementwise_affine() ? n : 0;
    const Index nb = options_.elementwise_affine() && options_.bias() ? n : 0;
    detail::prepare_gradients(g, x, nw, nb);
    if (sh.numel() == 0) {
      std::fill(g.weight.data(), g.weight.data() + g.weight.size(), Scalar(0));
      std::fill(g.bias.data(), g.bias.data() + g.bias.size(), Scalar(0));
      return;
    }
    detail::layer_norm_backward(sh, D, x.data(), dy.data(), g.input.data(), *st, wref(),
                                nw ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                                nb ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), ex);
  }

  /// backward(dy) into caller-owned gradients.
  template <class DY, class G, class Device = Eigen::DefaultDevice, detail::if_gradients<G> = 0>
  void backward(const DY& dy, G& g, const Device& device = Device()) {
    backward(this->kept_input(dy, kName), dy, g, device);
  }

  /// Elementwise scale (init 1), flat prod(normalized_shape) values, row-major over
  /// normalized_shape; empty without elementwise_affine.
  const Vector& weight() const { return weight_; }
  /// Elementwise shift (init 0), flat like weight(); empty without elementwise_affine or with
  /// bias(false).
  const Vector& bias() const { return bias_; }
  /// Sets weight.
  /// @throws shape_error unless v has prod(normalized_shape) elements (0 without
  ///         elementwise_affine).
  void set_weight(const Vector& v) {
    set_checked(weight_, v, "weight", options_.elementwise_affine());
  }
  /// Sets bias.
  /// @throws shape_error unless v has prod(normalized_shape) elements (0 without the bias).
  void set_bias(const Vector& v) {
    set_checked(bias_, v, "bias", options_.elementwise_affine() && options_.bias());
  }
  /// weight = 1, bias = 0 (when present).
  void reset_parameters() {
    const Index n = detail::product(options_.normalized_shape());
    if (options_.elementwise_affine()) {
      weight_ = detail::filled<Scalar>(n, Scalar(1));
      if (options_.bias())
        bias_ = detail::filled<Scalar>(n, Scalar(0));
    }
  }

 private:
  VectorRef<const Scalar> wref() const {
    return options_.elementwise_affine() ? VectorRef<const Scalar>(weight_)
                                         : VectorRef<const Scalar>();
  }
  VectorRef<const Scalar> bref() const {
    return options_.elementwise_affine() && options_.bias() ? VectorRef<const Scalar>(bias_)
                                                            : VectorRef<const Scalar>();
  }
  void set_checked(Vector& dst, const Vector& v, const char* name, bool exists) {
    const Index want = exists ? detail::product(options_.normalized_shape()) : 0;
    if (v.size() != want) {
      detail::fail(detail::Fail::shape, kName, "expected %s of %lld elements but got %lld", name,
                   static_cast<long long>(want), static_cast<long long>(v.size()));
    }
    dst = v;
  }

  LayerNormOptions options_;
  Vector weight_, bias_;
};

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_LAYER_NORM_HPP_
