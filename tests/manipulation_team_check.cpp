// The team algorithms of csrc/manipulation with N CPU threads as the team
// (std::barrier standing in for __syncthreads), compared bitwise with the
// SerialTeam run that the CPU kernels use. Every worker computes the same scalars
// redundantly and the vector work is split by rank, so the answer must not depend
// on the team size: a mismatch means a missing barrier or a bad work split, the
// bugs a CUDA block would hit. Built and run by tests/test_ops_manipulation.py
// (slow); add -fsanitize=thread to the compile line to look for data races (the
// only expected report is load_gram's benign flag race: every writer writes 0).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "manipulation/all.h"

using namespace selgroup;
using namespace selgroup::manipulation;

namespace {

struct ThreadTeam {
  int worker;
  int workers;
  std::barrier<>* barrier;
  int rank() const { return worker; }
  int size() const { return workers; }
  void sync() const { barrier->arrive_and_wait(); }
};

// The solver's weights with `threads` workers (0: SerialTeam).
template <typename Solver>
std::vector<double> solve(const Solver& solver, int threads) {
  std::vector<double> workspace(Solver::workspace_doubles(solver.K), -1.0);
  if (threads == 0) {
    solver(SerialTeam{}, workspace.data());
  } else {
    std::barrier<> barrier(threads);
    std::vector<std::thread> pool;
    for (int worker = 0; worker < threads; ++worker)
      pool.emplace_back([&, worker] { solver(ThreadTeam{worker, threads, &barrier}, workspace.data()); });
    for (std::thread& thread : pool) thread.join();
  }
  return std::vector<double>(solver.weights, solver.weights + solver.K);
}

}  // namespace

int main() {
  std::mt19937 generator(3);
  std::normal_distribution<double> normal;
  int mismatches = 0, runs = 0;
  for (int K : {2, 3, 5, 8, 13, 16}) {
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
      auto check = [&](const char* name, const auto& solver) {
        const std::vector<double> serial = solve(solver, 0);
        for (int threads : {2, 3, 7, 32}) {
          for (int repeat = 0; repeat < 2; ++repeat) {
            const std::vector<double> team = solve(solver, threads);
            ++runs;
            if (std::memcmp(serial.data(), team.data(), K * sizeof(double)) != 0) {
              ++mismatches;
              std::printf("MISMATCH %s K=%d problem=%d threads=%d: w0 %.17g vs %.17g\n", name, K, problem, threads,
                          serial[0], team[0]);
            }
          }
        }
      };
      check("pcgrad", PCGradWeights<double>{G.data(), order.data(), weights.data(), K});
      check("mgda", MGDAWeights<double>{G.data(), weights.data(), K, 250, 1e-5});
      check("cagrad", CAGradWeights<double>{G.data(), weights.data(), K, 0.4, 1, 1000, 1e-10});
      check("imtl", IMTLWeights<double>{G.data(), weights.data(), K});
      check("aligned_mtl", AlignedMTLWeights<double>{G.data(), weights.data(), K});
      check("nash_mtl", NashMTLWeights<double>{G.data(), alpha.data(), weights.data(), K, 50, 1e-16});
    }
  }
  std::printf("%d team runs, %d mismatches\n", runs, mismatches);
  return mismatches == 0 ? 0 : 1;
}
