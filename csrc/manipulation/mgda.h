// MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
// NeurIPS 2018): the min-norm point of the convex hull of the task gradients,
//   w = argmin_{w ∈ simplex} wᵀ·G·w,   d = wᵀ·J,
// solved exactly by Wolfe's minimum-norm-point algorithm (P. Wolfe, "Finding the
// nearest point in a polytope", Mathematical Programming 11, 1976), an active-set
// method on the simplex, written on G:
//   * the corral S: tasks whose gradients are affinely independent; w > 0 on S, 0 off S;
//     it starts as the task of least norm (the first on ties);
//   * major step: t = argmin_k (G·w)_k; w is optimal when wᵀ·G·w − (G·w)_t ≤ 0 (the
//     simplex KKT conditions: (G·w)_k ≥ wᵀ·G·w for every k, equality on S); else t joins S;
//   * minor steps: y = the affine minimiser of S (argmin yᵀ·G_S·y subject to Σ y = 1);
//     if y > 0 it is the new w; else w moves towards y until a coefficient reaches 0,
//     whose task leaves S, and the minor step repeats.
// The objective falls at every major step, so no corral repeats: it ends with the
// exact minimiser of the final corral (up to rounding), in about |support| major
// steps, where the authors' Frank-Wolfe (MinNormSolver) converges sublinearly and
// stops early on badly scaled tasks.
//
// The affine minimiser: with M = c·1·1ᵀ + G_S, the KKT system G_S·y = λ·1, 1ᵀ·y = 1
// reads M·y = (c + λ)·1, so y = M⁻¹·1 / (1ᵀ·M⁻¹·1). M is positive definite when S's
// gradients are affinely independent (even when 0 lies in their affine hull and G_S
// is singular). It is kept as its Cholesky factor M = Rᵀ·R (R upper triangular),
// with z = R⁻ᵀ·1: a task joining S appends a column to R and an entry to z
// (O(|S|²)), a task leaving S deletes its column and restores R by Givens rotations,
// applied to z too (O(|S|²)); a minor step is one back substitution y ∝ R⁻¹·z.
// c = ‖g‖² of the start task (1 when that is 0): the problem's scale where it starts.
// Cholesky is backward stable, so y is exact for a G_S perturbed by rounding of
// order ε·(‖G_S‖ + c), the size of G's own rounding.
//
// Stops (every one of them a point of the hull; the first is the optimum):
//   * gap = wᵀ·G·w − (G·w)_t ≤ (tol + K·ε)·m·(m + ‖g_t‖), m = Σ_k w_k·‖g_k‖: the gap
//     is below tol plus the rounding error of computing it from G (ε = double's);
//   * t is in S already, or wᵀ·G·w did not fall over the last major step, or t's
//     pivot in R is below K·ε·(c + ‖g_t‖²) (t affinely dependent on S in double):
//     rounding, not the method, stops the descent there;
//   * max_iter major steps.
#pragma once

#include <cfloat>

#include "common.h"

namespace selgroup {
namespace manipulation {

// Wolfe's min-norm point of the hull of K points given by their Gram matrix (doubles
// in the caller's workspace): writes w on the simplex with wᵀ·G·w minimal. MGDA runs it
// on the task gradients, CAGrad (cagrad.h) on its shifted task gradients.
struct MinNormPoint {
  int K;
  int max_iter;
  double tol;

  struct Scratch {
    double* pivot;  // t's pivot (rank 0 writes it, every worker reads it)
    double* R;      // K×K, the upper triangle of the first |S| rows and columns: M = Rᵀ·R
    double* z;      // R⁻ᵀ·1
    double* y;      // the affine minimiser of S
    double* alpha;  // w on S, in S's order
    double* Gw;     // K
    int* corral;    // S: task indices
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K), layout.take<double>(K),
            layout.take<double>(K), layout.take<double>(K),     layout.take<int>(K)};
  }

  // w (K, shared) = the min-norm point's weights for the Gram G (K×K, shared). Syncs.
  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s, const double* G, double* w) const {
    int start = 0;
    for (int k = 1; k < K; ++k)
      if (G[k * K + k] < G[start * K + start]) start = k;
    const double c = G[start * K + start] > 0.0 ? G[start * K + start] : 1.0;
    int size = 1;  // |S|, kept by every worker
    team.sync();   // everyone has read S, α and w of a previous call
    if (team.rank() == 0) {
      s.corral[0] = start;
      s.alpha[0] = 1.0;
      s.R[0] = sqrt(c + G[start * K + start]);
      s.z[0] = 1.0 / s.R[0];
    }
    fill(team, w, K, 0.0);
    team.sync();
    if (team.rank() == 0) w[start] = 1.0;
    team.sync();

    double previous = INFINITY;
    for (int step = 0; step < max_iter; ++step) {
      matvec(team, G, w, s.Gw, K);
      double value = 0.0, mass = 0.0;
      for (int i = 0; i < size; ++i) {
        value += s.alpha[i] * s.Gw[s.corral[i]];
        mass += s.alpha[i] * sqrt(fmax(G[s.corral[i] * (K + 1)], 0.0));
      }
      int t = 0;
      for (int k = 1; k < K; ++k)
        if (s.Gw[k] < s.Gw[t]) t = k;
      const double gap = value - s.Gw[t];
      const double noise = (tol + K * DBL_EPSILON) * mass * (mass + sqrt(fmax(G[t * K + t], 0.0)));
      if (!(gap > noise) || !(value < previous) || in_corral(s.corral, size, t)) break;
      previous = value;

      team.sync();  // everyone has read S before rank 0 extends it
      if (team.rank() == 0) *s.pivot = append_column(s, G, size, t, c);
      team.sync();
      if (!(*s.pivot > K * DBL_EPSILON * (c + G[t * K + t]))) break;
      ++size;

      while (true) {
        if (team.rank() == 0) affine_minimiser(s, size);
        team.sync();
        int leaving = -1;  // the first task to reach 0 on the way from w to y
        double theta = 1.0;
        for (int i = 0; i < size; ++i) {
          if (s.y[i] > 0.0) continue;
          const double ratio = s.alpha[i] > s.y[i] ? s.alpha[i] / (s.alpha[i] - s.y[i]) : 0.0;
          if (leaving < 0 || ratio < theta) leaving = i, theta = ratio;
        }
        team.sync();  // everyone has read α and y
        for (int i = team.rank(); i < size; i += team.size())
          s.alpha[i] = i == leaving ? 0.0 : fmax((1.0 - theta) * s.alpha[i] + theta * s.y[i], 0.0);
        team.sync();
        if (leaving < 0) break;
        if (team.rank() == 0) remove_from_corral(s, size, leaving);
        team.sync();
        --size;
      }

      fill(team, w, K, 0.0);
      team.sync();
      for (int i = team.rank(); i < size; i += team.size()) w[s.corral[i]] = s.alpha[i];
      team.sync();
    }
  }

 private:
  SELGROUP_HD_INLINE static bool in_corral(const int* corral, int size, int task) {
    for (int i = 0; i < size; ++i)
      if (corral[i] == task) return true;
    return false;
  }

  // Appends task t to S's factor (common.h's cholesky_append on M = c·1·1ᵀ + G) and
  // extends z. Returns the squared pivot (the caller adds t to S only when it is safely
  // positive). Rank 0 only.
  SELGROUP_HD double append_column(const Scratch& s, const double* G, int size, int t, double c) const {
    const double squared_pivot =
        cholesky_append(s.R, K, size, [&](int i) { return c + G[s.corral[i] * K + t]; }, c + G[t * K + t]);
    double r_dot_z = 0.0;
    for (int i = 0; i < size; ++i) r_dot_z += s.R[i * K + size] * s.z[i];
    s.z[size] = (1.0 - r_dot_z) / s.R[size * K + size];
    s.corral[size] = t;
    s.alpha[size] = 0.0;
    return squared_pivot;
  }

  // y = R⁻¹·z / Σ(R⁻¹·z), the affine minimiser of S (M⁻¹·1 normalised). Rank 0 only.
  SELGROUP_HD void affine_minimiser(const Scratch& s, int size) const {
    const double* R = s.R;
    double total = 0.0;
    for (int i = size - 1; i >= 0; --i) {
      double sum = s.z[i];
      for (int k = i + 1; k < size; ++k) sum -= R[i * K + k] * s.y[k];
      s.y[i] = sum / R[i * K + i];
      total += s.y[i];
    }
    for (int i = 0; i < size; ++i) s.y[i] /= total;
  }

  // Removes S's entry `leaving` (common.h's cholesky_delete, z rotated with R). Rank 0 only.
  SELGROUP_HD void remove_from_corral(const Scratch& s, int size, int leaving) const {
    for (int j = leaving; j + 1 < size; ++j) {
      s.corral[j] = s.corral[j + 1];
      s.alpha[j] = s.alpha[j + 1];
    }
    cholesky_delete(s.R, K, size, leaving, s.z);
  }
};


template <typename scalar_t>
struct MGDAWeights {
  const scalar_t* gram;  // K×K
  scalar_t* weights;     // K
  int K;
  int max_iter;
  double tol;

  struct Scratch {
    double* flag;  // load_gram's
    double* G;     // K×K
    double* w;     // K
    MinNormPoint::Scratch solver;
  };
  SELGROUP_HD MinNormPoint solver() const { return {K, max_iter, tol}; }
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K), solver().carve(layout)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    if (!load_gram(team, gram, K, s.G, s.flag, weights)) return;
    solver()(team, s.solver, s.G, s.w);
    store(team, s.w, K, weights);
  }
};

}  // namespace manipulation
}  // namespace selgroup
