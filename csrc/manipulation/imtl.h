// IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the
// weights w (Σ w = 1) for which d = wᵀ·J has the same projection on every unit
// task gradient u_k = g_k/‖g_k‖. The authors' closed form, with task 0 as anchor,
// D = [g_0 − g_i]_i and U = [u_0 − u_j]_j ((K−1)×P each):
//   α = (g_0·Uᵀ)·(D·Uᵀ)⁻¹,  w = [1 − Σα, α].
//
// Here the same conditions are solved without an anchor. With n_k = ‖g_k‖, the
// weights of the unit gradients ŵ_k = n_k·w_k and the cosine matrix C = U·Uᵀ
// (C_ij = G_ij/(n_i·n_j)), d = Σ ŵ_k·u_k has u_k·d = (C·ŵ)_k, so the conditions
// are C·ŵ = t·1 for some t and Σ_k ŵ_k/n_k = 1. Where C is regular that is
// ŵ = C⁻¹·1 / (rᵀ·C⁻¹·1), r = (1/n_k), the authors' unique solution. Where C is
// singular (linearly dependent gradients) the solutions form an affine set and
// the solver returns the one of least ‖ŵ‖, i.e. the pseudo-inverse solution of
// the whole system, which permutes with the tasks; the authors' anchored form
// takes the least ‖α‖ instead (torch.pinverse in their fallback), which depends
// on which task is the anchor: for parallel gradients (D·Uᵀ = 0) it returns the
// anchor's gradient, this solver the mean of them. In the eigenbasis of
// C = V·Λ·Vᵀ (eigh.h), with y = Vᵀ·1, ρ = Vᵀ·r and "dropped" the eigenvalues at or
// below m·ε·λ_max (ε the input dtype's machine epsilon, m the tasks solved for):
//   p = C⁺·1 has coordinates y_i/λ_i (kept), b = rᵀ·p, a = ‖p‖²;
//   1 ∈ range(C) (‖Π·1‖² = Σ_dropped y_i² ≤ m²·ε): ŵ ∝ (b/a)·p + Π·r,
//   else t = 0 and ŵ ∝ Π·r (d = 0: no direction has equal positive projections),
// scaled so that rᵀ·ŵ = 1; Π is the projector onto C's null space (the dropped
// coordinates). Nothing to scale by (rᵀ·ŵ = 0 before scaling): the mean.
// Working on C, not G, keeps unequal gradient norms out of the arithmetic.
// A task with a zero gradient has no direction: it gets weight 0 and the others
// are solved for (the authors' code divides by its zero norm and returns NaN).
// All gradients zero: w = 1/K (d = 0 whatever w).
#pragma once

#include "common.h"
#include "eigh.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct IMTLWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;

  struct Scratch {
    double* flag;
    double* G;
    double* norm;
    double* task;  // task[a]: the index of the a-th task with a non-zero gradient
    double* rho;   // r, then Vᵀ·r
    SymmetricEigen::Scratch eigen;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    double* flag = layout.take<double>(1);
    double* G = layout.take<double>(K * K);
    double* norm = layout.take<double>(K);
    double* task = layout.take<double>(K);
    double* rho = layout.take<double>(K);
    return {flag, G, norm, task, rho, SymmetricEigen::carve(layout, K, SymmetricEigen::log_capacity(K))};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    const SymmetricEigen::Scratch& e = s.eigen;
    double *G = s.G, *norm = s.norm, *task = s.task, *rho = s.rho;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;

    int m = 0;  // the tasks with a non-zero gradient; redundant on every worker
    for (int k = 0; k < K; ++k)
      if (G[k * K + k] > 0.0) ++m;
    if (m == 0) {
      for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(1.0 / K);
      return;
    }
    if (team.rank() == 0) {
      int a = 0;
      for (int k = 0; k < K; ++k) {
        norm[k] = sqrt(fmax(G[k * K + k], 0.0));
        if (G[k * K + k] > 0.0) task[a++] = k;
      }
    }
    team.sync();
    // C over the m tasks, row stride m, in the eigensolver's matrix.
    for (int entry = team.rank(); entry < m * m; entry += team.size()) {
      const int i = static_cast<int>(task[entry / m]), j = static_cast<int>(task[entry % m]);
      e.A[entry] = G[i * K + j] / (norm[i] * norm[j]);
    }
    team.sync();
    SymmetricEigen::decompose(team, e, m);
    double *ones = e.p, *y = e.q;  // the eigensolver's work vectors, free again
    for (int a = team.rank(); a < m; a += team.size()) {
      ones[a] = 1.0;
      rho[a] = 1.0 / norm[static_cast<int>(task[a])];
    }
    team.sync();
    SymmetricEigen::project(team, e, m, ones, y);
    SymmetricEigen::project(team, e, m, rho, ones);  // Vᵀ·r into `ones`, r (overwritten) no longer needed
    const double* r_eigen = ones;

    const double* eigenvalue = e.diagonal;  // the rest redundant on every worker
    double largest = 0.0;
    for (int i = 0; i < m; ++i) largest = fmax(largest, eigenvalue[i]);
    const double epsilon = input_epsilon<scalar_t>();
    const double cutoff = m * epsilon * largest;
    double a = 0.0, b = 0.0, ones_outside = 0.0, r_outside = 0.0;
    for (int i = 0; i < m; ++i) {
      if (eigenvalue[i] > cutoff) {
        a += (y[i] / eigenvalue[i]) * (y[i] / eigenvalue[i]);
        b += r_eigen[i] * y[i] / eigenvalue[i];
      } else {
        ones_outside += y[i] * y[i];
        r_outside += r_eigen[i] * r_eigen[i];
      }
    }
    const double along_p = ones_outside <= m * m * epsilon && a > 0.0 ? b / a : 0.0;
    const double sum = along_p * b + r_outside;  // rᵀ·ŵ before scaling
    team.sync();  // everyone has read y and Vᵀ·r
    if (!(sum > 0.0)) {
      for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(1.0 / K);
      return;
    }
    for (int i = team.rank(); i < m; i += team.size())
      y[i] = eigenvalue[i] > cutoff ? along_p * y[i] / eigenvalue[i] / sum : r_eigen[i] / sum;
    team.sync();
    double* unit_weights = rho;  // ŵ = V·z
    SymmetricEigen::expand(team, e, m, y, unit_weights);
    for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(0);
    team.sync();
    for (int a = team.rank(); a < m; a += team.size()) {
      const int k = static_cast<int>(task[a]);
      weights[k] = static_cast<scalar_t>(unit_weights[a] / norm[k]);
    }
  }
};

}  // namespace manipulation
}  // namespace selgroup
