// PCD, Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-
// Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026):
// task 0 is primary. With the normalised gradients g̃_k = s_k·g_k (s: the caller's
// scales, TorchJD's 1/sqrt(debiased EMA of ‖g_k‖² + eps)) and N = S·G·S their Gram,
//   d̃ = argmin_d ½‖d − g̃_0‖²  s.t.  g̃_jᵀ·d ≥ τ_j·‖g̃_j‖²  (j = 1..K−1),
// then d = d̃·‖g_0‖/‖d̃‖. By stationarity d̃ = g̃_0 + Σ_j μ_j·g̃_j, μ ≥ 0 the KKT
// multipliers: the dual is the non-negative QP min_{μ≥0} ½μᵀ·A·μ − bᵀ·μ,
// A = N[1:,1:], b_j = τ_j·N_jj − N_j0 (b_j > 0: g̃_0 violates constraint j), solved
// exactly by the dual active-set method of Goldfarb & Idnani (1983) for an identity
// Hessian, which reads only N: add the most violated constraint p, stepping μ_p up
// and the active μ down along r = A_AA⁻¹·A_Ap, dropping an active constraint whose μ
// reaches 0 first; a step with no bound (g̃_p dependent on the active gradients,
// z² = A_pp − A_pAᵀ·r ≤ max(1e-9, 10·ε)·A_pp, and no μ to drop) means the constraints are
// infeasible: d̃ = g̃_0 (TorchJD's convention). A constraint is satisfied within
// 1e-9·max diag N; at most 10·K inner steps (rounding cycles).
// Weights: w = s·[1, μ]·sqrt(N_00/(d̃ᵀd̃)) with d̃ᵀd̃ = [1, μ]ᵀ·N·[1, μ]; zero where
// g_0 = 0 or d̃ is zero to within 10·ε of its magnitude ((Σ|w̃_k|·‖g̃_k‖)²).
// Serial: one worker runs the active set, the active block's Cholesky factor kept up
// to date in O(|A|²) per change (common.h's cholesky_append/cholesky_delete, as
// mgda.h's corral and dual_cone.h's free set), the team stores; K ≤ a few dozen in practice.
#pragma once

#include "common.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct PCDWeights {
  const scalar_t* gram;    // K×K
  const scalar_t* scales;  // K: s
  const scalar_t* taus;    // K − 1
  scalar_t* weights;       // K
  int K;

  static constexpr double kFeasibilityTol = 1e-9;
  static constexpr double kDependenceTol = 1e-9;

  struct Scratch {
    double* flag;
    double* N;       // K×K
    double* factor;  // K×K: R with A_SS = Rᵀ·R for the active set S (ld K; common.h's cholesky_append/delete)
    double* mu;      // K (mu[0] = 1: the primary's weight)
    double* r;       // K
    double* active;  // K: indices of the active constraints (as doubles)
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K)};
  }

  // The multipliers [1, μ] into s.mu (serial).
  SELGROUP_HD void solve(const Scratch& s) const {
    const double* N = s.N;
    double *mu = s.mu + 1, *r = s.r, *active = s.active;
    const int m = K - 1;
    auto a = [&](int i, int j) { return N[(i + 1) * K + (j + 1)]; };
    auto b = [&](int j) { return static_cast<double>(taus[j]) * a(j, j) - N[(j + 1) * K]; };
    auto slack = [&](int j) {
      double sum = -b(j);
      for (int i = 0; i < m; ++i) sum += a(j, i) * mu[i];
      return sum;
    };
    s.mu[0] = 1.0;
    for (int j = 0; j < m; ++j) mu[j] = 0.0;
    double largest = 0.0;
    for (int k = 0; k < K; ++k) largest = fmax(largest, N[k * K + k]);
    const double atol = kFeasibilityTol * fmax(largest, DBL_MIN);
    // Above N's relative precision, or rounding makes dependent gradients look independent (huge μ).
    const double dependence = fmax(kDependenceTol, 10.0 * input_epsilon<scalar_t>());
    int n = 0, steps = 0;
    while (steps < 10 * K) {
      int p = -1;
      double worst = -atol;
      for (int j = 0; j < m; ++j) {
        bool is_active = false;
        for (int i = 0; i < n; ++i) is_active = is_active || static_cast<int>(active[i]) == j;
        const double value = is_active ? 0.0 : slack(j);
        if (value < worst) worst = value, p = j;
      }
      if (p < 0) return;  // every constraint holds
      double slack_p = worst;
      while (steps < 10 * K) {
        ++steps;
        // Rᵀ·y = A_Sp into R's column n (kept only if p joins), z² = A_pp − yᵀ·y; then r = R⁻¹·y = A_SS⁻¹·A_Sp.
        double* R = s.factor;
        const double z_squared =
            cholesky_append(R, K, n, [&](int i) { return a(static_cast<int>(active[i]), p); }, a(p, p));
        for (int i = n - 1; i >= 0; --i) {
          double sum = R[i * K + n];
          for (int k = i + 1; k < n; ++k) sum -= R[i * K + k] * r[k];
          r[i] = sum / R[i * K + i];
        }
        double partial = INFINITY;
        int leaving = -1;
        for (int i = 0; i < n; ++i)
          if (r[i] > 0.0 && mu[static_cast<int>(active[i])] / r[i] < partial)
            partial = mu[static_cast<int>(active[i])] / r[i], leaving = i;
        const double full = z_squared > dependence * a(p, p) ? -slack_p / z_squared : INFINITY;
        const double step = fmin(partial, full);
        if (step == INFINITY) {  // infeasible: the primary's own gradient
          for (int j = 0; j < m; ++j) mu[j] = 0.0;
          return;
        }
        for (int i = 0; i < n; ++i) mu[static_cast<int>(active[i])] -= step * r[i];
        mu[p] += step;
        if (full <= partial) {
          active[n++] = p;
          break;
        }
        mu[static_cast<int>(active[leaving])] = 0.0;
        cholesky_delete(R, K, n, leaving, r);  // r is recomputed: rotated as scratch
        for (int i = leaving; i + 1 < n; ++i) active[i] = active[i + 1];
        --n;
        slack_p = slack(p);
      }
    }
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    if (!load_gram(team, gram, K, s.N, s.flag, weights)) return;
    for (int e = team.rank(); e < K * K; e += team.size())
      s.N[e] *= static_cast<double>(scales[e / K]) * static_cast<double>(scales[e % K]);
    team.sync();
    if (team.rank() == 0) {
      for (int j = 0; j < K; ++j) s.mu[j] = 0.0;
      if (static_cast<double>(gram[0]) > 0.0) solve(s);
      for (int j = 1; j < K; ++j) s.mu[j] = fmax(s.mu[j], 0.0);
    }
    team.sync();
    // d̃ᵀd̃ and its rounding scale, redundant on every worker.
    const double squared_norm = quadratic_form(s.N, s.mu, K);
    double magnitude = 0.0;
    for (int k = 0; k < K; ++k) magnitude += fabs(s.mu[k]) * sqrt(fmax(s.N[k * K + k], 0.0));
    const double precision = 10.0 * input_epsilon<scalar_t>();
    const double primary = static_cast<double>(gram[0]);
    const double factor = squared_norm > precision * magnitude * magnitude ? sqrt(primary / squared_norm) : 0.0;
    for (int k = team.rank(); k < K; k += team.size())
      weights[k] = static_cast<scalar_t>(s.mu[k] * static_cast<double>(scales[k]) * factor);
  }
};

}  // namespace manipulation
}  // namespace selgroup
