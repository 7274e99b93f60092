"""DB-MTL and MoCo (selgroup_fast/methods/db_mtl.py, moco.py) against float64 re-derivations of LibMTL's rules.

Each reference follows LibMTL's procedure itself (``LibMTL/weighting/DB_MTL.py``, ``MoCo.py``): K backwards
(DB-MTL: of the log losses), the state updated with the decayed rates, the shared ``.grad`` reset to the
direction, the heads' gradients those of LibMTL's backwards; the parameters after a few SGD steps are compared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

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
        z = self.encoder(x)
        return [(head(z).squeeze(1) - x[:, k]).pow(2).mean() + 0.1 * (k + 1) for k, head in enumerate(self.heads)]


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, generator=generator, dtype=torch.float64) for _ in range(STEPS)]


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


def db_mtl_reference(model: Tiny, xs: list[torch.Tensor], beta: float, beta_sigma: float) -> None:
    shared = list(model.encoder.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = torch.zeros(K, sum(p.numel() for p in shared), dtype=torch.float64)
    for step, x in enumerate(xs, start=1):
        opt.zero_grad()
        grads = shared_gradients([torch.log(loss + 1e-8) for loss in model(x)], shared)
        buffer = grads + (beta / step**beta_sigma) * (buffer - grads)
        norms = buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        reset_shared(shared, sum(alpha[k] * buffer[k] for k in range(K)))
        opt.step()


def moco_reference(model: Tiny, xs: list[torch.Tensor], beta: float, gamma: float, rho: float) -> None:
    beta_sigma = gamma_sigma = 0.5
    shared = list(model.encoder.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.zeros(K, sum(p.numel() for p in shared), dtype=torch.float64)
    lambd = torch.ones(K, dtype=torch.float64) / K
    for step, x in enumerate(xs, start=1):
        opt.zero_grad()
        losses = model(x)
        grads = shared_gradients(losses, shared)
        grads = torch.stack([grads[k] / (grads[k].norm() + 1e-8) * losses[k].detach() for k in range(K)])
        y = y - (beta / step**beta_sigma) * (y - grads)
        coupling = y @ y.T + rho * torch.eye(K, dtype=torch.float64)
        lambd = torch.softmax(lambd - (gamma / step**gamma_sigma) * coupling @ lambd, -1)
        reset_shared(shared, y.T @ lambd)
        opt.step()


def train(name: str, model: Tiny, xs: list[torch.Tensor], **options) -> selgroup_fast.methods.MultiTaskMethod:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = selgroup_fast.methods.create(name, opt, K, shared_params=model.encoder.parameters(), **options)
    for x in xs:
        method.step(lambda x=x: model(x))
    return method


REFERENCES: dict[str, tuple[dict, Callable[[Tiny, list[torch.Tensor]], None]]] = {
    "db_mtl": ({"beta": 0.8, "beta_sigma": 0.5}, lambda m, xs: db_mtl_reference(m, xs, 0.8, 0.5)),
    "moco": ({"beta": 0.6, "gamma": 0.3, "rho": 0.1}, lambda m, xs: moco_reference(m, xs, 0.6, 0.3, 0.1)),
}


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_parameters_equal_libmtl_rule(name: str, jacobian: str) -> None:
    torch.manual_seed(0)
    ours = Tiny().double()
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)
    options, reference = REFERENCES[name]
    xs = batches()
    train(name, ours, xs, jacobian=jacobian, **options)
    reference(theirs, xs)
    for (key, mine), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=1e-12, msg=key)
    assert not torch.equal(ours.encoder[0].weight, start.encoder[0].weight)  # the steps moved the encoder


@pytest.mark.parametrize("name", sorted(REFERENCES))
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


@pytest.mark.parametrize("name", sorted(REFERENCES))
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


@pytest.mark.parametrize("name", sorted(REFERENCES))
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
