// normkit/rms_norm.hpp: RMSNorm and the functional rms_norm, forward and backward (root mean
// square of each row over the trailing normalized_shape dims, elementwise weight).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_RMS_NORM_HPP_
#define NORMKIT_RMS_NORM_HPP_

#include <algorithm>  // std::fill
#include <limits>     // std::numeric_limits
#include <optional>   // std::optional
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

namespace detail {
/// RMSNorm's eps when none is given: the machine epsilon of the computation type (float for
/// float, half and bfloat16; double for double), as PyTorch.
template <class T>
double default_rms_eps() {
  return std::is_same<T, double>::value
             ? std::numeric_limits<double>::epsilon()
             : static_cast<double>(std::numeric_limits<float>::epsilon());
}
}  // namespace detail

/// Options of the functional rms_norm (torch.nn.functional.rms_norm).
template <class Scalar>
class RMSNormFuncOptions {
 public:
  /// Normalizes over the trailing dims equal to normalized_shape; no weight.
  /* implicit */ RMSNormFuncOptions(std::vector<Index> normalized_shape)  // NOLINT
      : normalized_shape_(std::move(normalized_shape)) {}
  /// Normalizes over the trailing dims equal to normalized_shape, e.g. {4096}.
  /* implicit */ RMSNormFuncOptions(std::initializer_list<Index> normalized_shape)  // NOLINT
      : normalized_shape_(normalized_shape) {}
  /// Trailing input dims normalized over (no default); must be non-empty.
  NORMKIT_ARG(std::vector<Index>, normalized_shape);
  /// Elementwise scale of prod(normalized_shape) values, row-major over normalized_shape;
  /// not set = no scaling.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Added to the mean of squares; std::nullopt (default): the computation type's machine
  /// epsilon (RMSNormOptions::eps).
  NORMKIT_ARG(std::optional<double>, eps);
};

/// RMS normalization (Zhang & Sennrich 2019), as F.rms_norm: y = x / sqrt(mean(x^2) + eps) *
/// weight with the mean over the trailing dims equal to normalized_shape. Any rank >=
/// len(normalized_shape); RowMajor or ColMajor. `saved` receives rstd per row (and mean 0).
/// @throws value_error for an empty normalized_shape; shape_error when the trailing dims
///         differ from normalized_shape or weight has the wrong size.
/// @code
/// normkit::rms_norm(h, y, normkit::RMSNormFuncOptions<float>({4096}).weight(w).eps(1e-6));
/// @endcode
template <class X, class Y, class P = detail::scalar_of<X>, class Device = Eigen::DefaultDevice>
void rms_norm(const X& x,
              Y&& y,
              const RMSNormFuncOptions<P>& options,
              SavedStats* saved = nullptr,
              const Device& device = Device()) {
  static_assert(detail::accepts_v<P, detail::scalar_of<X>>,
                "normkit::rms_norm: parameters of the input's type, or float parameters with "
                "bfloat16/half input");
  using T = detail::scalar_of<X>;
  const detail::Shape sh = detail::logical_shape(x, false, "rms_norm");
  detail::layer_norm_check("rms_norm", sh, options.normalized_shape(), options.weight(),
                           VectorRef<const P>());
  if (options.eps())
    detail::check_eps("rms_norm", *options.eps());
  auto* y_ptr = detail::prepare_output(x, y, "rms_norm");
  if (sh.numel() == 0)
    return;
  detail::layer_norm_forward(sh, static_cast<int>(options.normalized_shape().size()), x.data(),
                             y_ptr, options.weight(), VectorRef<const P>(),
                             options.eps().value_or(detail::default_rms_eps<T>()), saved,
                             static_cast<T*>(nullptr), detail::make_exec(device), true);
}

/// rms_norm on a device, without saved statistics.
template <class X,
          class Y,
          class P = detail::scalar_of<X>,
          class Device,
          detail::if_device<Device> = 0>
void rms_norm(const X& x, Y&& y, const RMSNormFuncOptions<P>& options, const Device& device) {
  rms_norm(x, y, options, nullptr, device);
}

/// Allocating form of rms_norm.
template <class X, class P = detail::scalar_of<X>>
auto rms_norm(const X& x, const RMSNormFuncOptions<P>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  rms_norm(x, y, options);
  return y;
}

namespace detail {

/// rms_norm_backward with parameters of type P (the input's, or float for bfloat16/half
/// input).
template <class P, class X, class DY, class DX, class Device>
void rms_norm_backward_with(const X& x,
                            const DY& dy,
                            DX&& dx,
                            const SavedStats& saved,
                            const std::vector<Index>& normalized_shape,
                            VectorRef<const P> weight,
                            VectorRef<P> grad_weight,
                            const Device& device) {
  using T = P;
  const char* who = "rms_norm_backward";
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
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  if (sh.numel() == 0) {
    for (Index i = 0; grad_weight && i < grad_weight.size(); ++i) grad_weight.data()[i] = T(0);
    return;
  }
  detail::layer_norm_backward(sh, static_cast<int>(normalized_shape.size()), x.data(), dy.data(),
                              dx_ptr, saved, weight, grad_weight, VectorRef<T>(),
                              detail::make_exec(device), true);
}

}  // namespace detail

/// Gradients of rms_norm from its saved statistics: with g = dy * weight and r = rstd,
/// dx = r * g - x * r^3 * mean(g * x), dweight = sum over rows of dy * x * r
/// (docs/semantics.md §7).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void rms_norm_backward(const X& x,
                       const DY& dy,
                       DX&& dx,
                       const SavedStats& saved,
                       const std::vector<Index>& normalized_shape,
                       VectorRef<const detail::scalar_of<X>> weight,
                       VectorRef<detail::scalar_of<X>> grad_weight,
                       const Device& device = Device()) {
  detail::rms_norm_backward_with<detail::scalar_of<X>>(x, dy, dx, saved, normalized_shape, weight,
                                                       grad_weight, device);
}

/// rms_norm_backward of bfloat16/half input with float parameters (mixed precision: dx in the
/// input's type, grad_weight/grad_bias in float).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice, detail::if_low<X> = 0>
void rms_norm_backward(const X& x,
                       const DY& dy,
                       DX&& dx,
                       const SavedStats& saved,
                       const std::vector<Index>& normalized_shape,
                       VectorRef<const float> weight,
                       VectorRef<float> grad_weight,
                       const Device& device = Device()) {
  detail::rms_norm_backward_with<float>(x, dy, dx, saved, normalized_shape, weight, grad_weight,
                                        device);
}

/// RMSNorm over the trailing dims equal to normalized_shape, as torch.nn.RMSNorm (PyTorch
/// >= 2.4): weight (1) of prod(normalized_shape) values, row-major over normalized_shape,
/// when elementwise_affine; no bias, no running statistics; the same in training and
/// evaluation. eps defaults to the computation type's machine epsilon.
/// @code
/// normkit::RMSNorm<float> norm{normkit::RMSNormOptions{{4096}}.eps(1e-6)};
/// auto y = norm.forward(h);  // h: (..., 4096)
/// @endcode
template <class Scalar>
class RMSNorm : public detail::ModuleBase<Scalar> {
 public:
  /// 1-D tensor type of the parameter.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch, used in error messages.
  static constexpr const char* kName = "RMSNorm";

  /// @throws value_error for an empty normalized_shape, negative extents or eps.
  explicit RMSNorm(const RMSNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }

  /// The options the module was constructed with.
  const RMSNormOptions& options() const { return options_; }
  /// The eps in use (options().eps(), or the computation type's machine epsilon).
  double eps() const { return options_.eps().value_or(detail::default_rms_eps<Scalar>()); }

  /// Normalizes each row of x over the trailing normalized_shape dims. Returns y.
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                  detail::tensor_traits<X>::layout>
        y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward into y.
  /// @throws shape_error when the trailing dims differ from normalized_shape.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "RMSNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(),
                             VectorRef<const Scalar>());
    auto* y_ptr = detail::prepare_output(x, y, kName);
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_forward(sh, static_cast<int>(options_.normalized_shape().size()), x.data(),
                                 y_ptr, wref(), VectorRef<const Scalar>(), eps(),
                                 keep ? &saved : nullptr, copy, detail::make_exec(device), true);
    }
    if (keep)
      this->commit(x, std::move(saved), this->keep_input_);
  }

  /// Pre-norm residual, fused ("add + norm" of transformer blocks): writes h = x + residual
  /// (the residual stream; computed in float and rounded once for bfloat16/half) and writes
  /// y = RMSNorm(h), each tensor crossing memory once. h may be x's or the residual's storage.
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
                  "RMSNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    static_assert(std::is_same<detail::scalar_of<X>, detail::scalar_of<R>>::value &&
                      detail::tensor_traits<X>::rank == detail::tensor_traits<R>::rank &&
                      detail::tensor_traits<X>::layout == detail::tensor_traits<R>::layout,
                  "forward_add: the residual must have the input's type, rank and storage order");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(),
                             VectorRef<const Scalar>());
    detail::check_same_dims(kName, "residual", x, residual);
    auto* h_ptr = detail::prepare_output(x, h, kName, "h");
    auto* y_ptr = detail::prepare_output(x, y, kName);
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_add_forward(sh, static_cast<int>(options_.normalized_shape().size()),
                                     x.data(), residual.data(), h_ptr, y_ptr, wref(),
                                     VectorRef<const Scalar>(), eps(), keep ? &saved : nullptr,
                                     copy, detail::make_exec(device), true);
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
  /// @throws value_error when no input is kept (then call backward(x, dy)).
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(this->kept_input(dy, kName), dy, device);
  }

  /// Gradients at x (the statistics the last training forward kept for an input of x's shape,
  /// else x's own).
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

  /// Non-allocating backward into caller-owned gradients (g.bias stays empty: no bias).
  template <class X,
            class DY,
            class G,
            class Device = Eigen::DefaultDevice,
            detail::if_gradients<G> = 0>
  void backward(const X& x, const DY& dy, G& g, const Device& device = Device()) {
    static_assert(detail::accepts_v<Scalar, detail::scalar_of<X>>,
                  "RMSNorm: input must be of the module's scalar type (or bfloat16/half for a "
                  "float module)");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(),
                             VectorRef<const Scalar>());
    detail::check_same_dims(kName, "grad_output", x, dy);
    const detail::Exec ex = detail::make_exec(device);
    const int D = static_cast<int>(options_.normalized_shape().size());
    SavedStats local;
    const SavedStats* st = &this->saved_;
    if (!this->kept_for(x) && sh.numel() != 0) {
      detail::layer_norm_stats(sh, D, x.data(), eps(), local, ex, true);
      st = &local;
    }
    const Index n = detail::product(options_.normalized_shape());
    const Index nw = options_.elementwise_affine() ? n : 0;
    detail::prepare_gradients(g, x, nw, 0);
    if (sh.numel() == 0) {
      std::fill(g.weight.data(), g.weight.data() + g.weight.size(), Scalar(0));
      return;
    }
    detail::layer_norm_backward(sh, D, x.data(), dy.data(), g.input.data(), *st, wref(),
                                nw ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                                VectorRef<Scalar>(), ex, true);
  }

  /// backward(dy) into caller-owned gradients.
  template <class DY, class G, class Device = Eigen::DefaultDevice, detail::if_gradients<G> = 0>
  void backward(const DY& dy, G& g, const Device& device = Device()) {
    backward(this->kept_input(dy, kName), dy, g, device);
  }

  /// Elementwise scale (init 1), flat prod(normalized_shape) values, row-major over
  /// normalized_shape; empty without elementwise_affine.
  const Vector& weight() const { return weight_; }
  /// Sets weight.
  /// @throws shape_error unless v has prod(normalized_shape) elements (0 without
  ///         elementwise_affine).
  void set_weight(const Vector& v) {
    const Index want =
        options_.elementwise_affine() ? detail::product(options_.normalized_shape()) : 0;
    if (v.size() != want) {
      detail::fail(detail::Fail::shape, kName, "expected weight of %lld elements but got %lld",
                   static_cast<long long>(want), static_cast<long long>(v.size()));
    }
    weight_ = v;
  }
  /// weight = 1 (when present).
  void reset_parameters() {
    if (options_.elementwise_affine())
      weight_ = detail::filled<Scalar>(detail::product(options_.normalized_shape()), Scalar(1));
  }

 private:
  VectorRef<const Scalar> wref() const {
    return options_.elementwise_affine() ? VectorRef<const Scalar>(weight_)
                                         : VectorRef<const Scalar>();
  }

  RMSNormOptions options_;
  Vector weight_;
};

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_RMS_NORM_HPP_
