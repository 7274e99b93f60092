// One algorithm source for every backend.
//
// The small dense algorithms of this library (affinity propagation on a K×K
// similarity, the solvers on a K×K Gram matrix) are written once, as templates
// over a "team" of cooperating workers:
//
//   for (int i = team.rank(); i < n; i += team.size()) { ... }   // split work
//   team_split(team, n, [&](int64_t begin, int64_t end) { ... }); // the same, by ranges
//   team.sync();                                                  // barrier
//
// The CPU kernels run them with SerialTeam (one worker, no barrier) or, for large
// problems, OpenMP threads (csrc/cpu/ops_cpu.cpp); the CUDA kernels with BlockTeam
// (the threads of one block, __syncthreads); tests/team_check.cpp with std::thread
// workers. The answer must not depend on the team: every worker computes shared
// scalars redundantly, and vector work is split by rank with each element's
// arithmetic fixed. This header includes no torch header, so .cu files that use it
// compile with plain nvcc.
#pragma once

#include <concepts>
#include <cstdint>

#if defined(__CUDACC__)
#define SELGROUP_HD __host__ __device__
#define SELGROUP_HD_INLINE __host__ __device__ __forceinline__
#else
#define SELGROUP_HD
#define SELGROUP_HD_INLINE inline
#endif

namespace selgroup {

// What the algorithms ask of a team. `kHost` says the workers are host threads:
// they may call host-only library code (e.g. std::nth_element on rank 0), and
// team_split hands each one a contiguous block (cache lines and vector loops)
// instead of a rank-strided set (coalesced loads on a GPU).
template <typename T>
concept Team = requires(const T& team) {
  { team.rank() } -> std::same_as<int>;
  { team.size() } -> std::same_as<int>;
  team.sync();
  { T::kHost } -> std::convertible_to<bool>;
};

// A team of one: the host runs every iteration itself and never waits.
// `kVectorBytes` is the SIMD register width its loops may assume: 16 (SSE2, NEON)
// in portable code; csrc/cpu/ops_cpu.cpp also runs 32 in affinity propagation's
// version compiled for AVX2 (64, for AVX-512, was measured slower and is not built).
// Host teams that declare it (this one, the CPU's OpenMP team) take the algorithms'
// host paths written in SIMD lanes (affinity propagation's iterate_rows).
template <int VectorBytes>
struct SoloTeam {
  static constexpr bool kHost = true;
  static constexpr int kVectorBytes = VectorBytes;
  SELGROUP_HD_INLINE int rank() const { return 0; }
  SELGROUP_HD_INLINE int size() const { return 1; }
  SELGROUP_HD_INLINE void sync() const {}
};
using SerialTeam = SoloTeam<16>;
static_assert(Team<SerialTeam>);

#if defined(__CUDACC__)
// The threads of one CUDA block (1-D), synchronised with __syncthreads.
struct BlockTeam {
  static constexpr bool kHost = false;
  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};
static_assert(Team<BlockTeam>);
#endif

// Calls body(begin, end) on this worker's share of [0, n): one contiguous block on
// host teams, the ranges [i, i + 1) for i = rank, rank + size, ... on device teams.
// No barrier.
template <Team T, typename Body>
SELGROUP_HD_INLINE void team_split(const T& team, int64_t n, Body&& body) {
  if constexpr (T::kHost) {
    const int64_t share = (n + team.size() - 1) / team.size();
    const int64_t begin = team.rank() * share, end = begin + share < n ? begin + share : n;
    if (begin < end) body(begin, end);
  } else {
    for (int64_t i = team.rank(); i < n; i += team.size()) body(i, i + 1);
  }
}

// The elementwise ops are "maps" over independent indices [0, count()):
//   using Shared = ...;  Shared prepare() const;      // once per launch (per block on CUDA)
//   void operator()(const Shared&, int64_t begin, int64_t end) const;
//   static constexpr int64_t kGrain;                 // fewest indices worth a CPU thread
// Maps that prepare nothing use NoShared.
struct NoShared {};

}  // namespace selgroup
