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
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>

#include "../bindings.h"

namespace selgroup {
namespace bindings {
namespace {

// The barrier of the OpenMP team: spins (most waits last microseconds), then
// sleeps on a futex (std::atomic::wait) so that a descheduled partner can have the
// core. Affinity propagation (one barrier an iteration) ran ~7 % faster at K = 128
// with it than with libgomp's barrier, side by side in torch's process on the
// idle 2-core development machine.
class TeamBarrier {
 public:
  explicit TeamBarrier(int workers) : workers_(workers) {}
  void arrive_and_wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == workers_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      generation_.notify_all();
      return;
    }
    for (int spin = 0; spin < kSpins; ++spin) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    while (generation_.load(std::memory_order_acquire) == generation)
      generation_.wait(generation, std::memory_order_acquire);
  }

 private:
  static constexpr int kSpins = 1 << 14;  // ~0.3 ms of PAUSE on the development machine's Zen 4
  const int workers_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
};

// The threads of an OpenMP parallel region as a team (csrc/team.h), whose loops
// may assume SIMD registers of VectorBytes (as SoloTeam).
template <int VectorBytes>
struct OpenMPTeam {
  static constexpr bool kHost = true;
  static constexpr int kVectorBytes = VectorBytes;
  TeamBarrier* barrier;
  int rank() const { return omp_get_thread_num(); }
  int size() const { return omp_get_num_threads(); }
  void sync() const { barrier->arrive_and_wait(); }
};
static_assert(Team<OpenMPTeam<16>>);

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
    thread_local std::unique_ptr<CacheLine[]> cached;
    thread_local std::size_t capacity = 0;
    if (bytes > kCachedWorkspaceBytes) {
      owned_ = std::make_unique_for_overwrite<CacheLine[]>(bytes / sizeof(CacheLine) + 1);
      data_ = owned_.get();
      return;
    }
    if (bytes > capacity) {
      capacity = std::min(std::max(bytes, 2 * capacity), kCachedWorkspaceBytes);
      cached = std::make_unique_for_overwrite<CacheLine[]>(capacity / sizeof(CacheLine) + 1);
    }
    data_ = cached.get();
  }
  void* data() const { return data_; }

 private:
  // The base is cache-line aligned, so the workspace's large slices are too (csrc/workspace.h).
  struct alignas(kCacheLineBytes) CacheLine {
    unsigned char bytes[kCacheLineBytes];
  };
  std::unique_ptr<CacheLine[]> owned_;
  void* data_;
};

// One worker's run of a team solver: alone (SoloTeam) or as its rank of the OpenMP
// team, with SIMD lanes of 16 bytes (baseline x86-64: the wheel is built without
// -march). Affinity propagation's message loop is bound by per-entry arithmetic on
// K² values, so it also comes compiled for AVX2 (lanes of 32 bytes), which runs
// where the CPU has it. (Lanes of 64 bytes on AVX-512 ran 2.5× slower on the AMD
// EPYC (Zen 4) of benchmarks/results/affinity_propagation_large_k.md: GCC makes
// their compare masks lane by lane.) Neither version contracts a*b + c into an FMA,
// so both round alike: the same labels bit for bit. `flatten` inlines the solver
// into the AVX2 one.
template <int VectorBytes, typename Solver>
void run_worker(const Solver& solver, TeamBarrier* barrier, void* workspace) {
  if (barrier == nullptr)
    run_team(solver, SoloTeam<VectorBytes>{}, workspace);
  else
    run_team(solver, OpenMPTeam<VectorBytes>{barrier}, workspace);
}
template <typename Solver>
void run_fastest_worker(const Solver& solver, TeamBarrier* barrier, void* workspace) {
  run_worker<16>(solver, barrier, workspace);
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx2"), optimize("fp-contract=off"), flatten)) void run_worker_with_avx2(
    const AffinityPropagation<T>& solver, TeamBarrier* barrier, void* workspace) {
  run_worker<32>(solver, barrier, workspace);
}
template <typename T>
void run_fastest_worker(const AffinityPropagation<T>& solver, TeamBarrier* barrier, void* workspace) {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return run_worker_with_avx2(solver, barrier, workspace);
  run_worker<16>(solver, barrier, workspace);
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
    if (threads == 1) return run_fastest_worker(solver, nullptr, workspace.data());
    // The team is whatever number of threads the region gets (perhaps 1 when nested).
    std::unique_ptr<TeamBarrier> barrier;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      barrier = std::make_unique<TeamBarrier>(omp_get_num_threads());
      run_fastest_worker(solver, barrier.get(), workspace.data());
    }
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
