// MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
// NeurIPS 2018): the min-norm point of the convex hull of the task gradients,
//   w = argmin_{w ∈ simplex} wᵀ·G·w,   d = wᵀ·J,
// by the authors' Frank-Wolfe solver (MinNormSolver.find_min_norm_element_FW):
//   1. the start is the best pair: the 2-task closed form on every pair (i, j),
//      the pair of least norm wins (first pair on ties, pairs in order i < j);
//      with K = 2 this is the answer;
//   2. each step moves towards the vertex t = argmin_k (G·w)_k with the exact
//      line search of the 2-point problem between w and e_t;
//   3. it stops when ‖w_new − w‖₁ < tol or after max_iter steps.
// One deliberate difference: the authors' 2-point solver returns 0.999 / 0.001
// instead of 1 / 0 when an end point is the minimum; that perturbs an optimal w by
// 1e-3 at every step, so their loop never meets its own stop criterion. Here the
// line search is exact (1 / 0), and the solver stops at the optimum.
#pragma once

#include "common.h"

namespace selgroup {
namespace manipulation {

// argmin over γ ∈ [0, 1] of ‖γ·v1 + (1 − γ)·v2‖² from the three inner products;
// writes γ and the minimal squared norm.
SELGROUP_HD_INLINE void min_norm_of_two(double v1v1, double v1v2, double v2v2, double* gamma, double* cost) {
  if (v1v2 >= v1v1) {
    *gamma = 1.0;
    *cost = v1v1;
  } else if (v1v2 >= v2v2) {
    *gamma = 0.0;
    *cost = v2v2;
  } else {
    *gamma = (v2v2 - v1v2) / (v1v1 + v2v2 - 2.0 * v1v2);
    *cost = v2v2 + *gamma * (v1v2 - v2v2);
  }
}

template <typename scalar_t>
struct MGDAWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;
  int max_iter;
  double tol;

  struct Scratch {
    double* flag;
    double* G;
    double* w;
    double* Gw;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K), layout.take<double>(K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double* G = s.G;
    double* w = s.w;
    double* Gw = s.Gw;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;

    // Best pair, computed redundantly by every worker (K²/2 closed forms).
    int best_i = 0, best_j = 1;
    double best_gamma = 0.0, best_cost = 0.0;
    bool first = true;
    for (int i = 0; i < K; ++i) {
      for (int j = i + 1; j < K; ++j) {
        double gamma, cost;
        min_norm_of_two(G[i * K + i], G[i * K + j], G[j * K + j], &gamma, &cost);
        if (first || cost < best_cost) {
          best_i = i, best_j = j, best_gamma = gamma, best_cost = cost;
          first = false;
        }
      }
    }
    fill(team, w, K, 0.0);
    team.sync();
    if (team.rank() == 0) {
      w[best_i] = best_gamma;
      w[best_j] = 1.0 - best_gamma;
    }
    team.sync();

    for (int iteration = 0; K > 2 && iteration < max_iter; ++iteration) {
      matvec(team, G, w, Gw, K);
      int t = 0;
      for (int k = 1; k < K; ++k)
        if (Gw[k] < Gw[t]) t = k;
      double gamma, cost;
      min_norm_of_two(dot(w, Gw, K), Gw[t], G[t * K + t], &gamma, &cost);
      double change = 0.0;  // ‖γ·w + (1 − γ)·e_t − w‖₁
      for (int k = 0; k < K; ++k) change += fabs((gamma - 1.0) * w[k] + (k == t ? 1.0 - gamma : 0.0));
      team.sync();  // everyone has read w before it moves
      for (int k = team.rank(); k < K; k += team.size()) w[k] = gamma * w[k] + (k == t ? 1.0 - gamma : 0.0);
      team.sync();
      if (change < tol) break;
    }
    store(team, w, K, weights);
  }
};

}  // namespace manipulation
}  // namespace selgroup
