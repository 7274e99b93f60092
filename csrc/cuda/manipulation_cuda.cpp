// CUDA binding of the baselines' gradient-manipulation ops: the same input checks
// as the CPU binding (csrc/manipulation/bindings.h), then the launchers of
// manipulation_kernels.cu on the current stream. Nothing here waits for the GPU.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../manipulation/bindings.h"
#include "manipulation_kernels.h"

namespace selgroup {
namespace manipulation {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// The weighting ops' solvers run on one block of gram's device, on the current
// stream (csrc/manipulation/bindings.h).
struct BlockBackend {
  struct DeviceScope {
    explicit DeviceScope(const at::Tensor& gram) : guard((check_cuda(gram, "gram"), gram.device())) {}
    c10::cuda::CUDAGuard guard;
  };

  // Checks that the solver's workspace fits the block's shared memory (the largest,
  // Nash-MTL's 2K²+4K doubles, fits up to K ≈ 100 on an A100, K ≈ 118 on an H100).
  template <typename Solver>
  static void run(const Solver& solver, const char* op) {
    const std::size_t bytes = one_block_shared_bytes<Solver>(solver.K);
    // Asked of the runtime directly (a cached attribute, no sync) rather than through
    // ATen/cuda/CUDAContext.h, which drags in the cuBLAS/cuSPARSE headers.
    int available = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&available, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          c10::cuda::current_device()));
    TORCH_CHECK(bytes <= static_cast<std::size_t>(available), op, ": K = ", solver.K, " tasks need ", bytes,
                " bytes of shared memory, more than the ", available, " this GPU gives a block");
    const cudaError_t error = launch_one_block(solver, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
  }
};

at::Tensor graddrop_cuda(const at::Tensor& jacobian_in, const at::Tensor& leak_in, int64_t seed, int64_t offset) {
  const int64_t K = check_graddrop(jacobian_in, leak_in);
  check_cuda(jacobian_in, "jacobian");
  const c10::cuda::CUDAGuard guard(jacobian_in.device());
  const at::Tensor jacobian = jacobian_in.contiguous(), leak = leak_in.contiguous();
  const int64_t P = jacobian.size(1);
  at::Tensor update = at::empty({P}, jacobian.options());
  AT_DISPATCH_FLOATING_TYPES(jacobian.scalar_type(), "graddrop", [&] {
    const cudaError_t error =
        launch_graddrop(jacobian.const_data_ptr<scalar_t>(), leak.const_data_ptr<scalar_t>(), K, P, seed, offset,
                        update.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == cudaSuccess, "graddrop: kernel launch failed: ", cudaGetErrorString(error));
  });
  return update;
}

}  // namespace
}  // namespace manipulation
}  // namespace selgroup

TORCH_LIBRARY_IMPL(selgroup_fast, CUDA, m) {
  using namespace selgroup::manipulation;
  register_weighting_ops<BlockBackend>(m);
  m.impl("graddrop", &graddrop_cuda);
}
