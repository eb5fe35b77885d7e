// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_LAYER_NORM_HPP_
#define NORMKIT_LAYER_NORM_HPP_

#include <string>  // std::string
#include <vector>  // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/elementwise.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

namespace normkit {

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

namespace detail {

inline std::string list_str(const std::vector<Index>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

inline Index product(const std::vector<Index>& v) {
  Index p = 1;
  for (Index d : v) p *= d;
  return p;
}

template <class T>
void layer_norm_check(const char* who,
                      const Shape& sh,
                      const std::vector<Index>& ns,
                      const VectorRef<const T>& w,
                      const VectorRef<const T>& b) {
  if (ns.empty()) {
    throw_value(who,
                "Expected normalized_shape to be at least 1-dimensional, i.e., containing "
                "at least one element, but got normalized_shape = []");
  }
  const int D = static_cast<int>(ns.size());
  bool ok = sh.rank >= D;
  for (int j = 0; ok && j < D; ++j) {
    const auto lead = static_cast<std::size_t>(sh.rank - D);
    ok = sh.dim[lead + static_cast<std::size_t>(j)] == ns[static_cast<std::size_t>(j)];
  }
  if (!ok) {
    std::string want = list_str(ns);
    throw_shape(who, "Given normalized_shape=" + want + ", expected input with shape [*, " +
                         want.substr(1) + ", but got input of size" + shape_str(sh));
  }
  const Index n = product(ns);
  auto check = [&](const VectorRef<const T>& v, const char* name) {
    if (v && v.size() != n) {
      throw_shape(who, std::string("Expected ") + name +
                           " to be of same shape as normalized_shape, but got " + name + " of " +
                           std::to_string(v.size()) +
                           " elements and normalized_shape = " + list_str(ns));
    }
  };
  check(w, "weight");
  check(b, "bias");
}

// LayerNorm's plans. stats: leading axes are keys (one slot per row), trailing axes reduced,
// their aux index = the row-major position inside normalized_shape (gamma/beta's index).
// params (for dgamma/dbeta): trailing axes are keys, leading axes reduced, their aux index =
// the row's stats slot (to read its mean/rstd).
struct LayerPlans {
  Plan stats, params;
  int lead = 0;
  Index rows = 1, n = 1;
};

inline LayerPlans layer_plans(const Shape& sh, int D, bool with_params) {
  LayerPlans lp;
  lp.lead = sh.rank - D;
  std::array<AxisSpec, kMaxAxes> ax{};
  Index ps = 1;
  for (int i = sh.rank - 1; i >= 0; --i) {
    const auto u = static_cast<std::size_t>(i);
    const bool lead = i < lp.lead;
    ax[u] = AxisSpec{sh.dim[u], sh.stride[u], lead ? Role::key : Role::reduce, lead ? 0 : ps};
    if (lead) {
      lp.rows *= sh.dim[u];
    } else {
      ps *= sh.dim[u];
    }
  }
  lp.n = ps;
  lp.stats = make_plan(ax.data(), sh.rank);
  if (with_params) {
    for (int i = 0; i < sh.rank; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const bool lead = i < lp.lead;
      ax[u] = AxisSpec{sh.dim[u], sh.stride[u], lead ? Role::reduce : Role::key,
                       lead ? lp.stats.logical_slot_stride[u] : 0};
    }
    lp.params = make_plan(ax.data(), sh.rank);
  }
  return lp;
}

/// Plan slot of every logical (row-major) index over axes [first, last) of sh.
inline std::vector<Index> slot_map(const Shape& sh, const Plan& p, int first, int last) {
  Index count = 1;
  for (int i = first; i < last; ++i) count *= sh.dim[static_cast<std::size_t>(i)];
  std::vector<Index> map(static_cast<std::size_t>(count));
  for (Index l = 0; l < count; ++l) {
    Index rem = l, s = 0;
    for (int i = last - 1; i >= first; --i) {
      const Index d = sh.dim[static_cast<std::size_t>(i)];
      s += (rem % d) * p.logical_slot_stride[static_cast<std::size_t>(i)];
      rem /= d;
    }
    map[static_cast<std::size_t>(l)] = s;
  }
  return map;
}

template <class T, class Device>
void layer_norm_forward(const Shape& sh,
                        int D,
                        const T* x,
                        T* y,
                        const VectorRef<const T>& w,
                        const VectorRef<const T>& b,
                        double eps,
                        SavedStats* saved,
                        const Device& dev) {
  const LayerPlans lp = layer_plans(sh, D, false);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<acc_t> mean(rows), rstd(rows), center(rows);
  auto finish = [&](Index s, acc_t m, acc_t v) {
    mean[static_cast<std::size_t>(s)] = m;
    rstd[static_cast<std::size_t>(s)] = rstd_of(v, eps, false);
  };
  auto go = [&](const auto& op) {
    if (!fused_forward(lp.stats, lp.stats, x, center.data(), finish, op, dev)) {
      moments(lp.stats, x, mean.data(), rstd.data(), center.data(), dev);
      for (std::size_t s = 0; s < rows; ++s) finish(static_cast<Index>(s), mean[s], rstd[s]);
      for_each_run(lp.stats, op, dev);
    }
  };
  if (w || b) {
    // The caller's weight/bias are read in place; a missing one is replaced by ones/zeros.
    std::vector<T> fill;
    if (!w || !b)
      fill.assign(static_cast<std::size_t>(lp.n), w ? T(0) : T(1));
    go(AuxAffineOp<T>{x, y, mean.data(), rstd.data(), w ? w.data() : fill.data(),
                      b ? b.data() : fill.data()});
  } else {
    std::vector<acc_t> zero(rows, 0.0);
    go(AffineOp<T>{x, y, mean.data(), rstd.data(), zero.data()});
  }
  if (saved) {
    const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
    saved->mean = Eigen::Tensor<double, 1>(lp.rows);
    saved->rstd = Eigen::Tensor<double, 1>(lp.rows);
    for (Index l = 0; l < lp.rows; ++l) {
      saved->mean(l) = mean[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])];
      saved->rstd(l) = rstd[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])];
    }
    saved->batch_stats = true;
  }
}

template <class T, class Device>
void layer_norm_backward(const Shape& sh,
                         int D,
                         const T* x,
                         const T* dy,
                         T* dx,
                         const SavedStats& saved,
                         const VectorRef<const T>& w,
                         const VectorRef<T>& gw,
                         const VectorRef<T>& gb,
                         const Device& dev) {
  const bool params = gw || gb;
  const LayerPlans lp = layer_plans(sh, D, params);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<acc_t> mean(rows), rstd(rows), s1(rows), s2(rows), B(rows), C(rows);
  {
    const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
    for (Index l = 0; l < lp.rows; ++l) {
      mean[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.mean(l);
      rstd[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.rstd(l);
    }
  }
  if (dx) {
    std::vector<acc_t> gamma;
    const acc_t m = static_cast<acc_t>(lp.n);
    auto finish = [&](Index si, acc_t sum_g, acc_t sum_gx) {
      const auto s = static_cast<std::size_t>(si);
      const acc_t r = rstd[s];
      B[s] = -r * r * r * sum_gx / m;
      C[s] = -r * sum_g / m;
    };
    // dx = rstd * w * dy + B * (x - mean) + C per row, fused with the row sums when the row
    // fits in cache.
    auto go = [&](const auto& rop, const auto& aop) {
      if (can_fuse<T>(lp.stats, lp.stats, dev)) {
        fused_slots<T>(lp.stats, lp.stats, rop, finish, aop, dev);
      } else {
        reduce(lp.stats, rop, s1.data(), s2.data(), dev);
        for (std::size_t s = 0; s < rows; ++s) finish(static_cast<Index>(s), s1[s], s2[s]);
        for_each_run(lp.stats, aop, dev);
      }
    };
    if (w) {
      gamma.resize(static_cast<std::size_t>(lp.n));
      for (Index i = 0; i < lp.n; ++i)
        gamma[static_cast<std::size_t>(i)] = static_cast<acc_t>(w.data()[i]);
      go(GradSumsOp<T, true>{x, dy, mean.data(), gamma.data()},
         GradInputOp<T, true>{x, dy, dx, mean.data(), rstd.data(), B.data(), C.data(),
                              gamma.data()});
    } else {
      go(GradSumsOp<T, false>{x, dy, mean.data(), nullptr},
         GradInputOp<T, false>{x, dy, dx, mean.data(), rstd.data(), B.data(), C.data(), nullptr});
    }
  }
  if (params) {
    const auto n = static_cast<std::size_t>(lp.n);
    std::vector<acc_t> dg(n), dbv(n);
    reduce(lp.params, RowStatGradOp<T>{x, dy, mean.data(), rstd.data()}, dg.data(), dbv.data(),
           dev);
    const std::vector<Index> map = slot_map(sh, lp.params, lp.lead, sh.rank);
    for (std::size_t p = 0; p < n; ++p) {
      const auto s = static_cast<std::size_t>(map[p]);
      if (gw)
        gw.data()[p] = static_cast<T>(dg[s]);
      if (gb)
        gb.data()[p] = static_cast<T>(dbv[s]);
    }
  }
}

}  // namespace detail

/// Layer normalization (Ba et al. 2016), as F.layer_norm: statistics of each row over the
/// trailing dims equal to normalized_shape; y = (x - mean) / sqrt(var + eps) * weight + bias
/// with elementwise weight/bias (biased variance). Any rank >= len(normalized_shape); dims
/// are the tensor's own (RowMajor or ColMajor alike).
/// @throws value_error for an empty normalized_shape; shape_error when the trailing dims
///         differ from normalized_shape or weight/bias have the wrong size.
template <class X, class Y, class Device = Eigen::DefaultDevice>
void layer_norm(const X& x,
                Y& y,
                const LayerNormFuncOptions<detail::scalar_of<X>>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  const detail::Shape sh = detail::logical_shape(x, false, "layer_norm");
  detail::layer_norm_check("layer_norm", sh, options.normalized_shape(), options.weight(),
                           options.bias());
  auto* y_ptr = detail::prepare_output(x, y, "layer_norm");
  if (sh.numel() == 0)
    return;
  detail::layer_norm_forward(sh, static_cast<int>(options.normalized_shape().size()), x.data(),
                             y_ptr, options.weight(), options.bias(), options.eps(), saved, device);
}

/// Allocating form of layer_norm.
template <class X>
auto layer_norm(const X& x, const LayerNormFuncOptions<detail::scalar_of<X>>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  layer_norm(x, y, options);
  return y;
}

/// Gradients of layer_norm from its saved statistics: dx = r * (g - mean(g) - xhat *
/// mean(g * xhat)) with g = dy * weight; dweight = sum over rows of dy * xhat, dbias = sum dy.
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void layer_norm_backward(const X& x,
                         const DY& dy,
                         DX& dx,
                         const SavedStats& saved,
                         const std::vector<Index>& normalized_shape,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         const Device& device = Device()) {
  using T = detail::scalar_of<X>;
  const char* who = "layer_norm_backward";
  const detail::Shape sh = detail::logical_shape(x, false, who);
  detail::layer_norm_check(who, sh, normalized_shape, weight, VectorRef<const T>());
  constexpr int R = detail::tensor_traits<X>::rank;
  for (int i = 0; i < R; ++i) {
    if (detail::dim(x, i) != detail::dim(dy, i)) {
      detail::throw_shape(who, "expected grad_output of size " +
                                   detail::dims_str(x.dimensions(), R) + " but got " +
                                   detail::dims_str(dy.dimensions(), R));
    }
  }
  const Index n = detail::product(normalized_shape);
  const Index rows = n == 0 ? 0 : sh.numel() / n;
  if (n != 0 && (saved.mean.size() != rows || saved.rstd.size() != rows)) {
    detail::throw_shape(who, "expected saved statistics of " + std::to_string(rows) +
                                 " rows but got " + std::to_string(saved.mean.size()));
  }
  detail::check_size(who, "grad_weight", grad_weight, n);
  detail::check_size(who, "grad_bias", grad_bias, n);
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  if (sh.numel() == 0) {
    for (Index i = 0; grad_weight && i < grad_weight.size(); ++i) grad_weight.data()[i] = 0;
    for (Index i = 0; grad_bias && i < grad_bias.size(); ++i) grad_bias.data()[i] = 0;
    return;
  }
  detail::layer_norm_backward(sh, static_cast<int>(normalized_shape.size()), x.data(), dy.data(),
                              dx_ptr, saved, weight, grad_weight, grad_bias, device);
}

/// LayerNorm over the trailing dims equal to normalized_shape, as torch.nn.LayerNorm.
/// weight (1) and bias (0) hold prod(normalized_shape) values, row-major over
/// normalized_shape (PyTorch's flattening), when elementwise_affine (bias also needs
/// bias(true), the default). Same in training and evaluation.
/// @code
/// normkit::LayerNorm<float> ln(normkit::LayerNormOptions({768}));
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

  template <class X, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Normalizes each row of x over the trailing normalized_shape dims; same in training and
  /// evaluation. Returns y; throws as the non-allocating forward.
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// @throws shape_error when the trailing dims differ from normalized_shape.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "LayerNorm: input scalar type differs from the module's");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(), bref());
    auto* y_ptr = detail::prepare_output(x, y, kName);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_forward(sh, static_cast<int>(options_.normalized_shape().size()), x.data(),
                                 y_ptr, wref(), bref(), options_.eps(),
                                 this->requires_grad_ ? &saved : nullptr, device);
    }
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
    const Index n = detail::product(options_.normalized_shape());
    if (options_.elementwise_affine()) {
      g.weight.resize(n);
      g.weight.setZero();
      if (options_.bias()) {
        g.bias.resize(n);
        g.bias.setZero();
      }
    }
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::prepare_output(x, g.input, kName);
    if (sh.numel() != 0) {
      detail::layer_norm_backward(
          sh, static_cast<int>(options_.normalized_shape().size()), x.data(), dy.data(),
          g.input.data(), this->saved_, wref(),
          g.weight.size() ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
          g.bias.size() ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), device);
    }
    return g;
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
      detail::throw_shape(kName, std::string("expected ") + name + " of " + std::to_string(want) +
                                     " elements but got " + std::to_string(v.size()));
    }
    dst = v;
  }

  LayerNormOptions options_;
  Vector weight_, bias_;
};

}  // namespace normkit

#endif  // NORMKIT_LAYER_NORM_HPP_
