// ConFIG (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics
// Informed Neural Networks", ICLR 2025, Eq. 2), from G alone:
//   u_k = g_k/‖g_k‖ (0 for a zero gradient),  b = U⁺·p,  d = (Σ_k g_kᵀ·b̂)·b̂,  b̂ = b/‖b‖,
// p the preference vector (the authors' and TorchJD's default: all ones). With
// U = D·J, D = diag(1/‖g_k‖), U⁺ = Uᵀ·(U·Uᵀ)⁺ = Jᵀ·D·(D·G·D)⁺, so b = Jᵀ·v with
//   v = D·(D·G·D)⁺·p,  ‖b‖² = vᵀ·G·v,  Σ_k g_kᵀ·b = 1ᵀ·G·v,
// and d = wᵀ·J with w = (1ᵀ·G·v / vᵀ·G·v)·v: no SVD of the K×P matrix J (the
// authors and TorchJD call torch.linalg.pinv on U), one K×K eigenproblem
// (eigh.h). The pseudo-inverse drops the eigenvalues of D·G·D at or below
// K·ε·λ_max (ε the input dtype's epsilon): G's own rounding, below which an
// eigenvalue is noise. (torch.linalg.pinv on U cuts singular values below
// max(K, P)·ε·σ_max, which for float32 and large P drops real directions.) It
// drops as well p's components along the kept eigenvectors up to K·ε·Σ|p_k|, their
// rounding: where p is orthogonal to them (e.g. p = 1 and u_1 = −u_2) b is 0, not
// noise that b̂ would blow up to unit length. b = 0: w = 0.
#pragma once

#include "eigh.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct ConFIGWeights {
  const scalar_t* gram;        // K×K
  const scalar_t* preference;  // K: p
  scalar_t* weights;           // K
  int K;

  struct Scratch {
    double* flag;
    double* G;          // K×K: G (the eigensolver overwrites its copy of D·G·D)
    double* inv_norm;   // K: D
    double* G_v;        // K
    SymmetricEigen::Scratch eigen;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    double* flag = layout.take<double>(1);
    double* G = layout.take<double>(K * K);
    double* inv_norm = layout.take<double>(K);
    double* G_v = layout.take<double>(K);
    return {flag, G, inv_norm, G_v, SymmetricEigen::carve(layout, K, SymmetricEigen::log_capacity(K))};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    const SymmetricEigen::Scratch& e = s.eigen;
    if (!load_gram(team, gram, K, s.G, s.flag, weights)) return;
    for (int k = team.rank(); k < K; k += team.size()) {
      const double squared_norm = s.G[k * K + k];
      s.inv_norm[k] = squared_norm > 0.0 ? 1.0 / sqrt(squared_norm) : 0.0;
    }
    team.sync();
    for (int i = team.rank(); i < K * K; i += team.size()) e.A[i] = s.G[i] * s.inv_norm[i / K] * s.inv_norm[i % K];
    team.sync();
    SymmetricEigen::decompose(team, e, K);

    const double* eigenvalues = e.diagonal;
    double largest = 0.0;
    for (int i = 0; i < K; ++i) largest = fmax(largest, eigenvalues[i]);
    const double epsilon = input_epsilon<scalar_t>();
    const double cutoff = largest * K * epsilon;
    double preference_size = 0.0;  // Σ|p_k|, redundant on every worker
    for (int k = 0; k < K; ++k) preference_size += fabs(static_cast<double>(preference[k]));
    const double rounding = K * epsilon * preference_size;
    // v = D·V·Λ⁺·Vᵀ·p.
    double *x = e.p, *y = e.q;
    for (int k = team.rank(); k < K; k += team.size()) x[k] = static_cast<double>(preference[k]);
    team.sync();
    SymmetricEigen::project(team, e, K, x, y);
    for (int i = team.rank(); i < K; i += team.size())
      y[i] = largest > 0.0 && eigenvalues[i] > cutoff && fabs(y[i]) > rounding ? y[i] / eigenvalues[i] : 0.0;
    team.sync();
    SymmetricEigen::expand(team, e, K, y, x);
    for (int k = team.rank(); k < K; k += team.size()) x[k] *= s.inv_norm[k];
    team.sync();
    matvec(team, s.G, x, s.G_v, K);
    double length = 0.0;  // 1ᵀ·G·v, redundant on every worker
    for (int k = 0; k < K; ++k) length += s.G_v[k];
    const double squared_norm = dot(x, s.G_v, K);  // vᵀ·G·v = ‖b‖²
    const double factor = squared_norm > 0.0 ? length / squared_norm : 0.0;
    for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(factor * x[k]);
  }
};

}  // namespace manipulation
}  // namespace selgroup
