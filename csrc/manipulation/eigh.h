// The symmetric eigenproblem G = V·Λ·Vᵀ of a small K×K matrix for the team solvers
// (common.h), by the classic O(K³) route (Golub & Van Loan, "Matrix Computations",
// §8.3): Householder reduction to a tridiagonal T = Qᵀ·G·Q, then implicit QL
// iterations with Wilkinson shifts on T = Z·Λ·Zᵀ, so that V = Q·Z.
//
// Q is never formed: the callers only need V·f(Λ)·Vᵀ·x = Q·(Z·(f(Λ)·(Zᵀ·(Qᵀ·x)))),
// and Q's reflectors are applied to vectors (O(K²)). The work that costs O(K³),
// the rank-2 updates of the reduction and the rotations of Z, is split over the
// team by rows, in loops over contiguous memory (vector lanes on the CPU,
// coalesced on a GPU); the scalar recurrences run on rank 0 between barriers.
// (It replaces a cyclic Jacobi whose every rotation touched two strided columns
// and which needed several times the flops.)
#pragma once

#include <cfloat>

#include "common.h"

namespace selgroup {
namespace manipulation {

using std::copysign;
using std::hypot;

struct SymmetricEigen {
  // A QL iteration converges cubically (twice per eigenvalue on average); an
  // eigenvalue that has not split off after this many is accepted as it stands.
  static constexpr int kMaxIterations = 30;
  // Rotations of Z are applied to this many of its columns at a time, the
  // running row of each kept in registers.
  static constexpr int kLanes = 8;

  struct Scratch {
    double* A;           // K×K: G, overwritten by the reduction (row j keeps reflector j)
    double* Zt;          // K×K: Zᵀ, the eigenvectors of T in its ROWS
    double* diagonal;    // K: T's diagonal, then the eigenvalues
    double* off;         // K: T's sub-diagonal (off[i] couples i and i + 1), off[K−1] = 0
    double* tau;         // K: the reflectors' factors
    double* p;           // K: work vector
    double* q;           // K: work vector
    double* rotations;   // 2K: (cos, sin) of one QL sweep's rotations
    int* sweep;          // 2: the sweep's first and last rotation index, −1 when converged
  };
  SELGROUP_HD static Scratch carve(WorkspaceLayout& layout, int K) {
    return {layout.take<double>(K * K), layout.take<double>(K * K), layout.take<double>(K),
            layout.take<double>(K),     layout.take<double>(K),     layout.take<double>(K),
            layout.take<double>(K),     layout.take<double>(2 * K), layout.take<int>(2)};
  }

  // Eigenvalues into s.diagonal (unordered), the eigenvectors into the rows of
  // s.Zt (in T's basis), from the symmetric G already in s.A. Syncs.
  template <Team T>
  SELGROUP_HD static void decompose(const T& team, const Scratch& s, int K) {
    tridiagonalise(team, s, K);
    ql(team, s, K);
  }

  // y = Q·x (transpose = false) or Qᵀ·x (transpose = true), in place on rank 0. Syncs.
  template <Team T>
  SELGROUP_HD static void apply_q(const T& team, const Scratch& s, int K, double* x, bool transpose) {
    if (team.rank() == 0) {
      // Q = H_0·H_1·…·H_{K−3}, H_j = I − τ_j·v_j·v_jᵀ acting on entries j+1..K−1.
      for (int step = 0; step < K - 2; ++step) {
        const int j = transpose ? step : K - 3 - step;
        const double* v = s.A + j * K;
        double dot = 0.0;
        for (int c = j + 1; c < K; ++c) dot += v[c] * x[c];
        const double factor = s.tau[j] * dot;
        for (int c = j + 1; c < K; ++c) x[c] -= factor * v[c];
      }
    }
    team.sync();
  }

 private:
  // Householder reduction (LAPACK's dsytd2 on the full matrix): for each column j,
  // the reflector H = I − τ·v·vᵀ (v_{j+1} = 1) that maps A[j+1.., j] to β·e₁, and
  // A₂₂ ← H·A₂₂·H = A₂₂ − v·wᵀ − w·vᵀ with p = τ·A₂₂·v, w = p − (τ/2)(pᵀv)·v.
  // Both triangles are updated so that every row stays contiguous.
  template <Team T>
  SELGROUP_HD static void tridiagonalise(const T& team, const Scratch& s, int K) {
    double *A = s.A, *p = s.p, *w = s.q;
    for (int j = 0; j + 2 < K; ++j) {
      double* row = A + j * K;  // = column j by symmetry
      const double alpha = row[j + 1];
      double tail = 0.0;
      for (int c = j + 2; c < K; ++c) tail += row[c] * row[c];
      const double beta = tail == 0.0 ? alpha : -copysign(sqrt(alpha * alpha + tail), alpha);
      const double tau = tail == 0.0 ? 0.0 : (beta - alpha) / beta;
      const double scale = tail == 0.0 ? 0.0 : 1.0 / (alpha - beta);
      team.sync();  // everyone has read row j before it becomes v
      for (int c = j + 2 + team.rank(); c < K; c += team.size()) row[c] *= scale;
      if (team.rank() == 0) {
        row[j + 1] = 1.0;
        s.diagonal[j] = row[j];
        s.off[j] = beta;
        s.tau[j] = tau;
      }
      team.sync();
      if (tau == 0.0) continue;  // H = I: nothing to update
      const int first = j + 1, n = K - first;
      const double* v = row;
      // p = τ·A₂₂·v, as Σ_c v_c·(row c of A₂₂) (A₂₂ is symmetric): contiguous rows.
      team_split(team, n, [&](int64_t begin, int64_t end) {
        for (int64_t r = first + begin; r < first + end; ++r) p[r] = 0.0;
        for (int c = first; c < K; ++c) {
          const double factor = tau * v[c];
          const double* a = A + c * K;
          for (int64_t r = first + begin; r < first + end; ++r) p[r] += factor * a[r];
        }
      });
      team.sync();
      double pv = 0.0;
      for (int c = first; c < K; ++c) pv += p[c] * v[c];
      const double half = 0.5 * tau * pv;
      for (int c = first + team.rank(); c < K; c += team.size()) w[c] = p[c] - half * v[c];
      team.sync();
      team_split(team, n, [&](int64_t begin, int64_t end) {
        for (int64_t r = first + begin; r < first + end; ++r) {
          double* a = A + r * K;
          const double vr = v[r], wr = w[r];
          for (int c = first; c < K; ++c) a[c] -= vr * w[c] + wr * v[c];
        }
      });
      team.sync();
    }
    if (team.rank() == 0) {
      if (K >= 2) {
        s.diagonal[K - 2] = A[(K - 2) * K + K - 2];
        s.off[K - 2] = A[(K - 1) * K + K - 2];
      }
      s.diagonal[K - 1] = A[(K - 1) * K + K - 1];
      s.off[K - 1] = 0.0;
    }
    for (int e = team.rank(); e < K * K; e += team.size()) s.Zt[e] = (e / K == e % K) ? 1.0 : 0.0;
    team.sync();
  }

  // Implicit QL with Wilkinson shifts (Golub & Van Loan §8.3.3, in its QL form):
  // rank 0 chases one sweep's bulge through T from the bottom of the unreduced
  // block [l, m] up to l, recording its plane rotations; then the team applies
  // them to Zᵀ's rows, each worker to its columns.
  template <Team T>
  SELGROUP_HD static void ql(const T& team, const Scratch& s, int K) {
    double *d = s.diagonal, *e = s.off, *rotation = s.rotations;
    for (int l = 0; l < K; ++l) {
      for (int iteration = 0;; ++iteration) {
        if (team.rank() == 0) {
          int m = l;
          while (m < K - 1 && !(fabs(e[m]) <= DBL_EPSILON * (fabs(d[m]) + fabs(d[m + 1])))) ++m;
          if (m == l || iteration == kMaxIterations) {
            s.sweep[0] = -1;
          } else {
            s.sweep[0] = m;
            s.sweep[1] = chase(d, e, rotation, l, m);
          }
        }
        team.sync();
        const int top = s.sweep[0], bottom = s.sweep[1];
        team.sync();  // everyone has read the sweep before rank 0 writes the next
        if (top < 0) break;
        rotate(team, s.Zt, rotation, K, top, bottom);
        team.sync();
      }
    }
  }

  // One QL sweep on the block [l, m]; returns the last rotation index made (l, or
  // above it when an off-diagonal underflows to zero and splits the block).
  SELGROUP_HD static int chase(double* d, double* e, double* rotation, int l, int m) {
    // The shift: the eigenvalue of T's leading 2×2 at l nearer to d_l.
    double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
    double r = hypot(g, 1.0);
    g = d[m] - d[l] + e[l] / (g + copysign(r, g));
    double sine = 1.0, cosine = 1.0, p = 0.0;
    for (int i = m - 1; i >= l; --i) {
      const double f = sine * e[i], b = cosine * e[i];
      r = hypot(f, g);
      e[i + 1] = r;
      if (r == 0.0) {  // T splits at i + 1: redo the smaller block
        d[i + 1] -= p;
        e[m] = 0.0;
        return i + 1;
      }
      sine = f / r;
      cosine = g / r;
      g = d[i + 1] - p;
      r = (d[i] - g) * sine + 2.0 * cosine * b;
      p = sine * r;
      d[i + 1] = g + p;
      g = cosine * r - b;
      rotation[2 * i] = cosine;
      rotation[2 * i + 1] = sine;
    }
    d[l] -= p;
    e[l] = g;
    e[m] = 0.0;
    return l;
  }

  // Rows i, i+1 of Zᵀ ← the rotation i, for i = top−1 down to bottom: each column
  // carries its running row i+1 down the sweep (one load and one store per entry).
  template <Team T>
  SELGROUP_HD static void rotate(const T& team, double* Zt, const double* rotation, int K, int top, int bottom) {
    team_split(team, K, [&](int64_t begin, int64_t end) {
      for (int64_t k0 = begin; k0 < end; k0 += kLanes) {
        const int lanes = end - k0 < kLanes ? static_cast<int>(end - k0) : kLanes;
        if (lanes == kLanes) {
          rotate_columns<kLanes>(Zt, rotation, K, top, bottom, k0, kLanes);
        } else {
          rotate_columns<1>(Zt, rotation, K, top, bottom, k0, lanes);
        }
      }
    });
  }

  // Columns k0..k0+count−1 of the sweep, `Lanes` (a compile-time width, so that
  // the carried rows stay in registers) at a time.
  template <int Lanes>
  SELGROUP_HD_INLINE static void rotate_columns(double* Zt, const double* rotation, int K, int top, int bottom,
                                                int64_t k0, int count) {
    for (int start = 0; start < count; start += Lanes) {
      double* column = Zt + k0 + start;
      double carry[Lanes];
      for (int lane = 0; lane < Lanes; ++lane) carry[lane] = column[top * K + lane];
      for (int i = top - 1; i >= bottom; --i) {
        const double cosine = rotation[2 * i], sine = rotation[2 * i + 1];
        double* lower = column + i * K;
        double* upper = lower + K;
        // All loads before any store: the rows are K apart, which the compiler
        // cannot tell from less than Lanes, and it would not vectorise otherwise.
        double a[Lanes];
        for (int lane = 0; lane < Lanes; ++lane) a[lane] = lower[lane];
        for (int lane = 0; lane < Lanes; ++lane) {
          upper[lane] = sine * a[lane] + cosine * carry[lane];
          carry[lane] = cosine * a[lane] - sine * carry[lane];
        }
      }
      for (int lane = 0; lane < Lanes; ++lane) column[bottom * K + lane] = carry[lane];
    }
  }
};

}  // namespace manipulation
}  // namespace selgroup
