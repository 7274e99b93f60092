"""The loss scalarizations STCH, GLS, IMTL-L, COSMOS, PBI and RLW against float64 re-derivations and TorchJD.

Each test trains one parameter vector ``p`` (SGD, lr 0, so p stays 1) on the losses ``L = v ⊙ p``:
the gradient the method leaves in ``p`` is ``v ⊙ ∂T/∂L`` for its training loss T, compared with
the derivative of the peer's rule written out here in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from selgroup_fast.methods import MultiTaskMethod, create

K = 3
LOSSES = [[0.7, 2.0, 1.3], [0.5, 1.8, 1.1], [0.9, 1.1, 0.6], [0.4, 1.6, 1.0], [1.2, 0.8, 0.3]]


def f64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def train(name: str, steps: Sequence[Sequence[float]], **options: Any) -> tuple[MultiTaskMethod, torch.Tensor]:
    """The method after one step per loss vector of ``steps``, and ``∂T/∂L`` of the last step."""
    param = torch.nn.Parameter(torch.ones(K, dtype=torch.float64))
    method = create(name, torch.optim.SGD([param], lr=0.0), K, **options)
    for values in steps:
        method.step(lambda values=values: list(f64(values) * param))
    assert param.grad is not None
    return method, param.grad / f64(steps[-1])


def torchjd_scalarization() -> Any:
    """``torchjd.scalarization`` (the ``torchjd`` test extra), or a skip that says it is not installed."""
    return pytest.importorskip("torchjd.scalarization", reason="the torchjd test extra is not installed")


def torchjd_gradient(scalarizer: Any, values: Sequence[float]) -> torch.Tensor:
    losses = f64(values).requires_grad_()
    scalarizer(losses).backward()
    assert losses.grad is not None
    return losses.grad


# --------------------------------------------------------------------------- STCH


@pytest.mark.parametrize("options", [{}, {"mu": 0.1, "weights": [0.2, 0.5, 0.3], "reference": [0.1, 0.0, 0.3]}])
def test_stch_is_the_smooth_weighted_maximum(options):
    method, gradient = train("stch", LOSSES[:1], **options)
    mu = options.get("mu", 1.0)
    weights = f64(options.get("weights", [1 / K] * K))
    shifted = f64(LOSSES[0]) - f64(options.get("reference", [0.0] * K))
    # ∂/∂L_k μ log Σ_j exp(λ_j (L_j − z_j) / μ) = λ_k softmax(λ (L − z) / μ)_k
    torch.testing.assert_close(gradient, weights * torch.softmax(weights * shifted / mu, 0))


def test_stch_warmup_trains_on_the_log_losses_then_normalises_by_the_nadir():
    window, mu = 2, 0.5
    steps = LOSSES[:5]  # warmup=1: windows 0 and 1 (steps 0-3) on Σ log L, the nadir the mean over window 1
    for done in range(1, 5):
        method, gradient = train("stch", steps[:done], warmup=1, window=window, mu=mu)
        torch.testing.assert_close(gradient, 1 / (f64(steps[done - 1]) + 1e-20))
    nadir = (f64(steps[2]) + f64(steps[3])) / 2
    method, gradient = train("stch", steps, warmup=1, window=window, mu=mu)
    assert method.warmup_steps == 4  # declared: the steps on Σ log L above, the 5th the first with the nadir
    torch.testing.assert_close(method.nadir, nadir)  # type: ignore[attr-defined]
    # LibMTL: K μ log Σ exp(log(L / n) / μ); ∂/∂L_k = K softmax(log(L / n) / μ)_k / L_k
    losses = f64(steps[4])
    torch.testing.assert_close(gradient, K * torch.softmax(torch.log(losses / nadir) / mu, 0) / losses)


@pytest.mark.parametrize("name", ["gd", "stch", "uw", "gls"])
def test_a_method_without_a_warmup_declares_none(name):
    assert train(name, LOSSES[:1])[0].warmup_steps == 0


def test_stch_equals_torchjd():
    scalarization = torchjd_scalarization()
    weights, reference = [0.2, 0.5, 0.3], [0.1, 0.0, 0.3]
    _, gradient = train("stch", LOSSES[:1], mu=0.1, weights=weights, reference=reference)
    expected = torchjd_gradient(scalarization.STCH(0.1, f64(weights), f64(reference)), LOSSES[0])
    torch.testing.assert_close(gradient, expected)


# --------------------------------------------------------------------------- GLS


def test_gls_is_the_geometric_mean():
    _, gradient = train("gls", LOSSES[:1])
    losses = f64(LOSSES[0])
    geometric_mean = losses.prod() ** (1 / K)  # LibMTL's form
    torch.testing.assert_close(gradient, geometric_mean / (K * losses))


def test_gls_equals_torchjd():
    scalarization = torchjd_scalarization()
    _, gradient = train("gls", LOSSES[:1])
    torch.testing.assert_close(gradient, torchjd_gradient(scalarization.GeometricMean(), LOSSES[0]))


# --------------------------------------------------------------------------- IMTL-L


def test_imtl_l_scales_the_losses_by_learned_exponentials():
    lr = 0.1
    _, gradient = train("imtl_l", LOSSES[:1], lr=lr)
    torch.testing.assert_close(gradient, torch.ones(K, dtype=torch.float64))  # s = 0: the plain sum
    _, gradient = train("imtl_l", LOSSES[:2], lr=lr)
    # One Adam step on ∂/∂s Σ (e^s L − s) = e^s L − 1 at s = 0 moves s by −lr · sign(L − 1).
    scales = -lr * torch.sign(f64(LOSSES[0]) - 1)
    torch.testing.assert_close(gradient, torch.exp(scales))


def test_imtl_l_equals_torchjd():
    scalarization = torchjd_scalarization()
    _, gradient = train("imtl_l", LOSSES[:1])
    scalarizer = scalarization.IMTLL(K).double()
    torch.testing.assert_close(gradient, torchjd_gradient(scalarizer, LOSSES[0]))


# --------------------------------------------------------------------------- COSMOS

PREFERENCE = [0.2, 0.5, 0.3]


@pytest.mark.parametrize("options", [{}, {"lambda_": 3.0, "weights": PREFERENCE}])
def test_cosmos_is_the_linear_scalarization_minus_the_cosine(options):
    _, gradient = train("cosmos", LOSSES[:1], **options)
    lambda_, r, losses = options.get("lambda_", 1.0), f64(options.get("weights", [1 / K] * K)), f64(LOSSES[0])
    # ∂/∂L [r·L − λ r·L / (‖r‖ ‖L‖)] = r − λ (r / (‖r‖ ‖L‖) − (r·L) L / (‖r‖ ‖L‖³))
    norm_r, norm_l = r.norm(), losses.norm()
    expected = r - lambda_ * (r / (norm_r * norm_l) - (r @ losses) * losses / (norm_r * norm_l**3))
    torch.testing.assert_close(gradient, expected)


def test_cosmos_equals_torchjd():
    scalarization = torchjd_scalarization()
    _, gradient = train("cosmos", LOSSES[:1], lambda_=3.0, weights=PREFERENCE)
    torch.testing.assert_close(gradient, torchjd_gradient(scalarization.COSMOS(3.0, f64(PREFERENCE)), LOSSES[0]))


# --------------------------------------------------------------------------- PBI


@pytest.mark.parametrize("options", [{}, {"theta": 2.0, "weights": PREFERENCE, "reference": [0.1, 0.0, 0.3]}])
def test_pbi_is_the_distance_along_plus_theta_times_the_distance_to_the_preference(options):
    _, gradient = train("pbi", LOSSES[:1], **options)
    theta, w = options.get("theta", 5.0), f64(options.get("weights", [1.0] * K))
    shifted = f64(LOSSES[0]) - f64(options.get("reference", [0.0] * K))
    direction = w / w.norm()
    # d_2 = ‖P f‖ with P = I − ŵŵᵀ: ∂(d_1 + θ d_2)/∂f = ŵ + θ P f / d_2
    perpendicular = shifted - (shifted @ direction) * direction
    torch.testing.assert_close(gradient, direction + theta * perpendicular / perpendicular.norm())


def test_pbi_equals_torchjd():
    scalarization = torchjd_scalarization()
    reference = [0.1, 0.0, 0.3]
    _, gradient = train("pbi", LOSSES[:1], theta=2.0, weights=PREFERENCE, reference=reference)
    expected = torchjd_gradient(scalarization.PBI(2.0, f64(PREFERENCE), f64(reference)), LOSSES[0])
    torch.testing.assert_close(gradient, expected)


# --------------------------------------------------------------------------- RLW


def test_rlw_weights_are_a_softmax_of_normals_from_its_seed():
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(K, generator=generator, dtype=torch.float64) for _ in range(3)]
    for done in range(1, 4):
        _, gradient = train("rlw", LOSSES[:done], seed=7)
        torch.testing.assert_close(gradient, torch.softmax(draws[done - 1], 0))


def test_rlw_resumes_its_draws_from_the_state_dict():
    method, _ = train("rlw", LOSSES[:2], seed=3)
    state = method.state_dict()
    _, continued = train("rlw", LOSSES[:3], seed=3)
    param = torch.nn.Parameter(torch.ones(K, dtype=torch.float64))
    resumed = create("rlw", torch.optim.SGD([param], lr=0.0), K, seed=11)
    resumed.load_state_dict(state)
    resumed.step(lambda: list(f64(LOSSES[2]) * param))
    assert param.grad is not None
    torch.testing.assert_close(param.grad / f64(LOSSES[2]), continued, rtol=0, atol=0)


def test_rlw_equals_torchjd_random_from_the_same_seed():
    scalarization = torchjd_scalarization()
    param = torch.nn.Parameter(torch.ones(K))  # float32: TorchJD draws in the losses' dtype
    create("rlw", torch.optim.SGD([param], lr=0.0), K, seed=5).step(lambda: list(torch.tensor(LOSSES[0]) * param))
    losses = torch.tensor(LOSSES[0]).requires_grad_()
    torch.manual_seed(5)
    scalarization.Random()(losses).backward()
    assert param.grad is not None and losses.grad is not None
    torch.testing.assert_close(param.grad / torch.tensor(LOSSES[0]), losses.grad)


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("stch", {"mu": 0.0}, r"^mu must be > 0, got 0.0$"),
        ("stch", {"weights": [1.0, 2.0]}, r"^weights must be 3 finite numbers \(one per task\), got \[1.0, 2.0\]$"),
        ("stch", {"weights": [1.0, -1.0, 0.0]}, r"^weights must be >= 0 and not all 0"),
        ("stch", {"reference": [0.0, float("nan"), 0.0]}, r"^reference must be 3 finite numbers"),
        ("stch", {"warmup": 2, "weights": [1.0, 1.0, 1.0]}, r"^weights= and reference= are TorchJD's STCH"),
        ("stch", {"warmup": -1}, r"^warmup must be an int >= 0, got -1$"),
        ("stch", {"window": 0}, r"^window must be an int >= 1, got 0$"),
        ("imtl_l", {"lr": 0.0}, r"^lr must be > 0, got 0.0$"),
        ("cosmos", {"lambda_": -1.0}, r"^lambda_ must be >= 0, got -1.0$"),
        ("cosmos", {"weights": [0.0, 0.0, 0.0]}, r"^weights must be >= 0 and not all 0"),
        ("pbi", {"theta": float("nan")}, r"^theta must be >= 0, got nan$"),
        ("pbi", {"reference": [0.0]}, r"^reference must be 3 finite numbers"),
        ("rlw", {"seed": 0, "generator": torch.Generator()}, r"^give seed= or generator=, not both$"),
    ],
)
def test_bad_options_are_one_clear_error_at_construction(name, options, match):
    param = torch.nn.Parameter(torch.ones(K))
    with pytest.raises(ValueError, match=match):
        create(name, torch.optim.SGD([param], lr=0.1), K, **options)
