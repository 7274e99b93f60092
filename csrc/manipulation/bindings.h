// The torch side shared by the CPU and CUDA bindings of the baselines' ops: input
// checks (both backends reject the same inputs with the same messages) and the
// solver functors' construction. Includes torch headers: never include it from a
// .cu file.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace manipulation
}  // namespace selgroup
