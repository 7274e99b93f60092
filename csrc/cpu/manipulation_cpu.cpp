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

// The weighting ops' solvers run on the host, one worker (csrc/manipulation/bindings.h).
struct SerialBackend {
  struct DeviceScope {
    explicit DeviceScope(const at::Tensor&) {}
  };
  template <typename Solver>
  static void run(const Solver& solver, const char*) {
    std::vector<double> workspace(Solver::workspace_doubles(solver.K));
    solver(SerialTeam{}, workspace.data());
  }
};

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
  register_weighting_ops<SerialBackend>(m);
  m.impl("graddrop", &graddrop_cpu);
}
