// CPU kernels of the baselines' gradient-manipulation ops: the team algorithms of
// csrc/manipulation run with a SerialTeam, the same code as the CUDA block.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../manipulation/bindings.h"

namespace selgroup {
namespace manipulation {
namespace {

template <typename Solver>
void run_serial(const Solver& solver) {
  std::vector<double> workspace(Solver::workspace_doubles(solver.K));
  solver(SerialTeam{}, workspace.data());
}

at::Tensor pcgrad_weights_cpu(const at::Tensor& gram_in, const at::Tensor& order_in) {
  const int K = check_gram(gram_in);
  check_order(order_in, gram_in, K);
  const at::Tensor gram = gram_in.contiguous(), order = order_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "pcgrad_weights", [&] {
    run_serial(PCGradWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
                                       weights.mutable_data_ptr<scalar_t>(), K});
  });
  return weights;
}

at::Tensor mgda_weights_cpu(const at::Tensor& gram_in, int64_t max_iter, double tol) {
  const int K = check_gram(gram_in);
  check_iterations(max_iter, tol, "mgda_weights");
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "mgda_weights", [&] {
    run_serial(MGDAWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K,
                                     static_cast<int>(max_iter), tol});
  });
  return weights;
}

at::Tensor cagrad_weights_cpu(const at::Tensor& gram_in, double c, int64_t rescale, int64_t max_iter, double tol) {
  const int K = check_gram(gram_in);
  check_cagrad_options(c, rescale);
  check_iterations(max_iter, tol, "cagrad_weights");
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "cagrad_weights", [&] {
    run_serial(CAGradWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K, c,
                                       static_cast<int>(rescale), static_cast<int>(max_iter), tol});
  });
  return weights;
}

at::Tensor imtl_weights_cpu(const at::Tensor& gram_in) {
  const int K = check_gram(gram_in);
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "imtl_weights", [&] {
    run_serial(IMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K});
  });
  return weights;
}

at::Tensor aligned_mtl_weights_cpu(const at::Tensor& gram_in) {
  const int K = check_gram(gram_in);
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "aligned_mtl_weights", [&] {
    run_serial(AlignedMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), K});
  });
  return weights;
}

at::Tensor nash_mtl_weights_cpu(const at::Tensor& gram_in, const at::Tensor& alpha_init_in, int64_t max_iter,
                                double tol) {
  const int K = check_gram(gram_in);
  check_task_vector(alpha_init_in, gram_in, K, "alpha_init", "gram");
  check_iterations(max_iter, tol, "nash_mtl_weights");
  const at::Tensor gram = gram_in.contiguous(), alpha_init = alpha_init_in.contiguous();
  at::Tensor weights = at::empty({K}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "nash_mtl_weights", [&] {
    run_serial(NashMTLWeights<scalar_t>{gram.const_data_ptr<scalar_t>(), alpha_init.const_data_ptr<scalar_t>(),
                                        weights.mutable_data_ptr<scalar_t>(), K, static_cast<int>(max_iter), tol});
  });
  return weights;
}

// Columns are independent: split them over the CPU threads, at least this many
// columns per thread so that small matrices stay on one thread, and walk each
// thread's columns in chunks that keep the two scratch rows in L1.
constexpr int64_t kGradDropGrain = 8192;
constexpr int64_t kGradDropChunk = 512;

at::Tensor graddrop_cpu(const at::Tensor& jacobian_in, const at::Tensor& leak_in, int64_t seed, int64_t offset) {
  const int64_t K = check_graddrop(jacobian_in, leak_in);
  const at::Tensor jacobian = jacobian_in.contiguous(), leak = leak_in.contiguous();
  const int64_t P = jacobian.size(1);
  at::Tensor update = at::empty({P}, jacobian.options());
  AT_DISPATCH_FLOATING_TYPES(jacobian.scalar_type(), "graddrop", [&] {
    const scalar_t* J = jacobian.const_data_ptr<scalar_t>();
    const scalar_t* l = leak.const_data_ptr<scalar_t>();
    scalar_t* d = update.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P, kGradDropGrain, [&](int64_t begin, int64_t end) {
      scalar_t sums[kGradDropChunk], signs[kGradDropChunk];
      for (int64_t chunk = begin; chunk < end; chunk += kGradDropChunk)
        graddrop_columns(J, l, K, P, chunk, std::min(kGradDropChunk, end - chunk), seed, offset, d, sums, signs);
    });
  });
  return update;
}

}  // namespace
}  // namespace manipulation
}  // namespace selgroup

TORCH_LIBRARY_IMPL(selgroup_fast, CPU, m) {
  using namespace selgroup::manipulation;
  m.impl("pcgrad_weights", &pcgrad_weights_cpu);
  m.impl("mgda_weights", &mgda_weights_cpu);
  m.impl("cagrad_weights", &cagrad_weights_cpu);
  m.impl("imtl_weights", &imtl_weights_cpu);
  m.impl("aligned_mtl_weights", &aligned_mtl_weights_cpu);
  m.impl("nash_mtl_weights", &nash_mtl_weights_cpu);
  m.impl("graddrop", &graddrop_cpu);
}
