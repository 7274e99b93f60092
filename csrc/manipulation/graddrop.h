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
//   U = (h >> 11)·2⁻⁵³,  h = mix(mix(mix(seed) ^ offset) ^ column)
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

// d_p for one column p of the row-major K×P matrix J. Sequential over k in a
// fixed order, so the CPU and CUDA sums are the same sums.
template <typename scalar_t>
SELGROUP_HD_INLINE scalar_t graddrop_column(const scalar_t* jacobian, const scalar_t* leak, int64_t K, int64_t P,
                                            int64_t column, int64_t seed, int64_t offset) {
  scalar_t sum = 0, sum_abs = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t g = jacobian[k * P + column];
    sum += g;
    sum_abs += g < 0 ? -g : g;
  }
  if (!isfinite(static_cast<double>(sum_abs))) return static_cast<scalar_t>(NAN);
  const double purity = sum_abs > 0 ? 0.5 * (1.0 + static_cast<double>(sum) / static_cast<double>(sum_abs)) : 0.5;
  const bool keep_positive = graddrop_uniform(seed, offset, column) < purity;
  scalar_t update = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t g = jacobian[k * P + column];
    const bool kept = keep_positive ? g > 0 : g < 0;
    update += kept ? g : leak[k] * g;
  }
  return update;
}

}  // namespace manipulation
}  // namespace selgroup
