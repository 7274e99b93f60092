// Regrouping step 1 (algorithm.md): the similarity the clustering runs on,
// S = (N + Nᵀ) / 2 with N[i, j] = A[i, j] / A[j, j], one entry per call so that
// the CPU loop and the CUDA kernel share it.
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

}  // namespace selgroup
