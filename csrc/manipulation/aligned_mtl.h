// Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
// Learning", CVPR 2023) as a weighting of the task gradients.
//
// With G = V·Λ·Vᵀ (eigenvalues λ_i, kept where λ_i > λ_max·K·ε_float32 as the
// authors' ProcrustesSolver does), the aligned task gradients are
//   Ĵ = W·J,  W = V·diag(sqrt(σ/λ_i))·Vᵀ,  σ = the smallest kept λ_i
// (the authors' default scale_mode="min": the smallest singular value of J,
// squared), so that Ĵ·Ĵᵀ = σ·I on the kept span: orthogonal aligned gradients of
// equal norm sqrt(σ). With equal preferences the update is their SUM,
//   d = 1ᵀ·Ĵ = wᵀ·J,  w = W·1.
// The eigendecomposition is cyclic Jacobi (rotations of the rows/columns split
// over the team): torch.linalg.eigh would synchronise the host on CUDA.
// All eigenvalues dropped (G = 0, all gradients zero): w = 0.
#pragma once

#include <cfloat>

#include "common.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct AlignedMTLWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;

  // Cyclic Jacobi converges quadratically; 30 sweeps is far beyond what double
  // precision needs for any K this library meets (typically < 10).
  static constexpr int kMaxSweeps = 30;

  SELGROUP_HD static int workspace_doubles(int K) { return kFlagSlots + 2 * K * K; }

  template <typename Team>
  SELGROUP_HD void operator()(const Team& team, double* workspace) const {
    double* A = workspace + kFlagSlots;  // G, rotated to diagonal
    double* V = A + K * K;               // eigenvectors in its columns
    if (!load_gram(team, gram, K, A, workspace, weights)) return;
    for (int e = team.rank(); e < K * K; e += team.size()) V[e] = (e / K == e % K) ? 1.0 : 0.0;
    team.sync();

    for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
      double off = 0.0, total = 0.0;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const double square = A[i * K + j] * A[i * K + j];
          total += square;
          if (i != j) off += square;
        }
      if (off <= 1e-30 * total) break;
      for (int p = 0; p < K - 1; ++p) {
        for (int q = p + 1; q < K; ++q) {
          const double apq = A[p * K + q];
          if (apq == 0.0) continue;
          const double app = A[p * K + p], aqq = A[q * K + q];
          // The rotation that zeroes A_pq (Numerical Recipes' stable form).
          const double theta = (aqq - app) / (2.0 * apq);
          const double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
          const double cosine = 1.0 / sqrt(t * t + 1.0), sine = t * cosine;
          team.sync();  // everyone has read A_pp, A_qq, A_pq
          for (int k = team.rank(); k < K; k += team.size()) {
            if (k != p && k != q) {
              const double akp = A[k * K + p], akq = A[k * K + q];
              A[k * K + p] = A[p * K + k] = cosine * akp - sine * akq;
              A[k * K + q] = A[q * K + k] = sine * akp + cosine * akq;
            }
            const double vkp = V[k * K + p], vkq = V[k * K + q];
            V[k * K + p] = cosine * vkp - sine * vkq;
            V[k * K + q] = sine * vkp + cosine * vkq;
          }
          if (team.rank() == 0) {
            A[p * K + p] = app - t * apq;
            A[q * K + q] = aqq + t * apq;
            A[p * K + q] = A[q * K + p] = 0.0;
          }
          team.sync();
        }
      }
    }

    double largest = 0.0;
    for (int i = 0; i < K; ++i) largest = fmax(largest, A[i * K + i]);
    const double cutoff = largest * K * static_cast<double>(FLT_EPSILON);
    double smallest = largest;
    for (int i = 0; i < K; ++i)
      if (A[i * K + i] > cutoff) smallest = fmin(smallest, A[i * K + i]);
    for (int m = team.rank(); m < K; m += team.size()) {
      double sum = 0.0;
      for (int i = 0; i < K; ++i) {
        const double eigenvalue = A[i * K + i];
        if (!(largest > 0.0 && eigenvalue > cutoff)) continue;
        double column_sum = 0.0;
        for (int k = 0; k < K; ++k) column_sum += V[k * K + i];
        sum += V[m * K + i] * sqrt(smallest / eigenvalue) * column_sum;
      }
      weights[m] = static_cast<scalar_t>(sum);
    }
  }
};

}  // namespace manipulation
}  // namespace selgroup
