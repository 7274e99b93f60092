// FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024):
// α-fair weights w > 0 of
//   G·w = w^(−1/α)  (elementwise),  d = wᵀ·J,
// which, with p = 1/α, is the unique minimiser of the strictly convex
//   φ(w) = ½·wᵀ·G·w − Σ_k H(w_k),  H(x) = log x (p = 1), x^(1−p)/(1−p) (p ≠ 1),
//   ∇φ = G·w − w^(−p),  ∇²φ = G + diag(p·w^(−p−1)),
// when G is positive definite (H is concave for p > 0). α = 1 is Nash-MTL's
// bargaining solution G·w = 1/w (csrc/manipulation/nash_mtl.h runs this functor
// with p = 1 and its warm start). The authors (OptMN-Lab/fairgrad) and TorchJD call
// scipy's least_squares on G·w − w^(−p) from the uniform 1/K; here damped Newton on
// φ (Boyd & Vandenberghe §9.5: backtracking line search, w kept positive) solves it
// until the Newton decrement of the last step taken is below `tol`. α = 0 is the
// authors' linear scalarisation: w = 1/K.
//
// Scale and singular G. Newton runs in β = S·w on the correlation matrix
// C = S⁻¹·G·S⁻¹, S = diag(‖g_k‖) (a zero gradient's ‖g_k‖ floored at
// sqrt(ε·max_k G_kk), ε the input dtype's machine epsilon):
//   φ = ½·βᵀ·C·β − Σ_k c_k·H(β_k) + const,  c_k = S_k^(p−1),
// so the gradients' norms, however unequal, enter only through c (c = 1 for
// Nash-MTL, whose problem is then scale-free). G is known only to about ε relative
// to ‖g_i‖·‖g_j‖, so C to about ε. Where C's Cholesky pivots all exceed K·ε/2, C is
// positive definite beyond that rounding and Newton solves C·β = c·β^(−p) as it
// stands (δ = 0). Otherwise it solves
//   (C + δ·I)·β = c·β^(−p),  δ = K·ε, raised ×10 until C + δ·I factors with pivots > δ/2,
// which gives a singular or rounding-indefinite G (linearly dependent or zero
// gradients; float32 Grams of them) a unique, finite solution within about
// δ·‖β‖ of solving the equations. Without it φ is unbounded below there (no w solves
// G·w = w^(−p) when w^(−p) cannot lie in G's range, e.g. for a zero gradient or
// gradients ±v), w would grow without bound and d = wᵀ·J would become rounding
// noise. A zero gradient gets β_k = (c_k/δ)^(1/(1+p)), finite. All gradients zero:
// w = 1 (d = 0 whatever w).
//
// Start: alpha_init (Nash-MTL's previous weights; non-positive or non-finite
// entries replaced by 1) or, when null, all ones; then rescaled along its ray to
// the best s·β (s = (Σ_k c_k·β_k^(1−p) / βᵀ·C·β)^(1/(1+p))).
#pragma once

#include "common.h"

namespace selgroup {
namespace manipulation {

using std::pow;

template <typename scalar_t>
struct FairGradWeights {
  const scalar_t* gram;        // K×K
  const scalar_t* alpha_init;  // K, or null: start from ones
  scalar_t* weights;           // K
  int K;
  int max_iter;
  double tol;
  double alpha;  // α ≥ 0: the fairness of the solution (1: Nash-MTL's proportional fairness)

  // Armijo constant and at most this many halvings of the Newton step.
  static constexpr double kSufficientDecrease = 0.25;
  static constexpr int kMaxBacktracking = 60;
  // Below this squared Newton decrement φ is in its quadratically convergent
  // region (for p = 1 φ is self-concordant: the full step is accepted for
  // λ < (1 − 2·0.25)/4, Boyd & Vandenberghe §9.6.4), and the full step is taken
  // without the Armijo test, whose φ differences would be below φ's rounding there.
  static constexpr double kPureNewtonDecrement = 0.01;

  struct Scratch {
    double* flag;
    double* C;  // G, then C + δ·I
    double* hessian;
    double* scale;        // S
    double* coefficient;  // c
    double* beta;
    double* C_beta;
    double* step;  // −∇φ, then the Newton step
    double* trial;
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K)};
  }

  // H(x), H'(x) = x^(−p) and −H''(x) = p·x^(−p−1), with p = 1 (Nash-MTL) in plain divisions.
  SELGROUP_HD_INLINE static double barrier(double x, double p) {
    return p == 1.0 ? log(x) : pow(x, 1.0 - p) / (1.0 - p);
  }
  SELGROUP_HD_INLINE static double slope(double x, double p) { return p == 1.0 ? 1.0 / x : pow(x, -p); }
  SELGROUP_HD_INLINE static double curvature(double x, double p) {
    return p == 1.0 ? 1.0 / (x * x) : p * pow(x, -p - 1.0);
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *C = s.C, *hessian = s.hessian, *scale = s.scale, *coefficient = s.coefficient, *beta = s.beta,
           *C_beta = s.C_beta, *step = s.step, *trial = s.trial;
    if (!load_gram(team, gram, K, C, s.flag, weights)) return;
    if (alpha == 0.0) {  // linear scalarisation (the authors' α = 0)
      for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(1.0 / K);
      return;
    }
    const double p = 1.0 / alpha;

    double largest_diagonal = 0.0;  // redundant on every worker
    for (int k = 0; k < K; ++k) largest_diagonal = fmax(largest_diagonal, C[k * K + k]);
    if (!(largest_diagonal > 0.0)) {
      for (int k = team.rank(); k < K; k += team.size()) weights[k] = static_cast<scalar_t>(1);
      return;
    }
    const double epsilon = input_epsilon<scalar_t>();
    for (int k = team.rank(); k < K; k += team.size()) {
      scale[k] = sqrt(fmax(C[k * K + k], epsilon * largest_diagonal));
      coefficient[k] = p == 1.0 ? 1.0 : pow(scale[k], p - 1.0);
      const double start = alpha_init != nullptr ? static_cast<double>(alpha_init[k]) : 1.0;
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

    // The best point of the start's ray: ½·s²·q − Σ c_k·H(s·β_k) is least at s^(1+p) = Σ c_k·β_k^(1−p) / q.
    const double ray_curvature = quadratic_form(C, beta, K);
    double ray_pull = 0.0;
    for (int k = 0; k < K; ++k) ray_pull += p == 1.0 ? 1.0 : coefficient[k] * pow(beta[k], 1.0 - p);
    const double ray_scale =
        ray_curvature > 0.0 ? (p == 1.0 ? sqrt(K / ray_curvature) : pow(ray_pull / ray_curvature, 1.0 / (1.0 + p)))
                            : 1.0;
    team.sync();
    for (int k = team.rank(); k < K; k += team.size()) beta[k] *= ray_scale;
    team.sync();

    // φ at v (redundant on every worker).
    auto potential = [&](const double* v) {
      double barriers = 0.0;
      for (int k = 0; k < K; ++k) barriers += coefficient[k] * barrier(v[k], p);
      return 0.5 * quadratic_form(C, v, K) - barriers;
    };
    for (int iteration = 0; iteration < max_iter; ++iteration) {
      matvec(team, C, beta, C_beta, K);
      for (int e = team.rank(); e < K * K; e += team.size()) {
        const int i = e / K, j = e % K;
        hessian[e] = C[e] + (i == j ? coefficient[i] * curvature(beta[i], p) : 0.0);
      }
      for (int k = team.rank(); k < K; k += team.size()) step[k] = coefficient[k] * slope(beta[k], p) - C_beta[k];
      team.sync();
      const double phi = potential(beta);
      cholesky_factor(team, hessian, K);
      cholesky_solve(team, hessian, step, K);
      double decrement = 0.0;  // λ² = −∇φ·Δ
      for (int k = 0; k < K; ++k) decrement += (coefficient[k] * slope(beta[k], p) - C_beta[k]) * step[k];
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
