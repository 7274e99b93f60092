// CUDA kernels of the baselines' gradient manipulation: ONE generic kernel for
// every "one block solves one K×K problem" solver (the functors of
// csrc/manipulation, run with a BlockTeam), and the fused GradDrop kernel.
#include <algorithm>

#include "manipulation_kernels.h"
#include "../manipulation/all.h"

namespace selgroup {
namespace manipulation {
namespace {

// The K×K solvers are latency-bound and mostly do O(K) work per sync: one warp
// per 32 tasks, at least one warp, and no more than this many threads (beyond it
// the block only waits longer at each barrier).
constexpr int kMaxSolverThreads = 256;
// The default dynamic shared memory of a block; more needs an opt-in attribute.
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;
// GradDrop: one thread per column, a grid-stride loop over the columns.
constexpr int kGradDropThreads = 256;
constexpr int64_t kMaxGradDropBlocks = 65535;

template <typename Solver>
__global__ void one_block_kernel(Solver solver) {
  extern __shared__ double workspace[];
  solver(BlockTeam{}, workspace);
}

template <typename scalar_t>
__global__ void graddrop_kernel(const scalar_t* __restrict__ jacobian, const scalar_t* __restrict__ leak, int64_t K,
                                int64_t P, int64_t seed, int64_t offset, scalar_t* __restrict__ update) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; column < P; column += stride) {
    scalar_t sum, sign;  // the one-column scratch, in registers once inlined
    graddrop_columns(jacobian, leak, K, P, column, 1, seed, offset, update, &sum, &sign);
  }
}

}  // namespace

template <typename Solver>
std::size_t one_block_shared_bytes(int K) {
  return static_cast<std::size_t>(Solver::workspace_doubles(K)) * sizeof(double);
}

template <typename Solver>
cudaError_t launch_one_block(const Solver& solver, cudaStream_t stream) {
  const std::size_t bytes = one_block_shared_bytes<Solver>(solver.K);
  if (bytes > kDefaultSharedBytes) {
    const cudaError_t error = cudaFuncSetAttribute(one_block_kernel<Solver>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (error != cudaSuccess) return error;
  }
  const int threads = std::min(kMaxSolverThreads, 32 * ((solver.K + 31) / 32));
  one_block_kernel<Solver><<<1, threads, bytes, stream>>>(solver);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_graddrop(const scalar_t* jacobian, const scalar_t* leak, int64_t K, int64_t P, int64_t seed,
                            int64_t offset, scalar_t* update, cudaStream_t stream) {
  if (P == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxGradDropBlocks, (P + kGradDropThreads - 1) / kGradDropThreads);
  graddrop_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks), kGradDropThreads, 0, stream>>>(jacobian, leak, K, P, seed, offset, update);
  return cudaGetLastError();
}

#define SELGROUP_INSTANTIATE_SOLVER(SOLVER)                                     \
  template std::size_t one_block_shared_bytes<SOLVER<float>>(int);              \
  template std::size_t one_block_shared_bytes<SOLVER<double>>(int);             \
  template cudaError_t launch_one_block<SOLVER<float>>(const SOLVER<float>&, cudaStream_t); \
  template cudaError_t launch_one_block<SOLVER<double>>(const SOLVER<double>&, cudaStream_t);

SELGROUP_INSTANTIATE_SOLVER(PCGradWeights)
SELGROUP_INSTANTIATE_SOLVER(MGDAWeights)
SELGROUP_INSTANTIATE_SOLVER(CAGradWeights)
SELGROUP_INSTANTIATE_SOLVER(IMTLWeights)
SELGROUP_INSTANTIATE_SOLVER(AlignedMTLWeights)
SELGROUP_INSTANTIATE_SOLVER(NashMTLWeights)
#undef SELGROUP_INSTANTIATE_SOLVER

template cudaError_t launch_graddrop<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                            cudaStream_t);
template cudaError_t launch_graddrop<double>(const double*, const double*, int64_t, int64_t, int64_t, int64_t,
                                             double*, cudaStream_t);

}  // namespace manipulation
}  // namespace selgroup
