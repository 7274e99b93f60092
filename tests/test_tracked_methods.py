"""DB-MTL, MoCo and ExcessMTL's whole training steps (selgroup_fast/methods/db_mtl.py, moco.py, excess_mtl.py)
against their peers', float64.

DB-MTL and MoCo: re-derivations of LibMTL's procedure itself (``LibMTL/weighting/DB_MTL.py``, ``MoCo.py``,
``abstract_weighting.py``): K backwards (DB-MTL: of the log losses), the state updated with the decayed rates,
the shared ``.grad`` reset to the direction, the heads' gradients those the K backwards accumulate. ExcessMTL:
TorchJD 0.18's own ``mtl_backward`` + ``jac_to_grad`` with its ``ExcessMTL``. Every parameter is compared after
each step, under SGD and Adam, with the peers' default options and others.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import selgroup_fast

K, STEPS = 3, 4


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(K))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.losses_of(self.encoder(x), x)

    def losses_of(self, features: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """The K losses from the shared features (TorchJD's ``mtl_backward`` takes them apart)."""
        return [
            (head(features).squeeze(1) - x[:, k]).pow(2).mean() + 0.1 * (k + 1) for k, head in enumerate(self.heads)
        ]


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, generator=generator, dtype=torch.float64) for _ in range(steps)]


def shared_gradients(losses: list[torch.Tensor], shared: list[torch.nn.Parameter]) -> torch.Tensor:
    """LibMTL's ``_compute_grad``: one backward per task; the heads accumulate every task's gradient."""
    rows = []
    for k, loss in enumerate(losses):
        loss.backward(retain_graph=k < len(losses) - 1)
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in shared]))
        for p in shared:
            p.grad = None
    return torch.stack(rows)


def reset_shared(shared: list[torch.nn.Parameter], direction: torch.Tensor) -> None:
    for p, part in zip(shared, direction.split([p.numel() for p in shared]), strict=True):
        p.grad = part.view_as(p).clone()


#: The optimizers both sides train with: plain SGD, and Adam (weight decay, as the trainer's) whose per-coordinate
#: normalisation would hide a wrong overall scale of the direction but not a wrong shape or a wrong head gradient.
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-6),
}


#: LibMTL's defaults (its config.py: ``--DB_beta``, ``--DB_beta_sigma``; ``--MoCo_beta``, ..., ``--MoCo_rho``).
LIBMTL_DEFAULTS: dict[str, dict[str, float]] = {
    "db_mtl": {"beta": 0.9, "beta_sigma": 0.0},
    "moco": {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0},
}


class DBMTLReference:
    """LibMTL's ``DB_MTL.backward`` and the optimizer's step: the K backwards of ``log(L_k + 1e-8)`` (the heads get
    ``Σ_k ∇ log L_k``), ``buffer ← g + β/t^σ (buffer − g)``, the shared ``.grad`` reset to ``Σ_k α_k buffer_k``."""

    def __init__(self, model: Tiny, optimizer: str, **options: float) -> None:
        chosen = LIBMTL_DEFAULTS["db_mtl"] | options
        self.model, self.beta, self.beta_sigma, self.step_count = model, chosen["beta"], chosen["beta_sigma"], 0
        self.shared = list(model.encoder.parameters())
        self.optimizer = OPTIMIZERS[optimizer](model.parameters())
        self.buffer = torch.zeros(K, sum(p.numel() for p in self.shared), dtype=torch.float64)

    def step(self, x: torch.Tensor) -> None:
        self.step_count += 1
        self.optimizer.zero_grad()
        grads = shared_gradients([torch.log(loss + 1e-8) for loss in self.model(x)], self.shared)
        self.buffer = grads + (self.beta / self.step_count**self.beta_sigma) * (self.buffer - grads)
        norms = self.buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        reset_shared(self.shared, sum(alpha[k] * self.buffer[k] for k in range(K)))
        self.optimizer.step()


class MoCoReference:
    """LibMTL's ``MoCo.backward`` and the optimizer's step: the K backwards of ``L_k`` (the heads get ``Σ_k ∇L_k``),
    ``y ← y − β_t (y − L_k g_k/‖g_k‖)``, ``λ ← softmax(λ − γ_t (y yᵀ + ρI) λ)``, the shared ``.grad`` reset to ``yᵀλ``."""

    def __init__(self, model: Tiny, optimizer: str, **options: float) -> None:
        chosen = LIBMTL_DEFAULTS["moco"] | options
        self.model, self.step_count = model, 0
        self.beta, self.beta_sigma = chosen["beta"], chosen["beta_sigma"]
        self.gamma, self.gamma_sigma, self.rho = chosen["gamma"], chosen["gamma_sigma"], chosen["rho"]
        self.shared = list(model.encoder.parameters())
        self.optimizer = OPTIMIZERS[optimizer](model.parameters())
        self.y = torch.zeros(K, sum(p.numel() for p in self.shared), dtype=torch.float64)
        self.lambd = torch.ones(K, dtype=torch.float64) / K

    def step(self, x: torch.Tensor) -> None:
        self.step_count += 1
        self.optimizer.zero_grad()
        losses = self.model(x)
        grads = shared_gradients(losses, self.shared)
        grads = torch.stack([grads[k] / (grads[k].norm() + 1e-8) * losses[k].detach() for k in range(K)])
        self.y = self.y - (self.beta / self.step_count**self.beta_sigma) * (self.y - grads)
        coupling = self.y @ self.y.T + self.rho * torch.eye(K, dtype=torch.float64)
        self.lambd = torch.softmax(
            self.lambd - (self.gamma / self.step_count**self.gamma_sigma) * coupling @ self.lambd, -1
        )
        reset_shared(self.shared, self.y.T @ self.lambd)
        self.optimizer.step()


class TorchJDStep:
    """TorchJD's training step: ``mtl_backward`` (the heads get ``Σ_k ∇L_k``, the shared parameters their ``.jac``),
    ``jac_to_grad`` with its aggregator (its state: the running sums, weights and baseline), the optimizer's step."""

    def __init__(self, model: Tiny, optimizer: str, aggregator: Any) -> None:
        self.autojac = pytest.importorskip("torchjd.autojac", reason="the torchjd test extra is not installed")
        self.model, self.aggregator = model, aggregator
        self.optimizer = OPTIMIZERS[optimizer](model.parameters())

    def step(self, x: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        features = self.model.encoder(x)
        self.autojac.mtl_backward(self.model.losses_of(features, x), features=features)
        self.autojac.jac_to_grad(list(self.model.encoder.parameters()), self.aggregator)
        self.optimizer.step()


def excess_mtl_reference(model: Tiny, optimizer: str, **options: Any) -> TorchJDStep:
    aggregation = pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")
    return TorchJDStep(model, optimizer, aggregation.ExcessMTL(**options))


#: Each method's peer: LibMTL's training step re-derived (DB-MTL, MoCo), TorchJD's own (ExcessMTL).
PEERS: dict[str, Callable[..., Any]] = {
    "db_mtl": DBMTLReference,
    "moco": MoCoReference,
    "excess_mtl": excess_mtl_reference,
}
#: (method, options) cases: no option (our defaults must be the peer's), and other values of every option.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "db_mtl": ("db_mtl", {}),
    "db_mtl-options": ("db_mtl", {"beta": 0.8, "beta_sigma": 0.5}),
    "moco": ("moco", {}),
    "moco-options": ("moco", {"beta": 0.6, "beta_sigma": 0.3, "gamma": 0.3, "gamma_sigma": 0.7, "rho": 0.1}),
    "excess_mtl": ("excess_mtl", {}),
    "excess_mtl-options": ("excess_mtl", {"robust_step_size": 0.3, "n_warmup_steps": 2}),
}
TRACKED = ("db_mtl", "moco")


def train(name: str, model: Tiny, xs: list[torch.Tensor], **options) -> selgroup_fast.methods.MultiTaskMethod:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = selgroup_fast.methods.create(name, opt, K, shared_params=model.encoder.parameters(), **options)
    for x in xs:
        method.step(lambda x=x: model(x))
    return method


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_step_equals_the_peer_at_every_step(case: str, optimizer: str, jacobian: str) -> None:
    """Every parameter, shared and the heads', after each of 6 steps equals the peer's training step (LibMTL's
    for DB-MTL and MoCo, TorchJD's for ExcessMTL) with the same optimizer, float64."""
    torch.manual_seed(0)
    ours = Tiny().double()
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)
    name, options = CASES[case]
    reference = PEERS[name](theirs, optimizer, **options)
    opt = OPTIMIZERS[optimizer](ours.parameters())
    method = selgroup_fast.methods.create(
        name, opt, K, shared_params=ours.encoder.parameters(), jacobian=jacobian, **options
    )
    for step, x in enumerate(batches(6), start=1):
        method.step(lambda x=x: ours(x))
        reference.step(x)
        for (key, mine), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(mine, other, rtol=1e-10, atol=1e-12, msg=f"step {step}: {key}")
    for mine, first in zip(ours.parameters(), start.parameters(), strict=True):
        assert not torch.equal(mine, first)  # every parameter moved: the heads' gradients were compared too


@pytest.mark.parametrize("name", TRACKED)
def test_resume_is_bitwise(name: str) -> None:
    """Two steps, a state_dict, two more steps equal four uninterrupted steps bit for bit."""
    torch.manual_seed(0)
    straight = Tiny()
    resumed = copy.deepcopy(straight)
    xs = [x.float() for x in batches()]
    train(name, straight, xs)
    first = train(name, resumed, xs[:2])
    saved = copy.deepcopy(first.state_dict())
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    opt.load_state_dict(copy.deepcopy(first.optimizer.state_dict()))
    second = selgroup_fast.methods.create(name, opt, K, shared_params=resumed.encoder.parameters())
    second.load_state_dict(saved)
    for x in xs[2:]:
        second.step(lambda x=x: resumed(x))
    for mine, other in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(mine, other)
    assert saved["tracked"].shape == (K, sum(p.numel() for p in resumed.encoder.parameters()))
    assert saved["steps"] == 2


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("db_mtl", {"beta": 0.0}, r"^beta must be in \(0, 1\], got 0.0$"),
        ("db_mtl", {"beta": 1.5}, r"^beta must be in \(0, 1\], got 1.5$"),
        ("db_mtl", {"beta_sigma": -1}, r"^beta_sigma must be >= 0, got -1.0$"),
        ("moco", {"gamma": -0.1}, r"^gamma must be > 0, got -0.1$"),
        ("moco", {"rho": -1.0}, r"^rho must be >= 0, got -1.0$"),
        ("moco", {"gamma_sigma": float("nan")}, r"^gamma_sigma must be >= 0, got nan$"),
        ("gradnorm", {"alpha": -1.0}, r"^alpha must be >= 0, got -1.0$"),
        ("gradnorm", {"lr": 0.0}, r"^lr must be > 0, got 0.0$"),
        ("gradnorm", {"warmup_steps": 0}, r"^warmup_steps must be an int >= 1, got 0$"),
    ],
)
def test_bad_options_fail_at_construction(name: str, options: dict, message: str) -> None:
    model = Tiny()
    with pytest.raises(ValueError, match=message):
        selgroup_fast.methods.create(
            name, torch.optim.SGD(model.parameters(), lr=0.1), K, shared_params=model.encoder.parameters(), **options
        )


@pytest.mark.parametrize("name", TRACKED)
def test_paths_that_cannot_serve_it_refuse(name: str) -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    create = selgroup_fast.methods.create
    with pytest.raises(ValueError, match=r'space="representation" does not apply'):
        create(name, opt, K, shared_params=model.encoder.parameters(), space="representation")
    with pytest.raises(ValueError, match=r'jacobian="gramian" does not apply'):
        create(name, opt, K, shared_params=model.encoder.parameters(), jacobian="gramian")
    with pytest.raises(ValueError, match=r"reads the K = 3 task losses: pass losses="):
        selgroup_fast.methods.aggregate(name, torch.ones(K, 2))


@pytest.mark.parametrize("name", TRACKED)
def test_state_is_allocated_once_at_construction(name: str) -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = selgroup_fast.methods.create(name, opt, K, shared_params=model.encoder.parameters())
    tracker = method.aggregator
    width = sum(p.numel() for p in model.encoder.parameters())
    assert tracker.tracked.shape == (K, width) and not tracker.tracked.any()
    assert tracker.state_bytes == K * width * 4 + (K * 4 if name == "moco" else 0)  # MoCo's λ too
    assert method.state_bytes == tracker.state_bytes
    x = batches()[0].float()
    method.step(lambda: model(x))
    assert tracker.tracked.shape == (K, width) and tracker.tracked.any()


def gradnorm_reference(model: Tiny, xs: list[torch.Tensor], alpha: float, warmup: int) -> None:
    """LibMTL's GradNorm: the loss scales an ``nn.Parameter`` stepped by the model's Adam, ``L(0)`` the warm-up's
    mean losses (LibMTL's first epoch), ``L_grad`` back-propagated by autograd."""
    shared = list(model.encoder.parameters())
    loss_scale = torch.nn.Parameter(torch.ones(K, dtype=torch.float64))
    opt = torch.optim.Adam([*model.parameters(), loss_scale], lr=0.01, weight_decay=1e-5)
    initial = torch.zeros(K, dtype=torch.float64)
    for step, x in enumerate(xs, start=1):
        opt.zero_grad(set_to_none=False)
        losses = torch.stack(model(x))
        if step <= warmup:
            initial += losses.detach() / warmup
            losses.sum().backward()
        else:
            weights = K * torch.softmax(loss_scale, dim=-1)
            grads = shared_gradients(list(losses), shared)
            per_task = torch.norm(weights.unsqueeze(1) * grads, p=2, dim=-1)
            ratios = losses.detach() / initial
            target = (per_task.mean(0) * (ratios / ratios.mean()) ** alpha).detach()
            (per_task - target).abs().sum(0).backward()
            reset_shared(shared, weights.detach() @ grads)
        opt.step()


@pytest.mark.parametrize("jacobian", ["batched", "gramian"])
def test_gradnorm_parameters_equal_libmtl_rule(jacobian: str) -> None:
    torch.manual_seed(0)
    ours = Tiny().double()
    theirs = copy.deepcopy(ours)
    xs = batches() + batches()[:2]
    opt = torch.optim.Adam(ours.parameters(), lr=0.01, weight_decay=1e-5)
    method = selgroup_fast.methods.create(
        "gradnorm",
        opt,
        K,
        shared_params=ours.encoder.parameters(),
        jacobian=jacobian,
        alpha=1.2,
        lr=0.01,
        weight_decay=1e-5,
        warmup_steps=2,
    )
    for x in xs:
        method.step(lambda x=x: ours(x))
    gradnorm_reference(theirs, xs, 1.2, 2)
    for (key, mine), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=1e-12, msg=key)
    assert not torch.equal(method.aggregator.logits, torch.ones(K, dtype=torch.float64))  # the scales learned
