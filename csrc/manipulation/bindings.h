// The torch side shared by the CPU and CUDA bindings of the baselines' ops: input
// checks (both backends reject the same inputs with the same messages) and every
// weighting op written once, over a backend policy (see solve_weights). Includes
// torch headers: never include it from a .cu file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "all.h"

namespace selgroup {
namespace manipulation {

// A float32/float64 K×K Gram matrix; returns K.
inline int check_gram(const at::Tensor& gram) {
  check_float(gram, "gram");
  const int64_t K = check_square(gram, "gram");
  TORCH_CHECK(K <= (1 << 15), "gram: K = ", K, " tasks is beyond what a K×K solver is meant for");
  return static_cast<int>(K);
}

inline void check_iterations(int64_t max_iter, double tol, const char* op) {
  TORCH_CHECK(max_iter >= 0 && max_iter <= (1LL << 30), op, ": max_iter must be in [0, 2^30], got ", max_iter);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, op, ": tol must be finite and >= 0, got ", tol);
}

// int64 K×K on gram's device. Its values (a permutation per row) are not checked:
// that would synchronise on CUDA; entries outside [0, K) are skipped by the kernel.
inline void check_order(const at::Tensor& order, const at::Tensor& gram, int K) {
  TORCH_CHECK(order.scalar_type() == at::kLong, "order must be int64, got ", order.scalar_type());
  check_same_device(order, gram, "order", "gram");
  TORCH_CHECK(order.dim() == 2 && order.size(0) == K && order.size(1) == K, "order must be K×K = ", K, "×", K,
              " like gram, got shape ", order.sizes());
}

inline void check_cagrad_options(double c, int64_t rescale) {
  TORCH_CHECK(std::isfinite(c) && c >= 0.0, "cagrad_weights: c must be finite and >= 0, got ", c);
  TORCH_CHECK(rescale >= 0 && rescale <= 2, "cagrad_weights: rescale must be 0, 1 or 2, got ", rescale);
}

// float[K] on gram's device, with gram's dtype.
inline void check_task_vector(const at::Tensor& vector, const at::Tensor& like, int64_t K, const char* name,
                              const char* like_name) {
  check_same_dtype(vector, like, name, like_name);
  check_same_device(vector, like, name, like_name);
  TORCH_CHECK(vector.dim() == 1 && vector.size(0) == K, name, " must have shape [", K, "], got ", vector.sizes());
}

// A float32/float64 K×P matrix with K >= 1 and its leak vector; returns K.
inline int64_t check_graddrop(const at::Tensor& jacobian, const at::Tensor& leak) {
  check_float(jacobian, "jacobian");
  check_dim(jacobian, 2, "jacobian");
  TORCH_CHECK(jacobian.size(0) >= 1, "jacobian must have at least one task row, got shape ", jacobian.sizes());
  check_task_vector(leak, jacobian, jacobian.size(0), "leak", "jacobian");
  return jacobian.size(0);
}

// ---- the weighting ops, once for both backends --------------------------------
//
// `Backend` says where a K×K solver runs:
//   struct Backend {
//     struct DeviceScope { explicit DeviceScope(const at::Tensor& gram); };  // e.g. a device guard
//     template <typename Solver> static void run(const Solver& solver, const char* op);
//   };
// csrc/cpu/manipulation_cpu.cpp runs it serially, csrc/cuda/manipulation_cuda.cpp on
// one block of the current stream.

// The scalar type a solver is built for, from the weights pointer it gets.
template <typename Pointer>
using pointee_t = std::remove_cv_t<std::remove_pointer_t<Pointer>>;

// weights[K] = the solver made by `make(gram_data, weights_data)`, run on `Backend`.
template <typename Backend, typename MakeSolver>
at::Tensor solve_weights(const at::Tensor& gram_in, const char* op, MakeSolver make) {
  const typename Backend::DeviceScope scope(gram_in);
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({gram.size(0)}, gram.options());
  // check_gram already rejected other dtypes, so the dispatch's name (a literal) never shows.
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "solve_weights", [&] {
    Backend::run(make(gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>()), op);
  });
  return weights;
}

template <typename Backend>
at::Tensor pcgrad_weights(const at::Tensor& gram, const at::Tensor& order_in) {
  const int K = check_gram(gram);
  check_order(order_in, gram, K);
  const at::Tensor order = order_in.contiguous();
  return solve_weights<Backend>(gram, "pcgrad_weights", [&](const auto* g, auto* w) {
    return PCGradWeights<pointee_t<decltype(w)>>{g, order.const_data_ptr<int64_t>(), w, K};
  });
}

template <typename Backend>
at::Tensor mgda_weights(const at::Tensor& gram, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  check_iterations(max_iter, tol, "mgda_weights");
  return solve_weights<Backend>(gram, "mgda_weights", [&](const auto* g, auto* w) {
    return MGDAWeights<pointee_t<decltype(w)>>{g, w, K, static_cast<int>(max_iter), tol};
  });
}

template <typename Backend>
at::Tensor cagrad_weights(const at::Tensor& gram, double c, int64_t rescale, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  check_cagrad_options(c, rescale);
  check_iterations(max_iter, tol, "cagrad_weights");
  return solve_weights<Backend>(gram, "cagrad_weights", [&](const auto* g, auto* w) {
    return CAGradWeights<pointee_t<decltype(w)>>{g, w, K, c, static_cast<int>(rescale), static_cast<int>(max_iter),
                                                 tol};
  });
}

template <typename Backend>
at::Tensor imtl_weights(const at::Tensor& gram) {
  const int K = check_gram(gram);
  return solve_weights<Backend>(gram, "imtl_weights", [&](const auto* g, auto* w) {
    return IMTLWeights<pointee_t<decltype(w)>>{g, w, K};
  });
}

template <typename Backend>
at::Tensor aligned_mtl_weights(const at::Tensor& gram) {
  const int K = check_gram(gram);
  return solve_weights<Backend>(gram, "aligned_mtl_weights", [&](const auto* g, auto* w) {
    return AlignedMTLWeights<pointee_t<decltype(w)>>{g, w, K};
  });
}

template <typename Backend>
at::Tensor nash_mtl_weights(const at::Tensor& gram, const at::Tensor& alpha_init_in, int64_t max_iter, double tol) {
  const int K = check_gram(gram);
  check_task_vector(alpha_init_in, gram, K, "alpha_init", "gram");
  check_iterations(max_iter, tol, "nash_mtl_weights");
  const at::Tensor alpha_init = alpha_init_in.contiguous();
  return solve_weights<Backend>(gram, "nash_mtl_weights", [&](const auto* g, auto* w) {
    using T = pointee_t<decltype(w)>;
    return NashMTLWeights<T>{g, alpha_init.const_data_ptr<T>(), w, K, static_cast<int>(max_iter), tol};
  });
}

// Registers the six weighting ops of `Backend` (inside a TORCH_LIBRARY_IMPL block).
template <typename Backend>
void register_weighting_ops(torch::Library& m) {
  m.impl("pcgrad_weights", &pcgrad_weights<Backend>);
  m.impl("mgda_weights", &mgda_weights<Backend>);
  m.impl("cagrad_weights", &cagrad_weights<Backend>);
  m.impl("imtl_weights", &imtl_weights<Backend>);
  m.impl("aligned_mtl_weights", &aligned_mtl_weights<Backend>);
  m.impl("nash_mtl_weights", &nash_mtl_weights<Backend>);
}

}  // namespace manipulation
}  // namespace selgroup
