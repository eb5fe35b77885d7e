// normkit/mpi.hpp: SyncBatchNorm -- BatchNorm over a batch split across MPI processes, every
// process merging the same per-sample statistics in the same order. Optional header: needs an
// MPI-3 implementation (CMake: link normkit::mpi, or MPI::MPI_CXX next to normkit::normkit).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_MPI_HPP_
#define NORMKIT_MPI_HPP_

#include <algorithm>  // std::min
#include <cstdint>    // std::int64_t
#include <cstdio>     // std::snprintf
#include <cstring>    // std::memcpy, std::strncpy
#include <stdexcept>  // std::runtime_error
#include <string>     // std::string
#include <vector>     // std::vector

#include <mpi.h>

#include <normkit/batch_norm.hpp>
#include <normkit/config.hpp>
#include <normkit/detail/channel_module.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// An MPI call's return code: anything but MPI_SUCCESS throws std::runtime_error naming the
/// call. (With MPI's default error handler, MPI_ERRORS_ARE_FATAL, a failing call aborts the
/// job before returning; with MPI_ERRORS_RETURN on the communicator this is what the caller
/// sees, on the ranks where the call failed.)
inline void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS)
    return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(std::string("[normkit.SyncBatchNorm] ") + call + " failed: " + text);
}

/// What every rank tells the others before any data moves (one MPI_Allgather): its input's
/// shape facts, its mode, and whether its own checks passed (and why not). Bad input on one
/// rank then makes every rank throw the same exception, and nothing hangs in a collective the
/// other ranks never reach.
struct SyncHeader {
  std::int64_t channels = 0;  ///< logical dim 1
  std::int64_t samples = 0;   ///< logical dim 0 (this rank's shard)
  std::int64_t spatial = 0;   ///< product of the spatial dims
  std::int32_t rank = 0;      ///< tensor rank
  std::int32_t layout = 0;    ///< Eigen::RowMajor / ColMajor
  std::int32_t training = 0;  ///< 1 in training mode
  std::int32_t phase = 0;     ///< 0 forward, 1 backward recomputing, 2 backward with kept stats
  std::int32_t status = 0;    ///< 0 ok, 1 shape_error, 2 value_error
  char message[244] = {};     ///< the error's message when status is not 0
};
static_assert(sizeof(SyncHeader) == 288, "SyncHeader: 288 bytes on every rank (sent as bytes)");

/// Exchanges the headers and throws on every rank when any rank's status is an error or the
/// ranks disagree (channel count, tensor rank, layout, spatial dims, mode, phase).
inline std::vector<SyncHeader> sync_agree(MPI_Comm comm, const SyncHeader& mine, const char* who) {
  int size = 1;
  mpi_check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  std::vector<SyncHeader> all(static_cast<std::size_t>(size));
  mpi_check(MPI_Allgather(&mine, sizeof(SyncHeader), MPI_BYTE, all.data(), sizeof(SyncHeader),
                          MPI_BYTE, comm),
            "MPI_Allgather");
  for (int r = 0; r < size; ++r) {
    const SyncHeader& h = all[static_cast<std::size_t>(r)];
    if (h.status != 0) {
      fail(h.status == 1 ? Fail::shape : Fail::value, who, "rank %d rejected its input: %s", r,
           h.message);
    }
  }
  const SyncHeader& h0 = all[0];
  for (int r = 1; r < size; ++r) {
    const SyncHeader& h = all[static_cast<std::size_t>(r)];
    if (h.channels != h0.channels || h.rank != h0.rank || h.layout != h0.layout ||
        h.spatial != h0.spatial) {
      fail(Fail::shape, who,
           "rank %d has input of rank %d with %lld channels and %lld spatial elements (%s), but "
           "rank 0 has rank %d, %lld channels and %lld spatial elements (%s)",
           r, h.rank, static_cast<long long>(h.channels), static_cast<long long>(h.spatial),
           h.layout == Eigen::RowMajor ? "RowMajor" : "ColMajor", h0.rank,
           static_cast<long long>(h0.channels), static_cast<long long>(h0.spatial),
           h0.layout == Eigen::RowMajor ? "RowMajor" : "ColMajor");
    }
    if (h.training != h0.training || h.phase != h0.phase) {
      auto call = [](std::int32_t phase) {
        return phase == 0   ? "forward"
               : phase == 1 ? "backward recomputing the batch statistics"
                            : "backward with the kept batch statistics";
      };
      fail(Fail::value, who,
           "rank %d is in %s mode (%s), but rank 0 is in %s mode (%s): every rank must call the "
           "same method in the same mode",
           r, h.training ? "training" : "evaluation", call(h.phase),
           h0.training ? "training" : "evaluation", call(h0.phase));
    }
  }
  return all;
}

/// Gathers every rank's per-sample partials (samples x C, in rank order) and folds them per
/// channel in global sample order: the single-process fold of BatchNorm's per-sample blocks.
/// Returns the merged partial per channel; what this rank sent is added to `bytes`.
inline std::vector<Part> sync_fold(MPI_Comm comm,
                                   const std::vector<SyncHeader>& all,
                                   const std::vector<Part>& local,
                                   Index C,
                                   bool moments,
                                   long long& bytes) {
  const int size = static_cast<int>(all.size());
  std::vector<int> counts(static_cast<std::size_t>(size)), displs(counts.size());
  long long total = 0;
  for (int r = 0; r < size; ++r) {
    const long long n = all[static_cast<std::size_t>(r)].samples * C * 3;
    if (total + n > 2147483647LL)
      fail(Fail::value, "SyncBatchNorm", "more per-sample statistics than one MPI call moves");
    counts[static_cast<std::size_t>(r)] = static_cast<int>(n);
    displs[static_cast<std::size_t>(r)] = static_cast<int>(total);
    total += n;
  }
  std::vector<double> send(local.size() * 3), recv(static_cast<std::size_t>(total));
  for (std::size_t i = 0; i < local.size(); ++i) {
    send[3 * i] = local[i].a;
    send[3 * i + 1] = local[i].b;
    send[3 * i + 2] = static_cast<double>(local[i].n);
  }
  bytes += static_cast<long long>(send.size() * sizeof(double));
  mpi_check(MPI_Allgatherv(send.data(), static_cast<int>(send.size()), MPI_DOUBLE, recv.data(),
                           counts.data(), displs.data(), MPI_DOUBLE, comm),
            "MPI_Allgatherv");
  std::vector<Folder> fold(static_cast<std::size_t>(C), Folder{moments, {}, {}});
  const Index samples = static_cast<Index>(total / (3 * std::max<Index>(1, C)));
  for (Index n = 0; n < samples; ++n) {
    for (Index c = 0; c < C; ++c) {
      const double* q = recv.data() + 3 * (n * C + c);
      fold[static_cast<std::size_t>(c)].add(n, Part{q[0], q[1], static_cast<Index>(q[2])});
    }
  }
  std::vector<Part> out(static_cast<std::size_t>(C));
  for (Index c = 0; c < C; ++c)
    out[static_cast<std::size_t>(c)] = fold[static_cast<std::size_t>(c)].done();
  return out;
}

}  // namespace detail

/// BatchNorm over a batch split across the processes of an MPI communicator, as
/// torch.nn.SyncBatchNorm: in training, every process normalizes its shard with the mean and
/// variance of the *whole* batch, and the running statistics (unbiased variance over the
/// global count) are the same on every process. Evaluation mode is plain BatchNorm on the
/// running statistics, moving no data (without track_running_stats: on each shard's own
/// statistics, as torch.nn.SyncBatchNorm).
///
/// NB: exact and deterministic. Each process reduces every sample of its shard to per-channel
/// (count, mean, M2) -- BatchNorm's per-sample blocks -- and one MPI_Allgatherv gives every
/// process every sample's partial; each folds them in global sample order (Chan's formula).
/// Every process therefore gets bitwise the same statistics whatever the message timing, the
/// same for any number of processes and any split of the batch, and bitwise the statistics a
/// single-process BatchNorm computes on the concatenated batch whenever that BatchNorm uses
/// per-sample blocks (a sample's share of a channel of at least 1024 elements, in NCHW-like
/// or channels-last layouts); otherwise within rounding of it. Backward exchanges the two
/// per-channel sums per sample the same way (an all-gather summed in a fixed order, not
/// MPI_Allreduce, whose order is the MPI library's choice): dx is the slice of the full-batch
/// gradient. y and dx are bitwise the same for any split in RowMajor layouts (NCHW-like,
/// channels-last: a sample is a block the kernels walk alike in any shard); in ColMajor a
/// shard's contiguous runs lie along N, and the kernels' vector body, scalar tail and column
/// variant round alike only without FMA contraction (the baseline ISA), so there y and dx are
/// within rounding across splits (the statistics stay bitwise). dweight and dbias are this
/// process's own contribution, as PyTorch: summed over processes (what a data-parallel gradient
/// all-reduce does for every parameter) they give the full-batch gradient.
///
/// Every process must call forward (and backward) collectively, in both modes (evaluation
/// moves no data, but the processes still agree on the call in one small collective), with
/// shards of the same channel count, tensor rank, storage order and spatial size (the batch
/// size may differ, including 0; "more than 1 value per channel" is judged on the whole
/// batch). Before any data moves the processes agree on these in one small collective:
/// a mismatch, or bad input on any process, makes every process throw the same exception
/// naming the offending rank, and no state changes anywhere. MPI_THREAD_FUNNELED is enough:
/// only the calling thread talks to MPI (a thread-pool device only runs the local reductions).
/// @code
/// normkit::SyncBatchNorm<float> bn{normkit::BatchNormOptions{64}, MPI_COMM_WORLD};
/// auto y = bn.forward(x);   // x: this process's (n_r, 64, H, W) shard
/// auto g = bn.backward(dy);  // g.input: dL/dx of the shard; g.weight, g.bias: contributions
/// @endcode
template <class Scalar>
class SyncBatchNorm : public detail::ChannelModule<Scalar, BatchNormOptions> {
  using Base = detail::ChannelModule<Scalar, BatchNormOptions>;

 public:
  /// Class name as in PyTorch, used in error messages.
  static constexpr const char* kName = "SyncBatchNorm";

  /// @throws value_error for negative num_features or eps, or momentum outside [0, 1].
  explicit SyncBatchNorm(const BatchNormOptions& options, MPI_Comm comm = MPI_COMM_WORLD)
      : Base(kName, options), comm_(comm) {}

  /// The communicator the statistics are merged over.
  MPI_Comm comm() const { return comm_; }
  /// Bytes this process sent in the last call's data exchange: the per-sample partials, 3
  /// doubles per sample of its shard and channel, once in a training forward and once in a
  /// backward (twice when backward(x, dy) recomputes the statistics); 0 in evaluation mode.
  /// The agreement collective every call starts with adds sizeof(detail::SyncHeader) (288)
  /// bytes, not counted here.
  long long last_exchange_bytes() const { return bytes_; }

  /// Normalizes this process's shard x, (N_r, C, *) of rank 2 to 5 (C last with
  /// channels_last), with the statistics of the whole batch in training mode.
  template <class X, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// Non-allocating forward.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    const detail::Exec ex = detail::make_exec(device);
    // Every mode; y's size is checked (a Tensor resized) with x's, on every rank together.
    const detail::Shape sh =
        checked(x, static_cast<const X*>(nullptr), 0, [&] { detail::prepare_output(x, y, kName); });
    if (!this->training_) {  // running statistics (or this shard's own without tracking)
      this->forward_impl(detail::ChannelNormKind::batch, sh, x, y, ex);
      return;
    }
    std::vector<double> mean, var;
    const double count = global_stats(sh, x, ex, mean, var);
    const detail::GivenStats given{mean.data(), var.data(), count};
    // An empty batch on every rank: as BatchNorm on an empty batch (the counter moves, the
    // running statistics do not), which every rank sees alike.
    this->forward_impl(detail::ChannelNormKind::batch, sh, x, y, ex, count > 0 ? &given : nullptr);
    kept_count_ = count;
  }

  /// Gradients for the last training forward from its kept input (keep_input()).
  template <class DY, class Device = Eigen::DefaultDevice, detail::if_device<Device> = 0>
  auto backward(const DY& dy, const Device& device = Device()) {
    return backward(kept_input_or_reject(dy), dy, device);
  }

  /// Gradients at this process's shard x: dx of the full-batch loss, and this process's
  /// contributions to dweight and dbias.
  template <class X,
            class DY,
            class Device = Eigen::DefaultDevice,
            detail::if_tensor<DY> = 0,
            detail::if_device<Device> = 0>
  auto backward(const X& x, const DY& dy, const Device& device = Device()) {
    Gradients<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> g;
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
    const detail::Exec ex = detail::make_exec(device);
    const bool kept = this->training_ && this->kept_for(x);
    const detail::Shape sh = checked(x, &dy, kept ? 2 : 1, [] {});
    if (!this->training_) {  // evaluation: this process alone, as BatchNorm
      this->backward_impl(detail::ChannelNormKind::batch, sh, x, dy, g, ex);
      return;
    }
    const Index C = this->options_.num_features();
    // The statistics the forward used: kept, or the whole batch's again.
    std::vector<double> mean(static_cast<std::size_t>(C)), rstd(mean.size());
    double count = 0;
    if (kept) {
      for (Index c = 0; c < C; ++c) {
        mean[static_cast<std::size_t>(c)] = this->saved_.mean.data()[c];
        rstd[static_cast<std::size_t>(c)] = this->saved_.rstd.data()[c];
      }
      count = kept_count_;
    } else {
      std::vector<double> var;
      count = global_stats(sh, x, ex, mean, var);
      if (count == 1) {  // as BatchNorm's backward(x, dy); the count is the same on every rank
        detail::fail(detail::Fail::value, kName,
                     "Expected more than 1 value per channel when training, got 1 value per "
                     "channel over the whole batch (input size %s here)",
                     detail::shape_text(sh).s);
      }
      for (Index c = 0; c < C; ++c) {
        rstd[static_cast<std::size_t>(c)] =
            detail::rstd_of(var[static_cast<std::size_t>(c)], this->options_.eps(), true);
      }
    }
    // Per-sample backward sums, exchanged and folded in global order.
    std::vector<detail::Part> local(static_cast<std::size_t>(sh.dim[0] * C));
    detail::channel_sample_parts(sh, x.data(), dy.data(), mean.data(), local.data(), ex);
    const std::vector<detail::Part> sums =
        detail::sync_fold(comm_, headers_, local, C, false, bytes_);
    const Index nc = this->options_.affine() ? C : 0;
    detail::prepare_gradients(g, x, nc, nc);
    VectorRef<const Scalar> w;
    if (this->options_.affine())
      w = VectorRef<const Scalar>(this->weight_);
    detail::channel_norm_dx(sh, x.data(), dy.data(), g.input.data(), mean.data(), rstd.data(),
                            sums.data(), count, w, ex);
    if (nc) {
      // This process's contribution: its own samples' sums, folded in order.
      for (Index c = 0; c < C; ++c) {
        detail::Folder f{false, {}, {}};
        for (Index n = 0; n < sh.dim[0]; ++n) f.add(n, local[static_cast<std::size_t>(n * C + c)]);
        const detail::Part p = f.done();
        g.weight.data()[c] = static_cast<Scalar>(p.b * rstd[static_cast<std::size_t>(c)]);
        g.bias.data()[c] = static_cast<Scalar>(p.a);
      }
    }
  }

  /// backward(dy) into caller-owned gradients.
  template <class DY, class G, class Device = Eigen::DefaultDevice, detail::if_gradients<G> = 0>
  void backward(const DY& dy, G& g, const Device& device = Device()) {
    backward(kept_input_or_reject(dy), dy, g, device);
  }

 private:
  template <class X>
  detail::Shape shape(const X& x) const {
    constexpr int R = detail::tensor_traits<X>::rank;
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "SyncBatchNorm: input scalar type differs from the module's");
    static_assert(R >= 2 && R <= 5, "SyncBatchNorm: expected input of rank 2 to 5 (N, C, *)");
    return detail::logical_shape(x, this->options_.channels_last(), kName);
  }

  /// Runs this process's checks (of x, when given dy, and `extra`) and the agreement
  /// collective; throws on every process when any process's input is bad. Returns x's shape.
  template <class X, class DY, class F>
  detail::Shape checked(const X& x, const DY* dy, int phase, F&& extra) {
    detail::SyncHeader h;
    detail::Shape sh;
    bytes_ = 0;
    try {
      sh = shape(x);
      detail::check_channels(kName, "num_features", this->options_.num_features(), sh);
      if (dy)
        detail::check_same_dims(kName, "grad_output", x, *dy);
      extra();
    } catch (const error& e) {
      h.status = dynamic_cast<const shape_error*>(&e) ? 1 : 2;
      std::strncpy(h.message, e.what(), sizeof h.message - 1);
    }
    h.channels = sh.rank >= 2 ? sh.dim[1] : -1;
    h.samples = sh.rank >= 1 ? sh.dim[0] : 0;
    h.spatial = sh.rank >= 2 ? detail::spatial_size(sh) : 0;
    h.rank = sh.rank;
    h.layout = detail::tensor_traits<X>::layout;
    h.training = this->training_ ? 1 : 0;
    h.phase = phase;
    headers_ = detail::sync_agree(comm_, h, kName);
    return sh;
  }

  /// The kept input for backward(dy); when there is none (or dy does not match it), the
  /// agreement collective the other processes are in makes every process throw.
  template <class DY>
  auto kept_input_or_reject(const DY& dy) {
    try {
      return this->kept_input(dy, kName);
    } catch (const error& e) {
      detail::SyncHeader h;
      h.status = dynamic_cast<const shape_error*>(&e) ? 1 : 2;
      std::strncpy(h.message, e.what(), sizeof h.message - 1);
      bytes_ = 0;
      headers_ = detail::sync_agree(comm_, h, kName);  // throws: this rank's status is an error
      throw;
    }
  }

  /// The whole batch's per-channel mean and biased variance, merged over every process (after
  /// checked()); returns the global count per channel.
  template <class X>
  double global_stats(const detail::Shape& sh,
                      const X& x,
                      const detail::Exec& ex,
                      std::vector<double>& mean,
                      std::vector<double>& var) {
    const Index C = sh.dim[1];
    std::vector<detail::Part> local(static_cast<std::size_t>(sh.dim[0] * C));
    detail::channel_sample_parts<Scalar>(sh, x.data(), nullptr, nullptr, local.data(), ex);
    const std::vector<detail::Part> merged =
        detail::sync_fold(comm_, headers_, local, C, true, bytes_);
    mean.resize(static_cast<std::size_t>(C));
    var.resize(mean.size());
    for (Index c = 0; c < C; ++c) {
      mean[static_cast<std::size_t>(c)] = merged[static_cast<std::size_t>(c)].a;
      var[static_cast<std::size_t>(c)] = detail::variance(merged[static_cast<std::size_t>(c)]);
    }
    Index total = 0;
    for (const auto& h : headers_) total += h.samples;
    return static_cast<double>(total * detail::spatial_size(sh));
  }

  MPI_Comm comm_;
  std::vector<detail::SyncHeader> headers_;
  long long bytes_ = 0;
  double kept_count_ = 0;
};

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_MPI_HPP_
