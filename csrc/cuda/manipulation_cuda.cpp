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

// Runs a K×K solver on one block of gram's device, after checking that its
// workspace fits the block's shared memory (the largest, Nash-MTL's 2K²+4K doubles,
// fits up to K ≈ 100 on an A100, K ≈ 118 on an H100).
template <typename Solver>
void run_one_block(const Solver& solver, const char* op) {
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

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor pcgrad_weights_cuda(const at::Tensor& gram_in, const at::Tensor& order_in) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  check_order(order_in, gram_in, K);
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous(), order = order_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "pcgrad_weights", [&] {
    run_one_block(PCGradWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
                                          weights.mutable_data_ptr<scalar_t>(), K},
                  "pcgrad_weights");
  });
  return weights;
}

at::Tensor mgda_weights_cuda(const at::Tensor& gram_in, int64_t max_iter, double tol) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  check_iterations(max_iter, tol, "mgda_weights");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "mgda_weights", [&] {
    run_one_block(MGDAWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K,
                                        static_cast<int>(max_iter), tol},
                  "mgda_weights");
  });
  return weights;
}

at::Tensor cagrad_weights_cuda(const at::Tensor& gram_in, double c, int64_t rescale, int64_t max_iter, double tol) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  check_cagrad_options(c, rescale);
  check_iterations(max_iter, tol, "cagrad_weights");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "cagrad_weights", [&] {
    run_one_block(CAGradWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K,
                                          c, static_cast<int>(rescale), static_cast<int>(max_iter), tol},
                  "cagrad_weights");
  });
  return weights;
}

at::Tensor imtl_weights_cuda(const at::Tensor& gram_in) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "imtl_weights", [&] {
    run_one_block(IMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K},
                  "imtl_weights");
  });
  return weights;
}

at::Tensor aligned_mtl_weights_cuda(const at::Tensor& gram_in) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "aligned_mtl_weights", [&] {
    run_one_block(
        AlignedMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K},
        "aligned_mtl_weights");
  });
  return weights;
}

at::Tensor nash_mtl_weights_cuda(const at::Tensor& gram_in, const at::Tensor& alpha_init_in, int64_t max_iter,
                                 double tol) {
  const int K = check_gram(gram_in);
  check_cuda(gram_in, "gram");
  check_task_vector(alpha_init_in, gram_in, K, "alpha_init", "gram");
  check_iterations(max_iter, tol, "nash_mtl_weights");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous(), alpha_init = alpha_init_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "nash_mtl_weights", [&] {
    run_one_block(NashMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), alpha_init.const_data_ptr<scalar_t>(),
                                           weights.mutable_data_ptr<scalar_t>(), K, static_cast<int>(max_iter), tol},
                  "nash_mtl_weights");
  });
  return weights;
}

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
  m.impl("pcgrad_weights", &pcgrad_weights_cuda);
  m.impl("mgda_weights", &mgda_weights_cuda);
  m.impl("cagrad_weights", &cagrad_weights_cuda);
  m.impl("imtl_weights", &imtl_weights_cuda);
  m.impl("aligned_mtl_weights", &aligned_mtl_weights_cuda);
  m.impl("nash_mtl_weights", &nash_mtl_weights_cuda);
  m.impl("graddrop", &graddrop_cuda);
}
