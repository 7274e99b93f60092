// The projection onto the dual cone of the task gradients, in its dual form on G
// (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
// 2406.16232, Proposition 1): for a combination Jᵀ·u, the projection of Jᵀ·u onto
// {d : J·d ≥ 0} is Jᵀ·v with
//   v = argmin_v vᵀ·Ĝ·v   subject to   v ≥ u,
// Ĝ as TorchJD's QuadprogProjector builds it: G / tr(G) (0 when tr(G) < norm_eps) +
// reg_eps·I. UPGrad projects the N = K rows u = pref_k·e_k and sums the v's, DualProj
// one row u = pref. Every row of U is one such box-constrained QP; all of them are
// solved in one call, the rows split over the team's workers (one row per worker at a
// time, each with its own slot of scratch: the QPs are independent and sequential
// inside).
//
// Each QP is solved exactly by a primal active-set method on x = v − u ≥ 0 (Lawson &
// Hanson's NNLS algorithm, "Solving Least Squares Problems", 1974, ch. 23, for the
// objective ½·xᵀ·Ĝ·x + cᵀ·x, c = Ĝ·u), with block additions:
//   * the free set F: indices with x > 0 (constraint v_k ≥ u_k inactive); x = 0 off F;
//   * major step: μ = c + Ĝ·x, the gradient; x is optimal when μ_k ≥ 0 off F (the KKT
//     conditions: μ = 0 on F, μ ≥ 0 off F, x ≥ 0); else EVERY k with μ_k < 0 joins F
//     (Lawson & Hanson add the most negative only: one major step per index, where
//     near-orthogonal tasks, UPGrad's usual case, need one or two in all);
//   * minor steps: y = the minimiser on F (Ĝ_FF·y = −c_F); if y > 0 it is the new x_F;
//     else x moves towards y until a coefficient reaches 0, whose index leaves F, and
//     the minor step repeats.
// Each major step ends at the minimiser on its F and the objective falls from one to
// the next (the segment from x to y descends; if every joining index left at θ = 0, the
// last one left alone would be Lawson & Hanson's step, which moves), so no free set
// repeats and it ends with the exact minimiser. Ĝ_FF is kept as its Cholesky factor
// Ĝ_FF = Rᵀ·R with z = R⁻ᵀ·(−c_F) (common.h's cholesky_append / cholesky_delete,
// O(|F|²) per change), so a minor step is one back substitution y = R⁻¹·z.
//
// An index whose pivot is below K·ε·Ĝ_tt (ε = double's) does not join F: its gradient
// is a combination of F's to rounding (duplicate or zero rows with reg_eps = 0), so Ĝ_FF
// stays positive definite without changing the problem.
//
// Stops (every one of them a feasible v; the first is the optimum):
//   * μ_k ≥ −K·ε·sqrt(Ĝ_kk)·m off F, m = Σ_k |v_k|·sqrt(Ĝ_kk): the rounding error of μ_k;
//   * no joining index has a pivot above that, or x did not move over a major step
//     (rounding, not the method, stops the descent there);
//   * 4·K + 4 major steps (a safety net: the method needs at most about K).
// A non-finite entry in G gives all-NaN projections; a non-finite u, a non-finite v.
#pragma once

#include <cfloat>

#include "common.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct DualConeProjection {
  const scalar_t* gram;  // K×K
  const scalar_t* rows;  // N×K: the u's
  scalar_t* projections; // N×K: the v's
  int K;
  int N;
  double norm_eps;
  double reg_eps;
  // Scratch slots, one per concurrent worker: min(team size, slots) workers run
  // (any team is correct; the CPU backend passes 1, CUDA its block size at most).
  int slots;

  struct Scratch {
    double* flag;  // load_finite_gram's flag
    double* G;     // K×K: Ĝ
    double* norms; // K: sqrt(Ĝ_kk)
    double* R;     // slots × K×K: the factor of Ĝ_FF (upper triangle of the first |F| rows/columns)
    double* z;     // slots × K: R⁻ᵀ·(−c_F)
    double* y;     // slots × K: the minimiser on F, in F's order
    double* x;     // slots × K: x = v − u
    double* c;     // slots × K: Ĝ·u
    double* mu;    // slots × K: the gradient c + Ĝ·x
    int* free_set; // slots × K: F's indices, then (from K on) 1 where k ∈ F
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1),
            layout.take<double>(K * K),
            layout.take<double>(K),
            layout.take<double>(static_cast<int64_t>(slots) * K * K),
            layout.take<double>(static_cast<int64_t>(slots) * K),
            layout.take<double>(static_cast<int64_t>(slots) * K),
            layout.take<double>(static_cast<int64_t>(slots) * K),
            layout.take<double>(static_cast<int64_t>(slots) * K),
            layout.take<double>(static_cast<int64_t>(slots) * K),
            layout.take<int>(static_cast<int64_t>(slots) * 2 * K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double* G = s.G;
    if (!load_finite_gram(team, gram, K, G, s.flag)) {
      for (int64_t i = team.rank(); i < static_cast<int64_t>(N) * K; i += team.size())
        projections[i] = static_cast<scalar_t>(NAN);
      return;
    }
    double trace = 0.0;
    for (int k = 0; k < K; ++k) trace += G[k * K + k];
    const double scale = trace < norm_eps ? 0.0 : 1.0 / trace;
    team.sync();  // everyone has read the diagonal before it is rewritten
    for (int i = team.rank(); i < K * K; i += team.size()) G[i] = G[i] * scale + (i % (K + 1) == 0 ? reg_eps : 0.0);
    team.sync();
    for (int k = team.rank(); k < K; k += team.size()) s.norms[k] = sqrt(G[k * K + k]);
    team.sync();

    const int workers = team.size() < slots ? team.size() : slots;
    if (team.rank() >= workers) return;
    const int slot = team.rank();
    const Slot scratch{s.R + static_cast<int64_t>(slot) * K * K, s.z + slot * K,  s.y + slot * K,
                       s.x + slot * K,                           s.c + slot * K,  s.mu + slot * K,
                       s.free_set + slot * 2 * K};
    for (int row = team.rank(); row < N; row += workers) project(G, s.norms, scratch, row);
  }

 private:
  struct Slot {
    double* R;
    double* z;
    double* y;
    double* x;
    double* c;
    double* mu;
    int* free_set;
  };

  // One QP, by one worker: projections[row] = v for u = rows[row]. `norms`: sqrt(Ĝ_kk).
  SELGROUP_HD void project(const double* G, const double* norms, const Slot& s, int row) const {
    const scalar_t* u = rows + static_cast<int64_t>(row) * K;
    int* in_free = s.free_set + K;
    for (int i = 0; i < K; ++i) {
      double sum = 0.0;
      for (int j = 0; j < K; ++j) sum += G[i * K + j] * static_cast<double>(u[j]);
      s.c[i] = sum;
      s.mu[i] = sum;
      s.x[i] = 0.0;
      in_free[i] = 0;
    }
    int size = 0;  // |F|
    for (int step = 0; step < 4 * K + 4; ++step) {
      double mass = 0.0;
      for (int k = 0; k < K; ++k) mass += fabs(static_cast<double>(u[k]) + s.x[k]) * norms[k];
      const int kept = size;
      for (int t = 0; t < K; ++t) {  // every violated condition joins F
        if (in_free[t] || !(s.mu[t] < -K * DBL_EPSILON * norms[t] * mass)) continue;
        const double squared_pivot = cholesky_append(
            s.R, K, size, [&](int i) { return G[s.free_set[i] * K + t]; }, G[t * K + t]);
        // t is a combination of F's gradients to rounding (a duplicate or zero row when reg_eps = 0): it stays
        // out (its μ_t is then F's combination of zeros, up to that rounding).
        if (!(squared_pivot > K * DBL_EPSILON * G[t * K + t])) continue;
        double r_dot_z = 0.0;
        for (int i = 0; i < size; ++i) r_dot_z += s.R[i * K + size] * s.z[i];
        s.z[size] = (-s.c[t] - r_dot_z) / s.R[size * K + size];
        s.free_set[size++] = t;
        in_free[t] = 1;
      }
      if (size == kept) break;  // optimal (or only rounding violates the conditions)

      bool moved = false;
      while (true) {
        for (int i = size - 1; i >= 0; --i) {  // y = R⁻¹·z
          double sum = s.z[i];
          for (int k = i + 1; k < size; ++k) sum -= s.R[i * K + k] * s.y[k];
          s.y[i] = sum / s.R[i * K + i];
        }
        int leaving = -1;  // the first index to reach 0 on the way from x to y
        double theta = 1.0;
        for (int i = 0; i < size; ++i) {
          if (s.y[i] > 0.0) continue;
          const double x_i = s.x[s.free_set[i]];
          const double ratio = x_i > s.y[i] ? x_i / (x_i - s.y[i]) : 0.0;
          if (leaving < 0 || ratio < theta) leaving = i, theta = ratio;
        }
        for (int i = 0; i < size; ++i) {
          double& x_i = s.x[s.free_set[i]];
          x_i = i == leaving ? 0.0 : fmax((1.0 - theta) * x_i + theta * s.y[i], 0.0);
        }
        moved = moved || theta > 0.0;
        if (leaving < 0) break;
        in_free[s.free_set[leaving]] = 0;
        for (int j = leaving; j + 1 < size; ++j) s.free_set[j] = s.free_set[j + 1];
        cholesky_delete(s.R, K, size, leaving, s.z);
        --size;
      }
      if (!moved) break;  // every joining index left at once: rounding stops the descent
      for (int k = 0; k < K; ++k) s.mu[k] = s.c[k];
      for (int i = 0; i < size; ++i) {  // μ = c + Ĝ_{:,F}·x_F, by Ĝ's rows (Ĝ is symmetric)
        const double* column = G + s.free_set[i] * K;
        const double x_i = s.x[s.free_set[i]];
        for (int k = 0; k < K; ++k) s.mu[k] += column[k] * x_i;
      }
    }
    scalar_t* v = projections + static_cast<int64_t>(row) * K;
    for (int k = 0; k < K; ++k) v[k] = static_cast<scalar_t>(static_cast<double>(u[k]) + s.x[k]);
  }
};

}  // namespace manipulation
}  // namespace selgroup
