// The shape shared by the weighting baselines: one team solves one small K×K
// problem on the Gram matrix G = J·Jᵀ of the task gradients and writes K weights.
//
// Every solver is a small functor (the apex multi_tensor_apply pattern): it holds
// its pointers, K and its options, lists its scratch arrays once in `carve`
// (csrc/workspace.h sizes and carves the workspace from that one list), and runs
// as `solver(team, scratch)`. Every backend runs it through ONE generic path
// (csrc/bindings.h): the CPU with a SerialTeam on a host buffer, CUDA with one
// generic kernel (csrc/cuda/kernels.cu) in which one block is the team and the
// workspace is the block's dynamic shared memory (global memory when it does not
// fit). Same code, same arithmetic order, on both backends (up to the
// multiply-adds nvcc fuses). tests/team_check.cpp runs these functors with 2..32
// CPU threads as the team to check the work split and the barriers without a GPU.
//
// Conventions of every solver:
//   * all arithmetic in double, whatever the input dtype: the problems are tiny
//     (K×K), latency-bound, and several solvers (Newton, QL, Frank-Wolfe) lose
//     their answer in float32;
//   * vector work is split over the team (`for i = rank; i < n; i += size`),
//     followed by `team.sync()`; scalar reductions are computed REDUNDANTLY by
//     every worker from the shared workspace, so every worker takes the same
//     branch without broadcasting, and the control flow stays uniform;
//   * a non-finite entry anywhere in G gives all-NaN weights (the garbage is
//     flagged, never hidden, and no host synchronisation is needed to check);
//   * K = 1 gives w = [1].
// This header includes no torch header: the .cu files compile with plain nvcc.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../workspace.h"

namespace selgroup {
namespace manipulation {

// std:: so that the host compiler finds the double overloads; nvcc maps them to
// the device functions.
using std::fabs;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::log;
using std::sqrt;

template <Team T>
SELGROUP_HD_INLINE void fill(const T& team, double* x, int n, double value) {
  for (int i = team.rank(); i < n; i += team.size()) x[i] = value;
}

template <Team T, typename scalar_t>
SELGROUP_HD_INLINE void store(const T& team, const double* x, int n, scalar_t* out) {
  for (int i = team.rank(); i < n; i += team.size()) out[i] = static_cast<scalar_t>(x[i]);
}

// The machine epsilon of the input dtype: G, and so any answer derived from it,
// is known to this relative precision (scaled by the norms involved).
template <typename scalar_t>
SELGROUP_HD_INLINE constexpr double input_epsilon() {
  return sizeof(scalar_t) == sizeof(float) ? static_cast<double>(FLT_EPSILON) : DBL_EPSILON;
}

// Loads G (row-major K×K, any float dtype) into `G` as doubles; returns whether every
// entry is finite (the same answer on every worker). `flag` is one workspace slot (the
// team-wide "G is finite" flag), free again when it returns.
template <Team T, typename scalar_t>
SELGROUP_HD bool load_finite_gram(const T& team, const scalar_t* gram, int K, double* G, double* flag) {
  if (team.rank() == 0) *flag = 1.0;
  team.sync();
  for (int i = team.rank(); i < K * K; i += team.size()) {
    const double value = static_cast<double>(gram[i]);
    G[i] = value;
    // Benign race: every worker that sees a bad entry writes the same 0.
    if (!isfinite(value)) *flag = 0.0;
  }
  team.sync();
  const bool finite = *flag != 0.0;
  team.sync();  // everyone has read the flag before a solver reuses the slot
  return finite;
}

// load_finite_gram, and the two cases every weighting solver shares. Returns false
// when the weights are already written: all-NaN for a non-finite G, [1] for K = 1.
template <Team T, typename scalar_t>
SELGROUP_HD bool load_gram(const T& team, const scalar_t* gram, int K, double* G, double* flag,
                           scalar_t* weights) {
  if (!load_finite_gram(team, gram, K, G, flag)) {
    for (int i = team.rank(); i < K; i += team.size()) weights[i] = static_cast<scalar_t>(NAN);
    return false;
  }
  if (K == 1) {
    if (team.rank() == 0) weights[0] = static_cast<scalar_t>(1);
    return false;
  }
  return true;
}

// y = A·x for a row-major n×n A, rows split over the team; syncs.
template <Team T>
SELGROUP_HD void matvec(const T& team, const double* A, const double* x, double* y, int n) {
  for (int i = team.rank(); i < n; i += team.size()) {
    double sum = 0.0;
    for (int j = 0; j < n; ++j) sum += A[i * n + j] * x[j];
    y[i] = sum;
  }
  team.sync();
}

SELGROUP_HD_INLINE double dot(const double* x, const double* y, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// xᵀ·A·x, computed redundantly by the caller.
SELGROUP_HD_INLINE double quadratic_form(const double* A, const double* x, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    double row = 0.0;
    for (int j = 0; j < n; ++j) row += A[i * n + j] * x[j];
    sum += x[i] * row;
  }
  return sum;
}

// The threshold τ of the Euclidean projection onto the probability simplex,
// proj(v)_i = max(v_i − τ, 0) (Michelot 1986): τ = (Σ_{i∈S} v_i − 1)/|S| over
// S = {i : v_i > τ}, iterated from S = all; τ only grows and S only shrinks, so it
// stops after at most n passes with the exact τ. No sort, no scratch: every
// worker computes it redundantly.
SELGROUP_HD_INLINE double simplex_threshold(const double* v, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += v[i];
  double tau = (sum - 1.0) / n;
  for (int pass = 0; pass < n; ++pass) {
    double kept_sum = 0.0;
    int kept = 0;
    for (int i = 0; i < n; ++i) {
      if (v[i] > tau) {
        kept_sum += v[i];
        ++kept;
      }
    }
    const double next = (kept_sum - 1.0) / kept;  // kept >= 1: the largest v_i > τ always
    if (next == tau) break;
    tau = next;
  }
  return tau;
}

// Factors a symmetric A (row-major n×n) as L·Lᵀ in place (its lower triangle
// becomes L), columns split over the team, and returns the smallest squared
// pivot d_j met: A is positive definite (to rounding) iff it is positive. A
// non-positive pivot is floored at 1e-300 so that the factor stays finite.
// Redundant return on every worker; syncs.
template <Team T>
SELGROUP_HD double cholesky_factor(const T& team, double* A, int n) {
  double smallest_pivot = INFINITY;
  for (int j = 0; j < n; ++j) {
    double pivot = A[j * n + j];
    for (int k = 0; k < j; ++k) pivot -= A[j * n + k] * A[j * n + k];
    smallest_pivot = fmin(smallest_pivot, pivot);
    const double diagonal = sqrt(fmax(pivot, 1e-300));
    team.sync();  // everyone has read row j before it is rewritten
    for (int i = j + 1 + team.rank(); i < n; i += team.size()) {
      double sum = A[i * n + j];
      for (int k = 0; k < j; ++k) sum -= A[i * n + k] * A[j * n + k];
      A[i * n + j] = sum / diagonal;
    }
    if (team.rank() == 0) A[j * n + j] = diagonal;
    team.sync();
  }
  return smallest_pivot;
}

// Solves L·Lᵀ·x = b in place (b becomes x) with the factor of cholesky_factor. Syncs.
template <Team T>
SELGROUP_HD void cholesky_solve(const T& team, const double* L, double* b, int n) {
  if (team.rank() == 0) {
    for (int i = 0; i < n; ++i) {  // L·y = b
      double sum = b[i];
      for (int k = 0; k < i; ++k) sum -= L[i * n + k] * b[k];
      b[i] = sum / L[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {  // Lᵀ·x = y
      double sum = b[i];
      for (int k = i + 1; k < n; ++k) sum -= L[k * n + i] * b[k];
      b[i] = sum / L[i * n + i];
    }
  }
  team.sync();
}

// An active set's Cholesky factor M_S = Rᵀ·R, R upper triangular in the first |S| rows
// and columns of a row-major array with leading dimension `ld` (Wolfe's corral in
// mgda.h, the free set in dual_cone.h), kept up to date in O(|S|²) per change:
//
// cholesky_append: an index joins S: column `size` of R solves Rᵀ·r = (M_{S_i,new})_i,
// `column(i)` giving M_{S_i,new}, and its pivot is sqrt(diagonal − rᵀ·r). Returns the
// squared pivot (M_{S+new} is positive definite, to rounding, iff it is positive).
template <typename Column>
SELGROUP_HD_INLINE double cholesky_append(double* R, int ld, int size, Column column, double diagonal) {
  double squared_norm = 0.0;
  for (int i = 0; i < size; ++i) {
    double sum = column(i);
    for (int k = 0; k < i; ++k) sum -= R[k * ld + i] * R[k * ld + size];
    const double r = sum / R[i * ld + i];
    R[i * ld + size] = r;
    squared_norm += r * r;
  }
  const double squared_pivot = diagonal - squared_norm;
  R[size * ld + size] = sqrt(fmax(squared_pivot, 0.0));
  return squared_pivot;
}

// cholesky_delete: S's entry `leaving` goes: its column of R goes, the columns after it
// shift left, and Givens rotations of rows (j, j + 1) zero the subdiagonal this leaves,
// applied to z as well (if R_delᵀ·z = b then (Q·R_del)ᵀ·(Q·z) = b; Q·R_del's last row
// is 0, so z's last entry is dropped).
SELGROUP_HD_INLINE void cholesky_delete(double* R, int ld, int size, int leaving, double* z) {
  for (int j = leaving; j + 1 < size; ++j)
    for (int i = 0; i <= j + 1; ++i) R[i * ld + j] = R[i * ld + j + 1];
  for (int j = leaving; j + 1 < size; ++j) {
    const double a = R[j * ld + j], b = R[(j + 1) * ld + j];
    const double radius = sqrt(a * a + b * b);  // >= b, the old pivot of row j + 1: > 0
    const double cosine = a / radius, sine = b / radius;
    for (int k = j; k + 1 < size; ++k) {
      const double upper = R[j * ld + k], lower = R[(j + 1) * ld + k];
      R[j * ld + k] = cosine * upper + sine * lower;
      R[(j + 1) * ld + k] = cosine * lower - sine * upper;
    }
    const double upper = z[j], lower = z[j + 1];
    z[j] = cosine * upper + sine * lower;
    z[j + 1] = cosine * lower - sine * upper;
  }
}

}  // namespace manipulation
}  // namespace selgroup
