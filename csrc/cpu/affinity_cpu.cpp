// CPU kernels of the affinity ops: the shared algorithms of csrc/affinity run
// serially (SerialTeam), the same code the CUDA kernels run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../affinity/affinity_checks.h"
#include "../affinity/affinity_propagation.h"
#include "../affinity/affinity_update.h"
#include "../affinity/group_similarity.h"

namespace selgroup {
namespace {

void affinity_update_cpu(at::Tensor affinity, const at::Tensor& before, const at::Tensor& after,
                         const at::Tensor& group_mask, double decay) {
  const int64_t num_tasks = check_affinity_update_inputs(affinity, before, after, group_mask, decay);
  const at::Tensor before_c = before.contiguous(), after_c = after.contiguous(), mask_c = group_mask.contiguous();
  const bool* mask = mask_c.data_ptr<bool>();
  const int64_t size = group_size(mask, num_tasks);
  if (size == 0) return;  // an empty group updated nothing
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "affinity_update_cpu", [&] {
    scalar_t* data = affinity.data_ptr<scalar_t>();
    const scalar_t* b = before_c.data_ptr<scalar_t>();
    const scalar_t* a = after_c.data_ptr<scalar_t>();
    for (int64_t s = 0; s < num_tasks; ++s)
      for (int64_t t = 0; t < num_tasks; ++t)
        affinity_update_pair(data, affinity.stride(0), affinity.stride(1), b, a, mask, size,
                             static_cast<scalar_t>(decay), s, t);
  });
}

at::Tensor group_similarity_cpu(const at::Tensor& affinity) {
  const int64_t num_tasks = check_group_similarity_inputs(affinity);
  at::Tensor similarity = at::empty({num_tasks, num_tasks}, affinity.options());
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "group_similarity_cpu", [&] {
    const scalar_t* data = affinity.data_ptr<scalar_t>();
    scalar_t* out = similarity.data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_tasks; ++i)
      for (int64_t j = 0; j < num_tasks; ++j)
        out[i * num_tasks + j] = group_similarity_entry(data, affinity.stride(0), affinity.stride(1), i, j);
  });
  return similarity;
}

at::Tensor affinity_propagation_cpu(const at::Tensor& similarity, std::optional<double> preference, double damping,
                                    int64_t max_iter, int64_t convergence_iter) {
  const int64_t num_samples =
      check_affinity_propagation_inputs(similarity, preference, damping, max_iter, convergence_iter);
  const at::Tensor input = similarity.contiguous();
  at::Tensor labels = at::empty({num_samples}, similarity.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "affinity_propagation_cpu", [&] {
    const scalar_t* data = input.data_ptr<scalar_t>();
    // On the CPU the check is free, so non-finite input is an error rather than the
    // kernel's all −1 answer (the CUDA op cannot raise without a host sync).
    for (int64_t e = 0; e < num_samples * num_samples; ++e)
      TORCH_CHECK_VALUE(is_finite(data[e]), "similarity must be finite, got ", data[e], " at (", e / num_samples,
                        ", ", e % num_samples, ")");
    std::vector<double> workspace(affinity_propagation_workspace_bytes<scalar_t>(num_samples) / sizeof(double) + 1);
    team_affinity_propagation(SerialTeam{}, data, num_samples, preference.has_value(),
                              static_cast<scalar_t>(preference.value_or(0.0)), static_cast<scalar_t>(damping),
                              max_iter, convergence_iter, workspace.data(), labels.data_ptr<int64_t>());
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(selgroup_fast, CPU, m) {
  m.impl("affinity_update_", &affinity_update_cpu);
  m.impl("group_similarity", &group_similarity_cpu);
  m.impl("affinity_propagation", &affinity_propagation_cpu);
}

}  // namespace selgroup
