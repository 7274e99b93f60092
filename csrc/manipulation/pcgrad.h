// PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020) as
// a weighting of the task gradients.
//
// Task i's gradient is projected, in the order order[i, :], onto the normal plane
// of every other task's gradient it conflicts with:
//   g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j   whenever g_i·g_j < 0   (j ≠ i),
// always against the ORIGINAL g_j (the authors' code projects copies against the
// untouched gradients). Every projected gradient stays a combination of the g_m,
// g_i^PC = Σ_m a_im g_m, and the dot products are read from G:
// g_i^PC·g_j = Σ_m a_im G_mj. The update is the SUM of the projected gradients, as
// in the authors' code and in nash-mtl's PCGrad (reduction="sum"):
//   d = Σ_i g_i^PC = wᵀ·J with w_m = Σ_i a_im   (divide by K for the mean).
// A zero gradient g_j conflicts with nothing (g_i·g_j = 0) and is never projected
// on. Entries of `order` outside [0, K) and the entry i of row i are skipped.
#pragma once

#include "common.h"

namespace selgroup {
namespace manipulation {

template <typename scalar_t>
struct PCGradWeights {
  const scalar_t* gram;   // K×K
  const int64_t* order;   // K×K, row i: the order of the projections of task i
  scalar_t* weights;      // K
  int K;

  struct Scratch {
    double* flag;
    double* G;
    double* coefficients;  // row i: a_i·
  };
  SELGROUP_HD Scratch carve(WorkspaceLayout& layout) const {
    return {layout.take<double>(1), layout.take<double>(K * K), layout.take<double>(K * K)};
  }

  template <Team T>
  SELGROUP_HD void operator()(const T& team, const Scratch& s) const {
    double* G = s.G;
    double* coefficients = s.coefficients;
    if (!load_gram(team, gram, K, G, s.flag, weights)) return;
    // The tasks are independent: one worker per task.
    for (int i = team.rank(); i < K; i += team.size()) {
      double* a = coefficients + i * K;
      for (int m = 0; m < K; ++m) a[m] = m == i ? 1.0 : 0.0;
      for (int t = 0; t < K; ++t) {
        const int64_t j = order[i * K + t];
        if (j < 0 || j >= K || j == i) continue;
        double projection = 0.0;  // g_i^PC · g_j
        for (int m = 0; m < K; ++m) projection += a[m] * G[m * K + j];
        const double squared_norm = G[j * K + j];
        if (projection < 0.0 && squared_norm > 0.0) a[j] -= projection / squared_norm;
      }
    }
    team.sync();
    for (int m = team.rank(); m < K; m += team.size()) {
      double sum = 0.0;
      for (int i = 0; i < K; ++i) sum += coefficients[i * K + m];
      weights[m] = static_cast<scalar_t>(sum);
    }
  }
};

}  // namespace manipulation
}  // namespace selgroup
