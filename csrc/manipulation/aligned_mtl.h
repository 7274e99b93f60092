// Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
// Learning", CVPR 2023) as a weighting of the task gradients.
//
// With G = V·Λ·Vᵀ (eigenvalues λ_i, kept where λ_i > λ_max·K·ε, ε the machine
// epsilon of G's dtype, as the authors' ProcrustesSolver (ε of torch's default dtype,
// their training's) and TorchJD's AlignedMTL (ε of G's dtype) do: the rank is cut
// at the rounding of G's entries, not deeper), the aligned task gradients are
//   Ĵ = W·J,  W = V·diag(sqrt(σ/λ_i))·Vᵀ,  σ = the smallest kept λ_i
// (the authors' default scale_mode="min": the smallest singular value of J,
// squared), so that Ĵ·Ĵᵀ = σ·I on the kept span: orthogonal aligned gradients of
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

template <typename scalar_t>
struct AlignedMTLWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;
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
    double smallest = largest;
    for (int i = 0; i < K; ++i)
      if (eigenvalues[i] > cutoff) smallest = fmin(smallest, eigenvalues[i]);

    // w = V·f(Λ)·Vᵀ·1 with f(λ) = sqrt(σ/λ) on the kept eigenvalues, 0 on the dropped.
    double *x = e.p, *y = e.q;
    fill(team, x, K, 1.0);
    team.sync();
    SymmetricEigen::project(team, e, K, x, y);
    for (int i = team.rank(); i < K; i += team.size()) {
      const double eigenvalue = eigenvalues[i];
      y[i] = largest > 0.0 && eigenvalue > cutoff ? sqrt(smallest / eigenvalue) * y[i] : 0.0;
    }
    team.sync();
    SymmetricEigen::expand(team, e, K, y, x);
    store(team, x, K, weights);
  }
};

}  // namespace manipulation
}  // namespace selgroup
