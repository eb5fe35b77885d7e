// train_mlp: why BatchNorm? A two-layer perceptron on badly scaled features, trained with and
// without BatchNorm1d between its layers (same initial weights, learning rate and minibatches).
//
//   x (batch, 20) -> Linear(20 -> 128) -> [BatchNorm1d(128)] -> ReLU -> Linear(128 -> 4) -> softmax
//
// Everything but BatchNorm (the layers, softmax cross-entropy, backward, SGD, the synthetic
// data set) is written here with Eigen; BatchNorm1d's backward is bn.backward(dy). Prints the
// loss and accuracy of each epoch, the held-out accuracy (BatchNorm in eval mode), how many
// epochs each model needs to reach a target loss, and writes both loss curves to an SVG chart
// (train_mlp_loss.svg, or the path given as argv[1]). Exits 1 unless BatchNorm reaches the
// target in at most half the epochs.
//
// Why it helps here: the features have scales from 0.1 to 32 and large offsets, and without
// BatchNorm the first layer's outputs inherit them, so the loss is badly conditioned: at the
// learning rate that suits the BatchNorm model, plain SGD overshoots and the loss oscillates
// (a smaller rate is stable but slow). BatchNorm1d re-centres and re-scales every hidden unit
// over the batch, so what the rest of the network sees no longer depends on the inputs'
// offsets and scales (nor on the scale of w1), and the same step size makes steady progress.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Dense>

#include <normkit/normkit.hpp>

namespace {

using Index = Eigen::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
// A RowMajor (rows, cols) matrix's data is a RowMajor (N, C) tensor: no copy, no transpose.
using TensorMap2 = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using ConstTensorMap2 = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;

constexpr Index kDim = 20, kHidden = 128, kClasses = 4;
constexpr Index kTrain = 1536, kTest = 512, kBatch = 64;
constexpr int kEpochs = 40;
constexpr float kLearningRate = 0.05f;
constexpr float kOffset = 2.0f;
constexpr double kTargetLoss = 0.30;
constexpr std::uint32_t kDataSeed = 2024, kInitSeed = 1, kShuffleSeed = 99;

// The random numbers come from std::mt19937 (whose output the standard fixes) turned into
// uniform and normal variates here, not by <random>'s distributions (whose algorithms are
// each standard library's own): the same data, weights and minibatches everywhere.
class Rng {
 public:
  explicit Rng(std::uint32_t seed) : gen_(seed) {}
  float uniform() { return static_cast<float>(gen_() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  float normal() {  // Box-Muller
    const double u1 = 1.0 - static_cast<double>(uniform()), u2 = static_cast<double>(uniform());
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  Index below(Index n) { return static_cast<Index>(gen_() % static_cast<std::uint32_t>(n)); }
  template <class T>
  void shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (std::size_t i = v.size(); i > 1; --i)
      std::swap(v[i - 1], v[static_cast<std::size_t>(below(static_cast<Index>(i)))]);
  }

 private:
  std::mt19937 gen_;
};

struct DataSet {
  Mat x;
  std::vector<int> label;
};

// Four classes, each a mixture of two Gaussian blobs (so not linearly separable), in 20
// dimensions measured in "mixed units": feature j has scale 10^(-1 + 2.5 j / 19), from 0.1
// to 32, and an offset of kOffset times its scale, as raw measurements often are.
struct Generator {
  Rng rng{kDataSeed};
  std::vector<float> scale, offset;
  Mat centers{2 * kClasses, kDim};
  Generator() {
    for (Index j = 0; j < kDim; ++j) {
      scale.push_back(
          std::pow(10.0f, -1.0f + 2.5f * static_cast<float>(j) / static_cast<float>(kDim - 1)));
      offset.push_back((j % 2 ? -kOffset : kOffset) * scale.back());
    }
    for (Index k = 0; k < centers.size(); ++k) centers.data()[k] = 1.2f * rng.normal();
  }
  DataSet sample(Index n) {
    DataSet d{Mat(n, kDim), std::vector<int>(static_cast<std::size_t>(n))};
    for (Index i = 0; i < n; ++i) {
      const Index b = rng.below(2 * kClasses);
      d.label[static_cast<std::size_t>(i)] = static_cast<int>(b % kClasses);
      for (Index j = 0; j < kDim; ++j) {
        const auto jj = static_cast<std::size_t>(j);
        d.x(i, j) = offset[jj] + scale[jj] * (centers(b, j) + rng.normal());
      }
    }
    return d;
  }
};

// Softmax cross-entropy of logits (batch, classes): returns the mean loss, writes
// dL/dlogits into grad and adds the number of correct predictions to *correct.
double softmax_xent(const Mat& logits, const int* label, Mat& grad, Index* correct) {
  const Index n = logits.rows();
  grad.resize(n, logits.cols());
  double loss = 0.0;
  for (Index i = 0; i < n; ++i) {
    Index arg = 0;
    const float top = logits.row(i).maxCoeff(&arg);
    const RowVec e = (logits.row(i).array() - top).exp().matrix();
    const float sum = e.sum();
    grad.row(i) = e / sum;
    loss -= std::log(static_cast<double>(grad(i, label[i])));
    grad(i, label[i]) -= 1.0f;
    if (arg == label[i])
      ++*correct;
  }
  grad /= static_cast<float>(n);
  return loss / static_cast<double>(n);
}

struct Mlp {
  Mat w1, w2;
  RowVec b1, b2;
  bool use_bn;
  normkit::BatchNorm1d<float> bn{kHidden};
  Mat z1, a, h;  // pre-BN, post-BN (pre-ReLU), post-ReLU activations of the last forward
  // (With BatchNorm b1 is redundant, as BatchNorm subtracts the mean: its gradient is ~0.
  // It is kept so that both models have the same parameters and initial values.)

  // PyTorch's default Linear init, U(-1/sqrt(in), 1/sqrt(in)), from a fixed seed.
  explicit Mlp(bool with_bn) : use_bn(with_bn) {
    Rng rng(kInitSeed);
    auto init = [&rng](Index rows, Index cols, Index fan_in) {
      const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
      Mat m(rows, cols);
      for (Index k = 0; k < m.size(); ++k) m.data()[k] = rng.uniform(-bound, bound);
      return m;
    };
    w1 = init(kDim, kHidden, kDim);
    b1 = init(1, kHidden, kDim);
    w2 = init(kHidden, kClasses, kHidden);
    b2 = init(1, kClasses, kHidden);
  }

  Mat forward(const Mat& x) {
    z1 = (x * w1).rowwise() + b1;
    if (use_bn) {
      a.resize(z1.rows(), z1.cols());
      bn.forward(ConstTensorMap2(z1.data(), z1.rows(), z1.cols()),
                 TensorMap2(a.data(), a.rows(), a.cols()));
    } else {
      a = z1;
    }
    h = a.cwiseMax(0.0f);
    return (h * w2).rowwise() + b2;
  }

  // Backward from dL/dlogits and one SGD step.
  void backward_and_step(const Mat& x, const Mat& dlogits, float lr) {
    const Mat dh = dlogits * w2.transpose();
    const Mat da = (a.array() > 0.0f).select(dh, 0.0f);
    Mat dz1 = da;  // dL/dz1: through BatchNorm when there is one
    if (use_bn) {
      // g.input is dL/dz1, g.weight and g.bias the gradients of BatchNorm's affine parameters.
      const auto g = bn.backward(ConstTensorMap2(da.data(), da.rows(), da.cols()));
      dz1 = Eigen::Map<const Mat>(g.input.data(), da.rows(), da.cols());
      const Eigen::Tensor<float, 1> weight = bn.weight() - lr * g.weight;
      const Eigen::Tensor<float, 1> bias = bn.bias() - lr * g.bias;
      bn.set_weight(weight);
      bn.set_bias(bias);
    }
    w2 -= lr * (h.transpose() * dlogits);
    b2 -= lr * dlogits.colwise().sum();
    w1 -= lr * (x.transpose() * dz1);
    b1 -= lr * dz1.colwise().sum();
  }
};

struct History {
  std::vector<double> loss, accuracy;
  double test_accuracy = 0.0;
};

History train(bool use_bn, const DataSet& tr, const DataSet& te) {
  Mlp net(use_bn);
  History hist;
  Rng shuffle_rng(kShuffleSeed);  // the same minibatches for both models
  std::vector<Index> order(static_cast<std::size_t>(tr.x.rows()));
  std::iota(order.begin(), order.end(), Index(0));
  Mat xb(kBatch, kDim), dlogits;
  std::vector<int> yb(static_cast<std::size_t>(kBatch));
  for (int epoch = 0; epoch < kEpochs; ++epoch) {
    shuffle_rng.shuffle(order);
    double loss = 0.0;
    Index correct = 0, steps = 0;
    for (Index start = 0; start + kBatch <= tr.x.rows(); start += kBatch, ++steps) {
      for (Index i = 0; i < kBatch; ++i) {
        const Index src = order[static_cast<std::size_t>(start + i)];
        xb.row(i) = tr.x.row(src);
        yb[static_cast<std::size_t>(i)] = tr.label[static_cast<std::size_t>(src)];
      }
      loss += softmax_xent(net.forward(xb), yb.data(), dlogits, &correct);
      net.backward_and_step(xb, dlogits, kLearningRate);
    }
    hist.loss.push_back(loss / static_cast<double>(steps));
    hist.accuracy.push_back(static_cast<double>(correct) / static_cast<double>(steps * kBatch));
  }
  net.bn.eval();  // held-out data: BatchNorm uses its running statistics
  Mat dummy;
  Index correct = 0;
  softmax_xent(net.forward(te.x), te.label.data(), dummy, &correct);
  hist.test_accuracy = static_cast<double>(correct) / static_cast<double>(te.x.rows());
  return hist;
}

int epochs_to(const std::vector<double>& loss, double target) {
  for (std::size_t e = 0; e < loss.size(); ++e) {
    if (loss[e] <= target)
      return static_cast<int>(e) + 1;
  }
  return -1;
}

// A hand-written SVG line chart of the two loss curves (log-scale loss axis), with axes,
// ticks, labels, a legend, the target loss and where each curve first reaches it.
bool write_svg(const std::string& path,
               const History& bn,
               const History& plain,
               double target,
               int bn_epoch,
               int plain_epoch) {
  std::ofstream out(path);
  if (!out)
    return false;
  const double W = 720, H = 440, left = 70, right = 190, top = 40, bottom = 60;
  const double pw = W - left - right, ph = H - top - bottom;
  // The loss axis spans the 1-2-5 ticks around the data.
  std::vector<double> ticks;
  for (double decade = 1e-3; decade < 1e3; decade *= 10) {
    for (double m : {1.0, 2.0, 5.0}) ticks.push_back(m * decade);
  }
  double lo = target, hi = target;
  for (const auto* loss : {&bn.loss, &plain.loss}) {
    for (double v : *loss) {
      if (std::isfinite(v) && v > 0)
        lo = std::min(lo, v), hi = std::max(hi, v);
    }
  }
  const double ymin = *std::prev(std::upper_bound(ticks.begin(), ticks.end(), lo));
  const double ymax = *std::lower_bound(ticks.begin(), ticks.end(), hi);
  auto px = [&](double epoch) { return left + pw * (epoch - 1.0) / (kEpochs - 1.0); };
  auto py = [&](double loss) {
    const double v = std::isfinite(loss) ? std::clamp(loss, ymin, ymax) : ymax;
    return top + ph * (1.0 - std::log(v / ymin) / std::log(ymax / ymin));
  };
  char buf[1024];
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
         "fill=\"white\"/>\n"
      << "<text x=\"" << left + pw / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">"
      << "Training loss of a 2-layer MLP, with and without BatchNorm1d</text>\n";
  for (double v : ticks) {  // loss grid and ticks
    if (v < ymin * 0.999 || v > ymax * 1.001)
      continue;
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                  left, py(v), left + pw, py(v), left - 6, py(v) + 4, v);
    out << buf;
  }
  for (int e = 1; e <= kEpochs; e += (e == 1 ? 4 : 5)) {  // epoch ticks: 1, 5, 10, ...
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%d</text>\n",
                  px(e), top + ph, px(e), top + ph + 5, px(e), top + ph + 20, e);
    out << buf;
  }
  std::snprintf(
      buf, sizeof buf,
      "<polyline points=\"%.1f,%.1f %.1f,%.1f %.1f,%.1f\" fill=\"none\" stroke=\"black\"/>\n"
      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">epoch</text>\n"
      "<text transform=\"translate(%.1f,%.1f) rotate(-90)\" text-anchor=\"middle\">"
      "mean cross-entropy loss (log scale)</text>\n"
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"gray\" "
      "stroke-dasharray=\"6,4\"/>\n",
      left, top, left, top + ph, left + pw, top + ph, left + pw / 2, H - 15, 20.0, top + ph / 2,
      left, py(target), left + pw, py(target));
  out << buf;
  auto curve = [&](const std::vector<double>& loss, int reached, const char* color) {
    out << "<polyline fill=\"none\" stroke=\"" << color << "\" stroke-width=\"2\" points=\"";
    for (std::size_t e = 0; e < loss.size(); ++e) {
      std::snprintf(buf, sizeof buf, "%.1f,%.1f ", px(static_cast<double>(e) + 1.0), py(loss[e]));
      out << buf;
    }
    out << "\"/>\n";
    if (reached > 0) {
      const double x = px(reached), y = py(loss[static_cast<std::size_t>(reached - 1)]);
      std::snprintf(
          buf, sizeof buf,
          "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"5\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>"
          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"%s\">epoch %d</text>\n",
          x, y, color, x, y + 22, color, reached);
      out << buf;
    }
  };
  curve(bn.loss, bn_epoch, "#d62728");
  curve(plain.loss, plain_epoch, "#1f77b4");
  const double lx = left + pw + 15, ly = top + 10;  // legend
  std::snprintf(
      buf, sizeof buf,
      "<rect x=\"%.1f\" y=\"%.1f\" width=\"165\" height=\"70\" fill=\"none\" stroke=\"#999\"/>\n"
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#d62728\" "
      "stroke-width=\"2\"/>"
      "<text x=\"%.1f\" y=\"%.1f\">with BatchNorm1d</text>\n"
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#1f77b4\" "
      "stroke-width=\"2\"/>"
      "<text x=\"%.1f\" y=\"%.1f\">without BatchNorm</text>\n"
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"gray\" "
      "stroke-dasharray=\"6,4\"/>"
      "<text x=\"%.1f\" y=\"%.1f\">target loss %g</text>\n",
      lx, ly, lx + 8, ly + 15, lx + 33, ly + 15, lx + 40, ly + 19, lx + 8, ly + 35, lx + 33,
      ly + 35, lx + 40, ly + 39, lx + 8, ly + 55, lx + 33, ly + 55, lx + 40, ly + 59, target);
  out << buf << "</svg>\n";
  return static_cast<bool>(out);
}

}  // namespace

int main(int argc, char** argv) {
  Generator data;
  const DataSet tr = data.sample(kTrain), te = data.sample(kTest);
  const History with_bn = train(true, tr, te);
  const History without = train(false, tr, te);

  std::printf(
      "MLP %ld -> %ld -> %ld on %ld samples (%ld held out), minibatches of %ld, SGD with lr %g\n",
      static_cast<long>(kDim), static_cast<long>(kHidden), static_cast<long>(kClasses),
      static_cast<long>(kTrain), static_cast<long>(kTest), static_cast<long>(kBatch),
      static_cast<double>(kLearningRate));
  std::printf("epoch   with BN: loss   acc    without BN: loss   acc\n");
  for (int e = 0; e < kEpochs; ++e) {
    const auto i = static_cast<std::size_t>(e);
    std::printf("%5d   %13.4f %5.1f%%   %16.4f %5.1f%%\n", e + 1, with_bn.loss[i],
                100.0 * with_bn.accuracy[i], without.loss[i], 100.0 * without.accuracy[i]);
  }
  std::printf("held-out accuracy: with BN (eval mode) = %.1f%%, without BN = %.1f%%\n",
              100.0 * with_bn.test_accuracy, 100.0 * without.test_accuracy);

  const int a = epochs_to(with_bn.loss, kTargetLoss), b = epochs_to(without.loss, kTargetLoss);
  const std::string path = argc > 1 ? argv[1] : "train_mlp_loss.svg";
  if (!write_svg(path, with_bn, without, kTargetLoss, a, b)) {
    std::printf("FAIL: cannot write %s\n", path.c_str());
    return 1;
  }
  std::printf("loss curves written to %s\n", path.c_str());

  auto str = [](int e) {
    return e < 0 ? std::string("never (> ") + std::to_string(kEpochs) + ")" : std::to_string(e);
  };
  std::printf("target loss %.2f -- epochs to target: with BN = %s, without BN = %s\n", kTargetLoss,
              str(a).c_str(), str(b).c_str());
  const bool clearly_fewer = a > 0 && (b < 0 || 2 * a <= b);
  std::printf("%s\n", clearly_fewer ? "OK: BatchNorm reaches the target in at most half the epochs"
                                    : "FAIL: BatchNorm did not reach the target clearly faster");
  return clearly_fewer ? 0 : 1;
}
