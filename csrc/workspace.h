// The scratch memory of a team solver, sized and carved by ONE function.
//
// Each solver lists its scratch arrays once, in `carve(WorkspaceLayout&)`:
//
//   struct Scratch { double* flag; double* G; double* w; };
//   SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
//     return {layout.take<double>(kFlagSlots), layout.take<double>(K * K), layout.take<double>(K)};
//   }
//
// workspace_bytes(solver) runs that list on a layout with no memory (it only adds
// up sizes and alignments); run_team(solver, team, base) runs it on the real block
// and hands the pointers to the solver. Both walk the same list, so the size that
// was allocated and the pointers that are written cannot disagree. (The braced
// initialiser evaluates its elements left to right, which fixes the order.)
//
// Where the memory lives is the backend's business (csrc/cpu/ops_cpu.cpp: a host
// vector; csrc/cuda/ops_cuda.cpp: the block's dynamic shared memory, or global
// memory when the workspace does not fit in shared memory). The base must be
// aligned to kWorkspaceAlignment.
#pragma once

#include <cstddef>
#include <cstdint>

#include "team.h"

namespace selgroup {

constexpr std::size_t kWorkspaceAlignment = 16;
// Slices of a cache line or more start on a cache-line boundary of the base (the
// CPU backend's base is so aligned): a row of SIMD vectors that straddles lines
// ran affinity propagation's loops up to 1.5× slower.
constexpr std::size_t kCacheLineBytes = 64;

class WorkspaceLayout {
 public:
  // Without a base, the layout only measures.
  SELGROUP_HD_INLINE explicit WorkspaceLayout(void* base = nullptr) : base_(static_cast<unsigned char*>(base)) {}

  // The next `count` elements of type T, aligned for T.
  template <typename T>
  SELGROUP_HD_INLINE T* take(int64_t count) {
    static_assert(alignof(T) <= kWorkspaceAlignment);
    const std::size_t size = static_cast<std::size_t>(count) * sizeof(T);
    const std::size_t alignment = size >= kCacheLineBytes ? kCacheLineBytes : alignof(T);
    bytes_ = (bytes_ + alignment - 1) / alignment * alignment;
    T* slice = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + bytes_);
    bytes_ += size;
    return slice;
  }

  SELGROUP_HD_INLINE std::size_t bytes() const { return bytes_; }

 private:
  unsigned char* base_;
  std::size_t bytes_ = 0;
};

// Bytes of scratch `solver` needs.
template <typename Solver>
SELGROUP_HD_INLINE std::size_t workspace_bytes(const Solver& solver) {
  WorkspaceLayout measure;
  solver.carve(measure);
  return measure.bytes();
}

// Runs `solver` with `team` on the scratch at `base` (workspace_bytes(solver) bytes).
template <typename Solver, Team T>
SELGROUP_HD_INLINE void run_team(const Solver& solver, const T& team, void* base) {
  WorkspaceLayout layout(base);
  solver(team, solver.carve(layout));
}

}  // namespace selgroup
