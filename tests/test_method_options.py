"""The options users ask for on the methods we have (issue #22), against float64 re-derivations of the peers' rules
and TorchJD 0.18 where it has the option: MGDA's ``normalization`` (LibMTL's ``mgda_gn``: the authors'
``gradient_normalizers``), Aligned-MTL's ``scale_mode`` (TorchJD's ``AlignedMTL``) and IMTL's ``hybrid`` (LibMTL's
``IMTL``: IMTL-L's learned loss scales under IMTL-G's gradient weights)."""

from __future__ import annotations

import manipulation_reference as reference
import numpy as np
import pytest
import torch
from conftest import make_problem, regression_losses

import selgroup_fast.ops  # noqa: F401 (registers the ops' fake kernels)
from selgroup_fast.methods import aggregate, aggregator, create

#: The Jacobians of requirement 1 of issue #22: random, aligned, conflicting, badly scaled, a zero row, duplicate rows.
FAMILIES = ("random", "aligned", "conflicting", "badly_scaled", "zero_row", "duplicate_rows")
#: K = 1, 2, 7 by default, 32 with ``-m slow``.
TASK_COUNTS = [1, 2, 7, pytest.param(32, marks=pytest.mark.slow)]


def jacobian(family: str, K: int, seed: int = 0, width: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((K, width))
    if family == "aligned":
        J = rng.standard_normal(width) + 0.3 * J
    elif family == "conflicting":
        J[1::2] = -J[0::2][: K // 2] + 0.1 * J[1::2]
    elif family == "badly_scaled":
        J *= 10.0 ** rng.uniform(-3, 3, size=(K, 1))
    elif family == "zero_row":
        J[K // 2] = 0.0
    elif family == "duplicate_rows" and K > 1:
        J[1] = J[0]
    return J


def positive_losses(K: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 100).uniform(0.05, 5.0, size=K)


# --------------------------------------------------------------------------- MGDA's normalisations


def libmtl_normalizers(J: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """LibMTL's ``MGDA._gradient_normalizers`` (``l2``: ‖g‖, ``loss``: L, ``loss+``: L·‖g‖, ``none``: 1)."""
    norms = np.linalg.norm(J, axis=1)
    return {"none": np.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("K", TASK_COUNTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mgda_normalization_is_libmtls_min_norm_point_of_the_normalised_gradients(normalization, K, family):
    """LibMTL: the min-norm point of g_k/n_k, and the update Σ_k w'_k g_k/n_k, which is that point. A zero row
    (n_k = 0 under l2, loss+) divides 0 by 0 there (NaN); ours keeps it a zero row, the rule's limit."""
    J, losses = jacobian(family, K), positive_losses(K)
    normalizers = libmtl_normalizers(J, losses, normalization)
    normalised = J / np.where(normalizers > 0, normalizers, 1.0)[:, None]
    expected = reference.min_norm_point(normalised)
    d = aggregate("mgda", torch.from_numpy(J), normalization=normalization, losses=torch.from_numpy(losses)).numpy()
    scale = max(float(np.linalg.norm(normalised, axis=1).max()), 1e-300)
    # The min-norm point is fixed by G's rounding to K·ε·scale²/‖d*‖ (tests/test_weighting_properties.py).
    tolerance = 1e-9 * scale + K * 2.2e-16 * scale**2 / max(float(np.linalg.norm(expected)), 1e-300)
    assert np.linalg.norm(d - expected) <= tolerance


def test_mgda_reads_the_losses_only_under_a_loss_normalisation():
    assert {n: aggregator("mgda", 3, normalization=n).needs for n in ("none", "l2", "loss", "loss+")} == {
        "none": frozenset(),
        "l2": frozenset(),
        "loss": frozenset({"losses"}),
        "loss+": frozenset({"losses"}),
    }
    with pytest.raises(ValueError, match=r"^mgda reads the K = 3 task losses: pass losses= \(got None\)$"):
        aggregate("mgda", torch.ones(3, 2), normalization="loss")
    with pytest.raises(ValueError, match=r"^normalization must be one of .*'loss\+'.*, got 'losses'$"):
        aggregator("mgda", 3, normalization="losses")


@pytest.mark.parametrize("path", ["batched", "gramian"])
@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_mgda_loss_normalisation_in_the_training_step(normalization, path):
    """The step hands the batch's losses to the weighting: the shared gradient is LibMTL's update."""
    problem = make_problem(3, seed=4, correlated=True)
    shared = list(problem.model.encoder.parameters())
    losses = regression_losses(problem.twin, problem.x, problem.y)
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(loss, list(problem.twin.encoder.parameters()), retain_graph=True)
                ]
            )
            for loss in losses
        ]
    ).numpy()
    values = torch.stack(losses).detach().numpy()
    expected = reference.min_norm_point(rows / libmtl_normalizers(rows, values, normalization)[:, None])
    method = create(
        "mgda",
        torch.optim.SGD(problem.model.parameters(), lr=0.0),
        3,
        shared_params=shared,
        jacobian=path,
        normalization=normalization,
    )
    method.step(lambda: regression_losses(problem.model, problem.x, problem.y))
    got = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- Aligned-MTL's scale modes


def eigen_allowance(J: np.ndarray) -> float:
    """The relative error G's rounding allows a rule that reads its kept eigenvalues: K·ε·κ over them."""
    eigenvalues = np.linalg.eigvalsh(J @ J.T)
    kept = eigenvalues[eigenvalues > eigenvalues.max() * J.shape[0] * np.finfo(np.float64).eps]
    return J.shape[0] * np.finfo(np.float64).eps * float(kept.max() / kept.min()) if kept.size else 0.0


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("K", TASK_COUNTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_mtl_scale_mode_is_the_float64_rule(scale_mode, K, family):
    J = jacobian(family, K, seed=1)
    expected = J.T @ reference.aligned_mtl_weights(J, scale_mode=scale_mode)
    d = aggregate("aligned_mtl", torch.from_numpy(J), scale_mode=scale_mode).numpy()
    assert np.linalg.norm(d - expected) <= (1e-9 + eigen_allowance(J)) * np.linalg.norm(expected)


def test_aligned_mtl_median_is_torchs_lower_middle_eigenvalue():
    # Eigenvalues 1, 4, 9, 16: torch.median takes 4 (not 6.5); W = diag(sqrt(4/λ)), w = W·1.
    G = torch.diag(torch.tensor([16.0, 1.0, 9.0, 4.0], dtype=torch.float64))
    expected = torch.tensor([0.5, 2.0, 2 / 3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(aggregator("aligned_mtl", 4, scale_mode="median").weights(G), expected)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("K", [2, 7, 32])
@pytest.mark.parametrize("family", ["random", "conflicting", "duplicate_rows"])
def test_aligned_mtl_scale_mode_equals_torchjd(scale_mode, K, family):
    """K × TorchJD 0.18's AlignedMTL(scale_mode=...) (its preference is the mean, ours all ones)."""
    torchjd = pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")
    J = torch.from_numpy(jacobian(family, K, seed=2))
    theirs = K * torchjd.AlignedMTL(scale_mode=scale_mode)(J)
    ours = aggregate("aligned_mtl", J, scale_mode=scale_mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10 * float(theirs.abs().max()))


@pytest.mark.parametrize("scale_mode", ["median", "rmse"])
def test_aligned_mtl_scale_mode_passes_opcheck(scale_mode):
    """The schema's str option through the fake kernel, autograd registration and the dispatcher (torch.compile)."""
    J = torch.from_numpy(jacobian("random", 4))
    torch.library.opcheck(torch.ops.selgroup_fast.aligned_mtl_weights.default, ((J @ J.T).contiguous(), scale_mode))


def test_aligned_mtl_bad_scale_mode_fails_at_construction():
    with pytest.raises(
        ValueError, match=r"^aligned_mtl_weights: scale_mode must be 'min', 'median' or 'rmse', got 'max'$"
    ):
        aggregator("aligned_mtl", 3, scale_mode="max")


# --------------------------------------------------------------------------- IMTL's hybrid (IMTL-L + IMTL-G)

STEPS = 4


def batches(K: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 5, generator=generator, dtype=dtype), 3 * torch.randn(8, K, generator=generator, dtype=dtype))
        for _ in range(STEPS)
    ]


def libmtl_imtl(model: torch.nn.Module, data: list, lr: float, weight_decay: float) -> torch.Tensor:
    """LibMTL's ``IMTL.backward`` in its trainer: ``loss_scale`` an ``nn.Parameter`` in the model's Adam, the losses
    ``e^s L − s`` back-propagated one task at a time (the heads and ``loss_scale`` accumulate), the anchored closed
    form on the scaled gradients, the shared gradient reset to ``Σ α_k g̃_k``. Returns the final ``loss_scale``."""
    shared = list(model.encoder.parameters())
    loss_scale = torch.nn.Parameter(torch.zeros(len(model.heads), dtype=torch.float64))
    opt = torch.optim.Adam([*model.parameters(), loss_scale], lr=lr, weight_decay=weight_decay)
    for x, y in data:
        opt.zero_grad(set_to_none=False)
        losses = loss_scale.exp() * torch.stack(regression_losses(model, x, y)) - loss_scale
        rows = []
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=k < len(losses) - 1)
            rows.append(torch.cat([p.grad.reshape(-1).clone() for p in shared]))
            for p in shared:
                p.grad.zero_()
        grads = torch.stack(rows)
        unit = grads / grads.norm(dim=-1, keepdim=True)
        D, U = grads[0:1] - grads[1:], unit[0:1] - unit[1:]
        alpha = grads[0] @ U.T @ torch.inverse(D @ U.T)
        alpha = torch.cat([(1 - alpha.sum()).unsqueeze(0), alpha])
        for p, part in zip(shared, (alpha @ grads).split([p.numel() for p in shared]), strict=True):
            p.grad.copy_(part.view_as(p))
        opt.step()
    return loss_scale.detach()


def train_hybrid(model: torch.nn.Module, data: list, jacobian: str = "batched", **options):
    K = len(model.heads)
    method = create(
        "imtl",
        torch.optim.Adam(
            model.parameters(), lr=options.get("lr", 1e-4), weight_decay=options.get("weight_decay", 1e-5)
        ),
        K,
        shared_params=model.encoder.parameters(),
        jacobian=jacobian,
        hybrid=True,
        **options,
    )
    for x, y in data:
        method.step(lambda x=x, y=y: regression_losses(model, x, y))
    return method


@pytest.mark.parametrize("path", ["batched", "gramian"])
def test_imtl_hybrid_equals_libmtls_imtl(path):
    K = 3
    problem = make_problem(K, seed=6)
    data = batches(K)
    method = train_hybrid(problem.model, data, path, lr=0.05, weight_decay=1e-3)
    loss_scale = libmtl_imtl(problem.twin, data, lr=0.05, weight_decay=1e-3)
    torch.testing.assert_close(method.aggregator.log_scales, loss_scale, rtol=1e-10, atol=1e-12)
    assert loss_scale.abs().min() > 0.05  # the scales moved
    for (key, mine), theirs in zip(problem.model.state_dict().items(), problem.twin.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12, msg=key)


def test_imtl_hybrid_resume_is_bitwise():
    """Two steps, the method's and optimizer's state_dicts, two more steps equal four uninterrupted steps bit for bit."""
    K = 3
    problem = make_problem(K, seed=7, dtype=torch.float32)
    data = batches(K, torch.float32)
    straight = train_hybrid(problem.model, data, lr=0.05)
    first = train_hybrid(problem.twin, data[:2], lr=0.05)
    saved = {key: value.clone() for key, value in first.state_dict().items()}
    assert sorted(saved) == ["adam_steps", "exp_avg", "exp_avg_sq", "log_scales"]
    resumed = train_hybrid(problem.twin, [], lr=0.05)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(saved)
    for x, y in data[2:]:
        resumed.step(lambda x=x, y=y: regression_losses(problem.twin, x, y))
    assert torch.equal(resumed.aggregator.log_scales, straight.aggregator.log_scales)
    for mine, other in zip(problem.model.state_dict().values(), problem.twin.state_dict().values(), strict=True):
        assert torch.equal(mine, other)


def test_imtl_without_hybrid_keeps_no_state_and_reads_g_only():
    plain = aggregator("imtl", 3)
    assert plain.needs == frozenset() and plain.state_dict() == {}
    assert aggregator("imtl", 3, hybrid=True).needs == frozenset({"losses"})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"lr": 0.1}, ValueError, r"^imtl: lr and weight_decay step the hybrid's loss scales: pass hybrid=True$"),
        ({"hybrid": True, "lr": 0.0}, ValueError, r"^lr must be > 0, got 0.0$"),
        ({"hybrid": True, "weight_decay": -1.0}, ValueError, r"^weight_decay must be >= 0, got -1.0$"),
        ({"hybrid": 1}, TypeError, r"^hybrid must be a bool, got int$"),
    ],
)
def test_imtl_bad_options_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        aggregator("imtl", 3, **options)


def test_imtl_hybrid_skipped_step_leaves_its_scales():
    """nonfinite="skip" (the default) restores the tensor state of the step's weighting: s and Adam's moments."""
    K = 3
    problem = make_problem(K, seed=8, dtype=torch.float32)
    (x, y), (x2, y2) = batches(K, torch.float32)[:2]
    method = train_hybrid(problem.model, [(x, y)], lr=0.05)
    before = {key: value.clone() for key, value in method.state_dict().items()}

    def poisoned() -> list[torch.Tensor]:
        losses = regression_losses(problem.model, x2, y2)
        return [losses[0] * torch.log(torch.zeros(())), *losses[1:]]

    method.step(poisoned)
    assert int(method.skipped_steps) == 1
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert before["log_scales"].abs().min() > 0.04  # the first step moved them
