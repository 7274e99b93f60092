// IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the
// weights w (Σ w = 1) for which d = wᵀ·J has the same projection on every unit
// task gradient u_k = g_k/‖g_k‖. The authors' closed form, with task 0 as anchor,
// D = [g_0 − g_i]_i and U = [u_0 − u_j]_j ((K−1)×P each):
//   α = (g_0·Uᵀ)·(D·Uᵀ)⁻¹,  w = [1 − Σα, α],
// written through G (‖g_k‖ = sqrt(G_kk)):
//   (D·Uᵀ)_ij = G_00/n_0 − G_0j/n_j − G_i0/n_0 + G_ij/n_j,
//   (g_0·Uᵀ)_j = G_00/n_0 − G_0j/n_j,
// and solved as (D·Uᵀ)ᵀ·α = (g_0·Uᵀ)ᵀ by Gaussian elimination with partial
// pivoting (common.h; a singular system, e.g. linearly dependent gradients, gets
// one of its solutions where the authors fall back to the pseudo-inverse).
// A task with a zero gradient has no direction: it gets weight 0 and the closed
// form runs on the others (the authors' code divides by its zero norm and returns
// NaN); the first task with a non-zero gradient is the anchor. All gradients zero:
// w = 1/K (d = 0 whatever w).
#pragma once

#include "common.h"

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
    double* task;    // task[a]: the index of the a-th task with a non-zero gradient
    double* system;  // (m×m), m = active − 1
    double* rhs;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K),           layout.take<double>(K),
            layout.take<double>(K), layout.take<double>((K - 1) * (K - 1)), layout.take<double>(K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *G = s.G, *norm = s.norm, *task = s.task, *system = s.system, *rhs = s.rhs;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;

    int active = 0;  // redundant on every worker
    for (int k = 0; k < K; ++k)
      if (G[k * K + k] > 0.0) ++active;
    if (active == 0) {
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
    const int m = active - 1;
    const int anchor = static_cast<int>(task[0]);
    const double anchor_term = G[anchor * K + anchor] / norm[anchor];
    for (int e = team.rank(); e < m * m; e += team.size()) {
      const int jj = e / m, ii = e % m;  // system[jj][ii] = (D·Uᵀ)_{ii, jj}
      const int i = static_cast<int>(task[ii + 1]), j = static_cast<int>(task[jj + 1]);
      system[e] = anchor_term - G[anchor * K + j] / norm[j] - G[i * K + anchor] / norm[anchor] + G[i * K + j] / norm[j];
    }
    for (int jj = team.rank(); jj < m; jj += team.size()) {
      const int j = static_cast<int>(task[jj + 1]);
      rhs[jj] = anchor_term - G[anchor * K + j] / norm[j];
    }
    team.sync();
    gauss_solve(team, system, rhs, m);

    double sum = 0.0;
    for (int a = 0; a < m; ++a) sum += rhs[a];
    for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(0);
    team.sync();
    if (team.rank() == 0) {
      weights[anchor] = static_cast<scalar_t>(1.0 - sum);
      for (int a = 0; a < m; ++a) weights[static_cast<int>(task[a + 1])] = static_cast<scalar_t>(rhs[a]);
    }
  }
};

}  // namespace manipulation
}  // namespace selgroup
