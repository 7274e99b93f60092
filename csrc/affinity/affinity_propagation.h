// Affinity propagation (Frey & Dueck 2007) on a precomputed K×K similarity, step
// for step as scikit-learn's `_affinity_propagation` (sklearn/cluster/
// _affinity_propagation.py, 1.x; the rules: docs/algorithm.md §Affinity
// propagation), written once as a team solver (team.h, workspace.h): the CPU runs
// it on one thread (SoloTeam) or, from K = 128, on OpenMP threads, the CUDA kernel
// with the threads of one block, so the whole iteration loop is one launch with no
// host sync.
//
// Differences from scikit-learn, all deliberate:
// * none in the tie-breaking noise: scikit-learn adds (eps·S + 100·tiny)·N(0, 1)
//   drawn from NumPy's RandomState(0); we regenerate that very stream (MT19937 and
//   NumPy's legacy polar method, below), on the host and on the device alike. This
//   matters: with the default preference (the median) on a symmetric S of odd K,
//   the preference equals an off-diagonal similarity exactly, and the noise picks
//   the answer. What remains different is the order of floating-point sums (from
//   K = 128 the column sums add blocks of rows, see blocks()), so results can
//   differ only when two message values tie to within rounding;
// * the convergence test keeps, per sample, the length of the current run of its
//   exemplar flag instead of the last `convergence_iter` flags; "the flag was
//   constant over the last convergence_iter iterations" is the same condition;
// * labels are numbered 0..M-1 by first appearance (scikit-learn sorts them by
//   exemplar index); the partition is the same;
// * a similarity with a non-finite entry yields all −1 (on the CPU, where raising
//   needs no sync, csrc/bindings.h then raises).
//
// Speed (benchmarks/results/affinity_propagation_large_k.md). Device teams walk
// rows of contiguous memory in branch-free loops and accumulate the availabilities'
// column sums row by row (the same additions in the same order as a column walk).
// Host teams (iterate_rows) make one pass over the matrices per iteration instead
// of four, in explicit SIMD lanes (Lanes: 16 bytes portably, 32 in the CPU
// backend's AVX2 version; the lanes track where the row's maximum first appears),
// with each entry's arithmetic that of the device teams, each thread on its own
// blocks of rows with one barrier an iteration. The median
// is a radix selection on host teams, and the CPU bindings pass the tie-breaking
// noise in from a cache. Every team, and every lane width, gives the same labels and
// messages bit for bit (tests/team_check.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

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

// Reductions the compiler may vectorise: NaN-free maxima (exact in any order) and
// counts.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define SELGROUP_SIMD(clauses)
#else
#define SELGROUP_PRAGMA(text) _Pragma(#text)
#define SELGROUP_SIMD(clauses) SELGROUP_PRAGMA(omp simd clauses)
#endif
#define SELGROUP_SIMD_MAX(variable) SELGROUP_SIMD(reduction(max : variable))

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

// Radix selection on the floats' order-preserving integer images, 11 bits at a
// time (kth_smallest below; its first round split over a host team in team_median).
template <typename T>
struct RadixSelection {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static constexpr int kDigitBits = 11, kKeyBits = 8 * static_cast<int>(sizeof(T));
  static constexpr int64_t kBins = int64_t(1) << kDigitBits;
  // The digits of values[0, count) at `shift` into `digits`: a loop the compiler vectorises.
  static void digits_of(const T* values, int64_t count, int shift, uint16_t* digits) {
    constexpr Bits kSign = Bits(1) << (kKeyBits - 1);
    for (int64_t i = 0; i < count; ++i) {
      Bits bits;
      std::memcpy(&bits, values + i, sizeof bits);
      const Bits key = (bits & kSign) ? ~bits : (bits | kSign);
      digits[i] = static_cast<uint16_t>((key >> shift) & Bits(kBins - 1));
    }
  }
  // Adds the digits' counts to histogram[kBins]. Four interleaved histograms: similar
  // values share a bin, and one histogram's increments would wait on each other's stores.
  static void count_digits(const uint16_t* digits, int64_t count, int32_t* histogram) {
    constexpr int kInterleaved = 4;
    int32_t counts[kInterleaved][kBins] = {};
    int64_t i = 0;
    for (; i + kInterleaved <= count; i += kInterleaved)
      for (int h = 0; h < kInterleaved; ++h) ++counts[h][digits[i + h]];
    for (; i < count; ++i) ++counts[0][digits[i]];
    for (int64_t bin = 0; bin < kBins; ++bin)
      histogram[bin] += counts[0][bin] + counts[1][bin] + counts[2][bin] + counts[3][bin];
  }
  // The bin of the k-th smallest; k becomes its rank within the bin.
  static int64_t bin_of(const int32_t* histogram, int64_t& k) {
    int64_t bin = 0;
    while (k >= histogram[bin]) k -= histogram[bin++];
    return bin;
  }
  // Appends the `kept` values whose digit is `bin` at `into`, in order (the kept
  // count trails i, so it may compact in place). Few kept (a value in kSparse or
  // fewer, as in the first round over a similarity matrix): a branch that is
  // mostly not taken. Else branch free, which writes into[kept] once more after the
  // last value kept unless `bounded`: then the loop ends there. (Both: the same
  // values. At K = 256 the first round kept 4 %, and the branch-free loop took
  // ~1.2 ns a value where the branch takes ~0.4.)
  static constexpr int64_t kSparse = 8;
  static void gather(const T* values, const uint16_t* digits, int64_t count, int64_t bin, int64_t kept, T* into,
                     bool bounded = false) {
    if (kept * kSparse <= count) {
      for (int64_t i = 0, next = 0; next < kept; ++i)
        if (digits[i] == bin) into[next++] = values[i];
      return;
    }
    if (bounded)
      while (count > 0 && digits[count - 1] != bin) --count;
    int64_t next = 0;
    for (int64_t i = 0; i < count; ++i) {
      into[next] = values[i];
      next += digits[i] == bin ? 1 : 0;
    }
  }
};

// The k-th smallest (from 0) of the `count` finite `values`, whose digits above
// `shift` (all bits: none) are equal: each round maps the candidates to their next
// digits, counts them, and gathers the candidates of the k-th's digit, until
// std::nth_element takes the last few. `scratch` has room for 2·count values: the
// candidates, then the digits. O(count) with no data-dependent branches, where
// std::nth_element's partitions mispredict (about 7 ns per value at K² = 65 536).
// Host only. Equal values of either sign of zero order −0 first: the value is the same.
template <typename T>
T kth_smallest(const T* values, int64_t count, int64_t k, T* scratch, int shift = RadixSelection<T>::kKeyBits) {
  using Radix = RadixSelection<T>;
  constexpr int64_t kFewCandidates = 64;
  uint16_t* digits = reinterpret_cast<uint16_t*>(scratch + count);
  int32_t histogram[Radix::kBins];
  const T* candidates = values;
  while (count > kFewCandidates && shift > 0) {
    shift = shift > Radix::kDigitBits ? shift - Radix::kDigitBits : 0;
    Radix::digits_of(candidates, count, shift, digits);
    std::fill(histogram, histogram + Radix::kBins, 0);
    Radix::count_digits(digits, count, histogram);
    const int64_t bin = Radix::bin_of(histogram, k);
    Radix::gather(candidates, digits, count, bin, histogram[bin], scratch);
    count = histogram[bin];
    candidates = scratch;
  }
  if (candidates != scratch) std::copy(candidates, candidates + count, scratch);
  std::nth_element(scratch, scratch + k, scratch + count);
  return scratch[k];
}

// numpy.median of the `count` entries of `values`, using `scratch` (room for 2·count
// values, and for the next power of two ≥ count) and the one-slot `result`. Every
// rank returns it. Host teams select: the first round of the radix selection (its
// passes over all values) split over the team where the scratch has room for the
// workers' histograms, the rest on rank 0 (kth_smallest), O(count). Device teams
// sort (bitonic, every thread busy). The median is an entry (or the mean of two
// entries) either way, so every team gives the same value bit for bit.
template <Team Workers, typename T>
SELGROUP_HD T team_median(const Workers& team, const T* values, int64_t count, T* scratch, T* result) {
  const int64_t upper = count / 2;
  if constexpr (Workers::kHost) {
    using Radix = RadixSelection<T>;
    // Behind the candidates and the digits: each worker's histogram, then its share
    // of the count below the middle and of the largest value below it.
    const std::size_t digits_end = count * sizeof(T) + count * sizeof(uint16_t);
    const std::size_t shared_begin = (digits_end + 63) / 64 * 64;
    const std::size_t shared_bytes = team.size() * (Radix::kBins * sizeof(int32_t) + sizeof(int64_t) + sizeof(T));
    const bool split = team.size() > 1 && shared_begin + shared_bytes <= 2 * count * sizeof(T);
    auto* bytes = reinterpret_cast<unsigned char*>(scratch);
    int32_t* histograms = reinterpret_cast<int32_t*>(bytes + shared_begin);
    int64_t* smaller_counts = reinterpret_cast<int64_t*>(histograms + team.size() * Radix::kBins);
    T* largest_below = reinterpret_cast<T*>(smaller_counts + team.size());
    uint16_t* digits = reinterpret_cast<uint16_t*>(scratch + count);
    const int64_t share = (count + team.size() - 1) / team.size();
    const int64_t begin = std::min(count, team.rank() * share), end = std::min(count, begin + share);
    T middle = T(0);
    if (split) {
      const int shift = Radix::kKeyBits - Radix::kDigitBits;
      Radix::digits_of(values + begin, end - begin, shift, digits + begin);
      int32_t* own = histograms + team.rank() * Radix::kBins;
      std::fill(own, own + Radix::kBins, 0);
      Radix::count_digits(digits + begin, end - begin, own);
      team.sync();
      int32_t total[Radix::kBins];
      std::fill(total, total + Radix::kBins, 0);
      int64_t offset = 0;  // candidates of the workers before this one
      int64_t k = upper;
      for (int worker = 0; worker < team.size(); ++worker)
        for (int64_t b = 0; b < Radix::kBins; ++b) total[b] += histograms[worker * Radix::kBins + b];
      const int64_t bin = Radix::bin_of(total, k);
      for (int worker = 0; worker < team.rank(); ++worker) offset += histograms[worker * Radix::kBins + bin];
      // Bounded: the workers' candidates lie back to back.
      Radix::gather(values + begin, digits + begin, end - begin, bin, own[bin], scratch + offset, true);
      team.sync();
      if (team.rank() == 0) *result = kth_smallest(scratch, total[bin], k, scratch, shift);
      team.sync();
      middle = *result;
    } else {
      if (team.rank() == 0) *result = kth_smallest(values, count, upper, scratch);
      team.sync();
      middle = *result;
    }
    if (count % 2 == 0) {
      // The entry just below: `middle` again if fewer than `upper` entries are
      // smaller, else the largest smaller one (each worker's share, when split).
      const int64_t from = split ? begin : 0, to = split ? end : count;
      int64_t smaller = 0;
      const T minus_infinity = -T(1) / T(0);
      T below = minus_infinity;
      if (split || team.rank() == 0) {
        SELGROUP_SIMD(reduction(+ : smaller) reduction(max : below))
        for (int64_t i = from; i < to; ++i) {
          const T candidate = values[i] < middle ? values[i] : minus_infinity;
          smaller += values[i] < middle ? 1 : 0;
          below = below > candidate ? below : candidate;
        }
      }
      if (split) {
        smaller_counts[team.rank()] = smaller;
        largest_below[team.rank()] = below;
      }
      team.sync();  // every rank has read `middle` before rank 0 overwrites it
      if (team.rank() == 0) {
        if (split)
          for (int worker = 1; worker < team.size(); ++worker) {
            smaller += smaller_counts[worker];
            below = below > largest_below[worker] ? below : largest_below[worker];
          }
        *result = ((smaller < upper ? middle : below) + middle) / T(2);
      }
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

// SIMD lanes for the host teams' row passes: GCC's vector extensions, whose
// operators act lane by lane with the same IEEE arithmetic as the scalar code (so
// the lanes give the same bits). `Bytes` is the register width the caller was
// compiled for (csrc/team.h SoloTeam). Not for nvcc (device teams never take these
// paths) nor other compilers, which run the scalar loops.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SELGROUP_HOST_LANES 1
template <typename T, int Bytes>
struct Lanes {
  typedef T Vector __attribute__((vector_size(Bytes)));
  // What a compare of two Vectors gives: all ones in the lanes where it holds.
  typedef std::conditional_t<sizeof(T) == 8, int64_t, int32_t> MaskLane;
  typedef MaskLane Mask __attribute__((vector_size(Bytes)));
  static constexpr int64_t kCount = Bytes / static_cast<int64_t>(sizeof(T));
  static Vector load(const T* from) {
    Vector v;
    __builtin_memcpy(&v, from, sizeof v);
    return v;
  }
  static void store(T* to, const Vector& v) { __builtin_memcpy(to, &v, sizeof v); }
  static Vector broadcast(T x) { return x - Vector{}; }  // x − (+0) is x, even −0
  static Mask lane_numbers() {
    Mask numbers;
    for (int64_t l = 0; l < kCount; ++l) numbers[l] = static_cast<MaskLane>(l);
    return numbers;
  }
  // The mask of lane `lane` alone (for the one vector of a row that holds the
  // diagonal, or the row's maximum).
  static Mask only(int64_t lane) { return lane_numbers() == static_cast<MaskLane>(lane); }
};
#else
#define SELGROUP_HOST_LANES 0
#endif

// max(x, +0): the availability rule's clips and the responsibilities' share of a
// column sum. For float, in scalars and SIMD lanes alike, it is taken on the bits:
// a set sign bit gives +0. That is x > 0 ? x : +0 for every x but NaN, and one
// rule for NaN on every team. In AVX2 lanes it is one VPMAXSD (the signed maximum
// of the bits and 0), an integer instruction, where MAXPS competes with the row
// pass's multiplies, maxima and minima for two FP ports on Zen 4 (~5 % at K = 256).
// Doubles compare as floats (AVX2 has no 64-bit integer maximum). GCC folds a
// literal zero into a compare and a mask (two instructions), so in SIMD lanes the
// zero passes through an empty asm that hides its value.
//
// hide_value: an empty asm that makes a SIMD value opaque to GCC's folding (x86;
// elsewhere nothing).
template <typename V>
SELGROUP_HD_INLINE void hide_value([[maybe_unused]] V& value) {
#if defined(__x86_64__) && !defined(__CUDACC__)
  if constexpr (sizeof(V) >= 16) __asm__("" : "+x"(value));
#endif
}
template <typename V>
SELGROUP_HD_INLINE V hidden_zero() {
  V zero{};
  hide_value(zero);
  return zero;
}
template <typename T>
SELGROUP_HD_INLINE T positive_part(const T& x) {
  if constexpr (std::is_same_v<T, float>) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits > 0 ? x : 0.0f;
  }
#if SELGROUP_HOST_LANES
  else if constexpr (std::is_same_v<T, typename Lanes<float, sizeof(T)>::Vector>) {
    using Bits = typename Lanes<float, sizeof(T)>::Mask;
    Bits bits;
    __builtin_memcpy(&bits, &x, sizeof bits);
    const Bits zero = hidden_zero<Bits>();
    bits = bits > zero ? bits : zero;
    T result;
    __builtin_memcpy(&result, &bits, sizeof result);
    return result;
  }
#endif
  else {
    const T zero = hidden_zero<T>();
    return x > zero ? x : zero;
  }
}

// The damped message rules, one entry each (docs/algorithm.md §Affinity propagation).
// Every loop below, on every team, goes through these, so each message gets the
// same arithmetic whatever the traversal. Responsibility R[i,k] against its
// competitor max_{k'≠k}(A + S)[i,k']:
template <typename T>
SELGROUP_HD_INLINE T damped_responsibility(const T& r, const T& s, const T& competitor, const T& keep, const T& take) {
  return r * keep + (s - competitor) * take;
}
// Availability A[i,k], k ≠ i, from R[i,k] and column k's sum (R[k,k] + Σ_{i'≠k} max(0, R[i',k])):
// −A_new before clipping is max(0, R[i,k]) − sum. (That difference is never −0:
// max(0, R) is never −0, and u − v is −0 only for u = −0. So a clip that keeps a
// −0, as 0 > x ? 0 : x does, and positive_part give the same bits.)
template <typename T>
SELGROUP_HD_INLINE T damped_availability(const T& a, const T& r, const T& column_sum, const T& keep, const T& take) {
  return a * keep - positive_part(positive_part(r) - column_sum) * take;
}
// Self-availability A[k,k] = Σ_{i'≠k} max(0, R[i',k]) = sum − R[k,k].
template <typename T>
SELGROUP_HD_INLINE T damped_self_availability(const T& a, const T& r, const T& column_sum, const T& keep,
                                             const T& take) {
  return a * keep - (r - column_sum) * take;
}
// What R[i,k] adds to column k's sum: itself on the diagonal, its positive part elsewhere.
template <typename T>
SELGROUP_HD_INLINE T column_share(const T& r, bool diagonal) {
  return diagonal ? r : positive_part(r);
}

// A row of A + S, summed where it is read by the competitor search below (the
// device teams' max and first_equal; the host teams' row passes find the top two
// and the first position of the maximum as they make the row, RowTop).
template <typename T>
struct SummedRow {
  const T* a;
  const T* s;
  SELGROUP_HD_INLINE T operator()(int64_t k) const { return a[k] + s[k]; }
  SELGROUP_HD_INLINE T max(int64_t begin, int64_t end, T start) const {
    SELGROUP_SIMD_MAX(start)
    for (int64_t k = begin; k < end; ++k) start = start > a[k] + s[k] ? start : a[k] + s[k];
    return start;
  }
  // The first k < K − 1 whose value equals `target`, else K − 1.
  SELGROUP_HD_INLINE int64_t first_equal(int64_t K, T target) const {
    int64_t k = 0;
    while (k < K - 1 && !(a[k] + s[k] == target)) ++k;
    return k;
  }
};

// One row's competitors for the responsibility rule: numpy.argmax of the row (the
// first position of its maximum, `best`), the maximum, and the maximum of the
// others (the runner-up, `second`: equal to the maximum on a tie), found by the
// caller. Both values are read back from the row, so that even the sign of a zero
// is the one a sequential scan keeps (reductions in lanes may pick either zero).
template <typename T>
struct Competitors {
  int64_t best;
  T first, second;
};
template <typename T, typename Row>
SELGROUP_HD_INLINE Competitors<T> row_competitors(int64_t K, const Row& row, int64_t best, T second) {
  if (second == T(0)) {
    for (int64_t k = 0; k < K; ++k)
      if (k != best && row(k) == second) {
        second = row(k);
        break;
      }
  }
  return {best, row(best), second};
}

// The largest two values of a sequence (equal on a tie) and where the largest
// first appeared (numpy.argmax: only a value strictly above the largest so far
// moves it), lane by lane for vectors: V a scalar and Position int64_t, or V SIMD
// lanes and Position their compare mask type holding each vector's start.
template <typename V, typename Position>
struct TopTwo {
  V first, second;
  Position best;
  SELGROUP_HD_INLINE void add(const V& v, const Position& at) {
    if constexpr (std::is_integral_v<Position>) {
      best = v > first ? at : best;
    } else {
      // The empty asm keeps GCC from sharing this compare with the minimum below,
      // which it would then make a blend (slower than MINPS).
      V previous = first;
      hide_value(previous);
      best = v > previous ? at : best;
    }
    const V lower = first < v ? first : v;
    second = second > lower ? second : lower;
    first = first > v ? first : v;
  }
};
template <typename T>
using RowTop = TopTwo<T, int64_t>;

#if SELGROUP_HOST_LANES
template <typename T, int Bytes>
using LaneTops = TopTwo<typename Lanes<T, Bytes>::Vector, typename Lanes<T, Bytes>::Mask>;

// The lanes' top twos started at minus infinity (every finite value moves them).
template <int Bytes, typename T>
SELGROUP_HD_INLINE LaneTops<T, Bytes> empty_lanes() {
  using L = Lanes<T, Bytes>;
  const auto minus_infinity = L::broadcast(-T(1) / T(0));
  return {minus_infinity, minus_infinity, typename L::Mask{}};
}

// The top two of the union of the lanes' top twos (halves of the lanes merged
// pairwise, log2 of the lane count steps, then lane 0), and the first position of
// the maximum: the least start + lane among the lanes whose largest equals it.
template <int Bytes, typename T>
inline RowTop<T> merge_lanes(const LaneTops<T, Bytes>& lanes_top) {
  using L = Lanes<T, Bytes>;
  LaneTops<T, Bytes> lanes = lanes_top;
  for (int64_t half = L::kCount / 2; half > 0; half /= 2) {
    const auto partner = L::lane_numbers() ^ static_cast<typename L::MaskLane>(half);
    const auto first = __builtin_shuffle(lanes.first, partner), second = __builtin_shuffle(lanes.second, partner);
    const auto lower = lanes.first < first ? lanes.first : first;
    const auto seconds = lanes.second > second ? lanes.second : second;
    lanes.first = lanes.first > first ? lanes.first : first;
    lanes.second = seconds > lower ? seconds : lower;
  }
  RowTop<T> top{lanes.first[0], lanes.second[0], INT64_MAX};
  for (int64_t lane = 0; lane < L::kCount; ++lane) {
    const int64_t position = lanes_top.best[lane] + lane;
    if (lanes_top.first[lane] == top.first && position < top.best) top.best = position;
  }
  return top;
}
#endif

#if SELGROUP_HOST_LANES
// Calls body(k, std::false_type{}) for the whole vectors k = 0, L, 2L, ... that fit
// in [0, K), but body(k, std::true_type{}) for the one or two that hold position
// `p` or `q` (the diagonal, the row's maximum), so the selects of their special
// rules, and the test for them, cost nothing in the other vectors. Returns where
// the whole vectors end.
template <int64_t L, typename Body>
inline int64_t for_each_vector(int64_t K, int64_t p, int64_t q, Body&& body) {
  const int64_t end = K / L * L;
  const int64_t first = (p < q ? p : q) / L * L, second = (p < q ? q : p) / L * L;
  int64_t k = 0;
  const auto plain_until = [&](int64_t stop) {
    for (; k < stop; k += L) body(k, std::false_type{});
  };
  for (const int64_t special : {first, second}) {
    if (special < k || special >= end) continue;  // the same vector twice, or in the tail
    plain_until(special);
    body(k, std::true_type{});
    k += L;
  }
  plain_until(end);
  return end;
}
#endif

// The host teams' passes over a row, in whole SIMD vectors, then a scalar tail.
// The vector that holds the diagonal (or the row's maximum) takes the other rule
// in that lane by a select, so the loops have no scalar runs in the middle of a row.
//
// availability_row: A[i, :] from R and the column sums, the self rule at k = i;
// returns the top two of the new row of A + S.
template <int Bytes, typename T>
SELGROUP_HD_INLINE RowTop<T> availability_row(int64_t K, int64_t i, T* __restrict__ a_row,
                                              const T* __restrict__ r_row, const T* __restrict__ s_row,
                                              const T* __restrict__ column_sum, T keep, T take) {
  const T minus_infinity = -T(1) / T(0);
  RowTop<T> top{minus_infinity, minus_infinity, 0};
  int64_t k = 0;
#if SELGROUP_HOST_LANES
  using L = Lanes<T, Bytes>;
  if (K >= L::kCount) {
    const auto keep_lanes = L::broadcast(keep), take_lanes = L::broadcast(take);
    auto lanes = empty_lanes<Bytes, T>();
    auto starts = typename L::Mask{};
    k = for_each_vector<L::kCount>(K, i, i, [&](int64_t at, auto diagonal) {
      const auto a = L::load(a_row + at), r = L::load(r_row + at), sum = L::load(column_sum + at);
      auto updated = damped_availability(a, r, sum, keep_lanes, take_lanes);
      if constexpr (decltype(diagonal)::value)
        updated = L::only(i - at) ? damped_self_availability(a, r, sum, keep_lanes, take_lanes) : updated;
      L::store(a_row + at, updated);
      lanes.add(updated + L::load(s_row + at), starts);
      starts += static_cast<typename L::MaskLane>(L::kCount);
    });
    top = merge_lanes<Bytes, T>(lanes);
  }
#endif
  for (; k < K; ++k) {
    a_row[k] = k == i ? damped_self_availability(a_row[k], r_row[k], column_sum[k], keep, take)
                      : damped_availability(a_row[k], r_row[k], column_sum[k], keep, take);
    top.add(a_row[k] + s_row[k], k);
  }
  return top;
}
// The top two of row i of A + S.
template <int Bytes, typename T>
SELGROUP_HD_INLINE RowTop<T> summed_row_top_two(int64_t K, const T* __restrict__ a_row,
                                                const T* __restrict__ s_row) {
  const T minus_infinity = -T(1) / T(0);
  RowTop<T> top{minus_infinity, minus_infinity, 0};
  int64_t k = 0;
#if SELGROUP_HOST_LANES
  using L = Lanes<T, Bytes>;
  if (K >= L::kCount) {
    auto lanes = empty_lanes<Bytes, T>();
    auto starts = typename L::Mask{};
    for (; k + L::kCount <= K; k += L::kCount, starts += static_cast<typename L::MaskLane>(L::kCount))
      lanes.add(L::load(a_row + k) + L::load(s_row + k), starts);
    top = merge_lanes<Bytes, T>(lanes);
  }
#endif
  for (; k < K; ++k) top.add(a_row[k] + s_row[k], k);
  return top;
}
// R[i, :] against the competitors; adds the new values to `column_sum` (column_share)
// unless it is null.
template <int Bytes, typename T>
SELGROUP_HD_INLINE void responsibility_row(int64_t K, int64_t i, const Competitors<T>& c, T* __restrict__ r_row,
                                           const T* __restrict__ s_row, T* __restrict__ column_sum, T keep,
                                           T take) {
  int64_t k = 0;
#if SELGROUP_HOST_LANES
  using L = Lanes<T, Bytes>;
  if (K >= L::kCount) {
    const auto keep_lanes = L::broadcast(keep), take_lanes = L::broadcast(take);
    const auto first = L::broadcast(c.first), second = L::broadcast(c.second);
    const auto pass = [&](auto add_to_sums) {
      return for_each_vector<L::kCount>(K, i, c.best, [&](int64_t at, auto special) {
        auto competitor = first;
        if constexpr (decltype(special)::value) competitor = L::only(c.best - at) ? second : first;
        const auto r =
            damped_responsibility(L::load(r_row + at), L::load(s_row + at), competitor, keep_lanes, take_lanes);
        L::store(r_row + at, r);
        if constexpr (decltype(add_to_sums)::value) {
          auto share = positive_part(r);
          if constexpr (decltype(special)::value) share = L::only(i - at) ? r : share;
          L::store(column_sum + at, L::load(column_sum + at) + share);
        }
      });
    };
    k = column_sum != nullptr ? pass(std::true_type{}) : pass(std::false_type{});
  }
#endif
  for (; k < K; ++k) {
    r_row[k] = damped_responsibility(r_row[k], s_row[k], k == c.best ? c.second : c.first, keep, take);
    if (column_sum != nullptr) column_sum[k] += column_share(r_row[k], k == i);
  }
}
// Indices of the team-wide integers of the workspace.
enum MiscSlot : int { kNonFinite = 0, kUnequal = 1, kNumExemplars = 2, kAlone = 3, kMiscInts = 4 };
// A host worker's summary of an iteration (iterate_rows): the shortest run of its
// rows' flags, whether one of them is an exemplar, and (worker 0) whether the team
// goes on.
enum SummarySlot : int { kShortestRun = 0, kAnyExemplar = 1, kGoOnAlone = 2, kSummaryInts = 3 };

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

  // Each column's sum (the availability rule's) adds its rows block by block: the
  // rows form `blocks()` contiguous blocks of about equal size; a block's sum runs
  // down its rows from zero, and the column's sum adds the blocks' sums in order.
  // One block below K = 128: numpy's order (down all rows), as scikit-learn sums.
  // More blocks from there (differences of rounding only), because a host worker
  // that owns whole blocks can add its rows' responsibilities to their sums as it
  // makes them: the team needs one barrier an iteration and no pass of its own
  // over R. The count is a power of two, so teams of 2, 4 and 8 workers share the
  // blocks evenly; every team sums alike, so gives the same bits.
  //
  // A worker per block. On the idle 2-core development machine 2 threads were
  // about 1.6× faster than 1 at K = 128 and 1.8× at 256 (where an iteration takes
  // ~6 and ~19 µs on one thread, a barrier ~0.3 µs); at K = 64 they gained ~10 %
  // back to back and lost when the pool's threads had gone to sleep between calls
  // (benchmarks/results/affinity_propagation_large_k.md).
  static constexpr int64_t kSamplesPerBlock = 64, kMostBlocks = 8;
  SELGROUP_HD_INLINE int64_t blocks() const {
    int64_t count = 1;
    while (count < kMostBlocks && 2 * count * kSamplesPerBlock <= K) count *= 2;
    return count;
  }
  SELGROUP_HD_INLINE int64_t block_begin(int64_t block) const { return block * K / blocks(); }
  SELGROUP_HD_INLINE int64_t parallelism() const { return blocks(); }
  // The blocks a host worker owns: the first `workers` ranks of the team (the
  // largest power of two ≤ its size and ≤ blocks()) take equal runs of blocks, the
  // other ranks none. The message loop makes each worker's rows, and the exemplar
  // refinement sums them, on the same core.
  struct OwnedBlocks {
    int workers;
    int64_t first, last;
  };
  template <Team Workers>
  SELGROUP_HD_INLINE OwnedBlocks owned_blocks(const Workers& team) const {
    int workers = 1;
    while (2 * workers <= team.size() && 2 * workers <= blocks()) workers *= 2;
    const int rank = team.rank();
    if (rank >= workers) return {workers, blocks(), blocks()};
    return {workers, rank * blocks() / workers, (rank + 1) * blocks() / workers};
  }
  // sums[k] = entry(i, k) summed from zero down the rows i of `block`, in order,
  // for k in [begin, end): a block's part of a column sum.
  template <typename Entry>
  SELGROUP_HD_INLINE void sum_block_rows(int64_t block, int64_t begin, int64_t end, T* __restrict__ sums,
                                         Entry&& entry) const {
    for (int64_t k = begin; k < end; ++k) sums[k] = T(0);
    for (int64_t i = block_begin(block); i < block_begin(block + 1); ++i)
      for (int64_t k = begin; k < end; ++k) sums[k] += entry(i, k);
  }
  // into[k] = the blocks' sums of column k (`sums`: blocks() rows `sums_stride()`
  // apart) added in order, for k in [begin, end).
  SELGROUP_HD_INLINE void add_blocks_in_order(const T* sums, int64_t begin, int64_t end, T* __restrict__ into) const {
    for (int64_t k = begin; k < end; ++k) into[k] = sums[k];
    for (int64_t block = 1; block < blocks(); ++block) {
      const T* __restrict__ block_sums = sums + block * sums_stride();
      for (int64_t k = begin; k < end; ++k) into[k] += block_sums[k];
    }
  }
  // K rounded up to whole cache lines: two workers' sums never share a line.
  SELGROUP_HD_INLINE int64_t sums_stride() const {
    constexpr int64_t kLine = static_cast<int64_t>(kCacheLineBytes / sizeof(T));
    return (K + kLine - 1) / kLine * kLine;
  }

  struct Scratch {
    T* similarity;  // K×K, the preference on the diagonal, noise added
    T* messages;    // 2·K×K: A then R; before they start, the median's scratch (2·K², ≥ the power of two ≥ K²)
    T* block_sums;   // 2 × blocks() × sums_stride(): each block's column sums, for two passes of responsibilities
    T* column_sums;  // blocks() × sums_stride(): the column sums (iterate_rows: a copy for each worker)
    int* summaries;  // 2 × blocks() × kSummaryInts: each worker's flags after an iteration (two in turn)
    T* median;      // 1
    int* is_exemplar;  // K, the exemplar flag of the latest iteration
    int* run_length;   // K, iterations the flag has kept its value; later the label map
    int* exemplars;    // K, indices of the exemplars (first num_exemplars used)
    int* cluster;      // K, each sample's exemplar slot
    int* misc;         // kMiscInts
    uint32_t* generator_state;  // kMtStateWords when the noise is drawn here
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<T>(K * K),
            layout.take<T>(2 * K * K),
            layout.take<T>(2 * blocks() * sums_stride()),
            layout.take<T>(blocks() * sums_stride()),
            layout.take<int>(2 * blocks() * kSummaryInts),
            layout.take<T>(1),
            layout.take<int>(K),
            layout.take<int>(K),        layout.take<int>(K),       layout.take<int>(K),
            layout.take<int>(kMiscInts), layout.take<uint32_t>(noise == nullptr ? kMtStateWords : 0)};
  }

  // The "uniform" answer (all −1, or the special cases) on every rank, then return.
  template <Team Workers, typename Label>
  SELGROUP_HD void write_labels(const Workers& team, Label label) const {
    for (int64_t i = team.rank(); i < K; i += team.size()) labels[i] = label(i);
    team.sync();
  }

  // The exemplar flag of sample i after an iteration (A and R of that iteration),
  // and how long it has kept its value.
  SELGROUP_HD_INLINE void record_flag(const Scratch& ws, int64_t it, int64_t i) const {
    const T* A = ws.messages;
    const T* R = ws.messages + K * K;
    const int flag = (A[i * K + i] + R[i * K + i]) > T(0) ? 1 : 0;
    ws.run_length[i] = (it > 0 && flag == ws.is_exemplar[i]) ? ws.run_length[i] + 1 : 1;
    ws.is_exemplar[i] = flag;
  }

  // scikit-learn's stop after iteration `it`: every flag constant over the last
  // convergence_iter iterations, and some exemplar.
  SELGROUP_HD bool converged(const Scratch& ws, int64_t it) const {
    if (it < convergence_iter) return false;
    bool stable = true, any_exemplar = false;
    for (int64_t i = 0; i < K; ++i) {
      stable = stable && ws.run_length[i] >= convergence_iter;
      any_exemplar = any_exemplar || ws.is_exemplar[i];
    }
    return stable && any_exemplar;
  }

  // The message loop on a team: per iteration a pass over rows (responsibilities)
  // and one over columns (availabilities), the column sums made block by block
  // (blocks()) over each worker's columns.
  template <Team Workers>
  SELGROUP_HD void iterate(const Workers& team, const Scratch& ws, T keep, T take) const {
    const T* S = ws.similarity;
    T* A = ws.messages;
    T* R = ws.messages + K * K;
    const T minus_infinity = -T(1) / T(0);
    for (int64_t it = 0; it < max_iter; ++it) {
      team_split(team, K, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const T* __restrict__ s_row = S + i * K;
          const T* __restrict__ a_row = A + i * K;
          T* __restrict__ r_row = R + i * K;
          const SummedRow<T> row{a_row, s_row};
          const T maximum = row.max(0, K, minus_infinity);
          const int64_t best = row.first_equal(K, maximum);
          const Competitors<T> c =
              row_competitors(K, row, best, row.max(best + 1, K, row.max(int64_t(0), best, minus_infinity)));
          split_at_diagonal(
              0, K, c.best, [&](int64_t k) { r_row[k] = damped_responsibility(r_row[k], s_row[k], c.first, keep, take); },
              [&](int64_t k) { r_row[k] = damped_responsibility(r_row[k], s_row[k], c.second, keep, take); });
        }
      });
      team.sync();
      team_split(team, K, [&](int64_t begin, int64_t end) {
        T* __restrict__ column_sum = ws.column_sums;
        for (int64_t block = 0; block < blocks(); ++block)
          sum_block_rows(block, begin, end, ws.block_sums + block * sums_stride(),
                         [&](int64_t i, int64_t k) { return column_share(R[i * K + k], i == k); });
        add_blocks_in_order(ws.block_sums, begin, end, column_sum);
        for (int64_t i = 0; i < K; ++i) {
          const T* __restrict__ r_row = R + i * K;
          T* __restrict__ a_row = A + i * K;
          split_at_diagonal(
              begin, end, i,
              [&](int64_t k) { a_row[k] = damped_availability(a_row[k], r_row[k], column_sum[k], keep, take); },
              [&](int64_t k) {
                a_row[k] = damped_self_availability(a_row[k], r_row[k], column_sum[k], keep, take);
              });
        }
      });
      team.sync();
      for (int64_t i = team.rank(); i < K; i += team.size()) record_flag(ws, it, i);
      team.sync();
      // Every rank takes the same decision from the same shared flags.
      if (converged(ws, it)) break;
    }
  }

  // The message loop on host teams (one thread, or OpenMP's), one pass over the
  // matrices per iteration instead of iterate's four: the pass over row i updates
  // its availabilities (iteration t), records its flag, then makes its
  // responsibilities (iteration t + 1) from the top two of the row of A + S just
  // made, adding them to its block's column sums. An iteration that may be the last
  // (the flags could all have been constant for convergence_iter iterations by its
  // end; or max_iter) stops after the availabilities, and makes the next
  // responsibilities in a pass of their own if it was not, so the final messages
  // are iterate's (tests/team_check.cpp compares them).
  //
  // Each worker owns whole blocks of rows (a team of a power of two, up to
  // blocks(); other threads only pass the barriers). After the one barrier of an
  // iteration every worker adds the blocks' sums into its own copy of the column
  // sums, and reads the others' summaries of their flags; the block sums and the
  // summaries are kept for two iterations in turn, so no second barrier is needed.
  //
  // A barrier costs a scheduler time slice (milliseconds) when a worker has been
  // descheduled, which happens on a loaded machine. So when worker 0 has waited at
  // the barrier longer than it worked, plus kSlackNanoseconds (not counting the
  // first pass, when the pool's threads may be waking up), the other workers leave
  // and worker 0 finishes the loop alone: the same sums in the same order, so the
  // same bits.
  static constexpr int64_t kSlackNanoseconds = 100000;
  template <int Bytes, Team Workers>
  void iterate_rows(const Workers& team, const Scratch& ws, T keep, T take) const {
    using Clock = std::chrono::steady_clock;
    const T* S = ws.similarity;
    T* A = ws.messages;
    T* R = ws.messages + K * K;
    const int64_t num_blocks = blocks();
    const OwnedBlocks owned = owned_blocks(team);
    int workers = owned.workers;
    const int rank = team.rank();
    const bool first_worker = rank == 0;
    bool alone = team.size() == 1;
    int64_t own_first_block = owned.first, own_last_block = owned.last;
    int64_t own_begin = block_begin(own_first_block), own_end = block_begin(own_last_block);
    const auto block_sums = [&](int turn, int64_t block) {
      return ws.block_sums + (turn * num_blocks + block) * sums_stride();
    };
    // The column sums the availabilities read: with one block, that block's sums.
    T* own_column_sums = ws.column_sums + (rank < workers ? rank : 0) * sums_stride();
    int turn = 0;  // where the next responsibilities' block sums go
    const auto column_sums = [&]() -> const T* { return num_blocks == 1 ? block_sums(1 - turn, 0) : own_column_sums; };
    const auto add_block_sums = [&] {  // of the responsibilities just made; then the next turn
      if (num_blocks > 1 && rank < workers) add_blocks_in_order(block_sums(turn, 0), 0, K, own_column_sums);
      turn = 1 - turn;
    };
    const auto clear_own_block_sums = [&] {
      for (int64_t block = own_first_block; block < own_last_block; ++block)
        for (int64_t k = 0; k < K; ++k) block_sums(turn, block)[k] = T(0);
    };
    int64_t block = own_first_block;  // of the row being made
    const auto responsibilities = [&](int64_t i, const RowTop<T>& top) {
      const Competitors<T> c = row_competitors(K, SummedRow<T>{A + i * K, S + i * K}, top.best, top.second);
      while (i >= block_begin(block + 1)) ++block;
      responsibility_row<Bytes>(K, i, c, R + i * K, S + i * K, block_sums(turn, block), keep, take);
    };
    int64_t waited = 0, worked = 0;  // worker 0's nanoseconds since its last decision
    Clock::time_point mark = Clock::now();
    const auto elapsed = [&] {
      const Clock::time_point now = Clock::now();
      const int64_t nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(now - mark).count();
      mark = now;
      return nanoseconds;
    };
    const auto sync = [&] {
      if (alone) return;
      if (first_worker) worked += elapsed();
      team.sync();
      if (first_worker) waited += elapsed();
    };
    bool responsibilities_made = false;
    int64_t shortest_run = 0;  // of the flags' runs after the previous iteration
    for (int64_t it = 0; it < max_iter; ++it) {
      if (!responsibilities_made) {
        clear_own_block_sums();
        block = own_first_block;
        for (int64_t i = own_begin; i < own_end; ++i)
          responsibilities(i, summed_row_top_two<Bytes>(K, A + i * K, S + i * K));
        sync();
        add_block_sums();
      }
      const bool may_stop = it + 1 == max_iter || (it >= convergence_iter && shortest_run + 1 >= convergence_iter);
      if (!may_stop) clear_own_block_sums();
      block = own_first_block;
      int own_shortest_run = static_cast<int>(it + 1), own_exemplar = 0;
      for (int64_t i = own_begin; i < own_end; ++i) {
        const RowTop<T> top = availability_row<Bytes>(K, i, A + i * K, R + i * K, S + i * K, column_sums(), keep, take);
        record_flag(ws, it, i);
        own_shortest_run = ws.run_length[i] < own_shortest_run ? ws.run_length[i] : own_shortest_run;
        own_exemplar |= ws.is_exemplar[i];
        if (!may_stop) responsibilities(i, top);
      }
      // Alone, worker 0 keeps its summary to itself: a worker that left may not have
      // read the last shared one yet.
      int local_summary[kSummaryInts];
      int* summaries = alone ? local_summary : ws.summaries + (it % 2) * num_blocks * kSummaryInts;
      if (rank < workers) {
        summaries[rank * kSummaryInts + kShortestRun] = own_shortest_run;
        summaries[rank * kSummaryInts + kAnyExemplar] = own_exemplar;
      }
      if (first_worker) {
        worked += elapsed();
        summaries[kGoOnAlone] = !alone && it > 0 && waited > worked + kSlackNanoseconds ? 1 : 0;
        waited = worked = 0;
      }
      sync();
      // Every worker takes the same decisions from the same summaries (scikit-learn's
      // stop: every flag constant over the last convergence_iter iterations, and some
      // exemplar).
      bool any_exemplar = false;
      shortest_run = it + 1;
      for (int worker = 0; worker < workers; ++worker) {
        const int run = summaries[worker * kSummaryInts + kShortestRun];
        shortest_run = run < shortest_run ? run : shortest_run;
        any_exemplar = any_exemplar || summaries[worker * kSummaryInts + kAnyExemplar];
      }
      const bool stop = it >= convergence_iter && shortest_run >= convergence_iter && any_exemplar;
      // A worker that leaves goes before reading the block sums, which worker 0 alone
      // rewrites without a barrier; it waits at the barrier after the loop.
      if (!stop && summaries[kGoOnAlone] && !first_worker) return;
      if (!may_stop) add_block_sums();
      responsibilities_made = !may_stop;
      if (stop) break;
      if (summaries[kGoOnAlone]) {
        ws.misc[kAlone] = 1;
        // Worker 0 takes every block, with the column sums it already holds.
        alone = true;
        workers = 1;
        own_first_block = 0;
        own_last_block = num_blocks;
        own_begin = 0;
        own_end = K;
      }
    }
  }

  template <Team Workers>
  SELGROUP_HD void operator()(const Workers& team, const Scratch& ws) const {
    const int64_t squared = K * K;
    // Non-finite similarities: no clustering (all −1).
    if (team.rank() == 0) ws.misc[kNonFinite] = ws.misc[kUnequal] = ws.misc[kAlone] = 0;
    team.sync();
    team_split(team, K, [&](int64_t begin, int64_t end) {
      int non_finite = 0, unequal = 0;
      const T reference = K > 1 ? input[1] : T(0);
      for (int64_t i = begin; i < end; ++i) {
        const T* row = input + i * K;
        SELGROUP_SIMD(reduction(| : non_finite, unequal))
        for (int64_t j = 0; j < K; ++j) {
          non_finite |= is_finite(row[j]) ? 0 : 1;
          unequal |= j != i && row[j] != reference ? 1 : 0;
        }
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
    const auto with_noise = [](T value, T normal) {
      return value + (FloatLimits<T>::eps * value + FloatLimits<T>::tiny * T(100)) * normal;
    };
    team_split(team, K, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* input_row = input + i * K;
        T* s_row = S + i * K;
        const T diagonal_normal = noise != nullptr ? static_cast<T>(noise[i * K + i]) : s_row[i];
        if (noise != nullptr) {
          const double* normals = noise + i * K;
          for (int64_t j = 0; j < K; ++j) s_row[j] = with_noise(input_row[j], static_cast<T>(normals[j]));
        } else {
          for (int64_t j = 0; j < K; ++j) s_row[j] = with_noise(input_row[j], s_row[j]);
        }
        s_row[i] = with_noise(self, diagonal_normal);
        for (int64_t j = 0; j < K; ++j) A[i * K + j] = R[i * K + j] = T(0);
      }
    });
    team.sync();

    const T keep = damping, take = T(1) - damping;
    if constexpr (requires { Workers::kVectorBytes; })
      iterate_rows<Workers::kVectorBytes>(team, ws, keep, take);
    else
      iterate(team, ws, keep, take);

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
    // similarity from the members (the first on a tie, as numpy.argmax); then every
    // sample joins its nearest exemplar. The sums add the rows in the order of the
    // availability rule's column sums (blocks(): below K = 128 down the rows, as
    // scikit-learn's). Every row is added to every column, a non-member's as +0,
    // which changes no sum (one that starts at +0 is never −0), so the loop over a
    // row's columns has no branch. On host teams each worker sums the rows of its
    // own blocks (no row crosses to another core), on device teams each thread its
    // columns of every block.
    team_assign_clusters(team, S, K, ws.exemplars, num_exemplars, ws.cluster);
    const auto sum_block = [&](int64_t block, int64_t begin, int64_t end) {
      const int* __restrict__ cluster = ws.cluster;
      sum_block_rows(block, begin, end, ws.block_sums + block * sums_stride(),
                     [&](int64_t i, int64_t j) { return cluster[j] == cluster[i] ? S[i * K + j] : T(0); });
    };
    if constexpr (Workers::kHost) {
      const OwnedBlocks owned = owned_blocks(team);
      for (int64_t block = owned.first; block < owned.last; ++block) sum_block(block, 0, K);
    } else {
      for (int64_t block = 0; block < blocks(); ++block)
        team_split(team, K, [&](int64_t begin, int64_t end) { sum_block(block, begin, end); });
    }
    team.sync();
    T* member_sums = ws.column_sums;  // K; the messages are done with it
    team_split(team, K, [&](int64_t begin, int64_t end) { add_blocks_in_order(ws.block_sums, begin, end, member_sums); });
    team.sync();
    if (team.rank() == 0) {
      for (int k = 0; k < num_exemplars; ++k) ws.exemplars[k] = -1;  // only the cluster map is read here
      for (int64_t j = 0; j < K; ++j) {
        int& best = ws.exemplars[ws.cluster[j]];
        if (best < 0 || member_sums[j] > member_sums[best]) best = static_cast<int>(j);
      }
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
