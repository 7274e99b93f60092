// Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022):
// the weights are the bargaining solution α > 0 of
//   G·α = 1/α  (elementwise),  d = αᵀ·J,
// which is the unique minimiser of the strictly convex
//   φ(α) = ½·αᵀ·G·α − Σ_k log α_k   (∇φ = G·α − 1/α,  ∇²φ = G + diag(1/α²))
// when G is positive definite. The authors approach it by a sequence of convex
// programs (cvxpy/ECOS, at most 20, stopping at ‖G·α − 1/α‖ < 1e-3 on G/‖G‖_F);
// here damped Newton (Boyd & Vandenberghe §9.5: backtracking line search with
// α kept positive) on φ solves it until the Newton decrement of the last step
// taken is below `tol` (λ²/2 ≈ φ(α) − φ(α*), affine invariant), from `alpha_init` (the previous
// step's α, the authors' warm start) first rescaled along its ray to the best
// s·α_init (s = sqrt(K / α_initᵀ·G·α_init)), which makes the start scale-free.
// Non-positive or non-finite entries of alpha_init are replaced by 1.
// A singular G (linearly dependent or zero gradients) may have no solution: φ is
// then unbounded below along a direction α ≥ 0 and α grows at each step until
// max_iter; the weights stay positive and finite, and the methods side's max_norm
// clipping of d (the authors' too) bounds the update.
#pragma once

#include "common.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct NashMTLWeights {
  const scalar_t* gram;        // K×K
  const scalar_t* alpha_init;  // K
  scalar_t* weights;           // K
  int K;
  int max_iter;
  double tol;

  // Armijo constant and at most this many halvings of the Newton step.
  static constexpr double kSufficientDecrease = 0.25;
  static constexpr int kMaxBacktracking = 60;
  // Below this squared Newton decrement φ is in its quadratically convergent
  // region (φ is self-concordant: the full step is accepted for λ < (1 − 2·0.25)/4,
  // Boyd & Vandenberghe §9.6.4), and the full step is taken without the Armijo
  // test, whose φ differences would be below φ's rounding there.
  static constexpr double kPureNewtonDecrement = 0.01;

  struct Scratch {
    double* flag;
    double* G;
    double* hessian;
    double* alpha;
    double* G_alpha;
    double* step;  // −∇φ, then the Newton step
    double* trial;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K), layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *G = s.G, *hessian = s.hessian, *alpha = s.alpha, *G_alpha = s.G_alpha, *step = s.step, *trial = s.trial;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;

    for (int k = team.rank(); k < K; k += team.size()) {
      const double start = static_cast<double>(alpha_init[k]);
      alpha[k] = (isfinite(start) && start > 0.0) ? start : 1.0;
    }
    team.sync();
    const double curvature = quadratic_form(G, alpha, K);
    const double ray_scale = curvature > 0.0 ? sqrt(K / curvature) : 1.0;
    team.sync();
    for (int k = team.rank(); k < K; k += team.size()) alpha[k] *= ray_scale;
    team.sync();

    // φ at v (redundant on every worker).
    auto potential = [&](const double* v) {
      double logs = 0.0;
      for (int k = 0; k < K; ++k) logs += log(v[k]);
      return 0.5 * quadratic_form(G, v, K) - logs;
    };
    for (int iteration = 0; iteration < max_iter; ++iteration) {
      matvec(team, G, alpha, G_alpha, K);
      for (int e = team.rank(); e < K * K; e += team.size()) {
        const int i = e / K, j = e % K;
        hessian[e] = G[e] + (i == j ? 1.0 / (alpha[i] * alpha[i]) : 0.0);
      }
      for (int k = team.rank(); k < K; k += team.size()) step[k] = 1.0 / alpha[k] - G_alpha[k];
      team.sync();
      const double phi = potential(alpha);
      cholesky_solve(team, hessian, step, K);
      double decrement = 0.0;  // λ² = −∇φ·Δ
      for (int k = 0; k < K; ++k) decrement += (1.0 / alpha[k] - G_alpha[k]) * step[k];
      if (!(decrement >= 0.0)) break;  // NaN (or rounding below 0): stop rather than wander
      double t = 1.0;
      for (int k = 0; k < K; ++k)  // stay inside α > 0
        while (alpha[k] + t * step[k] <= 0.0) t *= 0.5;
      for (int attempt = 0; attempt < kMaxBacktracking; ++attempt) {
        for (int k = team.rank(); k < K; k += team.size()) trial[k] = alpha[k] + t * step[k];
        team.sync();
        const bool accepted =
            decrement < kPureNewtonDecrement || potential(trial) <= phi - kSufficientDecrease * t * decrement;
        team.sync();  // everyone has read trial before it is rewritten
        if (accepted) break;
        t *= 0.5;
      }
      for (int k = team.rank(); k < K; k += team.size()) alpha[k] = trial[k];
      team.sync();
      // Converged: this last (full, quadratically convergent) step took the error
      // from about λ² to about λ⁴.
      if (0.5 * decrement < tol) break;
    }
    store(team, alpha, K, weights);
  }
};

}  // namespace manipulation
}  // namespace selgroup
