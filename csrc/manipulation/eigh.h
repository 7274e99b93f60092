// The symmetric eigenproblem G = V·Λ·Vᵀ of a small K×K matrix for the team solvers
// (common.h), by the classic O(K³) route (Golub & Van Loan, "Matrix Computations",
// §8.3): Householder reduction to a tridiagonal T = Qᵀ·G·Q, then implicit QL
// iterations with Wilkinson shifts on T = Z·Λ·Zᵀ, so that V = Q·Z.
//
// Neither Q nor Z is formed: the callers need only Vᵀ·x and V·y, i.e. Q's
// reflectors and Z's plane rotations applied to vectors, O(K²) in all. The QL
// sweeps therefore only log their rotations (about 1.2·K² of them); accumulating
// them into Z, 6·K flops each, was three quarters of the time. Only when the log
// is full (2·K² + 2·K rotations, not reached on the random, repeated-eigenvalue
// and test matrices tried) is it applied to an explicit Zᵀ and emptied. The reduction's rank-2
// updates, the one O(K³) part, are split over the team by rows, in loops over
// contiguous memory (vector lanes on the CPU, coalesced on a GPU); the scalar
// recurrences run on rank 0 between barriers.
#pragma once

#include <cfloat>

#include "common.h"

namespace selgroup {
namespace manipulation {

using std::copysign;
using std::frexp;
using std::ldexp;

struct SymmetricEigen {
  // A QL iteration converges cubically (about 2.3 per eigenvalue on random
  // matrices); an eigenvalue that has not split off after this many is accepted
  // as it stands.
  static constexpr int kMaxIterations = 30;

  struct Scratch {
    double* A;          // K×K: G, overwritten by the reduction (row j keeps reflector j)
    double* Zt;         // K×K: the flushed rotations' product Zᵀ (rows: T's eigenvectors so far)
    double* diagonal;   // K: T's diagonal, then the eigenvalues
    double* off;        // K: T's sub-diagonal (off[i] couples i and i + 1), off[K−1] = 0
    double* tau;        // K: the reflectors' factors
    double* p;          // K: work vector
    double* q;          // K: work vector
    double* rotations;  // 2·capacity: (cos, sin) of the logged rotations, in the order made
    int* rows;          // capacity: the rotation's first row i (it mixes rows i and i + 1)
    int* control;       // 3: rank 0's word to the team; then the log's length, and whether Zᵀ ≠ I
    int capacity;
  };
  // Rotations the log holds: above the 1.2–1.3·K² that QL makes on random matrices.
  SELGROUP_HD static int log_capacity(int K) { return 2 * K * K + 2 * K; }
  // `capacity` is raised to K − 1, one sweep's most.
  SELGROUP_HD static Scratch carve(WorkspaceLayout& layout, int K, int capacity) {
    capacity = capacity > K - 1 ? capacity : K - 1;
    return {layout.take<double>(K * K), layout.take<double>(K * K), layout.take<double>(K),
            layout.take<double>(K),     layout.take<double>(K),     layout.take<double>(K),
            layout.take<double>(K),     layout.take<double>(2 * capacity),
            layout.take<int>(capacity), layout.take<int>(3),
            capacity};
  }

  // Eigenvalues into s.diagonal (unordered) and the rotations into the log, from
  // the symmetric G already in s.A. Syncs.
  template <Team T>
  SELGROUP_HD static void decompose(const T& team, const Scratch& s, int K) {
    const int exponent = normalise(team, s, K);
    tridiagonalise(team, s, K);
    ql(team, s, K);
    for (int i = team.rank(); i < K; i += team.size()) s.diagonal[i] = ldexp(s.diagonal[i], exponent);
    team.sync();
  }

  // y = Vᵀ·x (x is overwritten). Syncs.
  template <Team T>
  SELGROUP_HD static void project(const T& team, const Scratch& s, int K, double* x, double* y) {
    apply_q(team, s, K, x, true);
    const bool flushed = s.control[2] != 0;
    for (int i = team.rank(); i < K; i += team.size()) y[i] = flushed ? dot(s.Zt + i * K, x, K) : x[i];
    team.sync();
    if (team.rank() == 0) {
      const int logged = s.control[1];
      for (int r = 0; r < logged; ++r) {
        const int i = s.rows[r];
        const double cosine = s.rotations[2 * r], sine = s.rotations[2 * r + 1], a = y[i], b = y[i + 1];
        y[i] = cosine * a - sine * b;
        y[i + 1] = sine * a + cosine * b;
      }
    }
    team.sync();
  }

  // x = V·y (y is overwritten). Syncs.
  template <Team T>
  SELGROUP_HD static void expand(const T& team, const Scratch& s, int K, double* y, double* x) {
    if (team.rank() == 0) {
      for (int r = s.control[1] - 1; r >= 0; --r) {
        const int i = s.rows[r];
        const double cosine = s.rotations[2 * r], sine = s.rotations[2 * r + 1], a = y[i], b = y[i + 1];
        y[i] = cosine * a + sine * b;
        y[i + 1] = cosine * b - sine * a;
      }
    }
    team.sync();
    const bool flushed = s.control[2] != 0;
    team_split(team, K, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) x[k] = flushed ? 0.0 : y[k];
      if (!flushed) return;
      for (int i = 0; i < K; ++i) {
        const double* row = s.Zt + i * K;
        for (int64_t k = begin; k < end; ++k) x[k] += y[i] * row[k];
      }
    });
    team.sync();
    apply_q(team, s, K, x, false);
  }

 private:
  // A ← A·2^−e with the largest |A_ij| in [½, 1) (exact: a power of two), so that
  // the rotations may take sqrt(f² + g²) for hypot(f, g) (a quarter of the
  // solver's time at K = 32–128) without overflow; returns e, by which the
  // eigenvalues are scaled back. Syncs.
  template <Team T>
  SELGROUP_HD static int normalise(const T& team, const Scratch& s, int K) {
    for (int i = team.rank(); i < K; i += team.size()) {
      double largest = 0.0;
      for (int j = 0; j < K; ++j) largest = fmax(largest, fabs(s.A[i * K + j]));
      s.p[i] = largest;
    }
    team.sync();
    double largest = 0.0;
    for (int i = 0; i < K; ++i) largest = fmax(largest, s.p[i]);
    int exponent = 0;
    if (largest > 0.0) frexp(largest, &exponent);
    // Within ±1000 the scale is a normal number (|A| near the ends of the range is
    // then brought to [2^−31, 2^24], just as safe).
    exponent = exponent < -1000 ? -1000 : (exponent > 1000 ? 1000 : exponent);
    const double scale = ldexp(1.0, -exponent);
    for (int e = team.rank(); e < K * K; e += team.size()) s.A[e] *= scale;
    team.sync();
    return exponent;
  }

  // x ← Q·x (transpose = false) or Qᵀ·x (transpose = true), on rank 0. Syncs.
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
  // rank 0 chases each sweep's bulge through T from the bottom of the unreduced
  // block [l, m] up to l and logs its rotations; when the log would overflow, the
  // team first applies it to Zᵀ (each worker to its columns) and empties it.
  template <Team T>
  SELGROUP_HD static void ql(const T& team, const Scratch& s, int K) {
    constexpr int kConverged = -1, kFlush = -2;
    double *d = s.diagonal, *e = s.off;
    int logged = 0;  // rank 0's
    bool flushed = false;
    for (int l = 0; l < K; ++l) {
      for (int iteration = 0;;) {
        if (team.rank() == 0) {
          int m = l;
          while (m < K - 1 && !(fabs(e[m]) <= DBL_EPSILON * (fabs(d[m]) + fabs(d[m + 1])))) ++m;
          if (m == l || iteration == kMaxIterations) {
            s.control[0] = kConverged;
          } else if (logged + (m - l) > s.capacity) {
            s.control[0] = kFlush;
            s.control[1] = logged;
            logged = 0;
          } else {
            s.control[0] = m;
            logged = chase(d, e, s.rotations, s.rows, logged, l, m);
          }
        }
        team.sync();
        const int word = s.control[0], count = s.control[1];
        team.sync();  // everyone has read the word before rank 0 writes the next
        if (word == kConverged) break;
        if (word == kFlush) {
          flush(team, s, K, count);
          flushed = true;
          team.sync();
          continue;
        }
        ++iteration;
      }
    }
    if (team.rank() == 0) {
      s.control[1] = logged;
      s.control[2] = flushed ? 1 : 0;
    }
    team.sync();
  }

  // One QL sweep on the block [l, m], its rotations appended to the log at
  // `logged`; returns the log's new length. The sweep stops early when an
  // off-diagonal underflows to zero (T splits there; the next sweep redoes the rest).
  SELGROUP_HD static int chase(double* d, double* e, double* rotations, int* rows, int logged, int l, int m) {
    // The shift: the eigenvalue of T's leading 2×2 at l nearer to d_l. (|g| so
    // large that g² overflows gives r = ∞ and the right limit, a shift of d_m − d_l.)
    double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
    double r = sqrt(g * g + 1.0);
    g = d[m] - d[l] + e[l] / (g + copysign(r, g));
    double sine = 1.0, cosine = 1.0, p = 0.0;
    for (int i = m - 1; i >= l; --i) {
      const double f = sine * e[i], b = cosine * e[i];
      r = sqrt(f * f + g * g);
      e[i + 1] = r;
      if (r == 0.0) {  // both below 1e−154 of the matrix's norm (normalise)
        d[i + 1] -= p;
        e[m] = 0.0;
        return logged;
      }
      sine = f / r;
      cosine = g / r;
      g = d[i + 1] - p;
      r = (d[i] - g) * sine + 2.0 * cosine * b;
      p = sine * r;
      d[i + 1] = g + p;
      g = cosine * r - b;
      rotations[2 * logged] = cosine;
      rotations[2 * logged + 1] = sine;
      rows[logged++] = i;
    }
    d[l] -= p;
    e[l] = g;
    e[m] = 0.0;
    return logged;
  }

  // Zᵀ ← the first `count` logged rotations applied to its rows, in order; each
  // worker takes its columns. No barrier.
  template <Team T>
  SELGROUP_HD static void flush(const T& team, const Scratch& s, int K, int count) {
    team_split(team, K, [&](int64_t begin, int64_t end) {
      for (int r = 0; r < count; ++r) {
        const double cosine = s.rotations[2 * r], sine = s.rotations[2 * r + 1];
        double* lower = s.Zt + s.rows[r] * K;
        double* upper = lower + K;
        for (int64_t k = begin; k < end; ++k) {
          const double a = lower[k], b = upper[k];
          lower[k] = cosine * a - sine * b;
          upper[k] = sine * a + cosine * b;
        }
      }
    });
  }
};

}  // namespace manipulation
}  // namespace selgroup
