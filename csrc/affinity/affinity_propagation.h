// Affinity propagation (Frey & Dueck 2007) on a precomputed K×K similarity, step
// for step as scikit-learn's `_affinity_propagation` (sklearn/cluster/
// _affinity_propagation.py, 1.x; the rules: docs/algorithm.md §Affinity
// propagation), written once as a team solver (team.h, workspace.h): the CPU runs
// it with SerialTeam (OpenMP threads from K = 1024), the CUDA kernel with the
// threads of one block, so the whole iteration loop is one launch with no host sync.
//
// Differences from scikit-learn, all deliberate:
// * none in the tie-breaking noise: scikit-learn adds (eps·S + 100·tiny)·N(0, 1)
//   drawn from NumPy's RandomState(0); we regenerate that very stream (MT19937 and
//   NumPy's legacy polar method, below), on the host and on the device alike. This
//   matters: with the default preference (the median) on a symmetric S of odd K,
//   the preference equals an off-diagonal similarity exactly, and the noise picks
//   the answer. What remains different is the order of floating-point sums (the
//   column sums; NumPy sums pairwise), so results can differ only when two message
//   values tie to within rounding;
// * the convergence test keeps, per sample, the length of the current run of its
//   exemplar flag instead of the last `convergence_iter` flags; "the flag was
//   constant over the last convergence_iter iterations" is the same condition;
// * labels are numbered 0..M-1 by first appearance (scikit-learn sorts them by
//   exemplar index); the partition is the same;
// * a similarity with a non-finite entry yields all −1 (csrc/bindings.h raises
//   before calling on the CPU, where the check needs no sync).
//
// Speed (benchmarks/results/affinity_propagation_large_k.md): the message updates walk rows of contiguous
// memory in branch-free loops the compiler vectorises, the availabilities'
// column sums are accumulated row by row (the same additions in the same order
// as a column walk), the median is a selection on host teams, and the CPU
// bindings pass the tie-breaking noise in from a cache. Each element's arithmetic
// is the same whatever the team, so every team gives the same labels bit for bit
// (tests/team_check.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../workspace.h"
#include "affinity_update.h"

namespace selgroup {

// Machine epsilon and smallest normal number, as numpy.finfo gives them.
template <typename T>
struct FloatLimits;
template <>
struct FloatLimits<float> {
  static constexpr float eps = 1.1920928955078125e-07f;
  static constexpr float tiny = 1.1754943508222875e-38f;
};
template <>
struct FloatLimits<double> {
  static constexpr double eps = 2.220446049250313e-16;
  static constexpr double tiny = 2.2250738585072014e-308;
};

// NumPy's legacy normal stream, RandomState(seed).standard_normal(): the MT19937
// generator (init_genrand seeding) and the polar Box-Muller method of
// numpy/random/src/legacy/legacy-distributions.c, which scikit-learn draws its
// tie-breaking noise from (random_state=0). Sequential by nature; one worker runs it.
constexpr int kMtStateWords = 624;

struct LegacyNormalStream {
  uint32_t* key;  // kMtStateWords words of state
  int position;
  bool has_spare;
  double spare;

  SELGROUP_HD LegacyNormalStream(uint32_t* state, uint32_t seed) : key(state), position(kMtStateWords),
                                                                    has_spare(false), spare(0.0) {
    key[0] = seed;
    for (int i = 1; i < kMtStateWords; ++i) key[i] = 1812433253u * (key[i - 1] ^ (key[i - 1] >> 30)) + i;
  }

  SELGROUP_HD void twist() {
    constexpr int kShift = 397;
    constexpr uint32_t kMatrix = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;
    for (int i = 0; i < kMtStateWords; ++i) {
      const uint32_t y = (key[i] & kUpper) | (key[(i + 1) % kMtStateWords] & kLower);
      key[i] = key[(i + kShift) % kMtStateWords] ^ (y >> 1) ^ ((y & 1u) ? kMatrix : 0u);
    }
    position = 0;
  }

  SELGROUP_HD uint32_t next32() {
    if (position == kMtStateWords) twist();
    uint32_t y = key[position++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
  }

  SELGROUP_HD double next_double() {
    const uint32_t high = next32() >> 5, low = next32() >> 6;
    return (high * 67108864.0 + low) / 9007199254740992.0;
  }

  SELGROUP_HD double next_normal() {
    if (has_spare) {
      has_spare = false;
      return spare;
    }
    double x1, x2, r2;
    do {
      x1 = 2.0 * next_double() - 1.0;
      x2 = 2.0 * next_double() - 1.0;
      r2 = x1 * x1 + x2 * x2;
    } while (r2 >= 1.0 || r2 == 0.0);
    const double factor = sqrt(-2.0 * log(r2) / r2);
    spare = factor * x1;
    has_spare = true;
    return factor * x2;
  }
};

// NaN-free max reductions the compiler may vectorise (max is exact in any order).
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define SELGROUP_SIMD_MAX(variable)
#else
#define SELGROUP_PRAGMA(text) _Pragma(#text)
#define SELGROUP_SIMD_MAX(variable) SELGROUP_PRAGMA(omp simd reduction(max : variable))
#endif

// In-place ascending bitonic sort of `values[0, padded)`, padded a power of two.
template <Team Workers, typename T>
SELGROUP_HD void team_bitonic_sort(const Workers& team, T* values, int64_t padded) {
  for (int64_t block = 2; block <= padded; block <<= 1) {
    for (int64_t stride = block >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = team.rank(); i < padded; i += team.size()) {
        const int64_t partner = i ^ stride;
        if (partner <= i) continue;
        const bool ascending = (i & block) == 0;
        if ((values[i] > values[partner]) == ascending) {
          const T swap = values[i];
          values[i] = values[partner];
          values[partner] = swap;
        }
      }
      team.sync();
    }
  }
}

// numpy.median of the `count` entries of `values`, using `scratch` (room for the
// next power of two ≥ count values) and the one-slot `result`. Every rank returns
// it. Host teams select (std::nth_element on rank 0, O(count)); device teams sort
// (bitonic, every thread busy). The median is an entry (or the mean of two
// entries) either way, so both give the same value bit for bit.
template <Team Workers, typename T>
SELGROUP_HD T team_median(const Workers& team, const T* values, int64_t count, T* scratch, T* result) {
  const int64_t upper = count / 2;
  if constexpr (Workers::kHost) {
    if (team.rank() == 0) {
      std::copy(values, values + count, scratch);
      std::nth_element(scratch, scratch + upper, scratch + count);
      const T middle = scratch[upper];
      *result = count % 2 == 1 ? middle : (*std::max_element(scratch, scratch + upper) + middle) / T(2);
    }
  } else {
    int64_t padded = 1;
    while (padded < count) padded <<= 1;
    const T infinity = T(1) / T(0);
    for (int64_t i = team.rank(); i < padded; i += team.size()) scratch[i] = i < count ? values[i] : infinity;
    team.sync();
    team_bitonic_sort(team, scratch, padded);
    if (team.rank() == 0) *result = count % 2 == 1 ? scratch[upper] : (scratch[upper - 1] + scratch[upper]) / T(2);
  }
  team.sync();
  return *result;
}

// The exemplar slot k (0..num_exemplars-1) whose exemplar is most similar to `sample`
// (first on ties, as numpy.argmax).
template <typename T>
SELGROUP_HD_INLINE int nearest_exemplar(const T* similarity, int64_t num_samples, const int* exemplars,
                                        int num_exemplars, int64_t sample) {
  int best = 0;
  for (int k = 1; k < num_exemplars; ++k) {
    if (similarity[sample * num_samples + exemplars[k]] > similarity[sample * num_samples + exemplars[best]]) best = k;
  }
  return best;
}

// Assigns every sample to its nearest exemplar, each exemplar to itself.
template <Team Workers, typename T>
SELGROUP_HD void team_assign_clusters(const Workers& team, const T* similarity, int64_t num_samples,
                                      const int* exemplars, int num_exemplars, int* cluster) {
  for (int64_t i = team.rank(); i < num_samples; i += team.size())
    cluster[i] = nearest_exemplar(similarity, num_samples, exemplars, num_exemplars, i);
  team.sync();
  for (int64_t k = team.rank(); k < num_exemplars; k += team.size()) cluster[exemplars[k]] = static_cast<int>(k);
  team.sync();
}

// Labels numbered 0..M-1 by first appearance of each cluster (rank 0 writes them).
template <Team Workers>
SELGROUP_HD void team_write_labels(const Workers& team, const int* cluster, int64_t num_samples, int num_clusters,
                                   int* label_of_cluster, int64_t* labels) {
  if (team.rank() == 0) {
    for (int k = 0; k < num_clusters; ++k) label_of_cluster[k] = -1;
    int next_label = 0;
    for (int64_t i = 0; i < num_samples; ++i) {
      int& label = label_of_cluster[cluster[i]];
      if (label < 0) label = next_label++;
      labels[i] = label;
    }
  }
  team.sync();
}

// Calls off(k) for the k ≠ diagonal in [begin, end) and on(diagonal) if it is in
// range: two branch-free runs, so the compiler vectorises each.
template <typename Off, typename On>
SELGROUP_HD_INLINE void split_at_diagonal(int64_t begin, int64_t end, int64_t diagonal, Off&& off, On&& on) {
  const int64_t middle = diagonal < begin ? begin : (diagonal > end ? end : diagonal);
  for (int64_t k = begin; k < middle; ++k) off(k);
  if (middle == diagonal && diagonal < end) on(diagonal);
  for (int64_t k = middle == diagonal ? diagonal + 1 : middle; k < end; ++k) off(k);
}

// max(x, 0) and its twin that keeps a −0 (the two clips of the availability rule,
// each as it was first written, so that even zeros keep their sign).
template <typename T>
SELGROUP_HD_INLINE T positive_part(T x) {
  return x > T(0) ? x : T(0);
}
template <typename T>
SELGROUP_HD_INLINE T clip_below_zero(T x) {
  return x < T(0) ? T(0) : x;
}

// Indices of the team-wide integers of the workspace.
enum MiscSlot : int { kNonFinite = 0, kUnequal = 1, kNumExemplars = 2, kMiscInts = 3 };

// The whole algorithm as a team solver (csrc/workspace.h). `input` is the K×K
// similarity (row-major, contiguous, read only); `preference` is used when
// `has_preference`, else the median of `input`. `noise` holds the K² standard
// normals of RandomState(0), or is null: rank 0 then draws them (the CUDA kernel;
// the CPU bindings pass a cached copy). Writes K labels (int64): 0..M-1 by first
// appearance, or all −1 when no exemplar emerged or `input` has a non-finite entry.
template <typename T>
struct AffinityPropagation {
  const T* input;
  int64_t* labels;
  int64_t K;
  bool has_preference;
  T preference;
  T damping;
  int64_t max_iter;
  int64_t convergence_iter;
  const double* noise;

  // Host teams split the O(K²) message updates by rows and columns. Each iteration
  // costs four barriers, and a barrier whose threads are descheduled (a loaded or
  // oversubscribed machine) costs a scheduler time slice: with 128 samples per
  // worker, 2 threads ran K = 256 about 15× slower than 1 thread on the loaded 2-core
  // development machine (benchmarks/results/affinity_propagation_large_k.md). So a
  // worker needs 512 samples (≈ 0.1–1 ms of work per barrier): the CPU team starts
  // at K = 1024.
  static constexpr int64_t kSamplesPerWorker = 512;
  SELGROUP_HD_INLINE int64_t parallelism() const { return K / kSamplesPerWorker; }

  struct Scratch {
    T* similarity;  // K×K, the preference on the diagonal, noise added
    T* messages;    // 2·K×K: A then R; before they start, the median's scratch (≥ the power of two ≥ K²)
    T* column_sum;  // K, the availabilities' positive column sums
    T* median;      // 1
    int* is_exemplar;  // K, the exemplar flag of the latest iteration
    int* run_length;   // K, iterations the flag has kept its value; later the label map
    int* exemplars;    // K, indices of the exemplars (first num_exemplars used)
    int* cluster;      // K, each sample's exemplar slot
    int* misc;         // kMiscInts
    uint32_t* generator_state;  // kMtStateWords when the noise is drawn here
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<T>(K * K),  layout.take<T>(2 * K * K), layout.take<T>(K),   layout.take<T>(1),
            layout.take<int>(K),    layout.take<int>(K),       layout.take<int>(K), layout.take<int>(K),
            layout.take<int>(kMiscInts), layout.take<uint32_t>(noise == nullptr ? kMtStateWords : 0)};
  }

  // The "uniform" answer (all −1, or the special cases) on every rank, then return.
  template <Team Workers, typename Label>
  SELGROUP_HD void write_labels(const Workers& team, Label label) const {
    for (int64_t i = team.rank(); i < K; i += team.size()) labels[i] = label(i);
    team.sync();
  }

  template <Team Workers>
  SELGROUP_HD void operator()(const Workers& team, const Scratch& ws) const {
    const int64_t squared = K * K;
    // Non-finite similarities: no clustering (all −1).
    if (team.rank() == 0) ws.misc[kNonFinite] = ws.misc[kUnequal] = 0;
    team.sync();
    team_split(team, K, [&](int64_t begin, int64_t end) {
      bool non_finite = false, unequal = false;
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < K; ++j) {
          const T value = input[i * K + j];
          non_finite |= !is_finite(value);
          unequal |= i != j && value != input[1];
        }
      // Benign race: every writer writes the same 1.
      if (non_finite) ws.misc[kNonFinite] = 1;
      if (unequal) ws.misc[kUnequal] = 1;
    });
    team.sync();
    if (ws.misc[kNonFinite]) return write_labels(team, [](int64_t) { return int64_t(-1); });

    const T self = has_preference ? preference : team_median(team, input, squared, ws.messages, ws.median);

    // scikit-learn's special case: one sample, or all off-diagonal similarities equal
    // (the preference is a scalar, so "all preferences equal" holds): every sample
    // its own cluster if the preference beats the similarity S.flat[K-1], else one cluster.
    if (K == 1 || !ws.misc[kUnequal]) {
      const bool own_clusters = self > input[K - 1];
      return write_labels(team, [&](int64_t i) { return own_clusters ? i : int64_t(0); });
    }

    // The preference on the diagonal, then scikit-learn's tie-breaking noise
    // (eps·S + 100·tiny)·N(0, 1) with N drawn, in row-major order, from the stream of
    // RandomState(0); messages start at zero.
    if (noise == nullptr && team.rank() == 0) {
      LegacyNormalStream normals(ws.generator_state, 0u);
      for (int64_t e = 0; e < squared; ++e) ws.similarity[e] = static_cast<T>(normals.next_normal());
    }
    team.sync();
    T* S = ws.similarity;
    T* A = ws.messages;
    T* R = ws.messages + squared;
    team_split(team, K, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t e = i * K + j;
          const T value = i == j ? self : input[e];
          const T scale = FloatLimits<T>::eps * value + FloatLimits<T>::tiny * T(100);
          S[e] = value + scale * (noise != nullptr ? static_cast<T>(noise[e]) : S[e]);
          A[e] = R[e] = T(0);
        }
    });
    team.sync();

    const T keep = damping, take = T(1) - damping;
    for (int64_t it = 0; it < max_iter; ++it) {
      // Responsibilities, by rows: R ← d·R + (1−d)·(S − max_{k'≠k}(A + S)). The max
      // and the runner-up are reductions; their first positions (numpy.argmax's
      // tie rule) are then found by a scan, and their values read back from the
      // row, so that even the sign of a zero is the one a sequential scan keeps.
      team_split(team, K, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const T* __restrict__ s_row = S + i * K;
          const T* __restrict__ a_row = A + i * K;
          T* __restrict__ r_row = R + i * K;
          T first = -T(1) / T(0);
          SELGROUP_SIMD_MAX(first)
          for (int64_t k = 0; k < K; ++k) first = first > a_row[k] + s_row[k] ? first : a_row[k] + s_row[k];
          int64_t best = 0;
          while (best < K - 1 && !(a_row[best] + s_row[best] == first)) ++best;
          first = a_row[best] + s_row[best];
          T second = -T(1) / T(0);
          SELGROUP_SIMD_MAX(second)
          for (int64_t k = 0; k < best; ++k) second = second > a_row[k] + s_row[k] ? second : a_row[k] + s_row[k];
          SELGROUP_SIMD_MAX(second)
          for (int64_t k = best + 1; k < K; ++k) second = second > a_row[k] + s_row[k] ? second : a_row[k] + s_row[k];
          for (int64_t k = 0; k < K; ++k)
            if (k != best && a_row[k] + s_row[k] == second) {
              second = a_row[k] + s_row[k];
              break;
            }
          split_at_diagonal(
              0, K, best, [&](int64_t k) { r_row[k] = r_row[k] * keep + (s_row[k] - first) * take; },
              [&](int64_t k) { r_row[k] = r_row[k] * keep + (s_row[k] - second) * take; });
        }
      });
      team.sync();
      // Availabilities, by columns:
      // A[i,k] ← d·A + (1−d)·min(0, R[k,k] + Σ_{i'∉{i,k}} max(0, R[i',k])), A[k,k] ← … Σ_{i'≠k} max(0, R[i',k]).
      // The column sums run down the rows (i = 0, 1, ...) over this worker's columns.
      team_split(team, K, [&](int64_t begin, int64_t end) {
        T* __restrict__ column_sum = ws.column_sum;
        for (int64_t k = begin; k < end; ++k) column_sum[k] = T(0);
        for (int64_t i = 0; i < K; ++i) {
          const T* __restrict__ r_row = R + i * K;
          split_at_diagonal(
              begin, end, i, [&](int64_t k) { column_sum[k] += positive_part(r_row[k]); },
              [&](int64_t k) { column_sum[k] += r_row[k]; });
        }
        for (int64_t i = 0; i < K; ++i) {
          const T* __restrict__ r_row = R + i * K;
          T* __restrict__ a_row = A + i * K;
          // −A_new before clipping, then the damped update.
          split_at_diagonal(
              begin, end, i,
              [&](int64_t k) {
                a_row[k] = a_row[k] * keep - clip_below_zero(positive_part(r_row[k]) - column_sum[k]) * take;
              },
              [&](int64_t k) { a_row[k] = a_row[k] * keep - (r_row[k] - column_sum[k]) * take; });
        }
      });
      team.sync();
      // Exemplar flags and how long each has been constant.
      for (int64_t i = team.rank(); i < K; i += team.size()) {
        const int flag = (A[i * K + i] + R[i * K + i]) > T(0) ? 1 : 0;
        ws.run_length[i] = (it > 0 && flag == ws.is_exemplar[i]) ? ws.run_length[i] + 1 : 1;
        ws.is_exemplar[i] = flag;
      }
      team.sync();
      // Every rank takes the same decision from the same shared flags.
      if (it >= convergence_iter) {
        bool stable = true, any_exemplar = false;
        for (int64_t i = 0; i < K; ++i) {
          stable = stable && ws.run_length[i] >= convergence_iter;
          any_exemplar = any_exemplar || ws.is_exemplar[i];
        }
        if (stable && any_exemplar) break;
      }
    }

    // The exemplars of the last iteration (converged or not, as scikit-learn).
    if (team.rank() == 0) {
      int count = 0;
      for (int64_t i = 0; i < K; ++i)
        if (ws.is_exemplar[i]) ws.exemplars[count++] = static_cast<int>(i);
      ws.misc[kNumExemplars] = count;
    }
    team.sync();
    const int num_exemplars = ws.misc[kNumExemplars];
    if (num_exemplars == 0) return write_labels(team, [](int64_t) { return int64_t(-1); });

    // Refinement: each cluster's exemplar becomes the member with the largest summed
    // similarity from the other members; then every sample joins its nearest exemplar.
    team_assign_clusters(team, S, K, ws.exemplars, num_exemplars, ws.cluster);
    for (int64_t k = team.rank(); k < num_exemplars; k += team.size()) {
      int best = -1;
      T best_sum = T(0);
      for (int64_t j = 0; j < K; ++j) {
        if (ws.cluster[j] != k) continue;
        T sum = T(0);
        for (int64_t i = 0; i < K; ++i)
          if (ws.cluster[i] == k) sum += S[i * K + j];
        if (best < 0 || sum > best_sum) {
          best = static_cast<int>(j);
          best_sum = sum;
        }
      }
      ws.exemplars[k] = best;  // only the cluster map is read in this pass
    }
    team.sync();
    team_assign_clusters(team, S, K, ws.exemplars, num_exemplars, ws.cluster);
    team_write_labels(team, ws.cluster, K, num_exemplars, ws.run_length, labels);
  }
};

// The K² standard normals of NumPy's RandomState(0), in row-major order: what
// AffinityPropagation::noise holds when the caller supplies it.
inline void draw_tie_breaking_noise(double* normals, int64_t count) {
  uint32_t state[kMtStateWords];
  LegacyNormalStream stream(state, 0u);
  for (int64_t e = 0; e < count; ++e) normals[e] = stream.next_normal();
}

}  // namespace selgroup
