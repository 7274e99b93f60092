// Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022):
// the weights are the bargaining solution α > 0 of
//   G·α = 1/α  (elementwise),  d = αᵀ·J,
// which is the unique minimiser of the strictly convex
//   φ(α) = ½·αᵀ·G·α − Σ_k log α_k   (∇φ = G·α − 1/α,  ∇²φ = G + diag(1/α²))
// when G is positive definite. The authors approach it by a sequence of convex
// programs (cvxpy/ECOS, at most 20, stopping at ‖G·α − 1/α‖ < 1e-3 on G/‖G‖_F);
// here damped Newton (Boyd & Vandenberghe §9.5: backtracking line search with
// α kept positive) on φ solves it until the Newton decrement of the last step
// taken is below `tol` (λ²/2 ≈ φ(α) − φ(α*), affine invariant), from `alpha_init` (the previous
// step's α, the authors' warm start) first rescaled along its ray to the best
// s·α_init (s = sqrt(K / α_initᵀ·G·α_init)), which makes the start scale-free.
// Non-positive or non-finite entries of alpha_init are replaced by 1.
//
// Nash-MTL is FairGrad with α = 1 (csrc/manipulation/fairgrad.h: the same damped
// Newton, its scale handling and its singular-G regularisation); with p = 1 the
// problem is invariant under G → S·G·S for a positive diagonal S (α → S⁻¹·α), so
// the solve on the correlation matrix is scale-free. A zero gradient gets
// α_k = 1/(S_k·sqrt(δ)), finite. All gradients zero: α = 1 (d = 0 whatever α).
#pragma once

#include "fairgrad.h"

namespace selgroup {
namespace manipulation {

// FairGradWeights with α = 1, warm started from alpha_init (built as
// NashMTLWeights<T>{{gram, alpha_init, weights, K, max_iter, tol, 1.0}}).
template <typename scalar_t>
struct NashMTLWeights : FairGradWeights<scalar_t> {};

}  // namespace manipulation
}  // namespace selgroup
