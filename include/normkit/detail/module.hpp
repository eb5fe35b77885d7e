// normkit/detail/module.hpp: what every module shares -- training/evaluation mode, what a
// forward keeps for backward, devices and gradient storage.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_MODULE_HPP_
#define NORMKIT_DETAIL_MODULE_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::fill
#include <array>        // std::array
#include <string>       // std::string
#include <type_traits>  // std::enable_if_t
#include <utility>      // std::move
#include <vector>       // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/kernels/types.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

template <class T>
struct is_gradients : std::false_type {};
template <class S, int R, int L, class P>
struct is_gradients<Gradients<S, R, L, P>> : std::true_type {};

/// Whether a module with parameters of type P takes input of type D: its own type, or, for a
/// float module, bfloat16 or half (PyTorch's CPU mixed mode: low-precision data, float
/// parameters and statistics).
template <class P, class D>
inline constexpr bool accepts_v = std::is_same<P, D>::value ||
                                  (std::is_same<P, float>::value && is_low_v<D>);

/// The gradients a module with parameters of type P returns for input x.
template <class P, class X>
using gradients_for = Gradients<scalar_of<X>, tensor_traits<X>::rank, tensor_traits<X>::layout, P>;

/// A number per storage type, to tell which type a kept input has.
template <class T>
constexpr int type_code() {
  return std::is_same<T, float>::value             ? 1
         : std::is_same<T, double>::value          ? 2
         : std::is_same<T, Eigen::bfloat16>::value ? 3
         : std::is_same<T, Eigen::half>::value     ? 4
                                                   : 0;
}

/// A device argument: anything that is not a tensor, a pointer, a SavedStats or a Gradients
/// (Eigen::DefaultDevice, Eigen::ThreadPoolDevice).
template <class D>
inline constexpr bool is_device_v =
    !is_tensor_v<D> && !std::is_pointer<std::decay_t<D>>::value &&
    !std::is_null_pointer<std::decay_t<D>>::value && !is_gradients<std::decay_t<D>>::value &&
    !std::is_same<std::decay_t<D>, SavedStats>::value &&
    !std::is_arithmetic<std::decay_t<D>>::value;
template <class D>
using if_device = std::enable_if_t<is_device_v<D>, int>;
template <class X>
using if_low = std::enable_if_t<is_low_v<scalar_of<X>>, int>;
template <class G>
using if_gradients = std::enable_if_t<is_gradients<std::decay_t<G>>::value, int>;

template <class Scalar>
Eigen::Tensor<Scalar, 1> filled(Index n, Scalar v) {
  Eigen::Tensor<Scalar, 1> t(n);
  std::fill(t.data(), t.data() + n, v);
  return t;
}

/// Resizes g's tensors for an input like x (no reallocation when the sizes already match).
template <class G, class X>
void prepare_gradients(G& g, const X& x, Index n_weight, Index n_bias) {
  constexpr int R = tensor_traits<X>::rank;
  bool same = true;
  for (int i = 0; i < R; ++i) same = same && dim(g.input, i) == dim(x, i);
  if (!same)
    g.input.resize(x.dimensions());
  if (g.weight.size() != n_weight)
    g.weight.resize(n_weight);
  if (g.bias.size() != n_bias)
    g.bias.resize(n_bias);
}

/// dL/dz of y = act(z), from y and dy: dy where y > 0 for ReLU, dy for identity (the mask
/// comes from y, as oneDNN's fused norm + ReLU).
/// @throws value_error for the other activations (their derivative needs z, which a fused
///         forward does not keep).
template <class Y, class DY>
Eigen::Tensor<scalar_of<DY>, tensor_traits<DY>::rank, tensor_traits<DY>::layout> epilogue_grad(
    const char* who, const Y& y, const DY& dy, Activation act) {
  static_assert(std::is_same<scalar_of<Y>, scalar_of<DY>>::value &&
                    tensor_traits<Y>::rank == tensor_traits<DY>::rank &&
                    tensor_traits<Y>::layout == tensor_traits<DY>::layout,
                "backward_fused: y and dy must have one type, rank and storage order");
  if (act != Activation::relu && act != Activation::identity) {
    fail(Fail::value, who,
         "backward_fused supports Activation::relu and Activation::identity (the gradient of "
         "SiLU and GELU needs the pre-activation, which the fused forward does not keep)");
  }
  check_same_dims(who, "grad_output", y, dy);
  Eigen::Tensor<scalar_of<DY>, tensor_traits<DY>::rank, tensor_traits<DY>::layout> dz(
      dy.dimensions());
  using S = scalar_of<DY>;
  const S zero(0.0f);
  for (Index i = 0; i < dz.size(); ++i) {
    const S g = dy.data()[i];
    dz.data()[i] = act == Activation::relu && !(static_cast<double>(y.data()[i]) > 0) ? zero : g;
  }
  return dz;
}

/// backward_fused of any module m (BatchNorm, InstanceNorm, GroupNorm): dz from the
/// epilogue, m.backward(x, dz) into the norm's gradients, and dz as the residual's gradient.
template <class Param, class M, class X, class Y, class DY, class Device>
auto fused_backward(M& m,
                    const char* who,
                    const X& x,
                    const Y& y,
                    const DY& dy,
                    Activation act,
                    const Device& device) {
  auto dz = epilogue_grad(who, y, dy, act);
  FusedGradients<scalar_of<X>, tensor_traits<X>::rank, tensor_traits<X>::layout, Param> g;
  m.backward(x, dz, static_cast<gradients_for<Param, X>&>(g), device);
  g.residual = std::move(dz);
  return g;
}

// NB: what a module keeps (issue #10). An evaluation-mode forward keeps nothing and writes
// nothing to the module, so concurrent evaluation forwards are safe. A training-mode forward
// with requires_grad() keeps its statistics (a few numbers per slot) and, with keep_input()
// (the default), a copy of its input, written while the apply pass reads x -- never a
// separate pass -- so that backward(dy) works as in PyTorch. backward(x, dy) needs no copy:
// it uses the kept statistics when the last training forward had x's shape, and otherwise
// recomputes what the current mode's forward would use (batch statistics, or the running
// statistics of an evaluation-mode BatchNorm). Switching between train() and eval() forgets
// what was kept, so that a backward never mixes one mode's statistics with the other's.

/// State every module shares: train/eval, and what backward needs from the last forward.
template <class Scalar>
class ModuleBase {
 public:
  /// Training mode (the default) or evaluation mode, as torch.nn.Module.train(). Changing
  /// the mode forgets the statistics and input the last training forward kept.
  void train(bool on = true) {
    if (on != training_)
      forget();
    training_ = on;
  }
  /// Evaluation mode, as torch.nn.Module.eval().
  void eval() { train(false); }
  /// Whether the module is in training mode.
  bool is_training() const { return training_; }

  /// When false, training forwards keep nothing either (pure inference use of training
  /// statistics); backward(x, dy) still works, recomputing the statistics. Default true.
  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (!on) {
      forget();
      kept_x_ = std::vector<unsigned char>();
    }
  }
  /// Whether training forwards keep what backward needs.
  bool requires_grad() const { return requires_grad_; }

  /// Whether a training forward keeps a copy of its input (default true), so that
  /// backward(dy) works. With false it keeps only its statistics, and backward(x, dy) is the
  /// way to get gradients (no copy at all).
  void set_keep_input(bool on) {
    keep_input_ = on;
    if (!on) {
      x_kept_ = false;
      kept_x_ = std::vector<unsigned char>();
    }
  }
  /// See set_keep_input().
  bool keep_input() const { return keep_input_; }

  /// Statistics kept by the last training forward (empty when none is kept).
  const SavedStats& saved_stats() const { return saved_; }

 protected:
  /// Whether a forward in the current state keeps its statistics.
  bool keeps() const { return training_ && requires_grad_; }

  /// Where the forward of x writes the copy of its input, or null (nothing to keep). Call
  /// after every check has passed.
  template <class X>
  scalar_of<X>* input_buffer(const X& x) {
    if (!keeps() || !keep_input_)
      return nullptr;
    kept_x_.resize(static_cast<std::size_t>(x.size()) * sizeof(scalar_of<X>));
    return reinterpret_cast<scalar_of<X>*>(kept_x_.data());
  }

  /// Records a successful training forward of x: its statistics and whether x was copied.
  template <class X>
  void commit(const X& x, SavedStats&& stats, bool copied) {
    constexpr int R = tensor_traits<X>::rank;
    saved_ = std::move(stats);
    kept_rank_ = R;
    kept_layout_ = tensor_traits<X>::layout;
    kept_type_ = type_code<scalar_of<X>>();
    for (int i = 0; i < R; ++i) kept_dims_[static_cast<std::size_t>(i)] = dim(x, i);
    stats_kept_ = true;
    x_kept_ = copied;
  }

  void forget() {
    stats_kept_ = false;
    x_kept_ = false;
    saved_ = SavedStats();
  }

  /// Whether the kept statistics are those of an input with x's dims and storage order.
  template <class X>
  bool kept_for(const X& x) const {
    constexpr int R = tensor_traits<X>::rank;
    if (!stats_kept_ || kept_rank_ != R || kept_layout_ != tensor_traits<X>::layout)
      return false;
    for (int i = 0; i < R; ++i) {
      if (kept_dims_[static_cast<std::size_t>(i)] != dim(x, i))
        return false;
    }
    return true;
  }

  /// The kept input as a map with dy's rank and storage order (backward(dy)).
  /// @throws value_error when no input is kept; shape_error when dy does not match it.
  template <class DY>
  auto kept_input(const DY& dy, const char* who) const {
    constexpr int R = tensor_traits<DY>::rank;
    constexpr int L = tensor_traits<DY>::layout;
    using D = scalar_of<DY>;
    using Map = Eigen::TensorMap<const Eigen::Tensor<D, R, L>>;
    if (!x_kept_) {
      fail(Fail::value, who,
           "backward(dy) needs the input of the last training forward, and none is kept (no "
           "training forward since construction, train()/eval() or set_requires_grad(false), or "
           "keep_input() is false); call backward(x, dy)");
    }
    bool same = kept_rank_ == R && kept_layout_ == L;
    for (int i = 0; same && i < R; ++i)
      same = kept_dims_[static_cast<std::size_t>(i)] == dim(dy, i);
    if (!same) {
      fail(Fail::shape, who,
           "expected grad_output of size %s%s (the last forward's input) but got %s",
           dims_text(kept_dims_.data(), kept_rank_).s,
           kept_layout_ == L ? "" : " in the other storage order", dims_of(dy.dimensions(), R).s);
    }
    if (kept_type_ != type_code<D>()) {
      fail(Fail::value, who,
           "grad_output has another scalar type than the last forward's input; call "
           "backward(x, dy) with both of one type");
    }
    std::array<Index, R> d{};
    for (int i = 0; i < R; ++i)
      d[static_cast<std::size_t>(i)] = kept_dims_[static_cast<std::size_t>(i)];
    return Map(reinterpret_cast<const D*>(kept_x_.data()), d);
  }

  bool training_ = true;
  bool requires_grad_ = true;
  bool keep_input_ = true;
  bool stats_kept_ = false;
  bool x_kept_ = false;
  SavedStats saved_;
  std::vector<unsigned char> kept_x_;  // the kept input's bytes (type kept_type_)
  int kept_type_ = 0;
  std::array<Index, kMaxAxes> kept_dims_{};
  int kept_rank_ = -1;
  int kept_layout_ = -1;
};

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_MODULE_HPP_
