// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_GROUP_NORM_HPP_
#define NORMKIT_GROUP_NORM_HPP_

#include <string>  // std::string
#include <vector>  // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/channel_norm.hpp>
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

namespace detail {

// GroupNorm: statistics per (n, g) over the group's C/G channels and all spatial positions
// (stats plan: keys N, G; reduced Cg, spatial), then a per-(n, c) folded apply (apply plan:
// keys N, C), since gamma/beta are per channel.
struct GroupPlans {
  Plan stats, stats_aux, apply;  // stats_aux: the stats plan with aux = channel index
  Index N, C, G, Cg;
};

inline GroupPlans group_plans(const Shape& sh, Index G) {
  GroupPlans gp;
  gp.N = sh.dim[0];
  gp.C = sh.dim[1];
  gp.G = G;
  gp.Cg = gp.C / G;
  std::array<AxisSpec, kMaxAxes> ax{};
  ax[0] = AxisSpec{gp.N, sh.stride[0], Role::key, 0};
  ax[1] = AxisSpec{G, gp.Cg * sh.stride[1], Role::key, 0};
  ax[2] = AxisSpec{gp.Cg, sh.stride[1], Role::reduce, 0};
  for (int i = 2; i < sh.rank; ++i) {
    const auto u = static_cast<std::size_t>(i);
    ax[u + 1] = AxisSpec{sh.dim[u], sh.stride[u], Role::reduce, 0};
  }
  gp.stats = make_plan(ax.data(), sh.rank + 1);
  ax[1].aux_stride = gp.Cg;
  ax[2].aux_stride = 1;
  gp.stats_aux = make_plan(ax.data(), sh.rank + 1);
  gp.apply = channel_plan(ChannelNormKind::instance, sh);
  return gp;
}

template <class T>
void group_norm_check(const char* who,
                      const Shape& sh,
                      Index G,
                      const VectorRef<const T>& w,
                      const VectorRef<const T>& b) {
  if (G <= 0)
    throw_value(who, "Expected num groups to be greater than 0, got " + std::to_string(G));
  const Index C = sh.dim[1];
  if (C % G != 0) {
    throw_shape(who,
                "Expected number of channels in input to be divisible by num_groups, but got input "
                "of shape " +
                    shape_str(sh) + " and num_groups=" + std::to_string(G));
  }
  auto check = [&](const VectorRef<const T>& v, const char* name) {
    if (v && v.size() != C) {
      throw_shape(who,
                  std::string("Expected ") + name +
                      " to be a vector of size equal to the number of channels in input, but got " +
                      name + " of shape [" + std::to_string(v.size()) + "] and input of shape " +
                      shape_str(sh));
    }
  };
  check(w, "weight");
  check(b, "bias");
}

template <class T, class Device>
void group_norm_forward(const Shape& sh,
                        Index G,
                        const T* x,
                        T* y,
                        const VectorRef<const T>& w,
                        const VectorRef<const T>& b,
                        double eps,
                        SavedStats* saved,
                        const Device& dev) {
  const GroupPlans gp = group_plans(sh, G);
  const Index NG = gp.N * G;
  std::vector<acc_t> mean(static_cast<std::size_t>(NG)), rstd(mean.size()), center(mean.size());
  std::vector<T> ones, zeros;
  if (!w)
    ones.assign(static_cast<std::size_t>(gp.C), T(1));
  if (!b)
    zeros.assign(static_cast<std::size_t>(gp.C), T(0));
  const T* gamma = w ? w.data() : ones.data();
  const T* beta = b ? b.data() : zeros.data();
  auto finish = [&](Index s, acc_t m, acc_t v) {
    mean[static_cast<std::size_t>(s)] = m;
    rstd[static_cast<std::size_t>(s)] = rstd_of(v, eps, false);
  };
  // Per-channel gamma/beta through the aux index (the channel) of the stats plan.
  const AuxAffineOp<T> op{x, y, mean.data(), rstd.data(), gamma, beta};
  if (!fused_forward(gp.stats, gp.stats_aux, x, center.data(), finish, op, dev)) {
    moments(gp.stats, x, mean.data(), rstd.data(), center.data(), dev);
    for (std::size_t s = 0; s < mean.size(); ++s) finish(static_cast<Index>(s), mean[s], rstd[s]);
    for_each_run(gp.stats_aux, op, dev);
  }
  auto sslot = [&](Index n, Index g) {
    return n * gp.stats.logical_slot_stride[0] + g * gp.stats.logical_slot_stride[1];
  };
  if (saved) {
    saved->mean.resize(NG);  // no allocation when the size is unchanged
    saved->rstd.resize(NG);
    for (Index n = 0; n < gp.N; ++n) {
      for (Index g = 0; g < G; ++g) {
        const auto s = static_cast<std::size_t>(sslot(n, g));
        saved->mean(n * G + g) = mean[s];
        saved->rstd(n * G + g) = rstd[s];
      }
    }
    saved->batch_stats = true;
  }
}

template <class T, class Device>
void group_norm_backward(const Shape& sh,
                         Index G,
                         const T* x,
                         const T* dy,
                         T* dx,
                         const SavedStats& saved,
                         const VectorRef<const T>& w,
                         const VectorRef<T>& gw,
                         const VectorRef<T>& gb,
                         const Device& dev) {
  const GroupPlans gp = group_plans(sh, G);
  const Index NC = gp.N * gp.C;
  auto aslot = [&](Index n, Index c) {
    return n * gp.apply.logical_slot_stride[0] + c * gp.apply.logical_slot_stride[1];
  };
  const auto nc = static_cast<std::size_t>(NC);
  std::vector<acc_t> center(nc), s1(nc), s2(nc), A(nc), B(nc), Cc(nc);
  for (Index n = 0; n < gp.N; ++n) {
    for (Index c = 0; c < gp.C; ++c)
      center[static_cast<std::size_t>(aslot(n, c))] = saved.mean(n * G + c / gp.Cg);
  }
  const acc_t m = static_cast<acc_t>(gp.Cg * spatial_size(sh));
  std::vector<acc_t> dw(static_cast<std::size_t>(gp.C), 0.0), db(dw.size(), 0.0);
  auto gamma = [&](Index c) { return w ? static_cast<acc_t>(w.data()[c]) : acc_t{1}; };
  const GradSumsOp<T, false> rop{x, dy, center.data(), nullptr};
  const GradInputOp<T, false> aop{x, dy, dx, center.data(), A.data(), B.data(), Cc.data(), nullptr};
  const reduction_impl::Nest na = reduction_impl::split(gp.apply);
  // NB: fused per group (NCHW-like layouts whose (n, c) planes are single runs): the group's
  // channel sums, its coefficients and its dx, while the group's Cg planes are in cache --
  // 3B of traffic instead of 5B. The sums are reduce()'s (row_group, one block per plane);
  // dweight/dbias are then accumulated in the same order as the two-pass path. Chosen by
  // shape only.
  const bool fuse = dx && !gp.apply.column_mode() && na.R == 1 && na.L <= kBlockElements &&
                    na.T == NC && gp.apply.logical_slot_stride[0] == gp.C &&
                    gp.apply.logical_slot_stride[1] == 1;
  // dx coefficients of group (n, g) from its channels' sums.
  auto coefficients = [&](Index n, Index g) {
    const acc_t r = saved.rstd(n * G + g);
    acc_t sdy = 0, sdyx = 0;
    for (Index c = g * gp.Cg; c < (g + 1) * gp.Cg; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      sdy += gamma(c) * s1[a];
      sdyx += gamma(c) * s2[a];
    }
    for (Index c = g * gp.Cg; c < (g + 1) * gp.Cg; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      A[a] = gamma(c) * r;
      B[a] = m > 0 ? -r * r * r * sdyx / m : 0;
      Cc[a] = m > 0 ? -r * sdy / m : 0;
    }
  };
  if (fuse) {
    const Index NG = gp.N * G, Cg = gp.Cg;
    const bool parallel = device_threads(dev) > 1 && sh.numel() >= kMinParallelElements;
    parallel_for(dev, NG, double(Cg * na.L) * 5.0 * sizeof(T), parallel,
                 [&](Index first, Index last) {
                   Odometer ko = na.ko;
                   ko.seek(first * Cg);
                   for (Index q = first; q < last; ++q) {
                     const Odometer start = ko;
                     for (Index i = 0; i < Cg; ++i, ko.next()) {
                       const auto a = static_cast<std::size_t>(ko.slot);
                       reduction_impl::row_group<0>(na, rop, ko, 1, s1[a], s2[a]);
                     }
                     coefficients(q / G, q % G);
                     ko = start;
                     for (Index i = 0; i < Cg; ++i, ko.next())
                       aop.template run<false, 0>(ko.offset, na.L, ko.slot, 0, 0);
                   }
                 });
  } else {
    // Per (n, c): sum dy and sum dy * (x - mean_ng) -- the same core as every other norm.
    reduce(gp.apply, rop, s1.data(), s2.data(), dev);
    for (Index n = 0; n < gp.N; ++n) {
      for (Index g = 0; g < G; ++g) coefficients(n, g);
    }
    if (dx)
      for_each_run(gp.apply, aop, dev);
  }
  for (Index n = 0; n < gp.N; ++n) {
    for (Index c = 0; c < gp.C; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      dw[static_cast<std::size_t>(c)] += s2[a] * saved.rstd(n * G + c / gp.Cg);
      db[static_cast<std::size_t>(c)] += s1[a];
    }
  }
  store_grad(gw, dw.data());
  store_grad(gb, db.data());
}

}  // namespace detail

/// Group normalization (Wu & He 2018), as F.group_norm: channels split into num_groups
/// contiguous groups; y = (x - mean_ng) / sqrt(var_ng + eps) * weight_c + bias_c with the
/// mean and biased variance of each (n, g) over its C/G channels and all spatial positions.
/// Same in training and evaluation. Unlike PyTorch there is no "more than 1 value" guard
/// (SEMANTICS.md Policy 2): a one-element group returns bias.
/// @throws value_error for num_groups <= 0; shape_error if C is not divisible by
///         num_groups or weight/bias do not have C elements.
template <class X, class Y, class Device = Eigen::DefaultDevice>
void group_norm(const X& x,
                Y& y,
                const GroupNormFuncOptions<detail::scalar_of<X>>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  static_assert(detail::tensor_traits<X>::rank >= 2,
                "normkit::group_norm: expected input of rank >= 2 (N, C, *)");
  const detail::Shape sh = detail::logical_shape(x, options.channels_last(), "group_norm");
  detail::group_norm_check("group_norm", sh, options.num_groups(), options.weight(),
                           options.bias());
  auto* y_ptr = detail::prepare_output(x, y, "group_norm");
  if (sh.numel() == 0)
    return;
  detail::group_norm_forward(sh, options.num_groups(), x.data(), y_ptr, options.weight(),
                             options.bias(), options.eps(), saved, device);
}

/// Allocating form of group_norm.
template <class X>
auto group_norm(const X& x, const GroupNormFuncOptions<detail::scalar_of<X>>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  group_norm(x, y, options);
  return y;
}

/// Gradients of group_norm from its saved statistics (SEMANTICS.md §8).
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void group_norm_backward(const X& x,
                         const DY& dy,
                         DX& dx,
                         const SavedStats& saved,
                         Index num_groups,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         bool channels_last = false,
                         const Device& device = Device()) {
  const detail::Shape sh = detail::logical_shape(x, channels_last, "group_norm_backward");
  detail::group_norm_check("group_norm_backward", sh, num_groups, weight,
                           VectorRef<const detail::scalar_of<X>>());
  constexpr int R = detail::tensor_traits<X>::rank;
  for (int i = 0; i < R; ++i) {
    if (detail::dim(x, i) != detail::dim(dy, i)) {
      detail::throw_shape("group_norm_backward",
                          "expected grad_output of size " + detail::dims_str(x.dimensions(), R) +
                              " but got " + detail::dims_str(dy.dimensions(), R));
    }
  }
  if (saved.mean.size() != sh.dim[0] * num_groups || saved.rstd.size() != saved.mean.size()) {
    detail::throw_shape("group_norm_backward",
                        "expected saved statistics of " + std::to_string(sh.dim[0] * num_groups) +
                            " slots but got " + std::to_string(saved.mean.size()));
  }
  detail::check_size("group_norm_backward", "grad_weight", grad_weight, sh.dim[1]);
  detail::check_size("group_norm_backward", "grad_bias", grad_bias, sh.dim[1]);
  auto* dx_ptr = detail::prepare_output(x, dx, "group_norm_backward", "grad_input");
  if (sh.numel() == 0) {
    for (Index c = 0; grad_weight && c < grad_weight.size(); ++c) grad_weight.data()[c] = 0;
    for (Index c = 0; grad_bias && c < grad_bias.size(); ++c) grad_bias.data()[c] = 0;
    return;
  }
  detail::group_norm_backward(sh, num_groups, x.data(), dy.data(), dx_ptr, saved, weight,
                              grad_weight, grad_bias, device);
}

/// GroupNorm over (N, C, *) input, as torch.nn.GroupNorm; weight (1) and bias (0) of
/// num_channels elements when affine. No running statistics: training and evaluation agree.
/// @code
/// normkit::GroupNorm<float> gn(normkit::GroupNormOptions(/*num_groups=*/32,
/// /*num_channels=*/256)); auto y = gn.forward(x);  // x: (N, 256, H, W)
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

  template <class X, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Normalizes x with the statistics of each (sample, group); same in training and evaluation.
  /// Returns y; throws as the non-allocating forward.
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// @throws shape_error for a wrong channel count. The module is unchanged when it throws.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    const detail::Shape sh = shape(x);
    detail::check_channels(kName, "num_channels", options_.num_channels(), sh);
    auto* y_ptr = detail::prepare_output(x, y, kName);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::group_norm_forward(sh, options_.num_groups(), x.data(), y_ptr, wref(), bref(),
                                 options_.eps(), this->requires_grad_ ? &saved : nullptr, device);
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
    const bool affine = options_.affine();
    if (affine) {
      g.weight.resize(options_.num_channels());
      g.bias.resize(options_.num_channels());
      g.weight.setZero();
      g.bias.setZero();
    }
    const detail::Shape sh = shape(x);
    detail::prepare_output(x, g.input, kName);
    if (sh.numel() != 0) {
      detail::group_norm_backward(sh, options_.num_groups(), x.data(), dy.data(), g.input.data(),
                                  this->saved_, wref(),
                                  affine ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                                  affine ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), device);
    }
    return g;
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
  template <class X>
  detail::Shape shape(const X& x) const {
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "GroupNorm: input scalar type differs from the module's");
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
      detail::throw_shape(kName, std::string("expected ") + name + " of " + std::to_string(want) +
                                     " elements but got " + std::to_string(v.size()));
    }
    dst = v;
  }

  GroupNormOptions options_;
  Vector weight_, bias_;
};

}  // namespace normkit

#endif  // NORMKIT_GROUP_NORM_HPP_
