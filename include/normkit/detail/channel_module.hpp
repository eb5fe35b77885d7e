// normkit/detail/channel_module.hpp: the module side BatchNorm and InstanceNorm share --
// parameters, running buffers, their setters, and forward/backward around
// detail/channel_norm.hpp.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_CHANNEL_MODULE_HPP_
#define NORMKIT_DETAIL_CHANNEL_MODULE_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cstdint>      // std::int64_t
#include <string>       // std::string
#include <type_traits>  // std::is_same

#include <normkit/config.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// Batch statistics computed elsewhere (per channel; see ChannelNormArgs::batch_mean).
struct GivenStats {
  const double* mean;
  const double* var;
  double count;
};

/// Parameters (weight, bias), buffers (running_mean, running_var, num_batches_tracked) and
/// the forward/backward of a channel norm module; `Options` is BatchNormOptions or
/// InstanceNormOptions.
template <class Scalar, class Options>
class ChannelModule : public ModuleBase<Scalar> {
 public:
  /// 1-D tensor type of the parameters and running statistics.
  using Vector = Eigen::Tensor<Scalar, 1>;

  /// The options the module was constructed with.
  const Options& options() const { return options_; }

  /// Per-channel scale, num_features elements (init 1); empty when not affine.
  const Vector& weight() const { return weight_; }
  /// Per-channel shift, num_features elements (init 0); empty when not affine.
  const Vector& bias() const { return bias_; }
  /// Running mean, num_features elements (init 0); empty without track_running_stats.
  const Vector& running_mean() const { return running_mean_; }
  /// Running variance (init 1), from unbiased batch variances; empty without
  /// track_running_stats.
  const Vector& running_var() const { return running_var_; }
  /// BatchNorm: training forwards with track_running_stats so far, counting empty batches
  /// too (as PyTorch); a failed forward does not count. InstanceNorm: in the state dict, but
  /// never moved by forward (as PyTorch).
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }

  /// Sets weight.
  /// @throws shape_error unless v has num_features elements (0 when not affine).
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
  /// Sets the counter (e.g. from a checkpoint); with momentum none the next BatchNorm
  /// training update uses f = 1/(n + 1).
  void set_num_batches_tracked(std::int64_t n) { num_batches_tracked_ = n; }

  /// running_mean = 0, running_var = 1, num_batches_tracked = 0.
  void reset_running_stats() {
    if (options_.track_running_stats()) {
      running_mean_ = filled<Scalar>(options_.num_features(), Scalar(0));
      running_var_ = filled<Scalar>(options_.num_features(), Scalar(1));
    }
    num_batches_tracked_ = 0;
  }
  /// reset_running_stats(), and weight = 1, bias = 0.
  void reset_parameters() {
    reset_running_stats();
    if (options_.affine()) {
      weight_ = filled<Scalar>(options_.num_features(), Scalar(1));
      bias_ = filled<Scalar>(options_.num_features(), Scalar(0));
    }
  }

 protected:
  ChannelModule(const char* name, const Options& options) : name_(name), options_(options) {
    validate(name_, options_);
    reset_parameters();
  }

  /// The arguments of a forward in the current mode (momentum factor `factor`).
  ChannelNormArgs<Scalar> args(double factor) {
    const bool tracking = options_.track_running_stats();
    ChannelNormArgs<Scalar> a;
    if (options_.affine()) {
      a.weight = weight_;
      a.bias = bias_;
    }
    if (tracking) {
      a.running_mean = running_mean_;
      a.running_var = running_var_;
    }
    a.batch_stats = this->training_ || !tracking;
    a.update_running = this->training_ && tracking;
    a.momentum = factor;
    a.eps = options_.eps();
    return a;
  }

  /// A forward in the current mode; `batch` (SyncBatchNorm, training) gives the batch
  /// statistics merged over every process instead of x's own.
  template <class X, class Y>
  void forward_impl(ChannelNormKind kind,
                    const Shape& sh,
                    const X& x,
                    Y& y,
                    const Exec& ex,
                    const GivenStats* batch = nullptr,
                    const scalar_of<X>* res = nullptr,
                    int act = 0,
                    const EpiLeaves<scalar_of<X>>* epi = nullptr) {
    check_channels(name_, "num_features", options_.num_features(), sh);
    // docs/semantics.md §2.4: BatchNorm's counter moves (and sets the momentum-none factor)
    // in training with tracking, even for an empty batch; committed only after success.
    const bool counts =
        kind == ChannelNormKind::batch && this->training_ && options_.track_running_stats();
    std::int64_t nbt = num_batches_tracked_;
    double factor = options_.momentum().value_or(0.0);
    if (counts) {
      ++nbt;
      if (!options_.momentum())
        factor = 1.0 / static_cast<double>(nbt);
    }
    ChannelNormArgs<Scalar> a = args(factor);
    if (batch && a.batch_stats) {
      a.batch_mean = batch->mean;
      a.batch_var = batch->var;
      a.batch_count = batch->count;
    }
    channel_norm_check(name_, kind, sh, a);
    auto* y_ptr = prepare_output(x, y, name_);
    // Every check has passed: from here on the call succeeds.
    const bool keep = this->keeps();
    auto* copy = this->input_buffer(x);
    SavedStats saved;
    channel_norm_forward(kind, sh, x.data(), y_ptr, a, keep ? &saved : nullptr, copy, ex, res, act,
                         epi);
    if (counts)
      num_batches_tracked_ = nbt;
    if (keep)
      this->commit(x, std::move(saved), this->keep_input_);
  }

  /// forward_impl with the fused epilogue y = act(norm(x) + *residual) (residual may be null).
  template <class X, class R, class Y>
  void fused_impl(ChannelNormKind kind,
                  const Shape& sh,
                  const X& x,
                  const R* residual,
                  Activation act,
                  Y& y,
                  const Exec& ex) {
    static_assert(std::is_same<scalar_of<X>, scalar_of<R>>::value &&
                      tensor_traits<X>::rank == tensor_traits<R>::rank &&
                      tensor_traits<X>::layout == tensor_traits<R>::layout,
                  "forward_fused: the residual must have the input's type, rank and storage order");
    if (residual)
      check_same_dims(name_, "residual", x, *residual);
    forward_impl(kind, sh, x, y, ex, nullptr, residual ? residual->data() : nullptr,
                 static_cast<int>(act), &epi_leaves<scalar_of<X>>());
  }

  template <class X, class DY, class G>
  void backward_impl(
      ChannelNormKind kind, const Shape& sh, const X& x, const DY& dy, G& g, const Exec& ex) {
    check_same_dims(name_, "grad_output", x, dy);
    check_channels(name_, "num_features", options_.num_features(), sh);
    SavedStats local;
    const SavedStats* st = &this->saved_;
    if (!this->kept_for(x)) {
      const ChannelNormArgs<Scalar> a = args(0.0);
      if (a.batch_stats) {
        channel_norm_check(name_, kind, sh, a);
        channel_norm_stats(kind, sh, x.data(), options_.eps(), local, ex);
      } else {
        running_saved_stats(kind, sh, running_mean_.data(), running_var_.data(), options_.eps(),
                            local);
      }
      st = &local;
    }
    const Index C = options_.affine() ? options_.num_features() : 0;
    prepare_gradients(g, x, C, C);
    VectorRef<const Scalar> w;
    if (options_.affine())
      w = VectorRef<const Scalar>(weight_);
    channel_norm_backward(kind, sh, x.data(), dy.data(), g.input.data(), *st, w,
                          C ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
                          C ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), ex);
  }

  const char* name_;
  Options options_;
  Vector weight_, bias_, running_mean_, running_var_;
  std::int64_t num_batches_tracked_ = 0;

 private:
  void set_checked(Vector& dst, const Vector& v, const char* name, bool exists) {
    const Index want = exists ? options_.num_features() : 0;
    if (v.size() != want) {
      fail(Fail::shape, name_, "expected %s of %lld elements but got %lld", name,
           static_cast<long long>(want), static_cast<long long>(v.size()));
    }
    dst = v;
  }
};

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_CHANNEL_MODULE_HPP_
