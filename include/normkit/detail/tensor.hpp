// normkit/detail/tensor.hpp: the API side of every call -- tensor arguments to a logical
// Shape, output preparation, optional 1-D arguments (VectorRef), saved statistics, errors.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_TENSOR_HPP_
#define NORMKIT_DETAIL_TENSOR_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <array>        // std::array
#include <cstdint>      // std::int64_t
#include <limits>       // std::numeric_limits
#include <sstream>      // std::ostringstream
#include <string>       // std::string
#include <type_traits>  // std::remove_const_t
#include <vector>       // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/fail.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/error.hpp>

NORMKIT_BEGIN_NAMESPACE

/// The statistics a forward pass normalized with, as backward needs them: one mean and one
/// rstd = 1/sqrt(var + eps) per statistic slot, in logical order (BatchNorm: C;
/// InstanceNorm: N*C; GroupNorm: N*G; LayerNorm: the leading dims flattened row-major).
/// `batch_stats` is false when running statistics were used (they are constants then).
struct SavedStats {
  Eigen::Tensor<double, 1> mean;
  Eigen::Tensor<double, 1> rstd;
  bool batch_stats = true;
};

/// What backward returns: dL/dx with x's shape, storage order and scalar type, and
/// dL/dweight, dL/dbias in the parameters' type `Param` (empty when the module has no such
/// parameter; Param differs from Scalar only for bfloat16/half input to a float module).
/// Pass one back to backward() to reuse its storage.
template <class Scalar, int Rank, int Layout, class Param = Scalar>
struct Gradients {
  /// dL/dx.
  Eigen::Tensor<Scalar, Rank, Layout> input;
  /// dL/dweight (empty without weight).
  Eigen::Tensor<Param, 1> weight;
  /// dL/dbias (empty without bias).
  Eigen::Tensor<Param, 1> bias;
};

/// What backward_fused returns: the Gradients of the norm, and dL/dresidual (the gradient
/// through the activation, which is also what the norm's backward received).
template <class Scalar, int Rank, int Layout, class Param = Scalar>
struct FusedGradients : Gradients<Scalar, Rank, Layout, Param> {
  /// dL/dresidual.
  Eigen::Tensor<Scalar, Rank, Layout> residual;
};

namespace detail {

/// Sizes s for n slots (no allocation when the size is unchanged) and returns its mean and
/// rstd storage (out of line: Eigen's resize is a page of code at every call site).
NORMKIT_NOINLINE inline void stats_storage(SavedStats& s, Index n, double*& mean, double*& rstd) {
  if (s.mean.size() != n)
    s.mean.resize(n);
  if (s.rstd.size() != n)
    s.rstd.resize(n);
  mean = s.mean.data();
  rstd = s.rstd.data();
}

/// True for Eigen::Tensor and Eigen::TensorMap (the argument types normkit accepts); used to
/// tell forward(x, y) from forward(x, device).
template <class T>
struct is_tensor : std::false_type {};
template <class S, int R, int O, class I>
struct is_tensor<Eigen::Tensor<S, R, O, I>> : std::true_type {};
template <class P, int O, template <class> class MP>
struct is_tensor<Eigen::TensorMap<P, O, MP>> : std::true_type {};
template <class T>
inline constexpr bool is_tensor_v = is_tensor<std::remove_cv_t<std::remove_reference_t<T>>>::value;
template <class T>
using if_tensor = std::enable_if_t<is_tensor_v<T>, int>;
template <class T>
using not_tensor = std::enable_if_t<!is_tensor_v<T>, int>;

/// Compile-time facts about an Eigen::Tensor or Eigen::TensorMap argument.
template <class X>
struct tensor_traits {
  // NB: normkit reads and writes tensor memory directly, so an argument must be an
  // Eigen::Tensor or a TensorMap, not an unevaluated expression such as `x + r` (whose
  // errors otherwise end deep in this file). Evaluating it silently would be a hidden copy.
  static_assert(is_tensor_v<X>,
                "normkit: expected an Eigen::Tensor or Eigen::TensorMap argument; evaluate the "
                "expression first: `Eigen::Tensor<float, 4, Eigen::RowMajor> t = expr;`");
  using Traits = Eigen::internal::traits<std::remove_const_t<X>>;
  using Scalar = std::remove_const_t<typename Traits::Scalar>;
  static constexpr int rank = Traits::NumDimensions;
  static constexpr int layout = Traits::Layout;
};

template <class X>
using scalar_of = typename tensor_traits<X>::Scalar;

/// Extent of dim i of a Tensor or TensorMap (their dimension() overloads take different
/// index types; dimensions()[] is the same for both).
template <class X>
Index dim(const X& x, int i) {
  return static_cast<Index>(x.dimensions()[static_cast<std::size_t>(i)]);
}

/// Logical shape in PyTorch order (N, C, spatial...) with each axis' memory stride.
struct Shape {
  int rank = 0;
  int shown_from = 0;  // messages print dims from here (1: an unbatched input's added N)
  std::array<Index, kMaxAxes> dim{};
  std::array<Index, kMaxAxes> stride{};
  Index numel() const {
    Index n = 1;
    for (int i = 0; i < rank; ++i) n *= dim[static_cast<std::size_t>(i)];
    return n;
  }
};

inline std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (int i = s.shown_from; i < s.rank; ++i)
    os << (i > s.shown_from ? ", " : "") << s.dim[static_cast<std::size_t>(i)];
  os << ']';
  return os.str();
}

template <class Dims>
std::string dims_str(const Dims& d, int rank) {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < rank; ++i) os << (i ? ", " : "") << d[static_cast<std::size_t>(i)];
  os << ']';
  return os.str();
}

/// A shape's logical dims as the user gave them.
inline Text shape_text(const Shape& s) {
  return dims_text(s.dim.data(), s.rank, s.shown_from);
}
/// Eigen dims (DSizes, std::array) as text.
template <class Dims>
Text dims_of(const Dims& d, int rank) {
  Index a[kMaxAxes] = {};
  for (int i = 0; i < rank && i < kMaxAxes; ++i)
    a[i] = static_cast<Index>(d[static_cast<std::size_t>(i)]);
  return dims_text(a, rank);
}

[[noreturn]] inline void throw_shape(const char* who, const std::string& what) {
  throw shape_error(std::string("[normkit.") + who + "] " + what);
}
[[noreturn]] inline void throw_value(const char* who, const std::string& what) {
  throw value_error(std::string("[normkit.") + who + "] " + what);
}

/// Physical strides of a dense Eigen tensor, then the permutation to logical axes. With
/// channels_last the tensor's dims are (N, spatial..., C) and the logical axes (N, C,
/// spatial...): no data moves, only the strides are permuted.
template <class X>
Shape logical_shape(const X& x, bool channels_last, const char* who, bool batched = true) {
  constexpr int R = tensor_traits<X>::rank;
  static_assert(R <= kMaxAxes - 2, "normkit: tensors of rank above 10 are not supported");
  std::array<Index, kMaxAxes> st{};
  std::array<Index, kMaxAxes> d{};
  for (int i = 0; i < R; ++i) d[static_cast<std::size_t>(i)] = dim(x, i);
  // Overflow guard: the product of extents must fit Eigen::Index.
  Index numel = 1;
  for (int i = 0; i < R; ++i) {
    if (d[static_cast<std::size_t>(i)] < 0)
      fail(Fail::shape, who, "negative extent in input of size %s", dims_text(d.data(), R).s);
    if (d[static_cast<std::size_t>(i)] != 0 &&
        numel > std::numeric_limits<Index>::max() / d[static_cast<std::size_t>(i)]) {
      fail(Fail::shape, who, "input of size %s has more elements than Eigen::Index holds",
           dims_text(d.data(), R).s);
    }
    numel *= d[static_cast<std::size_t>(i)];
  }
  if constexpr (tensor_traits<X>::layout == Eigen::RowMajor) {
    Index s = 1;
    for (int i = R - 1; i >= 0; --i) {
      st[static_cast<std::size_t>(i)] = s;
      s *= d[static_cast<std::size_t>(i)];
    }
  } else {
    Index s = 1;
    for (int i = 0; i < R; ++i) {
      st[static_cast<std::size_t>(i)] = s;
      s *= d[static_cast<std::size_t>(i)];
    }
  }
  Shape sh;
  sh.rank = R;
  for (int i = 0; i < R; ++i) {
    int phys = i;
    if (channels_last && batched && R >= 3)
      phys = i == 0 ? 0 : (i == 1 ? R - 1 : i - 1);
    if (channels_last && !batched && R >= 2)
      phys = i == 0 ? R - 1 : i - 1;  // (spatial..., C)
    sh.dim[static_cast<std::size_t>(i)] = d[static_cast<std::size_t>(phys)];
    sh.stride[static_cast<std::size_t>(i)] = st[static_cast<std::size_t>(phys)];
  }
  return sh;
}

/// Prepends a batch axis of extent 1 (unbatched InstanceNorm input).
inline Shape unsqueeze0(const Shape& s) {
  Shape r;
  r.rank = s.rank + 1;
  r.shown_from = 1;
  r.dim[0] = 1;
  r.stride[0] = s.numel();
  for (int i = 0; i < s.rank; ++i) {
    const auto u = static_cast<std::size_t>(i);
    r.dim[u + 1] = s.dim[u];
    r.stride[u + 1] = s.stride[u];
  }
  return r;
}

/// Checks y against x (same dims) and returns its data pointer. A plain Tensor is
/// resized; a TensorMap must already have x's dims.
template <class X, class Y>
auto* prepare_output(const X& x, Y& y, const char* who, const char* name = "output") {
  static_assert(tensor_traits<X>::rank == tensor_traits<Y>::rank,
                "normkit: the output must have the input's rank");
  static_assert(tensor_traits<X>::layout == tensor_traits<Y>::layout,
                "normkit: the output must have the input's storage order");
  static_assert(std::is_same<scalar_of<X>, scalar_of<Y>>::value,
                "normkit: the output must have the input's scalar type");
  constexpr int R = tensor_traits<X>::rank;
  bool same = true;
  for (int i = 0; i < R; ++i) same = same && dim(x, i) == dim(y, i);
  if (!same) {
    if constexpr (std::is_same<std::remove_const_t<Y>,
                               Eigen::Tensor<scalar_of<X>, R, tensor_traits<X>::layout>>::value) {
      y.resize(x.dimensions());
    } else {
      fail(Fail::shape, who, "expected %s of size %s but got %s", name,
           dims_of(x.dimensions(), R).s, dims_of(y.dimensions(), R).s);
    }
  }
  return y.data();
}

/// A possibly-absent 1-D array argument: an Eigen::Tensor<T, 1>, a TensorMap of one, a
/// (pointer, size) pair, or nothing. Used by the free functions for weight, bias and the
/// running statistics, so callers can keep their own storage.
template <class T>
class VectorRef {
 public:
  using value_type = std::remove_const_t<T>;
  VectorRef() = default;
  VectorRef(std::nullptr_t) {}  // NOLINT: absent
  VectorRef(T* data, Index size) : data_(data), size_(size), present_(true) {}
  template <int Options>
  VectorRef(Eigen::Tensor<value_type, 1, Options>& t)  // NOLINT: implicit by design
      : data_(t.data()), size_(t.size()), present_(true) {}
  template <int Options, class U = T, class = std::enable_if_t<std::is_const<U>::value>>
  VectorRef(const Eigen::Tensor<value_type, 1, Options>& t)  // NOLINT: implicit by design
      : data_(t.data()), size_(t.size()), present_(true) {}
  template <class P, int MapOptions>
  VectorRef(const Eigen::TensorMap<P, MapOptions>& t)  // NOLINT: implicit by design
      : data_(t.data()), size_(t.size()), present_(true) {}

  T* data() const { return data_; }
  Index size() const { return size_; }
  bool present() const { return present_; }
  explicit operator bool() const { return present_; }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
  bool present_ = false;
};

/// Checks that `b` (named `name`) has the dims of `a`, the input.
template <class A, class B>
void check_same_dims(const char* who, const char* name, const A& a, const B& b) {
  static_assert(tensor_traits<A>::rank == tensor_traits<B>::rank,
                "normkit: grad_output must have the input's rank");
  static_assert(tensor_traits<A>::layout == tensor_traits<B>::layout,
                "normkit: grad_output must have the input's storage order");
  constexpr int R = tensor_traits<A>::rank;
  for (int i = 0; i < R; ++i) {
    if (dim(a, i) != dim(b, i)) {
      fail(Fail::shape, who, "expected %s of size %s (the input's) but got %s", name,
           dims_of(a.dimensions(), R).s, dims_of(b.dimensions(), R).s);
    }
  }
}

/// out[i] = v[i] for the length of out (a parameter gradient from its double sums); nothing
/// when out is absent.
template <class T>
void store_grad(const VectorRef<T>& out, const double* v) {
  for (Index i = 0; out && i < out.size(); ++i) out.data()[i] = static_cast<T>(v[i]);
}

}  // namespace detail

using detail::VectorRef;

NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_TENSOR_HPP_
