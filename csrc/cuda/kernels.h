// The CUDA launchers of every op: ONE generic kernel for the team solvers (one
// block is the team) and ONE for the maps (a grid-stride loop), instantiated for
// every functor of the lists in csrc/all.h (csrc/cuda/kernels.cu). Raw pointers
// and a stream, no torch header: included by kernels.cu and csrc/cuda/ops_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

namespace selgroup {

// Runs `solver` on ONE block of the current device, asynchronously on `stream`. Its
// workspace (workspace_bytes(solver)) is the block's dynamic shared memory, or
// `global_workspace` when that is not null (the caller's choice when the workspace
// does not fit the device's shared memory). Returns the launch error, if any.
template <typename Solver>
cudaError_t launch_team(const Solver& solver, void* global_workspace, cudaStream_t stream);

// Runs `map` over its indices [0, map.count()), asynchronously on `stream`.
template <typename Map>
cudaError_t launch_map(const Map& map, cudaStream_t stream);

}  // namespace selgroup
