"""The property harness of the gradient methods: one table of methods × the properties their papers or peers
claim (:data:`ROWS`), one set of input families (tests/method_families.py), one set of exact references
(tests/manipulation_reference.py), on every available device and both float dtypes. docs/algorithm.md
§"Property harness" says what each family and property is and how to add a method (one :class:`Row`).

Properties (each a test below; a row says where it claims it):

* finite: the direction is a finite P-vector on every family (zero for an all-zero J);
* one task: with K = 1 the direction is the task's own gradient;
* exact: the direction equals the float64 reference of the method's own rule on the same (rounded) input, to
  1e-9 relative in float64 and 2e-5 in float32 (float32 only where it resolves the input: norm ratios ≤ 10);
* optimality: the KKT or fixed-point conditions of the method's own problem hold (MGDA, CAGrad, IMTL, Nash-MTL);
* non-conflicting: J d ≥ 0 (TorchJD's assert: the negative part of J d is negligible);
* permutation invariance: d(P J) = d(J);
* scaling: d(s J) = s^e d(J) (e = 1, Nash-MTL e = 0);
* autograd: ``aggregate`` of a J that requires grad either gives a result that does not require grad, or one
  whose gradient is right (torch.autograd.gradcheck).

The default run takes K ∈ {1, 2, 5} (and the rank-deficient K = 20), seed 0, the norm ratio 10⁴ and the
scaling s = 7; ``-m slow`` adds K = 3, 20 and 128, seed 1, the ratios 1, 10, 100 and 1e3 and s = 0.1.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import manipulation_reference as reference
import numpy as np
import pytest
import torch
from method_families import NON_STATIONARY, STATIONARY, Case, cases

from selgroup_fast.methods import aggregate, aggregator, available
from selgroup_fast.methods.gradvac import vaccine_orders
from selgroup_fast.methods.pcgrad import projection_orders, seeded_generator
from selgroup_fast.methods.weighting import Weighting

Direction = Callable[[np.ndarray, dict[str, Any]], np.ndarray]
#: (J, d*, ε of the input dtype) → the relative error of d that the input's rounding alone allows.
Conditioning = Callable[[np.ndarray, np.ndarray, float], float]
Residual = Callable[[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]], float]

#: Relative error of "exact" (and of the optimality residuals) by dtype.
EXACT = {torch.float64: 1e-9, torch.float32: 2e-5}


def scale_of(J: np.ndarray) -> float:
    """The problem's scale: the largest task-gradient norm (1 for an all-zero J, so that errors stay errors)."""
    largest = float(np.linalg.norm(J, axis=1).max())
    return largest if largest > 0 else 1.0


def relative_error(d: np.ndarray, expected: np.ndarray, J: np.ndarray, dtype: torch.dtype) -> float:
    """‖d − d*‖/‖d*‖, or over the problem's scale where d* is below the dtype's resolution of it (a stationary
    point, where d* is zero or rounding noise)."""
    size = float(np.linalg.norm(expected))
    return float(np.linalg.norm(d - expected)) / (size if size > EXACT[dtype] * scale_of(J) else scale_of(J))


def min_norm_conditioning(J: np.ndarray, expected: np.ndarray, eps: float) -> float:
    """The relative error of a min-norm point that G's rounding (K·ε·max‖g_k‖² per entry) alone allows: the
    perturbation moves ‖d*‖² by that much, d* by it over ‖d*‖ (first order on the active face)."""
    size = float(np.linalg.norm(expected))
    return J.shape[0] * eps * (scale_of(J) / size) ** 2 if size > 0 else 0.0


def eigen_conditioning(J: np.ndarray, expected: np.ndarray, eps: float) -> float:
    """The relative error of a rule that reads G's smallest kept eigenvalue (Aligned-MTL's σ): G's rounding,
    ε·λ_max, fixes it only to ε·κ over the eigenvalues kept (those above λ_max·K·ε)."""
    eigenvalues = np.linalg.eigvalsh(J @ J.T)
    kept = eigenvalues[eigenvalues > eigenvalues.max() * J.shape[0] * eps]
    return J.shape[0] * eps * float(kept.max() / kept.min()) if kept.size else 0.0


# --------------------------------------------------------------------------- the methods' own rules, exactly


def mgda_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return reference.min_norm_point(J)


def unit_rows(J: np.ndarray) -> np.ndarray:
    """g_k/‖g_k‖ (a zero row stays zero): MGDA's rows under ``"l2"``, and under ``"loss+"`` with unit losses."""
    norms = np.linalg.norm(J, axis=1)
    return J / np.where(norms > 0, norms, 1.0)[:, None]


def normalised_mgda_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """LibMTL's update Σ_k w'_k g_k/‖g_k‖: the min-norm point of the unit rows."""
    return reference.min_norm_point(unit_rows(J))


def normalised_min_norm_conditioning(J: np.ndarray, expected: np.ndarray, eps: float) -> float:
    """:func:`min_norm_conditioning` of the unit rows, whose Gram matrix is G's entries over the norms."""
    return min_norm_conditioning(unit_rows(J), expected, eps)


def mgda_kkt(J: np.ndarray, d: np.ndarray, w: np.ndarray | None, options: dict[str, Any]) -> float:
    """d is the min-norm point of the hull iff it lies in it (w on the simplex) and g_k·d ≥ ‖d‖² for every k (the
    simplex KKT): the largest violation, relative (the weights' own rounding counts against the dtype's tolerance)."""
    assert w is not None
    outside = max(abs(float(w.sum()) - 1), float(-w.min()))
    return max(outside, float(d @ d - (J @ d).min()) / scale_of(J) ** 2)


def cagrad_optimality(J: np.ndarray, d: np.ndarray, w: np.ndarray | None, options: dict[str, Any]) -> float:
    """Our d is K/(1+c²) × a maximiser of min_k g_k·d over the ball ‖d − g0‖ ≤ c‖g0‖ (CAGrad's primal problem):
    its distance outside the ball over the radius, and its gap to the interior-point optimum over the smallest
    task's scale (‖g_k‖·‖g0‖ for the shortest non-zero g_k: the worst task's improvement must be right)."""
    c, K = options["c"], J.shape[0]
    primal = d * (1 + c**2) / K
    g0 = J.mean(axis=0)
    norms = np.linalg.norm(J, axis=1)
    radius = float(np.linalg.norm(g0))
    if radius == 0 or not norms.any():
        return float(np.linalg.norm(d)) / scale_of(J)  # g0 = 0: the ball is the point 0
    outside = max(0.0, float(np.linalg.norm(primal - g0)) - c * radius) / radius
    gap = max(0.0, reference.cagrad_optimum(J, c) - float((J @ primal).min())) / (norms[norms > 0].min() * radius)
    return max(outside, gap)


def dual_cone_direction(rows: Callable[[np.ndarray], np.ndarray]) -> Direction:
    """UPGrad's (rows: p_k·e_k, summed) or DualProj's (one row: p) direction from reference.dual_cone_weights."""

    def direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
        epsilons = {name: options[name] for name in ("norm_eps", "reg_eps") if name in options}
        return J.T @ reference.dual_cone_weights(J, rows(np.full(J.shape[0], 1 / J.shape[0])), **epsilons).sum(0)

    return direction


def gradvac_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    orders = vaccine_orders(J.shape[0], options["device"], seeded_generator(options["device"], options["seed"]))
    return reference.gradvac_update(J, orders.cpu().numpy(), np.zeros((J.shape[0],) * 2))[0]


def seeded(make: Callable[[], Any], seed: int) -> Any:
    """``make()`` after ``torch.manual_seed(seed)``: TorchJD's GradVac draws its orders from torch's global RNG."""
    torch.manual_seed(seed)
    return make()


def imtl_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return J.T @ reference.imtl_weights(J)


def imtl_equal_projections(J: np.ndarray, d: np.ndarray, w: np.ndarray | None, options: dict[str, Any]) -> float:
    """IMTL-G's definition: d's projections on the unit task gradients are equal (where that system is consistent)."""
    projections = (J @ d) / np.linalg.norm(J, axis=1)
    return float(np.ptp(projections)) / max(float(np.abs(projections).max()), 1e-300)


def aligned_mtl_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return J.T @ reference.aligned_mtl_weights(J, options["dtype"], options.get("scale_mode", "min"))


def nash_mtl_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return J.T @ reference.nash_mtl_weights(J @ J.T)


def nash_mtl_fixed_point(J: np.ndarray, d: np.ndarray, w: np.ndarray | None, options: dict[str, Any]) -> float:
    """(G α)_k α_k = 1 for every k, α > 0."""
    assert w is not None and np.all(w > 0)
    return float(np.abs((J @ J.T @ w) * w - 1).max())


def fairgrad_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return J.T @ reference.fairgrad_weights(J @ J.T, options["alpha"])


def fairgrad_fixed_point(J: np.ndarray, d: np.ndarray, w: np.ndarray | None, options: dict[str, Any]) -> float:
    """(G w)_k w_k^(1/α) = 1 for every k, w > 0 (Ban & Ji 2024, Eq. 4)."""
    assert w is not None and np.all(w > 0)
    return float(np.abs((J @ J.T @ w) * w ** (1 / options["alpha"]) - 1).max())


def config_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return reference.config_direction(J, np.ones(J.shape[0]), options["dtype"])


def krum_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return reference.krum_direction(J, options.get("n_byzantine", 0), options.get("n_selected", 1))


def trimmed_mean_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return reference.trimmed_mean_direction(J, options.get("trim_number", 1))


def pcd_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return reference.pcd_direction(J, options["tau"], options["eps"])


def pcgrad_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    orders = projection_orders(J.shape[0], options["device"], seeded_generator(options["device"], options["seed"]))
    return reference.pcgrad_update(J, orders.cpu().numpy())


def graddrop_direction(J: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    leak = torch.zeros(J.shape[0], dtype=torch.float64)
    return reference.graddrop_update(torch.from_numpy(J), leak, options["seed"], 0).numpy()


# --------------------------------------------------------------------------- the table


ALL_FAMILIES: frozenset[str] = frozenset(NON_STATIONARY | STATIONARY)
#: Families with distinct rows in general position (no two rows equally far from a third by construction).
UNTIED: frozenset[str] = frozenset({"typical", "norm_ratio", "non_weak_stationary"})


@dataclass(frozen=True)
class Claim:
    """Where a property is claimed: on these families, from K = 1 up to ``max_tasks``, with these options."""

    families: frozenset[str] = ALL_FAMILIES
    max_tasks: int = 1 << 30
    options: dict[str, Any] = field(default_factory=dict)
    #: The float64 error the claim allows where the method's own convention limits it (default: EXACT's).
    tolerance: float | None = None
    #: The least K the claim is checked from (where smaller K ties the rule's choice: Krum at K = 3).
    min_tasks: int = 1

    def covers(self, case: Case) -> bool:
        return case.family in self.families and self.min_tasks <= case.tasks <= self.max_tasks


@dataclass(frozen=True)
class Row:
    """One gradient method and what its paper or peer claims for it (``None``: no such claim)."""

    name: str
    #: Options that make it deterministic or switch off a step-level convention (Nash-MTL's clipping), or that
    #: choose the variant of the method the row is about.
    options: dict[str, Any] = field(default_factory=dict)
    #: The row of an option's variant of the method (``""``: the method as created by default).
    variant: str = ""
    #: The exact direction of the method's own rule (float64, on J), and where it is claimed.
    reference: Direction | None = None
    exact: Claim | None = Claim()
    #: A residual of the method's own optimality conditions (0 at its optimum) on (J, d, weights, options).
    optimality: Residual | None = None
    optimal: Claim | None = Claim()
    non_conflicting: Claim | None = None
    permutation_invariant: Claim | None = Claim()
    #: d(s J) = s^scale_exponent d(J) for s > 0, where claimed.
    scaling: Claim | None = Claim()
    scale_exponent: float = 1.0
    #: TorchJD 0.18's aggregator for K tasks, where ours is ``torchjd_factor(K, options)`` × its direction.
    torchjd: Callable[[int], Any] | None = None
    torchjd_factor: Callable[[int, dict[str, Any]], float] = lambda K, options: 1.0
    torchjd_equal: Claim | None = None
    #: Where the method's answer is ill-conditioned in G, the error G's rounding alone allows (added to every
    #: tolerance that compares directions: exact, permutation, TorchJD).
    conditioning: Conditioning | None = None
    #: The least K the method is defined for (robust aggregators: Krum K ≥ f + 3, the trimmed mean K ≥ 2t + 1).
    min_tasks: int = 1
    #: With K = 1 the direction is the task's own gradient (not where a tracked state averages it in: DB-MTL, MoCo).
    one_task: bool = True

    @property
    def key(self) -> str:
        """The row's key in :data:`ROWS` and its tests' ids: the registry name, and the variant's in brackets."""
        return f"{self.name}[{self.variant}]" if self.variant else self.name


ROWS: dict[str, Row] = {
    row.key: row
    for row in [
        Row(
            "pcgrad",
            {"seed": 0},
            reference=pcgrad_direction,
            # Two opposite gradients project each other to rounding noise, whose sign the next projection's
            # conflict test reads: the rule is discontinuous there (rank-1 strongly stationary inputs).
            exact=Claim(families=ALL_FAMILIES - {"rank_deficient", "strong_stationary"}),
            # The random projection orders are drawn per task, not permuted with the tasks: only K = 2 has one order.
            permutation_invariant=Claim(max_tasks=2),
            non_conflicting=Claim(max_tasks=2),  # g_1·d = ‖g_1‖² − (g_1·g_2)²/‖g_2‖² ≥ 0 (Yu et al., §3)
            # TorchJD draws its own random order: the same sum where K = 2 leaves no choice.
            torchjd=lambda K: torchjd_aggregation().PCGrad(),
            torchjd_equal=Claim(families=frozenset(NON_STATIONARY), max_tasks=2),
        ),
        Row(
            "cagrad",
            {"c": 0.4},
            optimality=cagrad_optimality,
            # Permutation invariant on every family: where the optimum is not unique (zero in the hull, the ball
            # meeting {J d ≥ 0}) the op returns the optimal d closest to g0, the projection of g0 on that cone.
            # c ≥ 1 puts d = 0 in the ball: the optimum of min_k g_k·d is then ≥ 0 (TorchJD's CAGrad tests).
            non_conflicting=Claim(options={"c": 1.0}),
            # Ours is the authors' d (the mean's ball, ÷(1 + c²)) × K; TorchJD's the undivided mean-based one.
            torchjd=lambda K: torchjd_aggregation().CAGrad(c=0.4),
            torchjd_factor=lambda K, options: K / (1 + options["c"] ** 2),
            # TorchJD's Clarabel runs at its default tolerances: 2e-4 off at K = 128, where ours is optimal to 1e-7.
            torchjd_equal=Claim(
                families=frozenset({"typical", "non_weak_stationary", "duplicate_rows"}), tolerance=1e-3
            ),
        ),
        Row(
            "mgda",
            reference=mgda_direction,
            # At the norm ratio 10⁴ the min-norm point is ~1e-6 of the largest gradient: G's rounding moves it 1e-4.
            conditioning=min_norm_conditioning,
            optimality=mgda_kkt,
            non_conflicting=Claim(),
            # TorchJD's Frank-Wolfe stops at a 1e-3 step: equal where the 2-task closed form ends it.
            torchjd=lambda K: torchjd_aggregation().MGDA(),
            torchjd_equal=Claim(families=frozenset({"typical", "non_weak_stationary", "norm_ratio"}), max_tasks=2),
        ),
        # LibMTL's gradient normalisations (mgda_gn): the min-norm point of g_k/n_k. Scale-free: d(s J) = d(J).
        # "loss+" (n_k = L_k·‖g_k‖) is "l2" with the harness's unit losses: its row checks that the step's losses
        # reach it (exact); l2's the properties.
        *(
            Row(
                "mgda",
                {"normalization": normalization},
                variant=normalization,
                reference=normalised_mgda_direction,
                conditioning=normalised_min_norm_conditioning,
                **properties,
                scale_exponent=0.0,
                one_task=False,  # one task: its unit gradient g/‖g‖
            )
            for normalization, properties in (
                ("l2", {"non_conflicting": Claim()}),
                ("loss+", {"permutation_invariant": None, "scaling": None}),
            )
        ),
        Row("graddrop", {"seed": 0}, reference=graddrop_direction),
        Row(
            "imtl",
            reference=imtl_direction,
            optimality=imtl_equal_projections,
            optimal=Claim(families=frozenset({"typical", "norm_ratio", "duplicate_rows"})),
            torchjd=lambda K: torchjd_aggregation().IMTLG(),
            # TorchJD's G⁺·‖g‖ is the authors' closed form where G is regular; on a singular G it is another point
            # than ours (the least-‖ŵ‖ solution of the conditions, docs/algorithm.md), e.g. the rank-deficient
            # non-weakly-stationary rows, where ours is d = 0 and TorchJD's projections are unequal.
            torchjd_equal=Claim(families=frozenset({"typical", "norm_ratio", "duplicate_rows"}), tolerance=1e-6),
        ),
        # LibMTL's IMTL at its first step: the scales e^0 = 1, IMTL-G's direction (tests/test_method_options.py
        # follows the learned scales over several steps).
        Row(
            "imtl",
            {"hybrid": True},
            variant="hybrid",
            reference=imtl_direction,
            optimality=imtl_equal_projections,
            optimal=Claim(families=frozenset({"typical", "norm_ratio", "duplicate_rows"})),
        ),
        Row(
            "aligned_mtl",
            reference=aligned_mtl_direction,
            # Its rule reads λ_min(G), which G's rounding (ε·λ_max) fixes only to ε·κ(G) relative: at the norm
            # ratio 10⁴ (κ ≈ 1e12) another order of the same tasks moves d by ~1e-4.
            conditioning=eigen_conditioning,
            # TorchJD's preference vector is the mean (1/K each), the authors' and ours all ones.
            torchjd=lambda K: torchjd_aggregation().AlignedMTL(),
            torchjd_factor=lambda K, options: K,
            torchjd_equal=Claim(tolerance=1e-6),
        ),
        *(
            Row(
                "aligned_mtl",
                {"scale_mode": scale_mode},
                variant=scale_mode,
                reference=aligned_mtl_direction,
                conditioning=eigen_conditioning,
                torchjd=lambda K, scale_mode=scale_mode: torchjd_aggregation().AlignedMTL(scale_mode=scale_mode),
                torchjd_factor=lambda K, options: K,
                torchjd_equal=Claim(tolerance=1e-6),
            )
            for scale_mode in ("median", "rmse")
        ),
        Row(
            "nash_mtl",
            {"max_norm": 0.0},
            reference=nash_mtl_direction,
            # G α = 1/α has a solution iff no w ≥ 0, w ≠ 0 has wᵀJ = 0; then J d = 1/α > 0.
            exact=Claim(families=frozenset(NON_STATIONARY)),
            optimality=nash_mtl_fixed_point,
            optimal=Claim(families=frozenset(NON_STATIONARY)),
            non_conflicting=Claim(families=frozenset(NON_STATIONARY)),
            permutation_invariant=Claim(families=frozenset(NON_STATIONARY)),
            scaling=Claim(families=frozenset(NON_STATIONARY)),
            scale_exponent=0.0,  # α(s² G) = α(G)/s
        ),
        Row(
            "fairgrad",
            {"alpha": 2.0, "max_norm": 0.0},
            reference=fairgrad_direction,
            # G w = w^(−1/α) has a solution iff no w ≥ 0, w ≠ 0 has wᵀJ = 0 (as Nash-MTL's, its α = 1 case).
            exact=Claim(families=frozenset(NON_STATIONARY)),
            optimality=fairgrad_fixed_point,
            optimal=Claim(families=frozenset(NON_STATIONARY)),
            non_conflicting=Claim(families=frozenset(NON_STATIONARY)),  # J d = w^(−1/α) > 0
            permutation_invariant=Claim(families=frozenset(NON_STATIONARY)),
            scaling=Claim(families=frozenset(NON_STATIONARY)),
            scale_exponent=-1 / 3,  # w(s² G) = s^(−2α/(1+α)) w(G): d(s J) = s^((1−α)/(1+α)) d(J), α = 2
            # Where G is singular to its precision (duplicate rows) the op solves (C + δI) β = c β^(−1/α), δ ≤ K·ε
            # relative (csrc/manipulation/fairgrad.h): d moves by about δ.
            conditioning=lambda J, expected, eps: J.shape[0] * eps,
            # TorchJD's least_squares stops at scipy's default tolerances: 0.6–0.95 relative off at norm ratios 10³–10⁴.
            torchjd=lambda K: torchjd_aggregation().FairGrad(alpha=2.0),
            torchjd_equal=Claim(
                families=frozenset({"typical", "non_weak_stationary", "duplicate_rows"}), tolerance=1e-6
            ),
        ),
        Row(
            "config",
            reference=config_direction,
            optimality=imtl_equal_projections,  # U b = p where U has full row rank: equal unit projections
            optimal=Claim(families=frozenset({"typical", "norm_ratio"})),
            non_conflicting=Claim(families=frozenset({"typical", "norm_ratio"})),  # ConFIG's conflict-free claim
            torchjd=lambda K: torchjd_aggregation().ConFIG(),
            torchjd_equal=Claim(families=frozenset({"typical", "norm_ratio", "zero_row", "all_zero"})),
        ),
        Row(
            "krum",
            reference=krum_direction,
            # Duplicate rows (and the symmetric stationary families) tie scores, and so does K = 3 (K − f − 2 = 1:
            # the mutual nearest pair has one score): the choice among equals is the tie-break's, not the rule's.
            exact=Claim(families=UNTIED, min_tasks=4),
            permutation_invariant=Claim(families=UNTIED, min_tasks=4),
            scaling=Claim(families=UNTIED, min_tasks=4),
            torchjd=lambda K: torchjd_aggregation().Krum(n_byzantine=0),
            torchjd_equal=Claim(families=UNTIED, min_tasks=4),
            min_tasks=3,
        ),
        Row(
            "trimmed_mean",
            reference=trimmed_mean_direction,
            torchjd=lambda K: torchjd_aggregation().TrimmedMean(trim_number=1),
            torchjd_equal=Claim(),
            min_tasks=3,
        ),
        Row(
            "pcd",
            # eps = 0: the normalisation exactly scale-free (eps = 1e-8 is 1% of a squared norm of 1e-6).
            {"tau": 0.3, "eps": 0.0},
            reference=pcd_direction,
            exact=Claim(families=frozenset(NON_STATIONARY)),
            permutation_invariant=None,  # task 0 is the primary one
            scaling=Claim(families=frozenset(NON_STATIONARY)),
            torchjd=lambda K: torchjd_aggregation().PCD(tau=0.3, eps=0.0),
            torchjd_equal=Claim(),
        ),
        # The tracked methods at their first step from a fresh state, the losses all 1 (tests/test_tracked_methods.py
        # follows them over several steps); their first average is a fraction of g even for one task. LibMTL's 1e-8
        # beside the norms it divides by makes the scaling hold to 1e-8/‖g_k‖ (the small rows of some families).
        Row(
            "db_mtl",
            reference=lambda J, options: reference.db_mtl_first_step(J),
            # At a stationary point the rescaled rows cancel but for that 1e-8: d is of its size, not J's.
            scaling=Claim(families=frozenset(NON_STATIONARY), tolerance=1e-4),
            one_task=False,
        ),
        Row(
            "moco",
            reference=lambda J, options: reference.moco_first_step(J),
            scaling=Claim(tolerance=1e-4),
            scale_exponent=0.0,
            one_task=False,
        ),
        # Its first step is LibMTL's warm-up (w = 1): the sum; its learned weights in tests/test_tracked_methods.py.
        Row("gradnorm", reference=lambda J, options: J.sum(axis=0)),
        # TorchJD's pref_vector defaults (1/K each), norm_eps and reg_eps: its projector's G/tr(G) + 1e-4·I projects
        # onto the dual cone of [J/‖J‖_F, 1e-2·I], so J·d ≥ 0 and d(s·J) = s·d(J) hold exactly with reg_eps = 0.
        Row(
            "upgrad",
            # A projection near 0 (rank-deficient, stationary J) is fixed by G's rounding as MGDA's min-norm point is.
            conditioning=min_norm_conditioning,
            reference=dual_cone_direction(np.diag),
            non_conflicting=Claim(options={"reg_eps": 0.0}),
            scaling=Claim(options={"reg_eps": 0.0}),
            torchjd=lambda K: torchjd_aggregation().UPGrad(),
            torchjd_equal=Claim(tolerance=1e-6),
        ),
        Row(
            "dualproj",
            # A projection near 0 (rank-deficient, stationary J) is fixed by G's rounding as MGDA's min-norm point is.
            conditioning=min_norm_conditioning,
            reference=dual_cone_direction(lambda preference: preference[None, :]),
            non_conflicting=Claim(options={"reg_eps": 0.0}),
            scaling=Claim(options={"reg_eps": 0.0}),
            torchjd=lambda K: torchjd_aggregation().DualProj(),
            torchjd_equal=Claim(tolerance=1e-6),
        ),
        # The EMA of UPGrad's weights (its default base): its first step is UPGrad's, λ_0 = λ̂_1.
        Row(
            "cr_mogm",
            conditioning=min_norm_conditioning,
            reference=dual_cone_direction(np.diag),
            non_conflicting=Claim(options={"base_options": {"reg_eps": 0.0}}),
            scaling=Claim(options={"base_options": {"reg_eps": 0.0}}),
            torchjd=lambda K: torchjd_aggregation().GramianWeightedAggregator(
                torchjd_aggregation().CRMOGMWeighting(torchjd_aggregation().UPGradWeighting())
            ),
            torchjd_equal=Claim(tolerance=1e-6),
        ),
        # Its first step (weights 1/K, e the baseline itself): softmax(e), not scale-equivariant (e grows with J).
        Row(
            "excess_mtl",
            reference=lambda J, options: reference.excess_mtl_steps([J])[0],
            scaling=None,
            torchjd=lambda K: torchjd_aggregation().ExcessMTL(),
            torchjd_equal=Claim(),
        ),
        # Its first step (targets φ̂ = 0) moves each g_i^PC off the conflicts as PCGrad does; the orders are drawn per
        # task, not permuted with the tasks: only K = 2 has one order.
        Row(
            "gradvac",
            {"seed": 0},
            reference=gradvac_direction,
            # Two opposite gradients make each other rounding noise, whose sign the next visit reads (as PCGrad's).
            exact=Claim(families=ALL_FAMILIES - {"rank_deficient", "strong_stationary"}),
            permutation_invariant=Claim(max_tasks=2),
            scaling=Claim(families=ALL_FAMILIES - {"rank_deficient", "strong_stationary"}),
            # φ̂ = 0: PCGrad's projection of two tasks, exact without the eps beside ‖g_j‖ (which leaves eps/‖g_j‖ of it).
            non_conflicting=Claim(max_tasks=2, options={"eps": 0.0}),
            torchjd=lambda K: seeded(torchjd_aggregation().GradVac, 0),
            torchjd_equal=Claim(families=ALL_FAMILIES - {"rank_deficient", "strong_stationary"}),
        ),
        # The two-batch methods on one batch given twice (A = G), their first step from λ = w = 1/K.
        Row(
            "modo",
            reference=lambda J, options: J.T @ reference.modo_weights(J @ J.T, np.full(J.shape[0], 1 / J.shape[0])),
            scaling=None,  # γ is a step on A: the weights depend on J's scale
            torchjd=lambda K: torchjd_aggregation().GramianWeightedAggregator(torchjd_aggregation().MoDoWeighting()),
            torchjd_equal=Claim(),
        ),
        Row(
            "sdmgrad",
            reference=lambda J, options: (
                J.T @ reference.sdmgrad_weights(J @ J.T, np.full(J.shape[0], 1 / J.shape[0]))[0]
            ),
            # Its projected SGD (lr 10, 20 steps) stops where it stops: its rounding is the iterates', not G's.
            exact=Claim(tolerance=1e-7),
            permutation_invariant=Claim(tolerance=1e-7),
            scaling=Claim(tolerance=1e-7),  # A is divided by the squared mean norm: w(s² A) = w(A), up to its 1e-8
            torchjd=lambda K: torchjd_aggregation().GramianWeightedAggregator(torchjd_aggregation().SDMGradWeighting()),
            torchjd_equal=Claim(),
        ),
    ]
}
assert sorted({row.name for row in ROWS.values()}) == sorted(available("gradient")), (
    "every gradient method needs its row"
)

DEFAULT_CASES = cases(tasks=(2, 5), seeds=(0,), ratios=(1e4,))
SLOW_CASES = [
    case
    for case in cases(tasks=(2, 3, 5, 20, 128), seeds=(0, 1), ratios=(1.0, 10.0, 100.0, 1e3, 1e4))
    if case not in DEFAULT_CASES
]


def torchjd_aggregation() -> Any:
    """``torchjd.aggregation`` (the ``torchjd`` test extra), or a skip that says it is not installed."""
    return pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")


def allowed(
    name: str, claim: Claim | None, J: np.ndarray, expected: np.ndarray, dtype: torch.dtype, base: float
) -> float:
    """The error a comparison of directions allows: ``base`` or the claim's own float64 tolerance where the
    method's convention limits it, plus what the input's rounding allows where the method is ill-conditioned."""
    assert claim is not None
    tolerance = max(claim.tolerance, base) if claim.tolerance is not None and dtype == torch.float64 else base
    conditioning = ROWS[name].conditioning
    return tolerance + (conditioning(J, expected, torch.finfo(dtype).eps) if conditioning is not None else 0.0)


def parameters(prop: str) -> list:
    """(row name, case, dtype) wherever a row claims ``prop``: float64 on every case, float32 on the cases it
    resolves (norm ratios up to 10; at 10⁴, κ(G) ≈ 1e12 is past float32's precision); the slow cases marked."""
    out = []
    for case in DEFAULT_CASES + SLOW_CASES:
        marks = [pytest.mark.slow] if case in SLOW_CASES else []
        for row in ROWS.values():
            claim = getattr(row, prop)
            if claim is None or not claim.covers(case) or case.tasks < row.min_tasks:
                continue
            if (prop == "exact" and row.reference is None) or (prop == "optimal" and row.optimality is None):
                continue
            for dtype in (torch.float64, torch.float32) if case.well_conditioned else (torch.float64,):
                out.append(pytest.param(row.key, case, dtype, marks=marks, id=f"{row.key}-{case.id}-{str(dtype)[6:]}"))
    return out


def method(key: str, K: int, device: str, dtype: torch.dtype, **extra: Any):
    return aggregator(ROWS[key].name, K, device, dtype, **{**ROWS[key].options, **extra})


def loss_inputs(key: str, J: torch.Tensor) -> dict[str, torch.Tensor]:
    """The losses of a method that reads them (all 1: a row's claims are about J), the same batch as the second of a
    two-batch method (A = G), else nothing."""
    needs = method(key, J.shape[0], "cpu", torch.float64).needs
    inputs = {"losses": torch.ones(J.shape[0], dtype=J.dtype, device=J.device)} if "losses" in needs else {}
    return {**inputs, "second_jacobian": J} if "cross_gram" in needs else inputs


def run(name: str, J: torch.Tensor, **extra: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The direction of method ``name`` on J and, for a weighting, its weights (float64 NumPy)."""
    combine = method(name, J.shape[0], str(J.device), J.dtype, **extra)
    weights = None
    if isinstance(combine, Weighting):
        inputs = loss_inputs(name, J)
        second = inputs.get("second_jacobian")
        cross_gram = None if second is None else (J @ second.T).contiguous()
        gram = (J @ J.T).contiguous()
        weights = combine.direction_weights(gram, inputs.get("losses"), cross_gram)[0].double().cpu().numpy()
        combine = method(name, J.shape[0], str(J.device), J.dtype, **extra)  # a fresh state (Nash-MTL's α)
    return combine(J, **loss_inputs(name, J)).double().cpu().numpy(), weights


def as_input(case: Case, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """J in ``dtype`` on ``device``, and the float64 matrix of the very same (rounded) values."""
    J = torch.from_numpy(case.jacobian()).to(device=device, dtype=dtype)
    return J, J.double().cpu().numpy()


# --------------------------------------------------------------------------- the properties


@pytest.mark.parametrize(
    ("name", "case"),
    [
        pytest.param(name, case, marks=[pytest.mark.slow] if case in SLOW_CASES else [], id=f"{name}-{case.id}")
        for case in DEFAULT_CASES + SLOW_CASES
        for name in ROWS
        if case.tasks >= ROWS[name].min_tasks
    ],
)
def test_finite(name, case, device, dtype):
    J, _ = as_input(case, device, dtype)
    d, _ = run(name, J)
    assert d.shape == (J.shape[1],) and np.isfinite(d).all()
    if case.family == "all_zero":
        assert not d.any()


@pytest.mark.parametrize("name", sorted(name for name, row in ROWS.items() if row.min_tasks == 1 and row.one_task))
def test_one_task_steps_along_its_own_gradient(name, device, dtype):
    J, J64 = as_input(Case("typical", 1), device, dtype)
    np.testing.assert_allclose(run(name, J)[0], J64[0], rtol=EXACT[dtype], atol=0)


@functools.cache
def _reference_direction(name: str, J_bytes: bytes, shape: tuple[int, int], device: str, dtype: str) -> np.ndarray:
    """The row's reference on J, for an input of ``dtype`` (whose epsilon a rank cut reads)."""
    J = np.frombuffer(J_bytes).reshape(shape).copy()
    options = {**ROWS[name].options, "device": device, "dtype": np.dtype(dtype).type}
    return ROWS[name].reference(J, options)  # type: ignore[misc]


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("exact"))
def test_exact(name, case, dtype, device):
    J, J64 = as_input(case, device, dtype)
    expected = _reference_direction(name, J64.tobytes(), J64.shape, device, str(dtype).removeprefix("torch."))
    tolerance = allowed(name, ROWS[name].exact, J64, expected, dtype, EXACT[dtype])
    assert relative_error(run(name, J)[0], expected, J64, dtype) <= tolerance


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("optimal"))
def test_optimal(name, case, dtype, device):
    J, J64 = as_input(case, device, dtype)
    row = ROWS[name]
    d, w = run(name, J)
    assert row.optimality is not None
    assert row.optimality(J64, d, w, row.options) <= 100 * EXACT[dtype]


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("non_conflicting"))
def test_non_conflicting(name, case, dtype, device):
    claim = ROWS[name].non_conflicting
    assert claim is not None
    J, J64 = as_input(case, device, dtype)
    d, _ = run(name, J, **claim.options)
    # A step below the dtype's resolution of the problem's scale conflicts with nothing; any other has
    # g_k·d ≥ 0 up to rounding: its cosine with every task gradient is ≥ −EXACT.
    size = float(np.linalg.norm(d))
    if size > EXACT[dtype] * scale_of(J64):
        norms = np.linalg.norm(J64, axis=1)
        cosines = (J64 @ d)[norms > 0] / (norms[norms > 0] * size)
        assert cosines.min() >= -EXACT[dtype]


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("permutation_invariant"))
def test_permutation_invariant(name, case, dtype, device):
    J, J64 = as_input(case, device, dtype)
    permutation = torch.from_numpy(np.random.default_rng(case.seed).permutation(case.tasks)).to(device)
    d, permuted = run(name, J)[0], run(name, J[permutation].contiguous())[0]
    tolerance = allowed(name, ROWS[name].permutation_invariant, J64, d, dtype, 100 * EXACT[dtype])
    assert relative_error(permuted, d, J64, dtype) <= tolerance


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("scaling"))
@pytest.mark.parametrize("scale", [7.0, pytest.param(0.1, marks=pytest.mark.slow)])
def test_scaling(name, case, dtype, scale, device):
    J, J64 = as_input(case, device, dtype)
    d = run(name, J)[0] * scale ** ROWS[name].scale_exponent
    scaled = run(name, J * scale)[0]
    assert relative_error(scaled, d, J64, dtype) <= allowed(name, ROWS[name].scaling, J64, d, dtype, 100 * EXACT[dtype])


@pytest.mark.parametrize("name", sorted(ROWS))
def test_aggregate_is_not_silently_differentiable(name):
    """Either the result does not require grad, or its gradient is right (TorchJD asserts the former)."""
    J = torch.from_numpy(Case("typical", 3).jacobian()).requires_grad_()
    options = ROWS[name].options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "silently incorrect" autograd warning is what is tested
        d = aggregate(ROWS[name].name, J, **options, **loss_inputs(name, J))
        if d.requires_grad:
            assert torch.autograd.gradcheck(
                lambda m: aggregate(ROWS[name].name, m, **options, **loss_inputs(name, m)), (J,), raise_exception=False
            )


@pytest.mark.parametrize(("name", "case", "dtype"), parameters("torchjd_equal"))
def test_torchjd(name, case, dtype):
    """Ours is TorchJD 0.18's direction up to the constant of our convention (CAGrad's K/(1 + c²), Aligned-MTL's
    K: pinned here), where TorchJD's solver is exact (see the rows); GradDrop (another RNG) and Nash-MTL (TorchJD's
    cvxpy loop stops at a 1e-3 residual) are compared in benchmarks/method_exactness.py instead."""
    row = ROWS[name]
    assert row.torchjd is not None and row.torchjd_equal is not None
    J, J64 = as_input(case, "cpu", dtype)
    theirs = row.torchjd(case.tasks)(J).double().numpy() * row.torchjd_factor(case.tasks, row.options)
    tolerance = allowed(name, row.torchjd_equal, J64, theirs, dtype, 100 * EXACT[dtype])
    assert relative_error(run(name, J)[0], theirs, J64, dtype) <= tolerance
