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

#include <cstdint>

#include "affinity_update.h"

namespace selgroup {

template <typename T>
SELGROUP_HD_INLINE T normalised_affinity(const T* affinity, int64_t stride_row, int64_t stride_col, int64_t row,
                                         int64_t col) {
  const T diagonal = affinity[col * stride_row + col * stride_col];
  if (!positive_finite(diagonal)) return T(0);
  const T ratio = affinity[row * stride_row + col * stride_col] / diagonal;
  return is_finite(ratio) ? ratio : T(0);
}

template <typename T>
SELGROUP_HD_INLINE T group_similarity_entry(const T* affinity, int64_t stride_row, int64_t stride_col, int64_t row,
                                            int64_t col) {
  return T(0.5) * normalised_affinity(affinity, stride_row, stride_col, row, col) +
         T(0.5) * normalised_affinity(affinity, stride_row, stride_col, col, row);
}

// S into a contiguous K×K output, a map over its entries.
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
    for (int64_t entry = begin; entry < end; ++entry)
      similarity[entry] = group_similarity_entry(affinity, stride_row, stride_col, entry / K, entry % K);
  }
};

}  // namespace selgroup
