// One algorithm source for both backends.
//
// The small dense algorithms of this library (affinity propagation on a K×K
// similarity, the solvers on a K×K Gram matrix) are written once, as templates
// over a "team" of cooperating workers:
//
//   for (int i = team.rank(); i < n; i += team.size()) { ... }   // split work
//   team.sync();                                                  // barrier
//
// The CPU kernel instantiates them with SerialTeam (one worker, no barrier); the
// CUDA kernel with BlockTeam (the threads of one block, __syncthreads). The CPU
// twin is therefore the same code as the CUDA kernel, step for step, which is
// what makes the CPU-vs-CUDA agreement tests meaningful. This header includes no
// torch header, so .cu files that use it compile with plain nvcc.
#pragma once

#if defined(__CUDACC__)
#define SELGROUP_HD __host__ __device__
#define SELGROUP_HD_INLINE __host__ __device__ __forceinline__
#else
#define SELGROUP_HD
#define SELGROUP_HD_INLINE inline
#endif

namespace selgroup {

// A team of one: the host runs every iteration itself and never waits.
struct SerialTeam {
  SELGROUP_HD_INLINE int rank() const { return 0; }
  SELGROUP_HD_INLINE int size() const { return 1; }
  SELGROUP_HD_INLINE void sync() const {}
};

#if defined(__CUDACC__)
// The threads of one CUDA block (1-D), synchronised with __syncthreads.
struct BlockTeam {
  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};
#endif

}  // namespace selgroup
