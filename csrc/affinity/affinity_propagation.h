// Affinity propagation (Frey & Dueck 2007) on a precomputed K×K similarity, step
// for step as scikit-learn's `_affinity_propagation` (sklearn/cluster/
// _affinity_propagation.py, 1.x), written once as a template over a team
// (team.h): the CPU runs it with SerialTeam, the CUDA kernel with the threads of
// one block, so the whole iteration loop is a single launch with no host sync.
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
// * a similarity with a non-finite entry yields all −1 (the bindings decide
//   whether to raise before calling, see csrc/cpu and csrc/cuda).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../team.h"
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

// The workspace of one run: 3·K² scalars (S with noise, A, R: A and R adjacent so
// that together they hold the ≥ K² power-of-two buffer of the median's sort),
// then 4·K + kMiscInts ints, then the generator's state. Aligned for either float type.
constexpr int64_t kMiscInts = 4;
enum MiscSlot : int { kNonFinite = 0, kUnequal = 1, kNumExemplars = 2 };

template <typename T>
SELGROUP_HD_INLINE size_t affinity_propagation_workspace_bytes(int64_t num_samples) {
  return static_cast<size_t>(3 * num_samples * num_samples) * sizeof(T) +
         static_cast<size_t>(4 * num_samples + kMiscInts) * sizeof(int) + kMtStateWords * sizeof(uint32_t);
}

template <typename T>
struct AffinityPropagationWorkspace {
  T* similarity;      // K×K, the preference on the diagonal, noise added
  T* availability;    // K×K, A
  T* responsibility;  // K×K, R (right after A)
  int* is_exemplar;   // K, the exemplar flag of the latest iteration
  int* run_length;    // K, iterations the flag has kept its value; later the label map
  int* exemplars;     // K, indices of the exemplars (first num_exemplars used)
  int* cluster;       // K, each sample's exemplar slot
  int* misc;          // kMiscInts
  uint32_t* generator_state;  // kMtStateWords

  SELGROUP_HD_INLINE AffinityPropagationWorkspace(void* base, int64_t num_samples) {
    const int64_t squared = num_samples * num_samples;
    similarity = static_cast<T*>(base);
    availability = similarity + squared;
    responsibility = availability + squared;
    is_exemplar = reinterpret_cast<int*>(responsibility + squared);
    run_length = is_exemplar + num_samples;
    exemplars = run_length + num_samples;
    cluster = exemplars + num_samples;
    misc = cluster + num_samples;
    generator_state = reinterpret_cast<uint32_t*>(misc + kMiscInts);
  }
};

// In-place ascending bitonic sort of `values[0, padded)`, padded a power of two.
template <typename Team, typename T>
SELGROUP_HD void team_bitonic_sort(const Team& team, T* values, int64_t padded) {
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

// numpy.median of the K² entries of `similarity` (row-major, contiguous), using
// `scratch` (room for the next power of two ≥ K² values). Every rank returns it.
template <typename Team, typename T>
SELGROUP_HD T team_median(const Team& team, const T* similarity, int64_t count, T* scratch) {
  int64_t padded = 1;
  while (padded < count) padded <<= 1;
  const T infinity = T(1) / T(0);
  for (int64_t i = team.rank(); i < padded; i += team.size()) scratch[i] = i < count ? similarity[i] : infinity;
  team.sync();
  team_bitonic_sort(team, scratch, padded);
  const T median = count % 2 == 1 ? scratch[count / 2] : (scratch[count / 2 - 1] + scratch[count / 2]) / T(2);
  team.sync();  // every rank has read the median before the scratch is reused
  return median;
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
template <typename Team, typename T>
SELGROUP_HD void team_assign_clusters(const Team& team, const T* similarity, int64_t num_samples,
                                      const int* exemplars, int num_exemplars, int* cluster) {
  for (int64_t i = team.rank(); i < num_samples; i += team.size())
    cluster[i] = nearest_exemplar(similarity, num_samples, exemplars, num_exemplars, i);
  team.sync();
  for (int64_t k = team.rank(); k < num_exemplars; k += team.size()) cluster[exemplars[k]] = static_cast<int>(k);
  team.sync();
}

// Labels numbered 0..M-1 by first appearance of each cluster (rank 0 writes them).
template <typename Team>
SELGROUP_HD void team_write_labels(const Team& team, const int* cluster, int64_t num_samples, int num_clusters,
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

// The whole algorithm. `input` is the K×K similarity (row-major, contiguous, read
// only); `preference` is used when `has_preference`, else the median of `input`.
// Writes K labels (int64): 0..M-1 by first appearance, or all −1 when no exemplar
// emerged or `input` has a non-finite entry.
template <typename Team, typename T>
SELGROUP_HD void team_affinity_propagation(const Team& team, const T* input, int64_t num_samples,
                                           bool has_preference, T preference, T damping, int64_t max_iter,
                                           int64_t convergence_iter, void* workspace_base, int64_t* labels) {
  AffinityPropagationWorkspace<T> ws(workspace_base, num_samples);
  const int64_t squared = num_samples * num_samples;

  // Non-finite similarities: no clustering (all −1).
  if (team.rank() == 0) {
    ws.misc[kNonFinite] = 0;
    ws.misc[kUnequal] = 0;
  }
  team.sync();
  for (int64_t e = team.rank(); e < squared; e += team.size()) {
    if (!is_finite(input[e])) ws.misc[kNonFinite] = 1;
    const int64_t row = e / num_samples, col = e % num_samples;
    if (row != col && input[e] != input[1]) ws.misc[kUnequal] = 1;
  }
  team.sync();
  if (ws.misc[kNonFinite]) {
    for (int64_t i = team.rank(); i < num_samples; i += team.size()) labels[i] = -1;
    team.sync();
    return;
  }

  if (!has_preference) preference = team_median(team, input, squared, ws.availability);

  // scikit-learn's special case: one sample, or all off-diagonal similarities equal
  // (the preference is a scalar, so "all preferences equal" holds): every sample
  // its own cluster if the preference beats the similarity S.flat[K-1], else one cluster.
  if (num_samples == 1 || !ws.misc[kUnequal]) {
    const bool own_clusters = preference > input[num_samples - 1];
    for (int64_t i = team.rank(); i < num_samples; i += team.size()) labels[i] = own_clusters ? i : 0;
    team.sync();
    return;
  }

  // The preference on the diagonal, then scikit-learn's tie-breaking noise
  // (eps·S + 100·tiny)·N(0, 1) with N drawn, in row-major order, from the stream of
  // RandomState(0); messages start at zero.
  if (team.rank() == 0) {
    LegacyNormalStream normals(ws.generator_state, 0u);
    for (int64_t e = 0; e < squared; ++e) ws.similarity[e] = static_cast<T>(normals.next_normal());
  }
  team.sync();
  for (int64_t e = team.rank(); e < squared; e += team.size()) {
    const T value = e / num_samples == e % num_samples ? preference : input[e];
    const T scale = FloatLimits<T>::eps * value + FloatLimits<T>::tiny * T(100);
    ws.similarity[e] = value + scale * ws.similarity[e];
    ws.availability[e] = T(0);
    ws.responsibility[e] = T(0);
  }
  team.sync();

  const T* S = ws.similarity;
  T* A = ws.availability;
  T* R = ws.responsibility;
  const T keep = damping, take = T(1) - damping;
  for (int64_t it = 0; it < max_iter; ++it) {
    // Responsibilities, one row per worker: R ← d·R + (1−d)·(S − max_{k'≠k}(A + S)).
    for (int64_t i = team.rank(); i < num_samples; i += team.size()) {
      const T* s_row = S + i * num_samples;
      const T* a_row = A + i * num_samples;
      int64_t best = 0;
      T first = a_row[0] + s_row[0];
      for (int64_t k = 1; k < num_samples; ++k) {
        const T v = a_row[k] + s_row[k];
        if (v > first) {
          first = v;
          best = k;
        }
      }
      T second = -T(1) / T(0);
      for (int64_t k = 0; k < num_samples; ++k) {
        const T v = a_row[k] + s_row[k];
        if (k != best && v > second) second = v;
      }
      T* r_row = R + i * num_samples;
      for (int64_t k = 0; k < num_samples; ++k) {
        const T fresh = s_row[k] - (k == best ? second : first);
        r_row[k] = r_row[k] * keep + fresh * take;
      }
    }
    team.sync();
    // Availabilities, one column per worker:
    // A[i,k] ← d·A + (1−d)·min(0, R[k,k] + Σ_{i'∉{i,k}} max(0, R[i',k])), A[k,k] ← … Σ_{i'≠k} max(0, R[i',k]).
    for (int64_t k = team.rank(); k < num_samples; k += team.size()) {
      T column_sum = T(0);
      for (int64_t i = 0; i < num_samples; ++i) {
        const T r = R[i * num_samples + k];
        column_sum += (i == k || r > T(0)) ? r : T(0);
      }
      for (int64_t i = 0; i < num_samples; ++i) {
        const T r = R[i * num_samples + k];
        T negated = ((i == k || r > T(0)) ? r : T(0)) - column_sum;  // −A_new before clipping
        if (i != k && negated < T(0)) negated = T(0);
        T& a = A[i * num_samples + k];
        a = a * keep - negated * take;
      }
    }
    team.sync();
    // Exemplar flags and how long each has been constant.
    for (int64_t i = team.rank(); i < num_samples; i += team.size()) {
      const int flag = (A[i * num_samples + i] + R[i * num_samples + i]) > T(0) ? 1 : 0;
      ws.run_length[i] = (it > 0 && flag == ws.is_exemplar[i]) ? ws.run_length[i] + 1 : 1;
      ws.is_exemplar[i] = flag;
    }
    team.sync();
    // Every rank takes the same decision from the same shared flags.
    if (it >= convergence_iter) {
      bool stable = true, any_exemplar = false;
      for (int64_t i = 0; i < num_samples; ++i) {
        stable = stable && ws.run_length[i] >= convergence_iter;
        any_exemplar = any_exemplar || ws.is_exemplar[i];
      }
      if (stable && any_exemplar) break;
    }
  }

  // The exemplars of the last iteration (converged or not, as scikit-learn).
  if (team.rank() == 0) {
    int count = 0;
    for (int64_t i = 0; i < num_samples; ++i)
      if (ws.is_exemplar[i]) ws.exemplars[count++] = static_cast<int>(i);
    ws.misc[kNumExemplars] = count;
  }
  team.sync();
  const int num_exemplars = ws.misc[kNumExemplars];
  if (num_exemplars == 0) {
    for (int64_t i = team.rank(); i < num_samples; i += team.size()) labels[i] = -1;
    team.sync();
    return;
  }

  // Refinement: each cluster's exemplar becomes the member with the largest summed
  // similarity from the other members; then every sample joins its nearest exemplar.
  team_assign_clusters(team, S, num_samples, ws.exemplars, num_exemplars, ws.cluster);
  for (int64_t k = team.rank(); k < num_exemplars; k += team.size()) {
    int best = -1;
    T best_sum = T(0);
    for (int64_t j = 0; j < num_samples; ++j) {
      if (ws.cluster[j] != k) continue;
      T sum = T(0);
      for (int64_t i = 0; i < num_samples; ++i)
        if (ws.cluster[i] == k) sum += S[i * num_samples + j];
      if (best < 0 || sum > best_sum) {
        best = static_cast<int>(j);
        best_sum = sum;
      }
    }
    ws.exemplars[k] = best;  // only the cluster map is read in this pass
  }
  team.sync();
  team_assign_clusters(team, S, num_samples, ws.exemplars, num_exemplars, ws.cluster);
  team_write_labels(team, ws.cluster, num_samples, num_exemplars, ws.run_length, labels);
}

}  // namespace selgroup
