// GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
// Gradient Sign Dropout", NeurIPS 2020), one column of the K×P task-gradient
// matrix J at a time:
//   purity   P = ½·(1 + Σ_k J_kp / Σ_k |J_kp|)          (½ for an all-zero column)
//   mask     M_k = [U < P]·[J_kp > 0] + [U ≥ P]·[J_kp < 0]
//   update   d_p = Σ_k (ℓ_k + (1 − ℓ_k)·M_k)·J_kp
// with U ~ Uniform[0, 1) drawn per column and ℓ the per-task leak (0 = the
// paper's default: only the chosen sign survives). A column with a non-finite
// entry gives d_p = NaN.
//
// U comes from a counter-based generator, a function of (seed, offset, column)
// only, so that the CPU and CUDA kernels draw the same numbers, in any order and
// with any number of threads, and a step is reproducible from (seed, offset):
//   U = (h >> 11)·2⁻⁵³,  h = mix(mix(mix(seed) ^ offset) ^ (column_offset + p))
// for the column p of J: `column_offset` is the global index of J's first column
// when J holds a slice of the columns (an FSDP2 rank's shard of a parameter), so
// that the slices of all ranks draw the numbers of the whole matrix.
// where mix is SplitMix64's finaliser (Steele, Lea & Flood 2014), a bijection of
// 64-bit words with full avalanche. The 53 high bits give a double in [0, 1).
#pragma once

#include <cstdint>

#include "common.h"

namespace selgroup {
namespace manipulation {

// SplitMix64: add the golden-ratio increment, then two xor-shift-multiply rounds.
SELGROUP_HD_INLINE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

SELGROUP_HD_INLINE double graddrop_uniform(int64_t seed, int64_t offset, int64_t column) {
  const uint64_t key = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(offset));
  const uint64_t h = splitmix64(key ^ static_cast<uint64_t>(column));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // 2⁻⁵³
}

// d_p for the columns p in [begin, begin + n) of the row-major K×P matrix J, into
// update[begin, begin + n). `sums` and `signs` are scratch of n scalars each. The
// loops run over the task rows outermost, so that on the CPU a chunk of columns
// is read row by row (contiguous, vectorisable); the CUDA kernel calls it with
// n = 1 per thread (the scratch then lives in registers). Either way each column
// is summed sequentially over k in the same order: the CPU and CUDA sums are the
// same sums.
template <typename scalar_t>
SELGROUP_HD_INLINE void graddrop_columns(const scalar_t* __restrict__ jacobian, const scalar_t* __restrict__ leak,
                                         int64_t K, int64_t P, int64_t begin, int64_t n, int64_t seed, int64_t offset,
                                         int64_t column_offset, scalar_t* __restrict__ update, scalar_t* __restrict__ sums,
                                         scalar_t* __restrict__ signs) {
  for (int64_t i = 0; i < n; ++i) sums[i] = signs[i] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = jacobian + k * P + begin;
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t g = row[i];
      sums[i] += g;
      signs[i] += fabs(g);  // Σ|g| for now
    }
  }
  // The sign each column keeps: +1, −1, or NaN for a non-finite column.
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t sum_abs = signs[i];
    const double purity = sum_abs > 0 ? 0.5 * (1.0 + static_cast<double>(sums[i]) / static_cast<double>(sum_abs)) : 0.5;
    // ±1 by integer arithmetic: a branch on this coin flip would be mispredicted.
    const int keep_positive = graddrop_uniform(seed, offset, column_offset + begin + i) < purity;
    const scalar_t sign = static_cast<scalar_t>(2 * keep_positive - 1);
    signs[i] = isfinite(static_cast<double>(sum_abs)) ? sign : static_cast<scalar_t>(NAN);
    sums[i] = 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = jacobian + k * P + begin;
    const scalar_t leak_k = leak[k];
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t g = row[i], sign = signs[i];
      // Branch-free (the signs are random, a branch would be mispredicted half the
      // time): with sign = ±1, kept = sign·max(sign·g, 0) is g where g has the kept
      // sign and 0 elsewhere, exactly; g − kept is the dropped part.
      const scalar_t signed_g = sign * g;
      const scalar_t kept = sign * (signed_g > 0 ? signed_g : static_cast<scalar_t>(0));
      sums[i] += kept + leak_k * (g - kept);
    }
  }
  for (int64_t i = 0; i < n; ++i) update[begin + i] = signs[i] == signs[i] ? sums[i] : signs[i];  // NaN: not equal
}

// GradDrop over the row-major K×P `jacobian` into `update` [P], a map over the
// columns (team.h). On the CPU a thread walks its columns in chunks that keep the
// two scratch rows in L1; a CUDA thread takes one column, its scratch in registers.
template <typename scalar_t>
struct GradDrop {
  const scalar_t* jacobian;
  const scalar_t* leak;
  scalar_t* update;
  int64_t K, P, seed, offset, column_offset;

#if defined(__CUDA_ARCH__)
  static constexpr int64_t kChunk = 1;
#else
  static constexpr int64_t kChunk = 512;
#endif
  static constexpr int64_t kGrain = 8192;
  SELGROUP_HD_INLINE int64_t count() const { return P; }
  using Shared = NoShared;
  SELGROUP_HD_INLINE Shared prepare() const { return {}; }
  SELGROUP_HD_INLINE void operator()(Shared, int64_t begin, int64_t end) const {
    scalar_t sums[kChunk], signs[kChunk];
    for (int64_t chunk = begin; chunk < end; chunk += kChunk)
      graddrop_columns(jacobian, leak, K, P, chunk, end - chunk < kChunk ? end - chunk : kChunk, seed, offset,
                       column_offset, update, sums, signs);
  }
};

}  // namespace manipulation
}  // namespace selgroup
