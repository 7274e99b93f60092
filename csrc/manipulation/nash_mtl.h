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
//
// Scale and singular G. The problem is invariant under G → S·G·S for a positive
// diagonal S (α → S⁻¹·α), so Newton runs on the correlation matrix
// C = S⁻¹·G·S⁻¹, S = diag(‖g_k‖) (a zero gradient's ‖g_k‖ floored at
// sqrt(ε·max_k G_kk), ε the input dtype's machine epsilon), and β = S·α: the
// gradients' norms, however unequal, do not enter its arithmetic. G is known only
// to about ε relative to ‖g_i‖·‖g_j‖, so C to about ε. Where C's Cholesky pivots
// all exceed K·ε/2, C is positive definite beyond that rounding and Newton solves
// C·β = 1/β as it stands (δ = 0). Otherwise it solves
//   (C + δ·I)·β = 1/β,  δ = K·ε, raised ×10 until C + δ·I factors with pivots > δ/2,
// which gives a singular or rounding-indefinite G (linearly dependent or zero
// gradients; float32 Grams of them) a unique, finite solution within about
// δ·‖β‖ of solving the equations. Without it φ is unbounded below there (no α solves
// G·α = 1/α when 1/α cannot lie in G's range, e.g. for a zero gradient or
// gradients ±v), α would grow without bound and d = αᵀ·J would become rounding
// noise. A zero gradient gets α_k = 1/(S_k·sqrt(δ)), finite. All gradients zero:
// α = 1 (d = 0 whatever α).
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
    double* C;  // G, then C + δ·I
    double* hessian;
    double* scale;  // S
    double* beta;
    double* C_beta;
    double* step;  // −∇φ, then the Newton step
    double* trial;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K), layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K),     layout.take<double>(K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *C = s.C, *hessian = s.hessian, *scale = s.scale, *beta = s.beta, *C_beta = s.C_beta, *step = s.step,
           *trial = s.trial;
    if (!load_gram(team, gram, K, C, s.flag, weights)) return;

    double largest_diagonal = 0.0;  // redundant on every worker
    for (int k = 0; k < K; ++k) largest_diagonal = fmax(largest_diagonal, C[k * K + k]);
    if (!(largest_diagonal > 0.0)) {
      for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(1);
      return;
    }
    const double epsilon = input_epsilon<scalar_t>();
    for (int k = team.rank(); k < K; k += team.size()) {
      scale[k] = sqrt(fmax(C[k * K + k], epsilon * largest_diagonal));
      const double start = static_cast<double>(alpha_init[k]);
      beta[k] = ((isfinite(start) && start > 0.0) ? start : 1.0) * scale[k];
    }
    team.sync();
    for (int e = team.rank(); e < K * K; e += team.size()) C[e] /= scale[e / K] * scale[e % K];
    team.sync();
    // δ = 0 where C factors with every pivot above K·ε/2 (C positive definite beyond
    // its rounding); else the first of K·ε, 10·K·ε, … with every pivot of C + δ·I
    // above δ/2. C has a unit (or zero) diagonal, so |λ(C)| ≤ K: δ ≥ 2K always factors.
    double delta = 0.0;
    for (;;) {
      for (int e = team.rank(); e < K * K; e += team.size()) hessian[e] = C[e] + (e / K == e % K ? delta : 0.0);
      team.sync();
      if (cholesky_factor(team, hessian, K) > 0.5 * fmax(delta, K * epsilon) || delta >= 2.0 * K) break;
      delta = delta == 0.0 ? K * epsilon : 10.0 * delta;
    }
    for (int k = team.rank(); k < K; k += team.size()) C[k * K + k] += delta;
    team.sync();

    const double curvature = quadratic_form(C, beta, K);
    const double ray_scale = curvature > 0.0 ? sqrt(K / curvature) : 1.0;
    team.sync();
    for (int k = team.rank(); k < K; k += team.size()) beta[k] *= ray_scale;
    team.sync();

    // φ at v (redundant on every worker).
    auto potential = [&](const double* v) {
      double logs = 0.0;
      for (int k = 0; k < K; ++k) logs += log(v[k]);
      return 0.5 * quadratic_form(C, v, K) - logs;
    };
    for (int iteration = 0; iteration < max_iter; ++iteration) {
      matvec(team, C, beta, C_beta, K);
      for (int e = team.rank(); e < K * K; e += team.size()) {
        const int i = e / K, j = e % K;
        hessian[e] = C[e] + (i == j ? 1.0 / (beta[i] * beta[i]) : 0.0);
      }
      for (int k = team.rank(); k < K; k += team.size()) step[k] = 1.0 / beta[k] - C_beta[k];
      team.sync();
      const double phi = potential(beta);
      cholesky_factor(team, hessian, K);
      cholesky_solve(team, hessian, step, K);
      double decrement = 0.0;  // λ² = −∇φ·Δ
      for (int k = 0; k < K; ++k) decrement += (1.0 / beta[k] - C_beta[k]) * step[k];
      if (!(decrement >= 0.0)) break;  // NaN (or rounding below 0): stop rather than wander
      double t = 1.0;
      for (int k = 0; k < K; ++k)  // stay inside β > 0
        while (beta[k] + t * step[k] <= 0.0) t *= 0.5;
      for (int attempt = 0; attempt < kMaxBacktracking; ++attempt) {
        for (int k = team.rank(); k < K; k += team.size()) trial[k] = beta[k] + t * step[k];
        team.sync();
        const bool accepted =
            decrement < kPureNewtonDecrement || potential(trial) <= phi - kSufficientDecrease * t * decrement;
        team.sync();  // everyone has read trial before it is rewritten
        if (accepted) break;
        t *= 0.5;
      }
      for (int k = team.rank(); k < K; k += team.size()) beta[k] = trial[k];
      team.sync();
      // Converged: this last (full, quadratically convergent) step took the error
      // from about λ² to about λ⁴.
      if (0.5 * decrement < tol) break;
    }
    for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(beta[k] / scale[k]);
  }
};

}  // namespace manipulation
}  // namespace selgroup
