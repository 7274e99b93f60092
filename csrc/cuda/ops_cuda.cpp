// The CUDA backend of every op (csrc/bindings.h): team solvers on one block, maps
// on a grid, all on the current stream through the generic launchers of
// kernels.cu. Nothing here waits for the GPU.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../bindings.h"
#include "kernels.h"

namespace selgroup {
namespace bindings {
namespace {

// The one check of every CUDA runtime call made here (launches included).
void check_cuda_call(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA call failed: ", cudaGetErrorString(error));
}

at::Device cuda_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "expected a CUDA tensor, got one on ", input.device());
  return input.device();
}

struct CUDABackend {
  static constexpr bool kHost = false;
  struct DeviceScope {
    explicit DeviceScope(const at::Tensor& input) : guard(cuda_device(input)) {}
    c10::cuda::CUDAGuard guard;
  };

  // The workspace is the block's shared memory when it fits what the device gives
  // a block (opt-in included: e.g. Nash-MTL's 2K²+4K doubles up to K ≈ 118 on an
  // H100); beyond, global memory from the caching allocator (no sync), slower but
  // without a limit on K.
  template <typename Solver>
  static void solve(const Solver& solver, const at::Tensor& like, const char* op) {
    const std::size_t bytes = workspace_bytes(solver);
    // Asked of the runtime directly (a cached attribute, no sync) rather than through
    // ATen/cuda/CUDAContext.h, which drags in the cuBLAS/cuSPARSE headers.
    int shared_limit = 0;
    check_cuda_call(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           c10::cuda::current_device()),
                    op);
    at::Tensor global;
    if (bytes > static_cast<std::size_t>(shared_limit))
      global = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    check_cuda_call(launch_team(solver, global.defined() ? global.data_ptr() : nullptr,
                                c10::cuda::getCurrentCUDAStream()),
                    op);
  }

  template <typename Map>
  static void map(const Map& map, const char* op) {
    check_cuda_call(launch_map(map, c10::cuda::getCurrentCUDAStream()), op);
  }

  // Drawn by the kernel itself (one thread), so nothing crosses to the device.
  static TieBreakingNoise tie_breaking_noise(int64_t) { return nullptr; }
};

}  // namespace
}  // namespace bindings
}  // namespace selgroup

TORCH_LIBRARY_IMPL(selgroup_fast, CUDA, m) { selgroup::bindings::register_ops<selgroup::bindings::CUDABackend>(m); }
