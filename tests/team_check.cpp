// The team algorithms of csrc/ with N CPU threads as the team (std::barrier
// standing in for __syncthreads), compared bit for bit with the SerialTeam run
// that the CPU kernels use. Every worker computes the same scalars redundantly and
// the vector work is split by rank, so the answer must not depend on the team: a
// mismatch means a missing barrier or a bad work split, the bugs a CUDA block (or
// the CPU's OpenMP team) would hit. Each thread team runs twice: as a host team
// (contiguous shares, the median by selection) and as a device-like team
// (rank-strided shares, the median by bitonic sort: the CUDA block's code paths).
// The AVX2 versions (affinity propagation's SIMD lanes of 32 bytes), serial and
// host teams, are compared too where the CPU has AVX2, and host teams with a
// worker that lags at every barrier (affinity propagation then goes on with worker
// 0 alone, which must change nothing).
//
// Covers the weighting solvers, affinity propagation (messages and labels; the
// noise drawn by rank 0 or passed in), its median, and the affinity maps split
// over threads.
// Built and run by tests/test_team_check.py: `team_check` is the fast sweep of the
// default suite, `team_check --full` the slow one. Add -fsanitize=thread to the
// compile line to look for data races (the only expected reports are the benign
// flag races: every writer writes the same value).
// run_wide below passes 32-byte lanes between inlined helpers (as csrc/cpu/ops_cpu.cpp).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "all.h"

using namespace selgroup;
using namespace selgroup::manipulation;

namespace {

// Host teams declare the SIMD width of their loops (csrc/team.h), which sends
// affinity propagation down its host path (iterate_rows); device-like teams do not.
template <bool Host, int VectorBytes>
struct VectorWidth {};
template <int VectorBytes>
struct VectorWidth<true, VectorBytes> {
  static constexpr int kVectorBytes = VectorBytes;
};

// `lagging`: worker 1 sleeps before every barrier, as a descheduled thread on a
// loaded machine would (affinity propagation's team then lets worker 0 finish alone).
template <bool Host, int VectorBytes = 16>
struct ThreadTeam : VectorWidth<Host, VectorBytes> {
  static constexpr bool kHost = Host;
  int worker;
  int workers;
  std::barrier<>* barrier;
  bool lagging;
  int rank() const { return worker; }
  int size() const { return workers; }
  void sync() const {
    if (lagging && worker == 1) std::this_thread::sleep_for(std::chrono::microseconds(300));
    barrier->arrive_and_wait();
  }
};
static_assert(Team<ThreadTeam<true>> && Team<ThreadTeam<false>>);

// The CPU backend's AVX2 version of the host teams (csrc/cpu/ops_cpu.cpp: SIMD
// lanes of 32 bytes, no FMA), where the compiler and the CPU have it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename Solver, typename Workers>
__attribute__((target("avx2"), optimize("fp-contract=off"), flatten)) void run_wide(const Solver& solver,
                                                                                     const Workers& team,
                                                                                     void* memory) {
  run_team(solver, team, memory);
}
const bool g_wide = __builtin_cpu_supports("avx2");
#else
template <typename Solver, typename Workers>
void run_wide(const Solver& solver, const Workers& team, void* memory) {
  run_team(solver, team, memory);
}
const bool g_wide = false;
#endif

// How a solver is run: serially (threads = 0) or by a team of threads, host-like or
// device-like, in 16- or 32-byte lanes (host teams), with a lagging worker or not.
struct Variant {
  int threads = 0;
  bool host = true;
  bool wide = false;
  bool lagging = false;
  std::string name() const {
    std::string text = threads == 0 ? "serial" : "threads=" + std::to_string(threads) + (host ? " host" : " strided");
    return text + (wide ? " avx2" : "") + (lagging ? " lagging" : "");
  }
};

template <bool Host, int VectorBytes, typename Solver>
void run_threads(const Solver& solver, const Variant& variant, void* memory) {
  std::barrier<> barrier(variant.threads);
  std::vector<std::thread> pool;
  for (int worker = 0; worker < variant.threads; ++worker)
    pool.emplace_back([&, worker] {
      const ThreadTeam<Host, VectorBytes> team{{}, worker, variant.threads, &barrier, variant.lagging};
      if (VectorBytes == 32)
        run_wide(solver, team, memory);
      else
        run_team(solver, team, memory);
    });
  for (std::thread& thread : pool) thread.join();
}

// Runs `solver` as `variant` says on a fresh workspace filled with a poison byte,
// aligned to a cache line as the CPU backend's; returns the workspace.
struct alignas(kCacheLineBytes) CacheLine {
  unsigned char bytes[kCacheLineBytes];
};
template <typename Solver>
std::vector<unsigned char> run(const Solver& solver, const Variant& variant) {
  std::vector<CacheLine> memory(workspace_bytes(solver) / sizeof(CacheLine) + 1);
  std::memset(memory.data(), 0x5a, memory.size() * sizeof(CacheLine));
  if (variant.threads == 0 && variant.wide)
    run_wide(solver, SoloTeam<32>{}, memory.data());
  else if (variant.threads == 0)
    run_team(solver, SerialTeam{}, memory.data());
  else if (!variant.host)
    run_threads<false, 16>(solver, variant, memory.data());
  else if (variant.wide)
    run_threads<true, 32>(solver, variant, memory.data());
  else
    run_threads<true, 16>(solver, variant, memory.data());
  const auto* bytes = reinterpret_cast<const unsigned char*>(memory.data());
  return std::vector<unsigned char>(bytes, bytes + workspace_bytes(solver));
}

struct Tally {
  int runs = 0, mismatches = 0;
  void check(bool same, const std::string& what) {
    ++runs;
    if (!same) {
      ++mismatches;
      std::printf("MISMATCH %s\n", what.c_str());
    }
  }
};

std::vector<int> g_threads;
int g_repeats = 1;

// Compares `output` (n values the solver writes) after every team run with the serial answer;
// `compare_scratch` extracts the bytes of the scratch that must agree too (e.g. final messages).
// `lagging` adds host teams with a lagging worker, whose runs `went_alone` must confirm.
template <typename Solver, typename Value, typename Scratch, typename WentAlone>
void check_solver(Tally& tally, const std::string& name, const Solver& solver, Value* output, int64_t n,
                  Scratch compare_scratch, bool lagging, WentAlone went_alone) {
  const std::vector<unsigned char> serial_ws = run(solver, Variant{});
  const std::vector<Value> serial(output, output + n);
  const std::vector<unsigned char> serial_scratch = compare_scratch(serial_ws);
  std::vector<Variant> variants;
  if (g_wide) variants.push_back({0, true, true, false});
  for (int threads : g_threads)
    for (int repeat = 0; repeat < g_repeats; ++repeat) {
      variants.push_back({threads, true, false, false});
      variants.push_back({threads, false, false, false});
      if (g_wide) variants.push_back({threads, true, true, false});
      if (lagging && repeat == 0) variants.push_back({threads, true, g_wide, true});
    }
  for (const Variant& variant : variants) {
    const std::vector<unsigned char> ws = run(solver, variant);
    const bool same =
        std::memcmp(serial.data(), output, n * sizeof(Value)) == 0 && compare_scratch(ws) == serial_scratch;
    tally.check(same && (!variant.lagging || went_alone(ws)), name + " " + variant.name());
  }
}
template <typename Solver, typename Value, typename Scratch>
void check_solver(Tally& tally, const std::string& name, const Solver& solver, Value* output, int64_t n,
                  Scratch compare_scratch) {
  check_solver(tally, name, solver, output, n, compare_scratch, false,
               [](const std::vector<unsigned char>&) { return true; });
}

const auto kNoScratch = [](const std::vector<unsigned char>&) { return std::vector<unsigned char>(); };

void check_weightings(Tally& tally, std::mt19937& generator, const std::vector<int>& sizes) {
  std::normal_distribution<double> normal;
  for (int K : sizes) {
    // Cases: full rank, full rank, NaN in G, singular G (fewer columns than tasks).
    for (int problem = 0; problem < 4; ++problem) {
      const int P = problem == 3 ? K / 2 + 1 : 2 * K + 3;
      std::vector<double> J(K * P), G(K * K), weights(K), alpha(K, 1.0);
      std::vector<int64_t> order(K * K);
      for (double& x : J) x = normal(generator);
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j) order[i * K + j] = j;
        std::shuffle(order.begin() + i * K, order.begin() + (i + 1) * K, generator);
        for (int j = 0; j < K; ++j) {
          double sum = 0.0;
          for (int p = 0; p < P; ++p) sum += J[i * P + p] * J[j * P + p];
          G[i * K + j] = sum;
        }
      }
      if (problem == 2) G[1] = G[K] = NAN;
      const std::string suffix = " K=" + std::to_string(K) + " problem=" + std::to_string(problem);
      double* w = weights.data();
      check_solver(tally, "pcgrad" + suffix, PCGradWeights<double>{G.data(), order.data(), w, K}, w, K, kNoScratch);
      check_solver(tally, "mgda" + suffix, MGDAWeights<double>{G.data(), w, K, 250, 0.0}, w, K, kNoScratch);
      check_solver(tally, "cagrad" + suffix, CAGradWeights<double>{G.data(), w, K, 0.4, 1, 1000, 1e-10}, w, K,
                   kNoScratch);
      check_solver(tally, "imtl" + suffix, IMTLWeights<double>{G.data(), w, K}, w, K, kNoScratch);
      for (const AlignedScale scale : {AlignedScale::kMedian, AlignedScale::kRmse})
        check_solver(tally, "aligned_mtl scale=" + std::to_string(static_cast<int>(scale)) + suffix,
                     AlignedMTLWeights<double>{G.data(), w, K, scale}, w, K, kNoScratch);
      check_solver(tally, "aligned_mtl" + suffix, AlignedMTLWeights<double>{G.data(), w, K}, w, K, kNoScratch);
      // A rotation log of K − 1 (eigh.h): the eigensolver flushes it into Zᵀ every sweep or two; same weights.
      const std::vector<double> logged(w, w + K);
      check_solver(tally, "aligned_mtl flushed" + suffix,
                   AlignedMTLWeights<double>{G.data(), w, K, AlignedScale::kMin, 3}, w, K, kNoScratch);
      double gap = 0.0, size = 0.0;
      for (int k = 0; k < K; ++k) {
        gap = std::max(gap, std::fabs(w[k] - logged[k]));
        size = std::max(size, std::fabs(logged[k]));
      }
      tally.check(problem == 2 ? std::isnan(w[0]) : gap <= 1e-10 * std::max(size, 1.0),
                  "aligned_mtl flushed = logged" + suffix);
      // UPGrad's K projections (rows e_k/K), each worker its own rows and scratch slot (slots = 32 ≥ any team).
      std::vector<double> rows(K * K, 0.0), projections(K * K);
      for (int k = 0; k < K; ++k) rows[k * K + k] = 1.0 / K;
      for (const double reg_eps : {1e-4, 0.0})
        check_solver(tally, "dual_cone reg=" + std::to_string(reg_eps) + suffix,
                     DualConeProjection<double>{G.data(), rows.data(), projections.data(), K, K, 1e-4, reg_eps, 32},
                     projections.data(), K * K, kNoScratch);
      check_solver(tally, "nash_mtl" + suffix, NashMTLWeights<double>{{G.data(), alpha.data(), w, K, 50, 1e-16, 1.0}}, w,
                   K, kNoScratch);
      const std::vector<double> taus(K, 0.3);
      check_solver(tally, "pcd" + suffix, PCDWeights<double>{G.data(), alpha.data(), taus.data(), w, K}, w, K,
                   kNoScratch);
      check_solver(tally, "config" + suffix, ConFIGWeights<double>{G.data(), alpha.data(), w, K}, w, K, kNoScratch);
      check_solver(tally, "fairgrad" + suffix, FairGradWeights<double>{G.data(), nullptr, w, K, 50, 1e-16, 2.0}, w,
                   K, kNoScratch);
    }
  }
}

// Affinity propagation on points in blobs (and with rounded, tie-heavy similarities),
// float64 and float32, median or given preference, noise drawn in the team or passed in.
template <typename T>
void check_affinity_propagation(Tally& tally, std::mt19937& generator, const std::vector<int>& sizes) {
  std::normal_distribution<double> normal;
  std::vector<double> noise(sizes.empty() ? 0 : *std::max_element(sizes.begin(), sizes.end()) *
                                                    *std::max_element(sizes.begin(), sizes.end()));
  draw_tie_breaking_noise(noise.data(), static_cast<int64_t>(noise.size()));
  for (int K : sizes) {
    for (int problem = 0; problem < 3; ++problem) {
      std::vector<double> x(K), y(K);
      for (int i = 0; i < K; ++i) {
        const int blob = i % 4;
        x[i] = 4.0 * blob + normal(generator);
        y[i] = 3.0 * (blob % 2) + normal(generator);
      }
      std::vector<T> S(K * K);
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const double d = -((x[i] - x[j]) * (x[i] - x[j]) + (y[i] - y[j]) * (y[i] - y[j]));
          S[i * K + j] = static_cast<T>(problem == 2 ? std::round(d) : d);
        }
      std::vector<int64_t> labels(K);
      for (bool passed_noise : {false, true}) {
        const AffinityPropagation<T> solver{S.data(), labels.data(), K, problem == 1, T(-30), T(0.5), 200, 15,
                                            passed_noise ? noise.data() : nullptr};
        // The final messages (A and R), not only the labels, must agree bit for bit.
        const auto messages = [&](const std::vector<unsigned char>& ws) {
          WorkspaceLayout layout(const_cast<unsigned char*>(ws.data()));
          const auto scratch = solver.carve(layout);
          const auto* begin = reinterpret_cast<const unsigned char*>(scratch.messages);
          return std::vector<unsigned char>(begin, begin + 2 * K * K * sizeof(T));
        };
        // A lagging worker must have made worker 0 go on alone (the team's flag in the
        // scratch), where there was a message loop (not K = 2: all off-diagonal equal).
        const auto went_alone = [&](const std::vector<unsigned char>& ws) {
          WorkspaceLayout layout(const_cast<unsigned char*>(ws.data()));
          const auto scratch = solver.carve(layout);
          return scratch.misc[kAlone] == 1 || scratch.misc[kUnequal] == 0;
        };
        check_solver(tally,
                     std::string("affinity_propagation<") + (sizeof(T) == 8 ? "double" : "float") +
                         "> K=" + std::to_string(K) + " problem=" + std::to_string(problem) +
                         (passed_noise ? " noise passed" : " noise drawn"),
                     solver, labels.data(), K, messages, true, went_alone);
      }
    }
  }
}

// The median of host teams (the radix selection's first round split over the team
// where the scratch has room) against the serial team's and numpy.median's
// definition (std::nth_element): counts around the split's threshold, odd and even,
// spread and clustered values, with ties.
template <typename T>
void check_median(Tally& tally, std::mt19937& generator, const std::vector<int>& counts) {
  std::normal_distribution<double> normal;
  for (int count : counts)
    for (int shape = 0; shape < 3; ++shape) {
      std::vector<T> values(count);
      for (T& v : values) {
        const double x = normal(generator);
        v = static_cast<T>(shape == 0 ? x : shape == 1 ? -8.0 - 0.01 * std::fabs(x) : std::round(4.0 * x));
      }
      std::vector<T> sorted = values;
      std::sort(sorted.begin(), sorted.end());
      const T expected = count % 2 == 1 ? sorted[count / 2] : (sorted[count / 2 - 1] + sorted[count / 2]) / T(2);
      std::vector<T> scratch(2 * count + 64);
      T result;
      const T serial = team_median(SerialTeam{}, values.data(), count, scratch.data(), &result);
      const std::string name = std::string("median<") + (sizeof(T) == 8 ? "double" : "float") +
                               "> count=" + std::to_string(count) + " shape=" + std::to_string(shape);
      tally.check(serial == expected, name + " serial");
      for (int threads : g_threads) {
        std::barrier<> barrier(threads);
        std::vector<T> answers(threads);
        std::vector<std::thread> pool;
        for (int worker = 0; worker < threads; ++worker)
          pool.emplace_back([&, worker] {
            const ThreadTeam<true> team{{}, worker, threads, &barrier, false};
            answers[worker] = team_median(team, values.data(), count, scratch.data(), &result);
          });
        for (std::thread& thread : pool) thread.join();
        bool same = true;
        for (T answer : answers) same = same && answer == serial;
        tally.check(same, name + " threads=" + std::to_string(threads));
      }
    }
}

// The maps split over threads (each index written once, so any split gives the same answer).
template <typename Map, typename Value>
void check_map(Tally& tally, const std::string& name, const Map& map, Value* output, int64_t n,
               const std::vector<Value>& initial) {
  std::copy(initial.begin(), initial.end(), output);
  map(map.prepare(), 0, map.count());
  const std::vector<Value> serial(output, output + n);
  for (int threads : g_threads) {
    std::copy(initial.begin(), initial.end(), output);
    std::vector<std::thread> pool;
    const int64_t share = (map.count() + threads - 1) / threads;
    for (int worker = 0; worker < threads; ++worker)
      pool.emplace_back([&, worker] {
        const int64_t begin = std::min(map.count(), worker * share), end = std::min(map.count(), begin + share);
        map(map.prepare(), begin, end);
      });
    for (std::thread& thread : pool) thread.join();
    tally.check(std::memcmp(serial.data(), output, n * sizeof(Value)) == 0,
                name + " threads=" + std::to_string(threads));
  }
}

void check_maps(Tally& tally, std::mt19937& generator, const std::vector<int>& sizes) {
  std::normal_distribution<double> normal;
  for (int K : sizes) {
    std::vector<double> affinity(K * K), before(K), after(K), similarity(K * K);
    for (double& a : affinity) a = 0.1 * normal(generator);
    for (int k = 0; k < K; ++k) {
      before[k] = 1.0 + std::fabs(normal(generator));
      after[k] = before[k] * (1.0 + 0.3 * normal(generator));
    }
    std::unique_ptr<bool[]> mask(new bool[K]);
    for (int k = 0; k < K; ++k) mask[k] = k % 3 != 1;
    std::vector<double> updated(K * K);
    check_map(tally, "affinity_update_ K=" + std::to_string(K),
              AffinityUpdate<double>{updated.data(), K, 1, before.data(), after.data(), mask.get(), K, 0.1},
              updated.data(), K * K, affinity);
    check_map(tally, "group_similarity K=" + std::to_string(K),
              GroupSimilarity<double>{affinity.data(), K, 1, K, similarity.data()}, similarity.data(), K * K,
              similarity);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "--full";
  std::mt19937 generator(3);
  Tally tally;
  g_threads = full ? std::vector<int>{2, 3, 7, 32} : std::vector<int>{2, 5};
  g_repeats = full ? 2 : 1;
  check_weightings(tally, generator, full ? std::vector<int>{2, 3, 5, 8, 13, 16} : std::vector<int>{3, 8});
  const std::vector<int> propagation_sizes =
      full ? std::vector<int>{1, 2, 3, 5, 8, 13, 16, 33, 64, 130, 260, 520} : std::vector<int>{1, 3, 13, 40, 130};
  check_affinity_propagation<double>(tally, generator, propagation_sizes);
  check_affinity_propagation<float>(tally, generator, propagation_sizes);
  const std::vector<int> median_counts =
      full ? std::vector<int>{101, 8300, 16901, 20000, 41000, 70000} : std::vector<int>{8300, 16901, 41000};
  check_median<float>(tally, generator, median_counts);
  check_median<double>(tally, generator, median_counts);
  check_maps(tally, generator, full ? std::vector<int>{1, 5, 17, 64} : std::vector<int>{5, 17});
  std::printf("%d team runs, %d mismatches\n", tally.runs, tally.mismatches);
  return tally.mismatches == 0 && tally.runs > 0 ? 0 : 1;
}
