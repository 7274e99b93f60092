// Regrouping step 1 (docs/algorithm.md §Similarity): the similarity the clustering
// runs on, S = (N + Nᵀ) / 2 with N[i, j] = A[i, j] / A[j, j], a map over the
// entries (team.h) shared by every backend.
//
// The rule that keeps S finite: column j is divided by A[j, j] only when A[j, j]
// is a positive finite number; otherwise task j has shown no measurable
// self-improvement, its normalised column is undefined and is taken as a zero
// column (neutral: neither attracts nor repels). A normalised entry that is not
// finite (a non-finite affinity, or an overflowing ratio) is likewise taken as 0.
// The symmetrisation halves before adding so that it cannot overflow.
// At the start of training (A = 0) S is therefore all zeros.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "affinity_update.h"

namespace selgroup {

// N = value / diagonal under the rule above, given `usable` = the diagonal is a
// positive finite number (positive_finite, with `&` rather than `&&`: no branch).
// The float version divides unconditionally and masks what the rule discards
// (the same values), so that the host loop vectorises.
template <typename T>
SELGROUP_HD_INLINE bool usable_diagonal(T diagonal) {
  return (diagonal > T(0)) & is_finite(diagonal);
}
template <typename T>
SELGROUP_HD_INLINE T normalised(T value, T diagonal, bool usable) {
  if constexpr (sizeof(T) == 4) {
    // The ratio or +0 by a bit mask: GCC vectorises that, divisions included, and
    // not the same `?:` (it will not if-convert it under -ftrapping-math).
    const T ratio = value / diagonal;
    uint32_t bits;
    memcpy(&bits, &ratio, sizeof(T));
    bits &= uint32_t(0) - static_cast<uint32_t>(usable & is_finite(ratio));
    T masked;
    memcpy(&masked, &bits, sizeof(T));
    return masked;
  } else {
    // The mask's 64-bit twin does not vectorise on baseline x86-64 (SSE2): the
    // scalar loop skips the divisions it does not need instead.
    if (!usable) return T(0);
    const T ratio = value / diagonal;
    return is_finite(ratio) ? ratio : T(0);
  }
}

// S into a contiguous K×K output, a map over its entries, taken row by row: the
// inner loop runs along a row of S (and of A), without a division of the index
// per entry, and vectorises.
template <typename T>
struct GroupSimilarity {
  const T* affinity;
  int64_t stride_row, stride_col;
  int64_t K;
  T* similarity;

  static constexpr int64_t kGrain = int64_t(1) << 16;
  SELGROUP_HD_INLINE int64_t count() const { return K * K; }
  using Shared = NoShared;
  SELGROUP_HD_INLINE Shared prepare() const { return {}; }

  SELGROUP_HD_INLINE void operator()(Shared, int64_t begin, int64_t end) const {
    for (int64_t i = begin / K, first = begin % K, entry = begin; entry < end; ++i, first = 0) {
      const int64_t last = first + (end - entry) < K ? first + (end - entry) : K;
      row(i, first, last, similarity + i * K);
      entry += last - first;
    }
  }

  // S[i, j] = N[i, j] / 2 + N[j, i] / 2 for j in [first, last).
  SELGROUP_HD_INLINE void row(int64_t i, int64_t first, int64_t last, T* __restrict__ out) const {
    const T* __restrict__ a = affinity;
    const int64_t diagonal_stride = stride_row + stride_col;
    const T diagonal_i = a[i * diagonal_stride];
    const bool usable_i = usable_diagonal(diagonal_i);
    for (int64_t j = first; j < last; ++j) {
      const T diagonal_j = a[j * diagonal_stride];
      out[j] = T(0.5) * normalised(a[i * stride_row + j * stride_col], diagonal_j, usable_diagonal(diagonal_j)) +
               T(0.5) * normalised(a[j * stride_row + i * stride_col], diagonal_i, usable_i);
    }
  }
};

}  // namespace selgroup
