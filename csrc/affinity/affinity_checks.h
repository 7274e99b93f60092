// Input checks of the affinity ops, shared by the CPU and CUDA bindings so that
// both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "../checks.h"

namespace selgroup {

// Returns K.
inline int64_t check_affinity_update_inputs(const at::Tensor& affinity, const at::Tensor& before,
                                            const at::Tensor& after, const at::Tensor& group_mask, double decay) {
  check_float(affinity, "affinity");
  const int64_t num_tasks = check_square(affinity, "affinity");
  TORCH_CHECK(at::has_internal_overlap(affinity) != at::MemOverlap::Yes,
              "affinity is updated in place and must not have overlapping memory (e.g. an expanded tensor)");
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{before, "before"},
                                     std::pair<const at::Tensor&, const char*>{after, "after"}}) {
    check_same_device(tensor, affinity, name, "affinity");
    check_same_dtype(tensor, affinity, name, "affinity");
    check_dim(tensor, 1, name);
    TORCH_CHECK(tensor.size(0) == num_tasks, name, " must hold K = ", num_tasks, " losses, got shape ",
                tensor.sizes());
  }
  check_same_device(group_mask, affinity, "group_mask", "affinity");
  TORCH_CHECK(group_mask.scalar_type() == at::kBool, "group_mask must be bool, got ", group_mask.scalar_type());
  check_dim(group_mask, 1, "group_mask");
  TORCH_CHECK(group_mask.size(0) == num_tasks, "group_mask must have K = ", num_tasks, " entries, got shape ",
              group_mask.sizes());
  TORCH_CHECK_VALUE(decay > 0.0 && decay <= 1.0, "decay must be in (0, 1], got ", decay);
  return num_tasks;
}

inline int64_t check_group_similarity_inputs(const at::Tensor& affinity) {
  check_float(affinity, "affinity");
  return check_square(affinity, "affinity");
}

inline int64_t check_affinity_propagation_inputs(const at::Tensor& similarity, std::optional<double> preference,
                                                 double damping, int64_t max_iter, int64_t convergence_iter) {
  check_float(similarity, "similarity");
  const int64_t num_samples = check_square(similarity, "similarity");
  TORCH_CHECK_VALUE(!preference.has_value() || std::isfinite(*preference), "preference must be finite, got ",
                    *preference);
  TORCH_CHECK_VALUE(damping >= 0.5 && damping < 1.0, "damping must be in [0.5, 1), got ", damping);
  TORCH_CHECK_VALUE(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK_VALUE(convergence_iter >= 1, "convergence_iter must be >= 1, got ", convergence_iter);
  return num_samples;
}

}  // namespace selgroup
