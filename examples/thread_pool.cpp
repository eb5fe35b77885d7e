// thread_pool: forward and backward on an Eigen::ThreadPoolDevice. normkit splits the work
// into a fixed set of blocks whatever the thread count and combines the partial sums in a
// fixed order, so the results are bitwise identical to the single-threaded ones; this
// example checks that on a (8, 64, 56, 56) tensor and exits 1 if any bit differs.
#define EIGEN_USE_THREADS  // before any Eigen include: enables Eigen::ThreadPoolDevice
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include <normkit/normkit.hpp>

namespace {

template <class A, class B>
bool same_bits(const A& a, const B& b, const char* what) {
  // (an empty tensor may have a null data(): no memcmp then)
  const bool same =
      a.size() == b.size() &&
      (a.size() == 0 ||
       std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0);
  std::printf("  %-40s %s\n", what, same ? "bitwise identical" : "DIFFERENT");
  return same;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(8, 64, 56, 56), dy(8, 64, 56, 56);
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.5f, 2.0f);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen), dy.data()[i] = normal(gen);

  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  std::printf("input (8, 64, 56, 56), %ld floats; thread pool of %d threads\n",
              static_cast<long>(x.size()), device.numThreads());

  bool ok = true;
  {  // BatchNorm2d, training mode: output, running statistics and gradients.
    normkit::BatchNorm2d<float> one(64), two(64);
    auto t0 = std::chrono::steady_clock::now();
    const auto y1 = one.forward(x);
    const double t_one = ms_since(t0);
    t0 = std::chrono::steady_clock::now();
    const auto y2 = two.forward(x, device);
    const double t_two = ms_since(t0);
    std::printf("BatchNorm2d forward: %.1f ms on 1 thread, %.1f ms on the pool\n", t_one, t_two);
    ok = same_bits(y1, y2, "output") && ok;
    ok = same_bits(one.running_mean(), two.running_mean(), "running_mean") && ok;
    ok = same_bits(one.running_var(), two.running_var(), "running_var") && ok;
    const auto g1 = one.backward(dy);
    const auto g2 = two.backward(dy, device);
    ok = same_bits(g1.input, g2.input, "backward: grad input") && ok;
    ok = same_bits(g1.weight, g2.weight, "backward: grad weight") && ok;
    ok = same_bits(g1.bias, g2.bias, "backward: grad bias") && ok;
  }
  {  // GroupNorm (8 groups) and LayerNorm over (C, H, W): other reduction shapes.
    normkit::GroupNorm<float> gn(normkit::GroupNormOptions(8, 64));
    normkit::LayerNorm<float> ln(normkit::LayerNormOptions({64, 56, 56}));
    std::printf("GroupNorm(8, 64) and LayerNorm({64, 56, 56}) forward:\n");
    ok = same_bits(gn.forward(x), gn.forward(x, device), "GroupNorm output") && ok;
    ok = same_bits(ln.forward(x), ln.forward(x, device), "LayerNorm output") && ok;
  }
  std::printf("%s\n", ok ? "OK: the thread pool changes no bit" : "FAIL");
  return ok ? 0 : 1;
}
