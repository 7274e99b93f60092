// The CPU backend of every op (csrc/bindings.h): team solvers run serially, or on
// OpenMP threads where a solver says its problem is large enough; maps run on
// at::parallel_for. Affinity propagation's tie-breaking noise comes from a cache.
// Affinity propagation's AVX2 version passes 32-byte vectors by value between
// inlined helpers (csrc/affinity/affinity_propagation.h, Lanes); GCC's note that
// such code outside AVX would change the ABI concerns no call that remains.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>

#include "../bindings.h"

namespace selgroup {
namespace bindings {
namespace {

// The threads of an OpenMP parallel region as a team (csrc/team.h).
struct OpenMPTeam {
  static constexpr bool kHost = true;
  int rank() const { return omp_get_thread_num(); }
  int size() const { return omp_get_num_threads(); }
  void sync() const {
#pragma omp barrier
  }
};
static_assert(Team<OpenMPTeam>);

// How many threads `solver` may use: solvers that are worth splitting say so with
// `parallelism()` (the most workers that still each get enough work); the others,
// latency-bound K×K problems, run serially. Capped by torch's intra-op threads.
template <typename Solver>
int solver_threads(const Solver& solver) {
  if constexpr (requires { solver.parallelism(); }) {
    return static_cast<int>(std::clamp<int64_t>(solver.parallelism(), 1, at::get_num_threads()));
  } else {
    return 1;
  }
}

// Scratch of up to kCachedWorkspaceBytes comes from one growing buffer per calling
// thread (no allocation, nor page faults, per call); larger scratch (affinity
// propagation beyond K ≈ 400) is allocated per call rather than held for good.
constexpr std::size_t kCachedWorkspaceBytes = std::size_t(4) << 20;

class HostWorkspace {
 public:
  explicit HostWorkspace(std::size_t bytes) {
    thread_local std::unique_ptr<std::max_align_t[]> cached;
    thread_local std::size_t capacity = 0;
    if (bytes > kCachedWorkspaceBytes) {
      owned_ = std::make_unique_for_overwrite<std::max_align_t[]>(bytes / sizeof(std::max_align_t) + 1);
      data_ = owned_.get();
      return;
    }
    if (bytes > capacity) {
      capacity = std::min(std::max(bytes, 2 * capacity), kCachedWorkspaceBytes);
      cached = std::make_unique_for_overwrite<std::max_align_t[]>(capacity / sizeof(std::max_align_t) + 1);
    }
    data_ = cached.get();
  }
  void* data() const { return data_; }

 private:
  std::unique_ptr<std::max_align_t[]> owned_;
  void* data_;
};

// One worker runs a team solver as a SerialTeam (SIMD lanes of 16 bytes: baseline
// x86-64, the wheel is built without -march). Affinity propagation's serial message
// loop is bound by per-entry arithmetic on K² values, so it also comes compiled for
// AVX2 (lanes of 32 bytes), which it runs where the CPU has it. (Lanes of 64 bytes
// on AVX-512 ran K = 64–256 about 2× slower than 32 on the AMD EPYC (Zen 4) of
// benchmarks/results/affinity_propagation_large_k.md.) Neither version contracts
// a*b + c into an FMA, so both round alike: the same labels bit for bit. `flatten`
// inlines the solver into the AVX2 one.
template <typename Solver>
void run_serially(const Solver& solver, void* workspace) {
  run_team(solver, SerialTeam{}, workspace);
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx2"), optimize("fp-contract=off"), flatten)) void run_with_avx2(
    const AffinityPropagation<T>& solver, void* workspace) {
  run_team(solver, SoloTeam<32>{}, workspace);
}
template <typename T>
void run_serially(const AffinityPropagation<T>& solver, void* workspace) {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return run_with_avx2(solver, workspace);
  run_team(solver, SerialTeam{}, workspace);
}
#endif

struct CPUBackend {
  static constexpr bool kHost = true;
  struct DeviceScope {
    explicit DeviceScope(const at::Tensor&) {}
  };

  template <typename Solver>
  static void solve(const Solver& solver, const at::Tensor&, const char*) {
    const HostWorkspace workspace(workspace_bytes(solver));
    const int threads = solver_threads(solver);
    if (threads == 1) return run_serially(solver, workspace.data());
    // The team is whatever number of threads the region gets (perhaps 1 when nested).
#pragma omp parallel num_threads(threads)
    run_team(solver, OpenMPTeam{}, workspace.data());
  }

  template <typename Map>
  static void map(const Map& map, const char*) {
    const typename Map::Shared shared = map.prepare();
    at::parallel_for(0, map.count(), Map::kGrain, [&](int64_t begin, int64_t end) { map(shared, begin, end); });
  }

  // RandomState(0)'s normals are a prefix-stable stream: one cached copy, grown to
  // the largest K² asked for, serves every K.
  static TieBreakingNoise tie_breaking_noise(int64_t count) {
    static std::mutex mutex;
    static TieBreakingNoise cache = std::make_shared<const std::vector<double>>();
    const std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<int64_t>(cache->size()) < count) {
      auto normals = std::make_shared<std::vector<double>>(count);
      draw_tie_breaking_noise(normals->data(), count);
      cache = std::move(normals);
    }
    return cache;
  }
};

}  // namespace
}  // namespace bindings
}  // namespace selgroup

TORCH_LIBRARY_IMPL(selgroup_fast, CPU, m) { selgroup::bindings::register_ops<selgroup::bindings::CPUBackend>(m); }
