// CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
// NeurIPS 2021) as a weighting of the task gradients.
//
// The authors' dual problem (Cranial-XIX/CAGrad, and nash-mtl's CAGrad), with
// b = 1/K (g0 = bᵀ·J is the mean gradient):
//   x* = argmin_{x ∈ simplex} f(x) = xᵀ·G·b + radius·sqrt(xᵀ·G·x + δ²),
//   radius = c·‖g0‖ + δ,  ‖g0‖ = sqrt(mean(G) + δ²),
// then d = g0 + λ·g_x with g_x = x*ᵀ·J and λ = radius / (‖g_x‖ + δ), i.e.
//   w = b + λ·x*,  divided by (1 + c²) when rescale = 1 (the authors' default),
//   by (1 + c) when rescale = 2, as is when rescale = 0.
// The authors' regulariser δ is an absolute 1e-8 (δ² = 1e-8 under the square
// roots): at gradient norms far from 1 it is not small against ‖g_x‖, which is as
// short as the hull's shortest points, and λ·g_x, hence the improvement of the
// smallest task, came out wrong (relative 1e-6 at a norm ratio of 10⁴). Here δ is
// relative to G's scale, ε·max_k ‖g_k‖ (ε double's: a norm below it is zero to the
// solver's precision), floored at 1e-150 so that δ² is still a double: the update
// is scale-equivariant and, where ‖g_x‖ ≫ δ, the regularisers are negligible. At
// unit-norm gradients the objective differs from the authors' by ~1e-8 relative.
// Where ‖g_x‖ is below its rounding level from G (zero in the hull), λ = 0: d = g0.
//
// The primal problem is max_d min_k g_k·d over the ball ‖d − g0‖ ≤ c·‖g0‖. For
// c ≥ 1 the ball holds d = 0, whose worst improvement is 0; where zero lies in the
// rows' convex hull, no d does better (x·J·d = 0 for the x with g_x = 0), so 0 is
// the optimum there, while the dual formula's g_x is zero up to rounding (or up to
// the 1e-8 regulariser) and its direction g_x/‖g_x‖ is noise: d = g0 + λ·g_x then
// conflicts with some task. So for c ≥ 1 the weights are 0 unless the formula's d
// improves every task by more than the rounding level of g_k·d (G known to the
// input dtype's ε relative to ‖g_k‖·‖g_j‖): the better of the two feasible points.
//
// Solver: accelerated projected gradient (FISTA, Beck & Teboulle 2009) with a
// backtracking estimate of the local Lipschitz constant and a restart whenever
// the objective goes up (O'Donoghue & Candès 2015), from x = b; it stops when
// ‖x_new − x‖₁ < tol, when even a plain gradient step from x no longer lowers f
// (f's rounding floor), or after max_iter steps. f is convex (a linear term plus a
// norm), so this reaches the optimum, to tol, where SLSQP stops at its ftol.
#pragma once

#include "common.h"

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

  // δ's floor: its square, 1e-300, is still a double.
  static constexpr double kRegulariserFloor = 1e-150;
  // At most this many doublings of the Lipschitz estimate per step: 2^60 covers
  // any start in double range.
  static constexpr int kMaxBacktracking = 60;
  // After an accepted step the estimate shrinks by this factor, so the step
  // length can grow again where the curvature is lower.
  static constexpr double kLipschitzDecay = 0.8;

  struct Scratch {
    double* flag;
    double* G;
    double* Gb;
    double* x;     // current iterate
    double* y;     // extrapolated point
    double* grad;  // ∇f(y)
    double* z;     // candidate step
    double* Gv;    // G·y or G·z
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K), layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<double>(K), layout.take<double>(K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double *G = s.G, *Gb = s.Gb, *x = s.x, *y = s.y, *grad = s.grad, *z = s.z, *Gv = s.Gv;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;

    const double b = 1.0 / K;
    double mean_gram = 0.0, max_diagonal = 0.0;
    for (int i = 0; i < K * K; ++i) mean_gram += G[i];
    mean_gram /= static_cast<double>(K) * K;
    for (int i = 0; i < K; ++i) max_diagonal = fmax(max_diagonal, G[i * K + i]);
    // The regulariser δ of the norms (δ² of the squared norms), relative to G's scale.
    const double delta = fmax(DBL_EPSILON * sqrt(max_diagonal), kRegulariserFloor);
    const double delta_squared = delta * delta;
    const double radius = c * sqrt(fmax(mean_gram, 0.0) + delta_squared) + delta;

    for (int i = team.rank(); i < K; i += team.size()) {
      double sum = 0.0;
      for (int j = 0; j < K; ++j) sum += G[i * K + j];
      Gb[i] = sum * b;
      x[i] = b;
      y[i] = b;
    }
    team.sync();
    // f at a point v with G·v already in Gv (redundant on every worker).
    auto objective = [&](const double* v) {
      return dot(v, Gb, K) + radius * sqrt(fmax(dot(v, Gv, K), 0.0) + delta_squared);
    };
    matvec(team, G, x, Gv, K);
    double f_x = objective(x);
    team.sync();  // everyone has read Gv before the loop rewrites it
    double momentum = 1.0;
    double lipschitz = fmax(max_diagonal * (1.0 + radius / sqrt(fmax(mean_gram, 0.0) + delta_squared)), 1e-300);

    for (int iteration = 0; iteration < max_iter; ++iteration) {
      matvec(team, G, y, Gv, K);
      const double norm_y = sqrt(fmax(dot(y, Gv, K), 0.0) + delta_squared);
      const double f_y = dot(y, Gb, K) + radius * norm_y;
      for (int i = team.rank(); i < K; i += team.size()) grad[i] = Gb[i] + radius * Gv[i] / norm_y;
      team.sync();
      double f_z = 0.0;
      for (int attempt = 0; attempt < kMaxBacktracking; ++attempt) {
        for (int i = team.rank(); i < K; i += team.size()) z[i] = y[i] - grad[i] / lipschitz;
        team.sync();
        const double tau = simplex_threshold(z, K);
        team.sync();
        for (int i = team.rank(); i < K; i += team.size()) z[i] = fmax(z[i] - tau, 0.0);
        team.sync();
        matvec(team, G, z, Gv, K);
        f_z = objective(z);
        double linear = 0.0, squared = 0.0;
        for (int i = 0; i < K; ++i) {
          const double step = z[i] - y[i];
          linear += grad[i] * step;
          squared += step * step;
        }
        team.sync();  // everyone has read z before it is rewritten
        if (f_z <= f_y + linear + 0.5 * lipschitz * squared) break;
        lipschitz *= 2.0;
      }
      double change = 0.0;
      for (int i = 0; i < K; ++i) change += fabs(z[i] - x[i]);
      if (f_z > f_x) {
        // The momentum overshot: restart from x. If the step already came from x
        // (momentum 1), f cannot decrease further in floating point: x is the answer.
        if (change < tol || momentum == 1.0) break;
        momentum = 1.0;
        team.sync();  // everyone has read z and x
        for (int i = team.rank(); i < K; i += team.size()) y[i] = x[i];
        team.sync();
        continue;
      }
      const double next_momentum = 0.5 * (1.0 + sqrt(1.0 + 4.0 * momentum * momentum));
      const double extrapolation = (momentum - 1.0) / next_momentum;
      team.sync();  // everyone has read x before it moves
      for (int i = team.rank(); i < K; i += team.size()) {
        y[i] = z[i] + extrapolation * (z[i] - x[i]);
        x[i] = z[i];
      }
      team.sync();
      f_x = f_z;
      momentum = next_momentum;
      lipschitz *= kLipschitzDecay;
      if (change < tol) break;
    }

    matvec(team, G, x, Gv, K);
    // g_x = x·J is known from G only to sqrt(K·ε)·Σ_k x_k·‖g_k‖ (ε the input dtype's): below that its direction is
    // rounding, and so would be λ·g_x; d is then g0, the ball's centre (zero in the hull with g_x → 0).
    const double norm_x = sqrt(fmax(dot(x, Gv, K), 0.0));
    double weighted_norms = 0.0;  // Σ_k x_k·‖g_k‖
    for (int k = 0; k < K; ++k) weighted_norms += x[k] * sqrt(fmax(G[k * K + k], 0.0));
    const bool resolved = norm_x > sqrt(K * input_epsilon<scalar_t>()) * weighted_norms;
    const double lambda = resolved ? radius / (norm_x + delta) : 0.0;
    const double scale = rescale == 1 ? 1.0 / (1.0 + c * c) : rescale == 2 ? 1.0 / (1.0 + c) : 1.0;
    double* w = z;  // d's weights, before the rescale
    for (int i = team.rank(); i < K; i += team.size()) w[i] = b + lambda * x[i];
    team.sync();
    if (c >= 1.0 && !improves_every_task(team, G, w, Gv)) fill(team, w, K, 0.0);
    team.sync();
    for (int i = team.rank(); i < K; i += team.size()) weights[i] = static_cast<scalar_t>(w[i] * scale);
  }

  // Whether d = wᵀ·J has g_k·d = (G·w)_k above its rounding level for every k,
  // K·ε·‖g_k‖·Σ_j ‖g_j‖·|w_j| with ε the input dtype's. Uses `Gw` (K); syncs.
  template <Team T>
  SELGROUP_HD bool improves_every_task(const T& team, const double* G, const double* w, double* Gw) const {
    matvec(team, G, w, Gw, K);
    const double epsilon = input_epsilon<scalar_t>();
    double weighted_norms = 0.0;  // Σ_j ‖g_j‖·|w_j|
    for (int j = 0; j < K; ++j) weighted_norms += sqrt(fmax(G[j * K + j], 0.0)) * fabs(w[j]);
    bool improves = true;
    for (int k = 0; k < K; ++k)
      improves = improves && Gw[k] > K * epsilon * sqrt(fmax(G[k * K + k], 0.0)) * weighted_norms;
    team.sync();  // everyone has read Gw
    return improves;
  }
};

}  // namespace manipulation
}  // namespace selgroup
