// Input checks shared by the CPU and CUDA bindings, so both backends reject the
// same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace selgroup {

// float32 or float64: the dtypes every op supports.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// A square K×K matrix with K >= 1.
inline int64_t check_square(const at::Tensor& t, const char* name) {
  check_dim(t, 2, name);
  TORCH_CHECK(t.size(0) == t.size(1), name, " must be square (K×K), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) >= 1, name, " must have at least one row, got shape ", t.sizes());
  return t.size(0);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " is ", t.scalar_type(), " but ", ref_name, " is ",
              ref.scalar_type());
}

}  // namespace selgroup
