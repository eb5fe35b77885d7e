// normkit/precise_bn.hpp: precise BatchNorm (issue 12 §3) -- the running statistics of a
// BatchNorm or InstanceNorm recomputed as the exact statistics of a set of batches, merged
// batch by batch, instead of a momentum average.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_PRECISE_BN_HPP_
#define NORMKIT_PRECISE_BN_HPP_

#include <cmath>        // std::abs, std::isfinite
#include <cstdint>      // std::int64_t
#include <functional>   // std::reference_wrapper
#include <iterator>     // std::iterator_traits, std::begin, std::end
#include <type_traits>  // std::enable_if_t, std::is_base_of, std::is_lvalue_reference
#include <utility>      // std::declval
#include <vector>       // std::vector

#include <normkit/batch_norm.hpp>
#include <normkit/config.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/fail.hpp>
#include <normkit/detail/float16.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/instance_norm.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: precise BatchNorm (docs/semantics.md §2.8). The running statistics a momentum average
// leaves behind describe the last few batches, seen through weights that kept changing. Precise
// BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") freezes the weights and recomputes
// them over many batches. BatchNorm: the mean and unbiased variance of the population of every
// element of every batch, per channel. Each batch is reduced to (count, mean, M2) per channel
// by the reduction core -- the very blocks and merge order of a training forward, so the same
// bits for any thread count -- and batches are merged in order with Chan's formula
// (merge_part), in double. That is exact in algebra whatever the batch sizes and means, and
// numerically as good as one reduction over the concatenated batch (the large-offset case
// included: no E[x^2] - E[x]^2 anywhere). torch.optim.swa_utils.update_bn instead runs every
// batch through a momentum-None forward (a cumulative average): its running_mean is the
// plain average of the batch means and its running_var that of the per-batch unbiased
// variances, which weights every batch alike whatever its size, misses the spread of the batch
// means around the overall mean, and applies Bessel's correction per batch. Even k batches of
// n elements with equal means give (kn-1)/(k(n-1)) times the population's unbiased variance.
//
// InstanceNorm: a running statistic estimates an *instance's* statistics (evaluation
// normalizes each instance with it), so the exact counterpart is the average over every
// instance (n, c) of every batch of the instance's mean, and of its unbiased variance -- what
// a cumulative average over all instances gives, and what a momentum-1 forward on the
// concatenated batch stores. The pooled variance of all elements would mix the spread between
// instances (which instance normalization removes) into it. The two averages are compensated
// sums (CompensatedSum): correct to about one rounding whatever the number of instances.

/// What precise BatchNorm needs of a module type: which statistics, the parameter type, the
/// input ranks its forward accepts. Only BatchNorm and InstanceNorm (with any Dim) qualify.
template <class M>
struct StatsModule {
  static constexpr bool kSupported = false;
};
template <class S, int D>
struct StatsModule<BatchNorm<S, D>> {
  static constexpr bool kSupported = true;
  static constexpr ChannelNormKind kKind = ChannelNormKind::batch;
  using Scalar = S;
  static constexpr bool accepts_rank(int r) { return D == 1 ? (r == 2 || r == 3) : r == D + 2; }
  static constexpr bool batched(int) { return true; }
};
template <class S, int D>
struct StatsModule<InstanceNorm<S, D>> {
  static constexpr bool kSupported = true;
  static constexpr ChannelNormKind kKind = ChannelNormKind::instance;
  using Scalar = S;
  static constexpr bool accepts_rank(int r) { return r == D + 1 || r == D + 2; }
  static constexpr bool batched(int r) { return r == D + 2; }
};

/// The logical shape of a batch for a module of type M, as M's forward reads it (unbatched
/// InstanceNorm input gets N = 1); the checks of the types are compile-time, as forward's.
template <class M, class X>
Shape stats_shape(const X& x, bool channels_last, const char* who) {
  using Tr = StatsModule<M>;
  constexpr int R = tensor_traits<X>::rank;
  static_assert(accepts_v<typename Tr::Scalar, scalar_of<X>>,
                "normkit precise BatchNorm: batches must be of the module's scalar type (or "
                "bfloat16/half for a float module), as its forward takes");
  static_assert(Tr::accepts_rank(R),
                "normkit precise BatchNorm: batches must have a rank the module's forward takes "
                "(BatchNorm1d: 2 or 3, BatchNorm2d: 4, BatchNorm3d: 5; InstanceNorm<Dim>: Dim + 1 "
                "or Dim + 2)");
  if constexpr (Tr::batched(R)) {
    return logical_shape(x, channels_last, who);
  } else {
    return unsqueeze0(logical_shape(x, channels_last, who, false));
  }
}

/// A Neumaier compensated sum: the sum of its terms correct to about one rounding of the
/// result, whatever their number and order (a plain sum of k terms can be off by k roundings).
/// Infinities and NaN propagate as in a plain sum.
struct CompensatedSum {
  double sum = 0, carry = 0;
  void add(double v) {
    const double t = sum + v;
    if (std::isfinite(t))
      carry += std::abs(sum) >= std::abs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  void add(const CompensatedSum& o) {
    add(o.sum);
    carry += o.carry;
  }
  double value() const { return sum + carry; }
};

/// The state of a precise-BatchNorm accumulation, whatever the module and input types:
/// BatchNorm: per channel (mean, M2, count) of every element so far; InstanceNorm: per channel
/// the compensated sums of the instances' means and unbiased variances, and the instance
/// count. Messages are tagged with the module's class name (`who`, "[normkit.BatchNorm2d]")
/// and start with the function's (`fn`).
class RunningStatsCore {
 public:
  RunningStatsCore(ChannelNormKind kind, Index channels, const char* who, const char* fn)
      : kind_(kind), channels_(channels), who_(who), fn_(fn) {
    const auto c = static_cast<std::size_t>(channels);
    if (kind == ChannelNormKind::batch) {
      parts_.resize(c);
    } else {
      mean_sum_.resize(c);
      var_sum_.resize(c);
    }
  }

  Index channels() const { return channels_; }
  std::int64_t batches() const { return batches_; }
  std::int64_t count() const { return count_; }
  const char* who() const { return who_; }

  /// Checks batch `index` (of shape sh) as the accumulation needs it: its channel count, and
  /// for InstanceNorm more than one spatial element (as a training forward).
  void check(const Shape& sh, std::int64_t index) const {
    if (sh.dim[1] != channels_) {
      fail(Fail::shape, who_,
           "%s: batch %lld: expected input with %lld channels (num_features) at logical dim 1, "
           "but got input of size %s",
           fn_, static_cast<long long>(index), static_cast<long long>(channels_), shape_text(sh).s);
    }
    if (kind_ == ChannelNormKind::instance && spatial_size(sh) == 1) {
      fail(Fail::value, who_,
           "%s: batch %lld: expected more than 1 spatial element per instance (its unbiased "
           "variance is undefined), got input size %s",
           fn_, static_cast<long long>(index), shape_text(sh).s);
    }
  }

  /// Adds one batch: checks it, reduces it (the caller's threads), then merges it in; nothing
  /// changes when it throws.
  template <class T>
  void add(const Shape& sh, const T* x, const Exec& ex) {
    check(sh, batches_);
    const Index C = channels_;
    const Index slots = kind_ == ChannelNormKind::batch ? C : sh.dim[0] * C;
    std::vector<Part> parts(static_cast<std::size_t>(slots));
    if (sh.numel() > 0)
      channel_norm_parts(kind_, sh, x, parts.data(), ex);
    // Commit (nothing below throws).
    if (kind_ == ChannelNormKind::batch) {
      for (Index c = 0; c < C; ++c)
        merge_part(true, parts_[static_cast<std::size_t>(c)], parts[static_cast<std::size_t>(c)]);
      count_ += sh.dim[0] * spatial_size(sh);
    } else if (sh.numel() > 0) {
      // Instances in (n, c) order: the order of the concatenated batch.
      const double m = static_cast<double>(spatial_size(sh));
      for (Index l = 0; l < slots; ++l) {
        const Part& p = parts[static_cast<std::size_t>(l)];
        const auto c = static_cast<std::size_t>(l % C);
        mean_sum_[c].add(p.a);
        var_sum_[c].add(variance(p) * m / (m - 1));  // a training forward's expression
      }
      count_ += sh.dim[0];
    }
    ++batches_;
  }

  /// Merges o's batches after this one's (same kind and channel count: the caller checks);
  /// o may be *this only through a copy.
  void merge(const RunningStatsCore& o) {
    for (std::size_t c = 0; c < parts_.size(); ++c) merge_part(true, parts_[c], o.parts_[c]);
    for (std::size_t c = 0; c < mean_sum_.size(); ++c) {
      mean_sum_[c].add(o.mean_sum_[c]);
      var_sum_[c].add(o.var_sum_[c]);
    }
    count_ += o.count_;
    batches_ += o.batches_;
  }

  /// value_error unless the module tracks running statistics.
  static void check_tracking(bool tracking, const char* who, const char* fn) {
    if (!tracking) {
      fail(Fail::value, who,
           "%s: track_running_stats is false: the module has no running statistics to "
           "recompute",
           fn);
    }
  }

  /// Starts over.
  void reset() { *this = RunningStatsCore(kind_, channels_, who_, fn_); }

  /// The statistics, per channel: mean and unbiased variance (BatchNorm), or the averages of
  /// the instances' (InstanceNorm), in double.
  /// @throws value_error without batches, with fewer than 2 elements per channel (BatchNorm)
  ///         or without instances (InstanceNorm).
  void finish(double* mean, double* var) const {
    if (batches_ == 0) {
      fail(Fail::value, who_,
           "%s: no batches: the statistics of an empty set of batches are undefined (the "
           "module is left unchanged)",
           fn_);
    }
    const auto C = static_cast<std::size_t>(channels_);
    if (kind_ == ChannelNormKind::batch) {
      if (count_ < 2) {
        fail(Fail::value, who_,
             "%s: expected more than 1 value per channel over all batches, got %lld in %lld "
             "batches (the unbiased variance is undefined)",
             fn_, static_cast<long long>(count_), static_cast<long long>(batches_));
      }
      const double m = static_cast<double>(count_);
      for (std::size_t c = 0; c < C; ++c) {
        mean[c] = parts_[c].a;
        var[c] = variance(parts_[c]) * m / (m - 1);  // a training forward's expression
      }
    } else {
      if (count_ == 0) {
        fail(Fail::value, who_,
             "%s: no instances in %lld batches (every batch is empty): the statistics are "
             "undefined",
             fn_, static_cast<long long>(batches_));
      }
      const double k = static_cast<double>(count_);
      for (std::size_t c = 0; c < C; ++c) {
        mean[c] = mean_sum_[c].value() / k;
        var[c] = var_sum_[c].value() / k;
      }
    }
  }

  /// Writes the statistics into module (a BatchNorm or InstanceNorm of scalar type S): every
  /// check first, then running_mean and running_var rounded once to S, and BatchNorm's
  /// num_batches_tracked = the number of batches. Nothing changes when it throws.
  template <class S, class Module>
  void write(Module& module) const {
    check_tracking(module.options().track_running_stats(), who_, fn_);
    if (module.options().num_features() != channels_) {
      fail(Fail::shape, who_,
           "%s: statistics of %lld channels cannot be written into a module of num_features "
           "%lld",
           fn_, static_cast<long long>(channels_),
           static_cast<long long>(module.options().num_features()));
    }
    const auto C = static_cast<std::size_t>(channels_);
    std::vector<double> mean(C), var(C);
    finish(mean.data(), var.data());
    Eigen::Tensor<S, 1> rm(channels_), rv(channels_);
    for (std::size_t c = 0; c < C; ++c) {
      rm.data()[c] = round_to<S>(mean[c]);
      rv.data()[c] = round_to<S>(var[c]);
    }
    // Same sizes as the module's buffers (checked above): no reallocation, nothing throws.
    module.set_running_mean(rm);
    module.set_running_var(rv);
    if (kind_ == ChannelNormKind::batch)
      module.set_num_batches_tracked(batches_);
  }

 private:
  ChannelNormKind kind_;
  Index channels_;
  const char* who_;
  const char* fn_;
  std::int64_t batches_ = 0;
  std::int64_t count_ = 0;  // BatchNorm: elements per channel; InstanceNorm: instances
  std::vector<Part> parts_;
  std::vector<CompensatedSum> mean_sum_, var_sum_;
};

/// The tensor a range element stands for: the element itself, or what a pointer or a
/// std::reference_wrapper refers to.
template <class E>
const E& batch_ref(const E& e) {
  return e;
}
template <class E>
const E& batch_ref(E* e) {
  return *e;
}
template <class E>
const E& batch_ref(const std::reference_wrapper<E>& e) {
  return e.get();
}

/// An empty accumulation for `module`, its messages tagged with the module's class name and
/// starting with `fn`.
/// @throws value_error when the module has no running statistics.
template <class Module>
RunningStatsCore stats_core(const Module& module, const char* fn) {
  RunningStatsCore::check_tracking(module.options().track_running_stats(), Module::kName, fn);
  return RunningStatsCore(StatsModule<Module>::kKind, module.options().num_features(),
                          Module::kName, fn);
}

template <class R, class = void>
struct is_batch_range : std::false_type {};
template <class R>
struct is_batch_range<R,
                      std::void_t<decltype(std::begin(std::declval<const R&>())),
                                  decltype(std::end(std::declval<const R&>()))>>
    : std::bool_constant<!is_tensor_v<R>> {};

}  // namespace detail

/// Precise BatchNorm statistics batch by batch: add() batches as they come (any mix of
/// Eigen::Tensor and TensorMap, of any rank and scalar type the module's forward takes, read
/// with the module's channels_last option), then write() the exact statistics of all of them
/// into the module's running_mean and running_var (docs/semantics.md §2.8):
///  - BatchNorm1d/2d/3d: per channel, the mean and unbiased variance of every element of every
///    batch -- what one training forward on the concatenated batch would compute -- not the
///    momentum or cumulative average of per-batch statistics (update_bn). num_batches_tracked
///    is set to the number of batches added, empty ones included, as update_bn leaves it (it
///    resets the counter and runs one training forward per batch).
///  - InstanceNorm1d/2d/3d with track_running_stats: per channel, the average over every
///    instance (n, c) of every batch of the instance's mean, and of its unbiased variance;
///    num_batches_tracked is left alone (an InstanceNorm's never moves, as in PyTorch).
///
/// Statistics are merged in double (Chan's parallel formula over per-batch (count, mean, M2);
/// compensated sums for InstanceNorm) in the order the batches were added, and rounded once to
/// the module's Scalar when written. A batch is reduced with the blocks and merge order of a
/// training forward, on the device given to add(): results are bitwise the same for any thread
/// count. The module is never touched before write(), and write() changes only the running
/// statistics (and BatchNorm's counter): mode, options, parameters and the statistics and
/// input kept for backward stay as they are. Errors are shape_error / value_error tagged with
/// the module's class name ("[normkit.BatchNorm2d] RunningStatsAccumulator: batch 3: ...").
/// One accumulator is not safe to add() to from several threads at once; give each thread its
/// own and merge() them (in a fixed order, for reproducible bits).
/// @code
/// normkit::BatchNorm2d<float> bn{64};
/// normkit::RunningStatsAccumulator acc(bn);  // RunningStatsAccumulator<BatchNorm2d<float>>
/// for (const auto& x : calibration_batches)
///   acc.add(x, pool_device);                 // any batch sizes; x: (N, 64, H, W)
/// acc.write(bn);                             // running_mean, running_var, num_batches_tracked
/// @endcode
/// @tparam Module normkit::BatchNorm<Scalar, Dim> or normkit::InstanceNorm<Scalar, Dim>.
template <class Module>
class RunningStatsAccumulator {
  using Traits = detail::StatsModule<Module>;
  static_assert(Traits::kSupported,
                "normkit::RunningStatsAccumulator: the module must be a normkit::BatchNorm or "
                "normkit::InstanceNorm (SyncBatchNorm is not supported)");

 public:
  /// The module type the statistics are for.
  using module_type = Module;

  /// An empty accumulator for `module`'s channel count, kind and channels_last option (the
  /// module is not kept: write() takes the module to write into).
  /// @throws value_error when the module has no running statistics (track_running_stats
  ///         false).
  explicit RunningStatsAccumulator(const Module& module)
      : core_(detail::stats_core(module, "RunningStatsAccumulator")),
        channels_last_(module.options().channels_last()) {}

  /// Adds batch x: (N, C, *), or what the module's forward takes (channels last with the
  /// module's channels_last; unbatched (C, *) for InstanceNorm, a batch of one). An empty
  /// batch counts as a batch (as a training forward counts it) and adds no values.
  /// @param x the batch, an Eigen::Tensor or TensorMap (read now, not kept).
  /// @param device Eigen::DefaultDevice, or an Eigen::ThreadPoolDevice to reduce x on its
  ///        threads (same bits for any thread count).
  /// @throws shape_error for a channel count other than the module's; value_error for
  ///         InstanceNorm input with one spatial element. The accumulator is unchanged when
  ///         it throws.
  template <class X, class Device = Eigen::DefaultDevice>
  void add(const X& x, const Device& device = Device()) {
    const detail::Shape sh = detail::stats_shape<Module>(x, channels_last_, core_.who());
    core_.add(sh, x.data(), detail::make_exec(device));
  }

  /// Appends the batches of `other` (an accumulator for the same module type and channel
  /// count) after this one's, as if they had been added here: exact, but rounded in this
  /// order (merge per-thread accumulators in a fixed order for reproducible bits).
  /// @throws shape_error for another channel count.
  void merge(const RunningStatsAccumulator& other) {
    if (other.core_.channels() != core_.channels()) {
      detail::fail(detail::Fail::shape, core_.who(),
                   "RunningStatsAccumulator: cannot merge the statistics of %lld channels into "
                   "an accumulator of %lld",
                   static_cast<long long>(other.core_.channels()),
                   static_cast<long long>(core_.channels()));
    }
    if (&other == this) {
      const detail::RunningStatsCore copy = other.core_;
      core_.merge(copy);
    } else {
      core_.merge(other.core_);
    }
  }

  /// Writes the statistics of every batch added into `module` (this one's module, or any
  /// module of the same type and channel count): running_mean and running_var rounded once to
  /// the module's Scalar; a BatchNorm's num_batches_tracked = batches(). Nothing else changes.
  /// @throws value_error when the module has no running statistics, without batches, or with
  ///         fewer than 2 values per channel in all (BatchNorm) or no instance (InstanceNorm);
  ///         shape_error when the module's channel count differs. The module is unchanged when
  ///         it throws.
  void write(Module& module) const { core_.template write<typename Traits::Scalar>(module); }

  /// Forgets every batch (the accumulator starts over).
  void reset() { core_.reset(); }

  /// The number of batches added (empty ones included).
  std::int64_t batches() const { return core_.batches(); }
  /// Values per channel so far: elements (BatchNorm: N * spatial, summed over batches) or
  /// instances (InstanceNorm: N, summed over non-empty batches).
  std::int64_t count() const { return core_.count(); }
  /// The channel count (the module's num_features).
  Index num_features() const { return core_.channels(); }

  /// The mean per channel that write() stores, in double (before rounding to the module's
  /// Scalar).
  /// @throws value_error as write() for too little data.
  Eigen::Tensor<double, 1> mean() const { return stats(true); }
  /// The unbiased variance per channel that write() stores (InstanceNorm: the average of the
  /// instances' unbiased variances), in double.
  /// @throws value_error as write() for too little data.
  Eigen::Tensor<double, 1> var() const { return stats(false); }

 private:
  Eigen::Tensor<double, 1> stats(bool want_mean) const {
    Eigen::Tensor<double, 1> mean(core_.channels()), var(core_.channels());
    core_.finish(mean.data(), var.data());
    return want_mean ? mean : var;
  }

  detail::RunningStatsCore core_;
  bool channels_last_;
};

/// Recomputes `module`'s running statistics from the batches [first, last) (precise
/// BatchNorm, docs/semantics.md §2.8): every batch goes through a RunningStatsAccumulator in
/// order, then write(). BatchNorm: running_mean and running_var become the mean and unbiased
/// variance of all elements of all batches per channel, and num_batches_tracked the number of
/// batches (empty ones included); InstanceNorm (with track_running_stats): the averages over
/// all instances of their means and unbiased variances (num_batches_tracked unchanged). Unlike
/// torch.optim.swa_utils.update_bn, which averages per-batch variances, the result is the
/// variance of the whole population, whatever the batch sizes and batch means. The module's
/// mode, options, parameters and the statistics and input kept for backward are not touched.
///
/// The iterators' elements are Eigen::Tensor or TensorMap batches (or pointers or
/// std::reference_wrapper to them; not null) that the module's forward takes, read with its
/// channels_last option; a wrong rank or scalar type does not compile. Batches of forward
/// iterators over lvalues are all checked first (an error before any reduction); any input
/// iterator works, read once.
/// @param module a BatchNorm, or an InstanceNorm with track_running_stats.
/// @param first, last the batches, in the order they are merged.
/// @param device Eigen::DefaultDevice, or an Eigen::ThreadPoolDevice to reduce each batch on
///        its threads (same bits for any thread count).
/// @throws value_error when the module has no running statistics, for an empty range, with
///         fewer than 2 values per channel in all (BatchNorm), or for InstanceNorm input with
///         one spatial element; shape_error for a batch of another channel count (naming the
///         batch, counted from 0). Messages are tagged with the module's class name:
///         "[normkit.BatchNorm2d] recompute_running_stats: batch 2: expected input with 64
///         channels ...". Every input is checked before anything is written: the module is
///         unchanged when it throws.
/// @code
/// bn.eval();  // any mode: it is left as it is
/// normkit::recompute_running_stats(bn, batches.begin(), batches.end(), pool_device);
/// @endcode
template <class Module, class It, class Device = Eigen::DefaultDevice>
void recompute_running_stats(Module& module, It first, It last, const Device& device = Device()) {
  static_assert(detail::StatsModule<Module>::kSupported,
                "normkit::recompute_running_stats: the module must be a normkit::BatchNorm or "
                "normkit::InstanceNorm (SyncBatchNorm is not supported)");
  detail::RunningStatsCore core = detail::stats_core(module, "recompute_running_stats");
  const bool channels_last = module.options().channels_last();
  using Ref = typename std::iterator_traits<It>::reference;
  using Cat = typename std::iterator_traits<It>::iterator_category;
  if constexpr (std::is_base_of<std::forward_iterator_tag, Cat>::value &&
                std::is_lvalue_reference<Ref>::value) {
    // Shapes first: a bad batch late in a long range throws before any reduction.
    std::int64_t i = 0;
    for (It it = first; it != last; ++it, ++i) {
      const auto& x = detail::batch_ref(*it);
      core.check(detail::stats_shape<Module>(x, channels_last, core.who()), i);
    }
  }
  const detail::Exec ex = detail::make_exec(device);
  for (; first != last; ++first) {
    auto&& elem = *first;  // a prvalue element lives to the end of the iteration
    const auto& x = detail::batch_ref(elem);
    core.add(detail::stats_shape<Module>(x, channels_last, core.who()), x.data(), ex);
  }
  core.write<typename detail::StatsModule<Module>::Scalar>(module);
}

/// recompute_running_stats over a whole range of batches (a std::vector of tensors, of
/// TensorMaps, of pointers to tensors, ...).
template <class Module,
          class Range,
          class Device = Eigen::DefaultDevice,
          std::enable_if_t<detail::is_batch_range<Range>::value, int> = 0,
          detail::if_device<Device> = 0>
void recompute_running_stats(Module& module,
                             const Range& batches,
                             const Device& device = Device()) {
  recompute_running_stats(module, std::begin(batches), std::end(batches), device);
}

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_PRECISE_BN_HPP_
