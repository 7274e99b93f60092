// The CUDA kernels of every op (see kernels.h): two generic kernels, instantiated
// from the lists of csrc/all.h, float and double each. Plain nvcc, no torch.
#include <algorithm>
#include <cstdint>

#include "../all.h"
#include "kernels.h"

namespace selgroup {
namespace {

// The team solvers are latency-bound and mostly do O(K) work per sync: one warp per
// 32 tasks, at least one warp, and no more than this many threads (beyond it the
// block only waits longer at each barrier).
constexpr int kMaxTeamThreads = 256;
// The dynamic shared memory a block gets without opting in.
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;
// Maps: 256 threads per block, a grid-stride loop beyond this many blocks.
constexpr int kMapThreads = 256;
constexpr int64_t kMaxMapBlocks = 65535;

template <typename Solver>
__global__ void team_kernel(Solver solver, void* global_workspace) {
  extern __shared__ __align__(kWorkspaceAlignment) unsigned char shared_workspace[];
  run_team(solver, BlockTeam{}, global_workspace != nullptr ? global_workspace : shared_workspace);
}

template <typename Map>
__global__ void map_kernel(Map map, int64_t count) {
  __shared__ typename Map::Shared shared;
  if (threadIdx.x == 0) shared = map.prepare();
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    map(shared, i, i + 1);
}

}  // namespace

template <typename Solver>
cudaError_t launch_team(const Solver& solver, void* global_workspace, cudaStream_t stream) {
  const std::size_t shared_bytes = global_workspace != nullptr ? 0 : workspace_bytes(solver);
  if (shared_bytes > kDefaultSharedBytes) {
    const cudaError_t error = cudaFuncSetAttribute(team_kernel<Solver>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(shared_bytes));
    if (error != cudaSuccess) return error;
  }
  const int threads = static_cast<int>(std::min<int64_t>(kMaxTeamThreads, 32 * ((solver.K + 31) / 32)));
  team_kernel<Solver><<<1, threads, shared_bytes, stream>>>(solver, global_workspace);
  return cudaGetLastError();
}

template <typename Map>
cudaError_t launch_map(const Map& map, cudaStream_t stream) {
  const int64_t count = map.count();
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxMapBlocks, (count + kMapThreads - 1) / kMapThreads);
  map_kernel<Map><<<static_cast<unsigned>(blocks), kMapThreads, 0, stream>>>(map, count);
  return cudaGetLastError();
}

#define SELGROUP_INSTANTIATE_TEAM(name, Functor)                                                      \
  template cudaError_t launch_team<Functor<float>>(const Functor<float>&, void*, cudaStream_t); \
  template cudaError_t launch_team<Functor<double>>(const Functor<double>&, void*, cudaStream_t);
#define SELGROUP_INSTANTIATE_MAP(name, Functor)                                                \
  template cudaError_t launch_map<Functor<float>>(const Functor<float>&, cudaStream_t); \
  template cudaError_t launch_map<Functor<double>>(const Functor<double>&, cudaStream_t);
SELGROUP_TEAM_OPS(SELGROUP_INSTANTIATE_TEAM)
SELGROUP_MAP_OPS(SELGROUP_INSTANTIATE_MAP)
#undef SELGROUP_INSTANTIATE_TEAM
#undef SELGROUP_INSTANTIATE_MAP

}  // namespace selgroup
