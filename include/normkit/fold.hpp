// normkit/fold.hpp: folding an evaluation-mode BatchNorm into the Linear or convolution
// before it (torch.nn.utils.fusion), so that one layer gives what the pair gave.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_FOLD_HPP_
#define NORMKIT_FOLD_HPP_

#include <cmath>        // std::sqrt, std::isfinite
#include <cstddef>      // std::nullptr_t, std::size_t
#include <cstdio>       // std::snprintf
#include <type_traits>  // std::is_same
#include <vector>       // std::vector

#include <normkit/batch_norm.hpp>
#include <normkit/config.hpp>
#include <normkit/detail/fail.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE

/// Options of fold_batch_norm.
class FoldOptions {
  /// The weight is a transposed convolution's (torch.nn.ConvTranspose1d/2d/3d), with dims
  /// (in, out/groups, k...): the output channel is on axis 1, as fuse_conv_bn_weights'
  /// transpose=True. Only groups = 1 can be folded (axis 1 then holds every output channel);
  /// a weight whose axis 1 holds fewer channels than the BatchNorm has is rejected. Default
  /// false: the output channel is on axis 0 ((out, in) or (out, in/groups, k...)).
  NORMKIT_ARG(bool, transposed) = false;
};

/// What fold_batch_norm returns: the folded layer's weight, with the dims and storage order
/// of the weight given, and its bias (one value per output channel; the folded layer always
/// has one).
template <class T, int Rank, int Layout>
struct FoldedWeights {
  /// W' = W * gamma / sqrt(var + eps) per output channel.
  Eigen::Tensor<T, Rank, Layout> weight;
  /// b' = (b - mean) * gamma / sqrt(var + eps) + beta, C elements.
  Eigen::Tensor<T, 1> bias;
};

namespace detail {

template <class S>
inline constexpr bool is_float_or_double_v =
    std::is_same<S, float>::value || std::is_same<S, double>::value;

/// A 1-D argument of fold_batch_norm read as doubles: float or double storage, or absent
/// (size 0).
struct FoldVec {
  const float* f = nullptr;
  const double* d = nullptr;
  Index size = 0;
  double operator[](Index i) const { return f ? static_cast<double>(f[i]) : d[i]; }
};

inline FoldVec fold_vec(std::nullptr_t) {
  return {};
}
inline FoldVec fold_vec(const float* p, Index n) {
  FoldVec v;
  v.f = p;
  v.size = n;
  return v;
}
inline FoldVec fold_vec(const double* p, Index n) {
  FoldVec v;
  v.d = p;
  v.size = n;
  return v;
}
template <class T>
FoldVec fold_vec(const VectorRef<T>& v) {
  static_assert(is_float_or_double_v<std::remove_const_t<T>>,
                "normkit::fold_batch_norm: expected float or double vectors");
  return v ? fold_vec(static_cast<const std::remove_const_t<T>*>(v.data()), v.size()) : FoldVec();
}
template <class V>
FoldVec fold_vec(const V& v) {
  static_assert(is_tensor_v<V>,
                "normkit::fold_batch_norm: expected an Eigen::Tensor<T, 1> or a TensorMap of one "
                "(or nullptr for an absent bias or BatchNorm weight/bias)");
  static_assert(tensor_traits<V>::rank == 1,
                "normkit::fold_batch_norm: bias, running statistics and BatchNorm parameters "
                "are 1-D tensors");
  static_assert(is_float_or_double_v<scalar_of<V>>,
                "normkit::fold_batch_norm: expected float or double vectors");
  return fold_vec(static_cast<const scalar_of<V>*>(v.data()), static_cast<Index>(v.size()));
}

/// The statistics side of a fold: C = mean.size() channels.
struct FoldStats {
  FoldVec mean, var, gamma, beta;
  double eps = 0.0;
  const char* module = nullptr;  // the BatchNorm's class name, or null (explicit statistics)
};

/// Checks a fold of a weight with dims wd[0, rank) and a bias of bias_size elements; throws
/// before anything is computed.
NORMKIT_NOINLINE inline void fold_check(
    const Index* wd, int rank, bool transposed, Index bias_size, const FoldStats& st) {
  const char* who = "fold_batch_norm";
  const Index C = st.mean.size;
  const char* source = st.module ? "num_features of the " : "the size of running_mean";
  const char* module = st.module ? st.module : "";
  if (!st.module) {
    if (st.var.size != C) {
      fail(Fail::shape, who, "expected running_var of %lld elements (running_mean's) but got %lld",
           static_cast<long long>(C), static_cast<long long>(st.var.size));
    }
    if (!(std::isfinite(st.eps) && st.eps >= 0.0))
      fail(Fail::value, who, "expected eps finite and >= 0 but got %g", st.eps);
  }
  if (transposed && rank < 3) {
    fail(Fail::value, who,
         "transposed(true) expects a transposed convolution weight (in, out/groups, k...) of "
         "rank 3 to 5 but got a rank-%d weight of size %s (a Linear weight has its output "
         "channel on axis 0: fold it without transposed)",
         rank, dims_text(wd, rank).s);
  }
  const int axis = transposed ? 1 : 0;
  const Index out = wd[axis];
  if (out != C) {
    if (transposed) {
      // NB: transposed convolutions with groups > 1 hold out_channels/groups on axis 1, and
      // the output channel of an element depends on its input channel's group too; PyTorch's
      // fuse_conv_bn_weights (reshape [1, -1, 1, ...]) does not handle them either. With a
      // BatchNorm of out_channels features such a weight always shows up here (axis 1 <
      // num_features), so it is rejected rather than folded wrongly.
      const bool grouped = out > 0 && out < C && C % out == 0 && wd[0] % (C / out) == 0;
      char hint[200] = "";
      if (grouped) {
        std::snprintf(hint, sizeof hint,
                      "; a transposed convolution with groups = %lld (axis 1 = out_channels / "
                      "groups) cannot be folded: only groups = 1 is supported, as in PyTorch",
                      static_cast<long long>(C / out));
      }
      fail(Fail::shape, who,
           "expected a transposed convolution weight (in, out/groups, k...) with %lld output "
           "channels (%s%s) on axis 1 but got size %s%s",
           static_cast<long long>(C), source, module, dims_text(wd, rank).s, hint);
    }
    fail(Fail::shape, who,
         "expected a weight with %lld output channels (%s%s) on axis 0 of %s but got size %s",
         static_cast<long long>(C), source, module,
         rank == 2 ? "(out, in)" : "(out, in/groups, k...)", dims_text(wd, rank).s);
  }
  if (bias_size != 0 && bias_size != C) {
    fail(Fail::shape, who,
         "expected bias of %lld elements (the output channels) or 0 (no bias) but got %lld",
         static_cast<long long>(C), static_cast<long long>(bias_size));
  }
  const FoldVec* params[2] = {&st.gamma, &st.beta};
  const char* names[2] = {"weight", "bias"};
  for (int i = 0; i < 2; ++i) {
    if (params[i]->size != 0 && params[i]->size != C) {
      fail(Fail::shape, who, "expected bn_%s of %lld elements or 0 (not affine) but got %lld",
           names[i], static_cast<long long>(C), static_cast<long long>(params[i]->size));
    }
  }
}

/// scale_c = gamma_c / sqrt(var_c + eps) and shift_c = (b_c - mean_c) * scale_c + beta_c
/// in double (b = 0 without bias, gamma = 1 and beta = 0 when absent).
NORMKIT_NOINLINE inline void fold_coefficients(const FoldStats& st,
                                               FoldVec bias,
                                               std::vector<double>& scale,
                                               std::vector<double>& shift) {
  const Index C = st.mean.size;
  scale.resize(static_cast<std::size_t>(C));
  shift.resize(static_cast<std::size_t>(C));
  for (Index c = 0; c < C; ++c) {
    const double g = st.gamma.size ? st.gamma[c] : 1.0;
    const double s = g / std::sqrt(st.var[c] + st.eps);
    const double b = bias.size ? bias[c] : 0.0;
    scale[static_cast<std::size_t>(c)] = s;
    shift[static_cast<std::size_t>(c)] = (b - st.mean[c]) * s + (st.beta.size ? st.beta[c] : 0.0);
  }
}

template <class W, class B>
auto fold_impl(const W& weight, const B& bias, const FoldStats& st, const FoldOptions& options) {
  using T = scalar_of<W>;
  constexpr int R = tensor_traits<W>::rank;
  constexpr int L = tensor_traits<W>::layout;
  static_assert(is_float_or_double_v<T>,
                "normkit::fold_batch_norm: expected a float or double weight");
  static_assert(R >= 2 && R <= 5,
                "normkit::fold_batch_norm: expected a Linear weight (rank 2: out, in) or a "
                "convolution weight (rank 3 to 5: out, in/groups, k... or, transposed, in, "
                "out/groups, k...)");
  Index wd[R] = {};
  for (int i = 0; i < R; ++i) wd[i] = dim(weight, i);
  const FoldVec b = fold_vec(bias);
  fold_check(wd, R, options.transposed(), b.size, st);
  // Every check has passed.
  std::vector<double> scale, shift;
  fold_coefficients(st, b, scale, shift);
  const int axis = options.transposed() ? 1 : 0;
  // Element i's output channel is (i / inner) % C, inner = the channel axis' memory stride.
  Index inner = 1;
  for (int i = 0; i < R; ++i) {
    if (L == Eigen::RowMajor ? i > axis : i < axis)
      inner *= wd[i];
  }
  const Index C = wd[axis];
  const Index n = static_cast<Index>(weight.size());
  FoldedWeights<T, R, L> f;
  f.weight.resize(weight.dimensions());
  f.bias.resize(C);
  const T* src = weight.data();
  T* dst = f.weight.data();
  for (Index o = 0; n != 0 && o < n; o += C * inner) {
    for (Index c = 0; c < C; ++c) {
      const double s = scale[static_cast<std::size_t>(c)];
      const Index base = o + c * inner;
      for (Index j = 0; j < inner; ++j)
        dst[base + j] = static_cast<T>(static_cast<double>(src[base + j]) * s);
    }
  }
  for (Index c = 0; c < C; ++c) f.bias(c) = static_cast<T>(shift[static_cast<std::size_t>(c)]);
  return f;
}

}  // namespace detail

// NB: mixed precision. Everything is computed in double and rounded once to the weight's
// scalar type, so the weight, the layer's bias, the BatchNorm (or the statistics given) may
// each be float or double independently: a float convolution folds with a double BatchNorm
// and the result is float. Other scalar types are compile-time errors.

/// Folds an evaluation-mode BatchNorm into the Linear or convolution before it, as
/// torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval: the layer with the
/// returned weight and bias gives what the layer followed by bn.eval() gave, up to rounding.
/// Per output channel c: W'_c = W_c * s_c, b'_c = (b_c - running_mean_c) * s_c + beta_c with
/// s_c = gamma_c / sqrt(running_var_c + eps) (b = 0 without bias; gamma = 1, beta = 0 when
/// the BatchNorm is not affine), computed in double and rounded once to the weight's type.
/// @param weight the layer's weight in PyTorch's dims, RowMajor or ColMajor (Tensor or
///        TensorMap): (out, in) for Linear, (out, in/groups, k...) for Conv1d/2d/3d (any
///        groups), (in, out, k...) for ConvTranspose1d/2d/3d with options.transposed(true).
/// @param bias the layer's bias (out elements), or an empty tensor or nullptr when it has
///        none.
/// @param bn a BatchNorm1d/2d/3d of any scalar type in evaluation mode; its Dim is not
///        checked against the weight's rank (a reshape in between keeps the channel axis).
/// @returns the folded weight (the dims and storage order of `weight`) and bias (out
///          elements), in the weight's scalar type.
/// @throws value_error if bn is in training mode (as PyTorch's "Fusion only for eval!": its
///         forward uses batch statistics, which no fixed weights reproduce; use the
///         explicit-statistics overload to fold the running statistics anyway) or has no
///         running statistics (track_running_stats false); value_error for transposed(true)
///         with a rank-2 weight; shape_error if the weight's output-channel count is not
///         num_features (a grouped transposed convolution among them) or the bias has
///         neither 0 nor num_features elements. Nothing is modified.
/// @code
/// normkit::BatchNorm2d<float> bn{64};  // ... trained, then:
/// bn.eval();
/// auto f = normkit::fold_batch_norm(conv_weight, conv_bias, bn);  // f.weight, f.bias
/// @endcode
template <class W, class B, class S, int Dim>
auto fold_batch_norm(const W& weight,
                     const B& bias,
                     const BatchNorm<S, Dim>& bn,
                     const FoldOptions& options = FoldOptions()) {
  const char* who = "fold_batch_norm";
  const char* name = BatchNorm<S, Dim>::kName;
  if (!bn.options().track_running_stats()) {
    detail::fail(detail::Fail::value, who,
                 "expected a %s with running statistics but got one with track_running_stats "
                 "false: it normalizes with batch statistics in evaluation too, so there is "
                 "nothing to fold",
                 name);
  }
  // NB: training mode. Folding would be well defined from the running statistics, but the
  // module's own forward then normalizes with batch statistics, so the folded layer would
  // silently differ from it; PyTorch's fuse_conv_bn_eval refuses too ("Fusion only for
  // eval!"). The explicit-statistics overload folds any statistics without asking.
  if (bn.is_training()) {
    detail::fail(detail::Fail::value, who,
                 "expected a %s in evaluation mode but got one in training mode, whose forward "
                 "uses batch statistics (PyTorch: \"Fusion only for eval!\"); call eval() first, "
                 "or pass its running statistics to the explicit-statistics overload",
                 name);
  }
  detail::FoldStats st;
  st.mean = detail::fold_vec(bn.running_mean());
  st.var = detail::fold_vec(bn.running_var());
  st.gamma = detail::fold_vec(bn.weight());
  st.beta = detail::fold_vec(bn.bias());
  st.eps = bn.options().eps();
  st.module = name;
  return detail::fold_impl(weight, bias, st, options);
}

/// fold_batch_norm with the BatchNorm's statistics and parameters given explicitly, as
/// torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights (no mode to check).
/// running_mean, running_var, bn_weight and bn_bias are 1-D Tensors or TensorMaps (or
/// VectorRefs) of float or double, each independently; bias, bn_weight and bn_bias may be
/// empty or nullptr (no layer bias; gamma = 1; beta = 0). C = running_mean.size().
/// @throws shape_error if running_var, bn_weight or bn_bias do not have C elements (the
///         last two may have 0), the weight's output-channel count is not C, or the bias has
///         neither 0 nor C elements; value_error for eps negative or not finite, or
///         transposed(true) with a rank-2 weight. Nothing is modified.
/// @code
/// auto f = normkit::fold_batch_norm(linear_weight, nullptr, mean, var, 1e-5, gamma, beta);
/// @endcode
template <class W, class B, class M, class V, class G, class Bt>
auto fold_batch_norm(const W& weight,
                     const B& bias,
                     const M& running_mean,
                     const V& running_var,
                     double eps,
                     const G& bn_weight,
                     const Bt& bn_bias,
                     const FoldOptions& options = FoldOptions()) {
  detail::FoldStats st;
  st.mean = detail::fold_vec(running_mean);
  st.var = detail::fold_vec(running_var);
  st.gamma = detail::fold_vec(bn_weight);
  st.beta = detail::fold_vec(bn_bias);
  st.eps = eps;
  return detail::fold_impl(weight, bias, st, options);
}

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_FOLD_HPP_
