// sync_batch_norm_mpi: train_mlp.cpp's MLP (20 -> 128 -> BatchNorm -> ReLU -> 4) trained
// data-parallel, `mpirun -np 2 ./sync_batch_norm_mpi` (2 to 4 ranks): each rank takes a shard
// of every minibatch; SyncBatchNorm normalizes it with the whole minibatch's statistics, and
// the other gradients (per-rank contributions) are summed with one MPI_Allreduce per step.
// Rank 0 also trains with BatchNorm1d on whole minibatches in one process and prints both
// loss curves: equal to float rounding (exit 1 beyond 1e-4 relative).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include <Eigen/Dense>
#include <mpi.h>

#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

namespace {

using Index = Eigen::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
using Map2 = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using ConstMap2 = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;

constexpr Index kDim = 20, kHidden = 128, kClasses = 4, kTrain = 1536, kBatch = 64;
constexpr int kEpochs = 15;
constexpr float kLearningRate = 0.05f;

// Variates from std::mt19937, whose output the standard fixes: the same numbers everywhere.
double uniform(std::mt19937& g) {
  return static_cast<double>(g() >> 8) / 16777216.0;
}
float normal(std::mt19937& g) {  // Box-Muller
  const double u1 = 1.0 - uniform(g), u2 = uniform(g);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// train_mlp's data: 4 classes of 2 Gaussian blobs each, features scaled 0.1 to 32 and offset.
struct Data {
  Mat x{kTrain, kDim};
  std::vector<Index> label = std::vector<Index>(kTrain);
  Data() {
    std::mt19937 g(2024);
    Mat centers(8, kDim);
    for (Index k = 0; k < centers.size(); ++k) centers.data()[k] = 1.2f * normal(g);
    for (Index i = 0; i < kTrain; ++i) {
      const Index b = static_cast<Index>(g() % 8);
      label[static_cast<std::size_t>(i)] = b % kClasses;
      for (Index j = 0; j < kDim; ++j) {
        const float scale = std::pow(10.0f, -1.0f + 2.5f * static_cast<float>(j) / 19.0f);
        x(i, j) = (j % 2 ? -2.0f : 2.0f) * scale + scale * (centers(b, j) + normal(g));
      }
    }
  }
};

// One training run: this rank's shard of each minibatch (rank 0 of 1: all of it) through
// `bn`; returns the mean loss of every epoch over whole minibatches.
template <class BN>
std::vector<double> train(BN& bn, const Data& d, int rank, int size) {
  std::mt19937 init(1), shuffle(99);
  auto weights = [&init](Index rows, Index cols, Index fan_in) {
    Mat m(rows, cols);
    const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
    for (Index k = 0; k < m.size(); ++k)
      m.data()[k] = bound * static_cast<float>(2.0 * uniform(init) - 1.0);
    return m;
  };
  Mat w1 = weights(kDim, kHidden, kDim), b1 = weights(1, kHidden, kDim);
  Mat w2 = weights(kHidden, kClasses, kHidden), b2 = weights(1, kClasses, kHidden);
  const Index lo = kBatch * rank / size, n = kBatch * (rank + 1) / size - lo;
  std::vector<Index> order(kTrain);
  std::iota(order.begin(), order.end(), Index{0});
  std::vector<double> curve;
  std::vector<float> grad;
  Mat x(n, kDim), a(n, kHidden), dlogits(n, kClasses);
  for (int epoch = 0; epoch < kEpochs; ++epoch) {
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[shuffle() % i]);
    double loss = 0;
    for (Index start = 0; start < kTrain; start += kBatch) {
      const Index* rows = order.data() + start + lo;
      for (Index i = 0; i < n; ++i) x.row(i) = d.x.row(rows[i]);
      const Mat z1 = (x * w1).rowwise() + RowVec(b1);
      bn.forward(ConstMap2(z1.data(), n, kHidden), Map2(a.data(), n, kHidden));
      const Mat h = a.cwiseMax(0.0f);
      const Mat logits = (h * w2).rowwise() + RowVec(b2);
      double step_loss = 0;  // softmax cross-entropy, a mean over the whole minibatch
      for (Index i = 0; i < n; ++i) {
        const RowVec e = (logits.row(i).array() - logits.row(i).maxCoeff()).exp().matrix();
        dlogits.row(i) = e / e.sum();
        const Index t = d.label[static_cast<std::size_t>(rows[i])];
        step_loss -= std::log(static_cast<double>(dlogits(i, t)));
        dlogits(i, t) -= 1.0f;
      }
      dlogits /= static_cast<float>(kBatch);
      const Mat da = (a.array() > 0.0f).select(dlogits * w2.transpose(), 0.0f);
      const auto g = bn.backward(ConstMap2(da.data(), n, kHidden));  // dz1 of the whole loss
      const Eigen::Map<const Mat> dz1(g.input.data(), n, kHidden);
      grad.clear();  // this rank's contributions, summed over the ranks in one call
      auto put = [&grad](const auto& m) { grad.insert(grad.end(), m.data(), m.data() + m.size()); };
      for (const Mat& m : {Mat(x.transpose() * dz1), Mat(dz1.colwise().sum()),
                           Mat(h.transpose() * dlogits), Mat(dlogits.colwise().sum())})
        put(m);
      put(g.weight);
      put(g.bias);
      if (size > 1) {
        MPI_Allreduce(MPI_IN_PLACE, grad.data(), static_cast<int>(grad.size()), MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, &step_loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      }
      const float* p = grad.data();
      auto step = [&p](auto& m) {
        for (Index k = 0; k < m.size(); ++k) m.data()[k] -= kLearningRate * *p++;
      };
      for (Mat* m : {&w1, &b1, &w2, &b2}) step(*m);
      Eigen::Tensor<float, 1> weight = bn.weight(), bias = bn.bias();
      step(weight);
      step(bias);
      bn.set_weight(weight);
      bn.set_bias(bias);
      loss += step_loss / static_cast<double>(kBatch);
    }
    curve.push_back(loss / static_cast<double>(kTrain / kBatch));
  }
  return curve;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0, rank = 0, size = 1;  // only this thread calls MPI: FUNNELED is enough
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const Data data;
  normkit::SyncBatchNorm<float> sbn(normkit::BatchNormOptions(kHidden), MPI_COMM_WORLD);
  const std::vector<double> dist = train(sbn, data, rank, size);
  int ok = 1;
  if (rank == 0) {
    normkit::BatchNorm1d<float> bn(kHidden);
    const std::vector<double> one = train(bn, data, 0, 1);
    std::printf(
        "minibatches of 64 split over %d ranks; mean training loss per epoch:\n"
        "epoch   SyncBatchNorm, %d ranks   BatchNorm1d, 1 process   difference\n",
        size, size);
    double worst = 0;
    for (std::size_t i = 0; i < one.size(); ++i) {
      worst = std::max(worst, std::abs(dist[i] - one[i]) / one[i]);
      std::printf("%5zu   %22.6f   %22.6f   %10.1e\n", i + 1, dist[i], one[i],
                  std::abs(dist[i] - one[i]) / one[i]);
    }
    std::printf("SyncBatchNorm sent %lld bytes per training call (rank 0)\n",
                sbn.last_exchange_bytes());
    ok = worst <= 1e-4 ? 1 : 0;
    std::printf("%s: largest relative difference of the loss curves %.1e (float rounding)\n",
                ok ? "OK" : "FAIL", worst);
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return ok ? 0 : 1;
}
