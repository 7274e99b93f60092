// CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
// NeurIPS 2021) as a weighting of the task gradients.
//
// CAGrad's problem: d* = argmax_d min_k g_k·d over the ball ‖d − g0‖ ≤ r, g0 = bᵀ·J the
// mean gradient (b = 1/K), r = c·‖g0‖. Its dual (the authors' inner problem, without
// their 1e-8 regularisers) is x* = argmin_{x ∈ simplex} xᵀ·G·b + r·‖g_x‖, g_x = xᵀ·J,
// and d* = g0 + r·g_x*/‖g_x*‖, i.e. w = b + (r/‖g_x*‖)·x*, divided by (1 + c²) when
// rescale = 1 (the authors' default), by (1 + c) when rescale = 2, as is when rescale = 0.
//
// Solver, exact on every face (no first-order iteration to stall on badly scaled rows):
// x* is the min-norm point of the hull of the shifted gradients g_k + s*·g0 for the
// s* = ‖g_x*‖/r (the two problems' KKT conditions coincide there: g_k·d* is smallest,
// and equal, on x*'s support), so
//   * x(s) = Wolfe's min-norm point (mgda.h, exact in about |support| major steps) on the
//     shifted Gram G_ij + s·(a_i + a_j) + s²·‖g0‖², a = G·b;
//   * n(s) = ‖g_x(s)‖ grows with s while n(s)/s falls (x(s) walks the convex trade-off
//     between ‖g_x‖ and g_x·g0, at the slope −n/s), so ψ(s) = n(s)² − r²·s² has one sign
//     change, at s*: it is bracketed from s = 1/c by factors of 4 and found by the
//     Illinois variant of regula falsi (ψ is a quadratic in s on each support) until the
//     bracket is tol relative, or max_iter evaluations.
// Where zero lies in the rows' convex hull (x(0)'s ‖g_x‖ below its rounding level from G,
// sqrt(K·ε)·Σ_k x_k·‖g_k‖, ε the input dtype's), no d improves every task (x·J·d = 0):
// the optimum is 0 if the cone C = {d : J·d ≥ 0} meets the ball, and then every point of
// C in the ball is optimal. The op returns the one closest to g0, the projection
// d = g0 + Jᵀ·μ of g0 onto C, μ = argmin_{μ ≥ 0} (b + μ)ᵀ·G·(b + μ) (Lawson & Hanson's
// active-set NNLS on G, exact in finitely many steps): w = b + μ. Its ‖Jᵀ·μ‖ ≤ r decides
// whether the ball meets C (always for c ≥ 1, where 0 is in the ball); w = 0 where that d is
// below its rounding level from G (strongly stationary rows: C ⊥ the rows). Where it does not,
// the optimum is below 0 with ‖g_x*‖ > 0 and the root-finder above returns it.
// d = g0 (w = b) where r = 0 (c = 0 or g0 = 0: the ball is the point g0).
#pragma once

#include "common.h"
#include "mgda.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct CAGradWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;
  double c;
  int rescale;
  int max_iter;
  double tol;

  // Factors of 4 from s = 1/c that bracket s*: 4^60 covers any ratio of norms in double range.
  static constexpr int kMaxBracketing = 60;

  struct Scratch {
    double* flag;  // load_gram's
    double* G;     // K×K
    double* work;  // K×K: the shifted Gram, or the cone projection's Cholesky factor
    double* a;     // G·b
    double* x;     // x(s) at the latest s
    double* best;  // x(s) at the s with the smallest |n(s)/(r·s) − 1| so far
    double* mu;    // the cone projection's μ
    double* rhs;   // K
    double* Gv;    // K
    double* w;     // d's weights, before the rescale
    int* passive;  // the cone projection's passive set (tasks with μ > 0)
    MinNormPoint::Scratch min_norm;
  };
  SELGROUP_HD MinNormPoint min_norm_point() const { return {K, max_iter, tol}; }
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K),
            layout.take<double>(K), layout.take<int>(K),        min_norm_point().carve(layout)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    const double* G = s.G;
    if (!load_gram(team, gram, K, s.G, s.flag, weights)) return;
    const double b = 1.0 / K;
    for (int i = team.rank(); i < K; i += team.size()) {
      double sum = 0.0;
      for (int j = 0; j < K; ++j) sum += G[i * K + j];
      s.a[i] = sum * b;
    }
    team.sync();
    double mean_squared = 0.0;  // ‖g0‖² = bᵀ·G·b
    for (int i = 0; i < K; ++i) mean_squared += s.a[i] * b;
    mean_squared = fmax(mean_squared, 0.0);
    const double radius = c * sqrt(mean_squared);
    const double scale = rescale == 1 ? 1.0 / (1.0 + c * c) : rescale == 2 ? 1.0 / (1.0 + c) : 1.0;
    double* w = s.w;  // d's weights, before the rescale
    if (!(radius > 0.0)) {
      fill(team, w, K, b);
      team.sync();
    } else {
      solve(team, s, radius, mean_squared, w);
    }
    for (int i = team.rank(); i < K; i += team.size()) weights[i] = static_cast<scalar_t>(w[i] * scale);
  }

 private:
  // w (shared) = d*'s weights for r = radius > 0. Syncs.
  template <Team T>
  SELGROUP_HD void solve(const T& team, const Scratch& s, double radius, double mean_squared, double* w) const {
    const double b = 1.0 / K;
    double best_miss = INFINITY, best_norm = 0.0;
    // ψ(s) = n(s)² − r²·s², x(s) in s.x; keeps the x(s) whose n(s) is closest to r·s.
    auto evaluate = [&](double shift) {
      for (int i = team.rank(); i < K * K; i += team.size()) {
        const int row = i / K, column = i - row * K;
        s.work[i] = s.G[i] + shift * (s.a[row] + s.a[column]) + shift * shift * mean_squared;
      }
      team.sync();
      min_norm_point()(team, s.min_norm, s.work, s.x);
      matvec(team, s.G, s.x, s.Gv, K);
      const double norm = sqrt(fmax(dot(s.x, s.Gv, K), 0.0));
      const double miss = shift > 0.0 ? fabs(norm / (radius * shift) - 1.0) : INFINITY;
      if (miss < best_miss) {
        best_miss = miss;
        best_norm = norm;
        for (int i = team.rank(); i < K; i += team.size()) s.best[i] = s.x[i];
      }
      team.sync();
      return (norm - radius * shift) * (norm + radius * shift);
    };

    // s = 0: MGDA's min-norm point. Zero in the hull when its norm is below its rounding level.
    const double at_zero = evaluate(0.0);
    double weighted_norms = 0.0;  // Σ_k x_k·‖g_k‖
    for (int k = 0; k < K; ++k) weighted_norms += s.x[k] * sqrt(fmax(s.G[k * K + k], 0.0));
    const bool zero_in_hull = !(sqrt(at_zero) > sqrt(K * input_epsilon<scalar_t>()) * weighted_norms);
    // The ball meets C when ‖Jᵀ·μ‖ ≤ r; always for c ≥ 1 (0 ∈ C is in the ball, and g0's projection is nearer),
    // where rounding alone could put ‖Jᵀ·μ‖ = ‖g0‖ (C ⊥ g0) above r = ‖g0‖.
    if (zero_in_hull && (project_on_cone(team, s) <= radius * radius || c >= 1.0)) {
      // d = g0 + Jᵀ·μ; below its rounding level from G (sqrt(K·ε)·Σ_k w_k·‖g_k‖) it is 0 (strongly stationary
      // rows: C is the rows' orthogonal complement, g0's projection on it 0).
      for (int i = team.rank(); i < K; i += team.size()) w[i] = b + s.mu[i];
      team.sync();
      matvec(team, s.G, w, s.Gv, K);
      double reach = 0.0;
      for (int k = 0; k < K; ++k) reach += w[k] * sqrt(fmax(s.G[k * K + k], 0.0));
      const bool resolved = sqrt(fmax(dot(w, s.Gv, K), 0.0)) > sqrt(K * input_epsilon<scalar_t>()) * reach;
      team.sync();  // everyone has read w
      if (!resolved) fill(team, w, K, 0.0);
      team.sync();
      return;
    }

    double lo = zero_in_hull ? -1.0 : 0.0, psi_lo = at_zero;  // lo < 0: not bracketed yet
    double hi = 1.0 / c, psi_hi = evaluate(hi);
    for (int attempt = 0; attempt < kMaxBracketing && psi_hi > 0.0; ++attempt) {
      lo = hi, psi_lo = psi_hi;
      hi *= 4.0;
      psi_hi = evaluate(hi);
    }
    for (int attempt = 0; attempt < kMaxBracketing && lo < 0.0; ++attempt) {
      const double shift = hi / 4.0, psi = evaluate(shift);
      if (psi > 0.0) lo = shift, psi_lo = psi;
      else hi = shift, psi_hi = psi;
    }
    int side = 0;  // the end that moved last: Illinois halves the other end's ψ when one end repeats
    for (int iteration = 0; iteration < max_iter && lo >= 0.0 && psi_lo > 0.0 && psi_hi < 0.0; ++iteration) {
      if (hi - lo <= (tol + 4.0 * DBL_EPSILON) * hi) break;
      double shift = (lo * psi_hi - hi * psi_lo) / (psi_hi - psi_lo);
      if (!(shift > lo && shift < hi)) shift = 0.5 * (lo + hi);
      const double psi = evaluate(shift);
      if (psi == 0.0) break;
      if (psi > 0.0) {
        if (side > 0) psi_hi *= 0.5;
        lo = shift, psi_lo = psi, side = 1;
      } else {
        if (side < 0) psi_lo *= 0.5;
        hi = shift, psi_hi = psi, side = -1;
      }
    }
    if (!(best_norm > 0.0)) {  // no s resolved ‖g_x‖ (rounding): the cone's point, d = g0 if it is empty
      for (int i = team.rank(); i < K; i += team.size()) w[i] = b + (zero_in_hull ? s.mu[i] : 0.0);
      team.sync();
      return;
    }
    for (int i = team.rank(); i < K; i += team.size()) w[i] = b + radius / best_norm * s.best[i];
    team.sync();
  }

  // μ = argmin_{μ ≥ 0} (b + μ)ᵀ·G·(b + μ), by Lawson & Hanson's active set ("Solving Least Squares
  // Problems", 1974, ch. 23) on G: the task t that d = g0 + Jᵀ·μ conflicts with most (by cosine, above the
  // rounding level of g_t·d) joins the passive set P; μ_P moves towards the minimiser on P (G_PP·z = −a_P,
  // Cholesky) until a coefficient reaches 0, whose task leaves P, and again. Returns ‖Jᵀ·μ‖² = μᵀ·G·μ. Syncs.
  template <Team T>
  SELGROUP_HD double project_on_cone(const T& team, const Scratch& s) const {
    const double b = 1.0 / K, epsilon = input_epsilon<scalar_t>();
    double *mu = s.mu, *rhs = s.rhs, *factor = s.work;
    fill(team, mu, K, 0.0);
    team.sync();
    int size = 0;  // |P|, kept by every worker
    for (int step = 0; step < 3 * K; ++step) {
      for (int i = team.rank(); i < K; i += team.size()) rhs[i] = b + mu[i];
      team.sync();
      matvec(team, s.G, rhs, s.Gv, K);  // g_k·d
      double reach = 0.0;               // Σ_k (b + μ_k)·‖g_k‖ ≥ ‖d‖
      for (int k = 0; k < K; ++k) reach += rhs[k] * sqrt(fmax(s.G[k * K + k], 0.0));
      int entering = -1;
      double worst = K * epsilon * reach;
      for (int k = 0; k < K; ++k) {
        const double norm = sqrt(fmax(s.G[k * K + k], 0.0));
        if (norm > 0.0 && mu[k] == 0.0 && -s.Gv[k] / norm > worst) entering = k, worst = -s.Gv[k] / norm;
      }
      team.sync();  // everyone has read rhs and P
      if (entering < 0) break;
      if (team.rank() == 0) s.passive[size] = entering;
      ++size;
      team.sync();
      bool stalled = false;
      for (bool first = true;; first = false) {
        double largest = 0.0;  // the largest G_kk on P: the scale of the factor's pivots
        for (int i = 0; i < size; ++i) largest = fmax(largest, s.G[s.passive[i] * (K + 1)]);
        for (int i = team.rank(); i < size * size; i += team.size())
          factor[i] = s.G[s.passive[i / size] * K + s.passive[i % size]];
        for (int i = team.rank(); i < size; i += team.size()) rhs[i] = -s.a[s.passive[i]];
        team.sync();
        // The entering task dependent on P's (to rounding): g_t·d is then rounding, not a conflict.
        if (!(cholesky_factor(team, factor, size) > K * DBL_EPSILON * largest)) {
          --size;
          stalled = true;
          break;
        }
        cholesky_solve(team, factor, rhs, size);
        int leaving = -1;  // the first coefficient to reach 0 on the way from μ_P to z
        double theta = 1.0;
        for (int i = 0; i < size; ++i) {
          if (rhs[i] > 0.0) continue;
          const double current = mu[s.passive[i]];
          const double ratio = current > rhs[i] ? current / (current - rhs[i]) : 0.0;
          if (leaving < 0 || ratio < theta) leaving = i, theta = ratio;
        }
        team.sync();  // everyone has read μ
        for (int i = team.rank(); i < size; i += team.size()) {
          const int task = s.passive[i];
          mu[task] = i == leaving ? 0.0 : fmax((1.0 - theta) * mu[task] + theta * rhs[i], 0.0);
        }
        team.sync();
        if (leaving < 0) break;
        // The entering task leaving at once: rounding, not the method, stops the descent.
        stalled = first && s.passive[leaving] == entering && theta == 0.0;
        if (team.rank() == 0)
          for (int i = leaving; i + 1 < size; ++i) s.passive[i] = s.passive[i + 1];
        --size;
        team.sync();
        if (stalled) break;
      }
      if (stalled) break;
    }
    matvec(team, s.G, mu, s.Gv, K);
    return dot(mu, s.Gv, K);
  }
};

}  // namespace manipulation
}  // namespace selgroup
