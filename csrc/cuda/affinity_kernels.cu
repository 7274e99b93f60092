// CUDA kernels of the affinity ops: the shared algorithms of csrc/affinity, run by
// one thread per entry (the elementwise ops) or by the threads of one block
// (affinity propagation, BlockTeam). No torch header here (see affinity_kernels.h).
#include "affinity_kernels.h"

#include "../affinity/affinity_propagation.h"
#include "../affinity/affinity_update.h"
#include "../affinity/group_similarity.h"
#include "../team.h"

namespace selgroup {
namespace {

constexpr int kElementThreads = 256;
// The dynamic shared memory a block may use without opting in.
constexpr size_t kSharedWorkspaceLimit = 48 * 1024;

int element_blocks(int64_t count) { return static_cast<int>((count + kElementThreads - 1) / kElementThreads); }

template <typename T>
__global__ void affinity_update_kernel(T* affinity, int64_t stride_source, int64_t stride_target, const T* before,
                                       const T* after, const bool* group_mask, int64_t num_tasks, T decay) {
  __shared__ int64_t size;
  if (threadIdx.x == 0) size = group_size(group_mask, num_tasks);
  __syncthreads();
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= num_tasks * num_tasks || size == 0) return;
  affinity_update_pair(affinity, stride_source, stride_target, before, after, group_mask, size, decay,
                       pair / num_tasks, pair % num_tasks);
}

template <typename T>
__global__ void group_similarity_kernel(const T* affinity, int64_t stride_row, int64_t stride_col, int64_t num_tasks,
                                        T* similarity) {
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (entry >= num_tasks * num_tasks) return;
  similarity[entry] = group_similarity_entry(affinity, stride_row, stride_col, entry / num_tasks, entry % num_tasks);
}

template <typename T>
__global__ void affinity_propagation_kernel(const T* similarity, int64_t num_samples, bool has_preference,
                                            T preference, T damping, int64_t max_iter, int64_t convergence_iter,
                                            void* global_workspace, int64_t* labels) {
  extern __shared__ __align__(16) unsigned char shared_workspace[];
  void* workspace = global_workspace != nullptr ? global_workspace : static_cast<void*>(shared_workspace);
  team_affinity_propagation(BlockTeam{}, similarity, num_samples, has_preference, preference, damping, max_iter,
                            convergence_iter, workspace, labels);
}

template <typename T>
cudaError_t affinity_update(T* affinity, int64_t stride_source, int64_t stride_target, const T* before,
                            const T* after, const bool* group_mask, int64_t num_tasks, T decay, cudaStream_t stream) {
  affinity_update_kernel<T><<<element_blocks(num_tasks * num_tasks), kElementThreads, 0, stream>>>(
      affinity, stride_source, stride_target, before, after, group_mask, num_tasks, decay);
  return cudaGetLastError();
}

template <typename T>
cudaError_t group_similarity(const T* affinity, int64_t stride_row, int64_t stride_col, int64_t num_tasks,
                             T* similarity, cudaStream_t stream) {
  group_similarity_kernel<T><<<element_blocks(num_tasks * num_tasks), kElementThreads, 0, stream>>>(
      affinity, stride_row, stride_col, num_tasks, similarity);
  return cudaGetLastError();
}

template <typename T>
cudaError_t affinity_propagation(const T* similarity, int64_t num_samples, bool has_preference, T preference,
                                 T damping, int64_t max_iter, int64_t convergence_iter, void* global_workspace,
                                 int64_t* labels, cudaStream_t stream) {
  const size_t workspace_bytes = affinity_propagation_workspace_bytes<T>(num_samples);
  const bool use_shared = workspace_bytes <= kSharedWorkspaceLimit;
  if (!use_shared && global_workspace == nullptr) return cudaErrorInvalidValue;
  // Rows and columns are split over the threads: a warp for small K, up to 256.
  const int threads = num_samples <= 32 ? 32 : (num_samples <= 128 ? 128 : 256);
  affinity_propagation_kernel<T><<<1, threads, use_shared ? workspace_bytes : 0, stream>>>(
      similarity, num_samples, has_preference, preference, damping, max_iter, convergence_iter,
      use_shared ? nullptr : global_workspace, labels);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_affinity_update(float* affinity, int64_t stride_source, int64_t stride_target, const float* before,
                                   const float* after, const bool* group_mask, int64_t num_tasks, float decay,
                                   cudaStream_t stream) {
  return affinity_update(affinity, stride_source, stride_target, before, after, group_mask, num_tasks, decay, stream);
}
cudaError_t launch_affinity_update(double* affinity, int64_t stride_source, int64_t stride_target,
                                   const double* before, const double* after, const bool* group_mask,
                                   int64_t num_tasks, double decay, cudaStream_t stream) {
  return affinity_update(affinity, stride_source, stride_target, before, after, group_mask, num_tasks, decay, stream);
}

cudaError_t launch_group_similarity(const float* affinity, int64_t stride_row, int64_t stride_col, int64_t num_tasks,
                                    float* similarity, cudaStream_t stream) {
  return group_similarity(affinity, stride_row, stride_col, num_tasks, similarity, stream);
}
cudaError_t launch_group_similarity(const double* affinity, int64_t stride_row, int64_t stride_col,
                                    int64_t num_tasks, double* similarity, cudaStream_t stream) {
  return group_similarity(affinity, stride_row, stride_col, num_tasks, similarity, stream);
}

size_t affinity_propagation_global_workspace_bytes(int64_t num_samples, size_t scalar_bytes) {
  const size_t bytes = scalar_bytes == sizeof(double) ? affinity_propagation_workspace_bytes<double>(num_samples)
                                                      : affinity_propagation_workspace_bytes<float>(num_samples);
  return bytes <= kSharedWorkspaceLimit ? 0 : bytes;
}

cudaError_t launch_affinity_propagation(const float* similarity, int64_t num_samples, bool has_preference,
                                        float preference, float damping, int64_t max_iter, int64_t convergence_iter,
                                        void* global_workspace, int64_t* labels, cudaStream_t stream) {
  return affinity_propagation(similarity, num_samples, has_preference, preference, damping, max_iter,
                              convergence_iter, global_workspace, labels, stream);
}
cudaError_t launch_affinity_propagation(const double* similarity, int64_t num_samples, bool has_preference,
                                        double preference, double damping, int64_t max_iter,
                                        int64_t convergence_iter, void* global_workspace, int64_t* labels,
                                        cudaStream_t stream) {
  return affinity_propagation(similarity, num_samples, has_preference, preference, damping, max_iter,
                              convergence_iter, global_workspace, labels, stream);
}

}  // namespace selgroup
