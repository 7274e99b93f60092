// Launchers of the affinity CUDA kernels, on raw pointers and a stream: a plain
// header (no torch) shared by affinity_kernels.cu and the torch binding.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace selgroup {

// affinity_update_ on a K×K affinity addressed through its strides; the losses and
// the mask are contiguous K-vectors. One launch.
cudaError_t launch_affinity_update(float* affinity, int64_t stride_source, int64_t stride_target, const float* before,
                                   const float* after, const bool* group_mask, int64_t num_tasks, float decay,
                                   cudaStream_t stream);
cudaError_t launch_affinity_update(double* affinity, int64_t stride_source, int64_t stride_target,
                                   const double* before, const double* after, const bool* group_mask,
                                   int64_t num_tasks, double decay, cudaStream_t stream);

// group_similarity into a contiguous K×K output. One launch.
cudaError_t launch_group_similarity(const float* affinity, int64_t stride_row, int64_t stride_col, int64_t num_tasks,
                                    float* similarity, cudaStream_t stream);
cudaError_t launch_group_similarity(const double* affinity, int64_t stride_row, int64_t stride_col,
                                    int64_t num_tasks, double* similarity, cudaStream_t stream);

// Bytes of global scratch the affinity propagation of K samples needs: 0 when its
// workspace fits in the block's shared memory (small K), else the workspace size.
size_t affinity_propagation_global_workspace_bytes(int64_t num_samples, size_t scalar_bytes);

// affinity_propagation of a contiguous K×K similarity, the whole loop in one launch
// of one block. `global_workspace` (16-byte aligned) is required when the function
// above says so, else ignored. Writes K int64 labels.
cudaError_t launch_affinity_propagation(const float* similarity, int64_t num_samples, bool has_preference,
                                        float preference, float damping, int64_t max_iter, int64_t convergence_iter,
                                        void* global_workspace, int64_t* labels, cudaStream_t stream);
cudaError_t launch_affinity_propagation(const double* similarity, int64_t num_samples, bool has_preference,
                                        double preference, double damping, int64_t max_iter,
                                        int64_t convergence_iter, void* global_workspace, int64_t* labels,
                                        cudaStream_t stream);

}  // namespace selgroup
