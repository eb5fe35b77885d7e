// normkit/detail/instantiate.hpp: the list of kernel entry points (every function a module or
// free function calls with raw pointers), for the optional compiled mode.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_INSTANTIATE_HPP_
#define NORMKIT_DETAIL_INSTANTIATE_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

// NB: compiled mode. Header-only is the default: every translation unit that calls a norm
// compiles its kernels (the ISA copies included). With NORMKIT_SEPARATE_COMPILATION defined
// (CMake: link normkit::compiled), the headers declare the entry points below `extern
// template` for float and double, and src/normkit.cpp instantiates them once: a translation
// unit then pays only for the headers and the module glue of its own tensor types. Both sides
// must be compiled for the same baseline ISA (the ABI namespace, config.hpp, turns a mismatch
// into a link error).
// NOLINTBEGIN(bugprone-macro-parentheses): T is a template argument, X a macro name.
#define NORMKIT_CHANNEL_NORM_ENTRY_POINTS(X, T)                                                    \
  X(void channel_norm_forward<T, T>(ChannelNormKind, const Shape&, const T*, T*,                   \
                                    const ChannelNormArgs<T>&, SavedStats*, T*, const Exec&,       \
                                    const T*, int, const EpiLeaves<T>*))                           \
  X(void channel_norm_stats<T>(ChannelNormKind, const Shape&, const T*, double, SavedStats&,       \
                               const Exec&))                                                       \
  X(void channel_norm_parts<T>(ChannelNormKind, const Shape&, const T*, Part*, const Exec&))       \
  X(void running_saved_stats<T>(ChannelNormKind, const Shape&, const T*, const T*, double,         \
                                SavedStats&))                                                      \
  X(void channel_norm_backward<T, T>(ChannelNormKind, const Shape&, const T*, const T*, T*,        \
                                     const SavedStats&, const VectorRef<const T>&,                 \
                                     const VectorRef<T>&, const VectorRef<T>&, const Exec&))       \
  X(void channel_sample_parts<T>(const Shape&, const T*, const T*, const double*, Part*,           \
                                 const Exec&))                                                     \
  X(void channel_norm_dx<T, T>(const Shape&, const T*, const T*, T*, const double*, const double*, \
                               const Part*, double, const VectorRef<const T>&, const Exec&))
#define NORMKIT_LAYER_NORM_ENTRY_POINTS(X, T)                                                      \
  X(void layer_norm_forward<T, T>(const Shape&, int, const T*, T*, const VectorRef<const T>&,      \
                                  const VectorRef<const T>&, double, SavedStats*, T*, const Exec&, \
                                  bool))                                                           \
  X(void layer_norm_stats<T>(const Shape&, int, const T*, double, SavedStats&, const Exec&, bool)) \
  X(void layer_norm_backward<T, T>(const Shape&, int, const T*, const T*, T*, const SavedStats&,   \
                                   const VectorRef<const T>&, const VectorRef<T>&,                 \
                                   const VectorRef<T>&, const Exec&, bool))
#define NORMKIT_GROUP_NORM_ENTRY_POINTS(X, T)                                                      \
  X(void group_norm_forward<T, T>(const Shape&, Index, const T*, T*, const VectorRef<const T>&,    \
                                  const VectorRef<const T>&, double, SavedStats*, T*, const Exec&, \
                                  const T*, int, const EpiLeaves<T>*))                             \
  X(void group_norm_stats<T>(const Shape&, Index, const T*, double, SavedStats&, const Exec&))     \
  X(void group_norm_backward<T, T>(const Shape&, Index, const T*, const T*, T*, const SavedStats&, \
                                   const VectorRef<const T>&, const VectorRef<T>&,                 \
                                   const VectorRef<T>&, const Exec&))

/// The scalar types the compiled mode instantiates.
#define NORMKIT_FOR_EACH_COMPILED_TYPE(M, X) M(X, float) M(X, double)

#define NORMKIT_EXTERN_TEMPLATE(...) extern template __VA_ARGS__;
#define NORMKIT_INSTANTIATE_TEMPLATE(...) template __VA_ARGS__;
// NOLINTEND(bugprone-macro-parentheses)

#if defined(NORMKIT_SEPARATE_COMPILATION) && !defined(NORMKIT_BUILDING_LIBRARY)
#define NORMKIT_DECLARE_EXTERN(LIST) NORMKIT_FOR_EACH_COMPILED_TYPE(LIST, NORMKIT_EXTERN_TEMPLATE)
#else
#define NORMKIT_DECLARE_EXTERN(LIST)
#endif

#endif  // NORMKIT_DETAIL_INSTANTIATE_HPP_
