// A consumer of normkit::mpi, run as one process (MPI singleton): SyncBatchNorm over a
// communicator of one rank is BatchNorm2d, bit for bit, at a spatial size of 1024 (forward,
// backward, running statistics). Exits non-zero otherwise.
#include <cstdio>
#include <cstring>

#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/mpi.hpp>
#include <normkit/normkit.hpp>

namespace {

template <class T>
bool same_bits(const T& a, const T& b) {
  const auto bytes = static_cast<std::size_t>(a.size()) * sizeof(*a.data());
  return a.size() == b.size() && (bytes == 0 || std::memcmp(a.data(), b.data(), bytes) == 0);
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(2, 3, 32, 32), dy(2, 3, 32, 32);
  for (int i = 0; i < static_cast<int>(x.size()); ++i) {
    x.data()[i] = static_cast<float>((i * 37) % 23) * 0.25f + 3.0f;
    dy.data()[i] = static_cast<float>((i * 11) % 7) * 0.5f - 1.5f;
  }
  normkit::SyncBatchNorm<float> sync{normkit::BatchNormOptions{3}, MPI_COMM_WORLD};
  normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{3}};
  const auto y = sync.forward(x);
  const auto g = sync.backward(dy);
  const auto y_bn = bn.forward(x);
  const auto g_bn = bn.backward(dy);
  const bool ok = same_bits(y, y_bn) && same_bits(g.input, g_bn.input) &&
                  same_bits(sync.running_var(), bn.running_var()) &&
                  sync.last_exchange_bytes() == 2 * 3 * 3 * 8;
  std::printf("SyncBatchNorm on 1 rank %s BatchNorm2d\n", ok ? "==" : "!=");
  MPI_Finalize();
  return ok ? 0 : 1;
}
