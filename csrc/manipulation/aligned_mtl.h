// Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
// Learning", CVPR 2023) as a weighting of the task gradients.
//
// With G = V·Λ·Vᵀ (eigenvalues λ_i, kept where λ_i > λ_max·K·ε, ε the machine
// epsilon of G's dtype, as the authors' ProcrustesSolver (ε of torch's default dtype,
// their training's) and TorchJD's AlignedMTL (ε of G's dtype) do: the rank is cut
// at the rounding of G's entries, not deeper), the aligned task gradients are
//   Ĵ = W·J,  W = V·diag(sqrt(σ/λ_i))·Vᵀ,
// σ by the authors' scale_mode (TorchJD 0.18's AlignedMTL has the same three):
//   min    (0, the default): the smallest kept λ_i (J's smallest singular value, squared);
//   median (1): torch.median of the kept λ_i, the lower middle one for an even count;
//   rmse   (2): the mean of the kept λ_i (the mean squared singular value),
// so that Ĵ·Ĵᵀ = σ·I on the kept span: orthogonal aligned gradients of
// equal norm sqrt(σ). With equal preferences the update is their SUM,
//   d = 1ᵀ·Ĵ = wᵀ·J,  w = W·1.
// The eigendecomposition is eigh.h's (Householder + implicit QL) on the team:
// torch.linalg.eigh would synchronise the host on CUDA. w = W·1 is computed as
// V·(f(Λ)·(Vᵀ·1)) without forming V or W.
// All eigenvalues dropped (G = 0, all gradients zero): w = 0.
// In float32 the eigenvalues below λ_max·K·ε_float32 are below the rounding of G
// itself and are lost: directions of the gradients with singular values below
// sqrt(K·ε_float32)·σ_max (3.5e-4·σ_max at K = 1) get no weight, where float64
// keeps them down to sqrt(K·ε_float64)·σ_max (1.5e-8·σ_max).
#pragma once

#include "eigh.h"

namespace selgroup {
namespace manipulation {

// The scale σ of the aligned gradients (AlignedMTLWeights::scale_mode), in the op's schema order.
enum class AlignedScale : int { kMin = 0, kMedian = 1, kRmse = 2 };

template <typename scalar_t>
struct AlignedMTLWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;
  AlignedScale scale_mode = AlignedScale::kMin;
  // Rotations the eigensolver logs before it applies them to an explicit Zᵀ
  // (eigh.h), at least K − 1 (one sweep); 0: SymmetricEigen::log_capacity(K).
  // Tests set it small to take that path.
  int rotation_log = 0;

  struct Scratch {
    double* flag;
    SymmetricEigen::Scratch eigen;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    double* flag = layout.take<double>(1);
    return {flag, SymmetricEigen::carve(layout, K, rotation_log > 0 ? rotation_log : SymmetricEigen::log_capacity(K))};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    const SymmetricEigen::Scratch& e = s.eigen;
    if (!load_gram(team, gram, K, e.A, s.flag, weights)) return;
    SymmetricEigen::decompose(team, e, K);

    const double* eigenvalues = e.diagonal;
    double largest = 0.0;
    for (int i = 0; i < K; ++i) largest = fmax(largest, eigenvalues[i]);
    constexpr double epsilon = input_epsilon<scalar_t>();
    const double cutoff = largest * K * epsilon;
    const double scale = kept_scale(eigenvalues, cutoff, largest);

    // w = V·f(Λ)·Vᵀ·1 with f(λ) = sqrt(σ/λ) on the kept eigenvalues, 0 on the dropped.
    double *x = e.p, *y = e.q;
    fill(team, x, K, 1.0);
    team.sync();
    SymmetricEigen::project(team, e, K, x, y);
    for (int i = team.rank(); i < K; i += team.size()) {
      const double eigenvalue = eigenvalues[i];
      y[i] = largest > 0.0 && eigenvalue > cutoff ? sqrt(scale / eigenvalue) * y[i] : 0.0;
    }
    team.sync();
    SymmetricEigen::expand(team, e, K, y, x);
    store(team, x, K, weights);
  }

  // σ of scale_mode over the eigenvalues above `cutoff` (every worker computes it, O(K²) at most: no sync).
  SELGROUP_HD double kept_scale(const double* eigenvalues, double cutoff, double largest) const {
    double smallest = largest, sum = 0.0;
    int kept = 0;
    for (int i = 0; i < K; ++i)
      if (eigenvalues[i] > cutoff) {
        smallest = fmin(smallest, eigenvalues[i]);
        sum += eigenvalues[i];
        ++kept;
      }
    if (scale_mode == AlignedScale::kMin || kept == 0) return smallest;
    if (scale_mode == AlignedScale::kRmse) return sum / kept;
    // torch.median: the kept eigenvalue of ascending rank (kept − 1)/2; ties ranked by index.
    const int middle = (kept - 1) / 2;
    for (int i = 0; i < K; ++i) {
      if (!(eigenvalues[i] > cutoff)) continue;
      int rank = 0;
      for (int j = 0; j < K; ++j)
        if (eigenvalues[j] > cutoff && (eigenvalues[j] < eigenvalues[i] || (eigenvalues[j] == eigenvalues[i] && j < i)))
          ++rank;
      if (rank == middle) return eigenvalues[i];
    }
    return smallest;  // not reached: exactly one kept eigenvalue has each rank
  }
};

}  // namespace manipulation
}  // namespace selgroup
