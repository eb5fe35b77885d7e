// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_MODULE_HPP_
#define NORMKIT_DETAIL_MODULE_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::copy
#include <array>      // std::array
#include <string>     // std::string
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/tensor.hpp>

namespace normkit {

/// The statistics a forward pass normalized with, as backward needs them: one mean and one
/// rstd = 1/sqrt(var + eps) per statistic slot, in logical order (BatchNorm: C;
/// InstanceNorm: N*C; GroupNorm: N*G; LayerNorm: the leading dims flattened row-major).
/// `batch_stats` is false when running statistics were used (they are constants then).
struct SavedStats {
  Eigen::Tensor<double, 1> mean;
  Eigen::Tensor<double, 1> rstd;
  bool batch_stats = true;
};

/// What backward returns: dL/dx with x's shape and storage order, and dL/dweight,
/// dL/dbias (empty when the module has no affine parameters).
template <class Scalar, int Rank, int Layout>
struct Gradients {
  Eigen::Tensor<Scalar, Rank, Layout> input;
  Eigen::Tensor<Scalar, 1> weight;
  Eigen::Tensor<Scalar, 1> bias;
};

namespace detail {

template <class Scalar>
Eigen::Tensor<Scalar, 1> filled(Index n, Scalar v) {
  Eigen::Tensor<Scalar, 1> t(n);
  t.setConstant(v);
  return t;
}

/// State every module shares: train/eval, and what backward(dy) needs from the last forward.
template <class Scalar>
class ModuleBase {
 public:
  /// Training mode (the default) or evaluation mode, as torch.nn.Module.train().
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode, as torch.nn.Module.eval().
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// When true (the default, as PyTorch parameters), forward keeps its statistics and a copy
  /// of its input so that backward(dy) can run. Set it to false for inference: forward then
  /// writes nothing to the module except what training itself updates (running statistics),
  /// so evaluation-mode forwards may run concurrently, and backward throws.
  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (!on) {
      saved_x_.clear();
      saved_x_.shrink_to_fit();
      x_saved_ = false;
      has_forward_ = false;
    }
  }
  bool requires_grad() const { return requires_grad_; }

  /// Statistics of the last successful forward (empty before the first).
  const SavedStats& saved_stats() const { return saved_; }

 protected:
  /// Records a successful forward: its shape and, when requires_grad(), a copy of x.
  template <class X>
  void remember_input(const X& x) {
    constexpr int R = tensor_traits<X>::rank;
    saved_rank_ = R;
    saved_layout_ = tensor_traits<X>::layout;
    for (int i = 0; i < R; ++i) saved_dims_[static_cast<std::size_t>(i)] = dim(x, i);
    has_forward_ = true;
    x_saved_ = requires_grad_;
    if (requires_grad_) {
      saved_x_.assign(x.data(), x.data() + x.size());
    } else {
      saved_x_.clear();
    }
  }

  /// Checks dy against the last forward's input and returns a map over the saved copy.
  template <class DY>
  auto saved_input(const DY& dy, const char* who) const {
    constexpr int R = tensor_traits<DY>::rank;
    constexpr int L = tensor_traits<DY>::layout;
    using Map = Eigen::TensorMap<const Eigen::Tensor<Scalar, R, L>>;
    check_same(dy, who);
    if (!x_saved_) {
      throw_value(who,
                  "backward(dy) needs the input of the last forward, which was not kept "
                  "(requires_grad() was false during that forward); call backward(x, dy)");
    }
    std::array<Index, R> d{};
    for (int i = 0; i < R; ++i)
      d[static_cast<std::size_t>(i)] = saved_dims_[static_cast<std::size_t>(i)];
    return Map(saved_x_.data(), d);
  }

  /// Checks that dy (or an explicit x) has the last forward's shape and storage order.
  template <class DY>
  void check_same(const DY& dy, const char* who) const {
    constexpr int R = tensor_traits<DY>::rank;
    if (!has_forward_) {
      throw_value(who,
                  "backward needs a preceding forward with requires_grad() true "
                  "(none since construction or set_requires_grad(false))");
    }
    std::string got = dims_str(dy.dimensions(), R);
    std::string want = dims_str(saved_dims_, saved_rank_);
    bool same = saved_rank_ == R;
    for (int i = 0; same && i < R; ++i)
      same = saved_dims_[static_cast<std::size_t>(i)] == dim(dy, i);
    if (!same) {
      throw_shape(who, "expected grad_output of size " + want +
                           " (the last forward's input) but got " + got);
    }
    if (saved_layout_ != tensor_traits<DY>::layout) {
      throw_shape(who, std::string("expected grad_output in ") +
                           (saved_layout_ == Eigen::RowMajor ? "RowMajor" : "ColMajor") +
                           " storage (the last forward's input) but got the other order");
    }
  }

  bool training_ = true;
  bool requires_grad_ = true;
  bool has_forward_ = false;
  bool x_saved_ = false;
  SavedStats saved_;
  std::vector<Scalar> saved_x_;
  std::array<Index, kMaxAxes> saved_dims_{};
  int saved_rank_ = -1;
  int saved_layout_ = -1;
};

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_MODULE_HPP_
