// Launchers of the baselines' gradient-manipulation kernels, on raw pointers and a
// stream (no torch header: included by manipulation_kernels.cu and by the torch
// binding manipulation_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace selgroup {
namespace manipulation {

// Dynamic shared memory one block of the K×K solver kernel needs.
template <typename Solver>
std::size_t one_block_shared_bytes(int K);

// Runs `solver` (a functor of csrc/manipulation, pointers on the device) on ONE
// block of the current device: the block is the team, its dynamic shared memory
// the workspace. Asynchronous on `stream`; returns the launch error, if any. The
// caller checks beforehand that one_block_shared_bytes fits the device.
template <typename Solver>
cudaError_t launch_one_block(const Solver& solver, cudaStream_t stream);

// GradDrop over the row-major K×P `jacobian` into `update` [P].
template <typename scalar_t>
cudaError_t launch_graddrop(const scalar_t* jacobian, const scalar_t* leak, int64_t K, int64_t P, int64_t seed,
                            int64_t offset, scalar_t* update, cudaStream_t stream);

}  // namespace manipulation
}  // namespace selgroup
