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
// The eigendecomposition is parallel Jacobi (disjoint rotations of a round-robin
// ordering applied at once, their rows/columns split over the team):
// torch.linalg.eigh would synchronise the host on CUDA.
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

  // Jacobi converges quadratically; 30 sweeps is far beyond what double precision
  // needs for any K this library meets (typically < 10).
  static constexpr int kMaxSweeps = 30;
  // Stop when the off-diagonal part is this small relative to the whole matrix
  // (in squared Frobenius norm): a relative off-diagonal size of 1e-14, just above
  // the rounding noise the rotations leave in it (about K·ε).
  static constexpr double kOffDiagonalTolerance = 1e-28;

  // Rounds of a sweep: the pairs of the round-robin (circle) tournament on m
  // players, m = K rounded up to even (player K is a bye when K is odd). In each
  // of the m − 1 rounds the m/2 pairs are disjoint, so their rotations commute and
  // run at once (Brent & Luk 1985): per round, one barrier after the angles, one
  // after the row rotations, one after the column rotations, instead of two per
  // pair for the cyclic-by-rows order.
  SELGROUP_HD static int players(int K) { return K + (K & 1); }

  // The pair i of round r, p < q (q may be the bye K).
  SELGROUP_HD static void pair(int m, int r, int i, int* p, int* q) {
    int a = r, b = m - 1;
    if (i > 0) {
      a = (r + i) % (m - 1);
      b = (r - i + m - 1) % (m - 1);
    }
    *p = a < b ? a : b;
    *q = a < b ? b : a;
  }

  struct Scratch {
    double* flag;
    double* A;         // G, rotated to diagonal
    double* V;         // eigenvectors in its columns
    double* rotation;  // (cos, sin) of each pair of the round
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K),
            layout.take<double>(players(K))};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *A = s.A, *V = s.V, *rotation = s.rotation;
    if (!load_gram(team, gram, K, A, s.flag, weights)) return;
    for (int e = team.rank(); e < K * K; e += team.size()) V[e] = (e / K == e % K) ? 1.0 : 0.0;
    team.sync();

    const int m = players(K), pairs = m / 2;
    for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
      double off = 0.0, total = 0.0;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const double square = A[i * K + j] * A[i * K + j];
          total += square;
          if (i != j) off += square;
        }
      if (off <= kOffDiagonalTolerance * total) break;
      for (int round = 0; round < m - 1; ++round) {
        // The rotation that zeroes A_pq (Numerical Recipes' stable form); the
        // identity for a zero A_pq or a bye.
        for (int i = team.rank(); i < pairs; i += team.size()) {
          int p, q;
          pair(m, round, i, &p, &q);
          double cosine = 1.0, sine = 0.0;
          if (q < K && A[p * K + q] != 0.0) {
            const double theta = (A[q * K + q] - A[p * K + p]) / (2.0 * A[p * K + q]);
            const double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
            cosine = 1.0 / sqrt(t * t + 1.0);
            sine = t * cosine;
          }
          rotation[2 * i] = cosine;
          rotation[2 * i + 1] = sine;
        }
        team.sync();
        // Rows p, q ← rotated (Pᵀ·A), every pair and column at once.
        for (int e = team.rank(); e < pairs * K; e += team.size()) {
          const int i = e / K, k = e % K;
          int p, q;
          pair(m, round, i, &p, &q);
          if (q >= K) continue;
          const double cosine = rotation[2 * i], sine = rotation[2 * i + 1];
          const double apk = A[p * K + k], aqk = A[q * K + k];
          A[p * K + k] = cosine * apk - sine * aqk;
          A[q * K + k] = sine * apk + cosine * aqk;
        }
        team.sync();
        // Columns p, q ← rotated (·P) in A and in V; A_pq is zero in exact arithmetic.
        for (int e = team.rank(); e < pairs * K; e += team.size()) {
          const int i = e / K, k = e % K;
          int p, q;
          pair(m, round, i, &p, &q);
          if (q >= K) continue;
          const double cosine = rotation[2 * i], sine = rotation[2 * i + 1];
          const double akp = A[k * K + p], akq = A[k * K + q];
          A[k * K + p] = k == q ? 0.0 : cosine * akp - sine * akq;
          A[k * K + q] = k == p ? 0.0 : sine * akp + cosine * akq;
          const double vkp = V[k * K + p], vkq = V[k * K + q];
          V[k * K + p] = cosine * vkp - sine * vkq;
          V[k * K + q] = sine * vkp + cosine * vkq;
        }
        team.sync();
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
