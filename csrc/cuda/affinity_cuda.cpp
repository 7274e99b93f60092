// CUDA bindings of the affinity ops: input checks (shared with the CPU), then one
// kernel launch on the current stream. Nothing here reads device memory on the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../affinity/affinity_checks.h"
#include "affinity_kernels.h"

namespace selgroup {
namespace {

void affinity_update_cuda(at::Tensor affinity, const at::Tensor& before, const at::Tensor& after,
                          const at::Tensor& group_mask, double decay) {
  const int64_t num_tasks = check_affinity_update_inputs(affinity, before, after, group_mask, decay);
  const c10::cuda::CUDAGuard guard(affinity.device());
  const at::Tensor before_c = before.contiguous(), after_c = after.contiguous(), mask_c = group_mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "affinity_update_cuda", [&] {
    C10_CUDA_CHECK(launch_affinity_update(affinity.data_ptr<scalar_t>(), affinity.stride(0), affinity.stride(1),
                                          before_c.data_ptr<scalar_t>(), after_c.data_ptr<scalar_t>(),
                                          mask_c.data_ptr<bool>(), num_tasks, static_cast<scalar_t>(decay),
                                          c10::cuda::getCurrentCUDAStream()));
  });
}

at::Tensor group_similarity_cuda(const at::Tensor& affinity) {
  const int64_t num_tasks = check_group_similarity_inputs(affinity);
  const c10::cuda::CUDAGuard guard(affinity.device());
  at::Tensor similarity = at::empty({num_tasks, num_tasks}, affinity.options());
  AT_DISPATCH_FLOATING_TYPES(affinity.scalar_type(), "group_similarity_cuda", [&] {
    C10_CUDA_CHECK(launch_group_similarity(affinity.data_ptr<scalar_t>(), affinity.stride(0), affinity.stride(1),
                                           num_tasks, similarity.data_ptr<scalar_t>(),
                                           c10::cuda::getCurrentCUDAStream()));
  });
  return similarity;
}

// Non-finite similarities are not checked here (that would need a host sync): the
// kernel answers all −1 for them, which the Python wrapper documents.
at::Tensor affinity_propagation_cuda(const at::Tensor& similarity, std::optional<double> preference, double damping,
                                     int64_t max_iter, int64_t convergence_iter) {
  const int64_t num_samples =
      check_affinity_propagation_inputs(similarity, preference, damping, max_iter, convergence_iter);
  const c10::cuda::CUDAGuard guard(similarity.device());
  const at::Tensor input = similarity.contiguous();
  at::Tensor labels = at::empty({num_samples}, similarity.options().dtype(at::kLong));
  const size_t scratch_bytes =
      affinity_propagation_global_workspace_bytes(num_samples, similarity.element_size());
  // Large K: the workspace lives in global memory (from the caching allocator, no sync).
  at::Tensor scratch;
  if (scratch_bytes > 0) scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, similarity.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "affinity_propagation_cuda", [&] {
    C10_CUDA_CHECK(launch_affinity_propagation(
        input.data_ptr<scalar_t>(), num_samples, preference.has_value(),
        static_cast<scalar_t>(preference.value_or(0.0)), static_cast<scalar_t>(damping), max_iter, convergence_iter,
        scratch_bytes > 0 ? scratch.data_ptr() : nullptr, labels.data_ptr<int64_t>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(selgroup_fast, CUDA, m) {
  m.impl("affinity_update_", &affinity_update_cuda);
  m.impl("group_similarity", &group_similarity_cuda);
  m.impl("affinity_propagation", &affinity_propagation_cuda);
}

}  // namespace selgroup
