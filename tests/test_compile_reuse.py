"""Every method of the registry on a compiled model after other compiled runs in the same process (issue 19, item 1).

torch.compile reuses compiled code across instances of a model class (Dynamo's cache is
per code object) and, through its caches, across ``torch.compiler.reset()``. A gradient
method back-propagates each task's loss through one graph; a backward compiled before for
one backward per step (with donated buffers: GD, the selective update, a loss-weighting
method) overwrites the tensors the forward saved, and every task gradient after the first
was silently wrong (0.05 off eager after 3 steps with Inductor). Each run below trains
:data:`scaling_worker.STEPS` steps of a method on a fresh instance of the same model class
(``scaling_worker.run(..., reset=False)``) and is compared with one eager run; a gradient
method after a method that compiled such a backward must raise the one error naming
``torch.compiler.reset()`` instead, and train as eager after it.
"""

from __future__ import annotations

import pytest
import scaling_worker as worker
import torch

from selgroup_fast import methods
from selgroup_fast.methods.gradient import GradientMethod
from selgroup_fast.parallel import compiled_backwards


def variant(name: str) -> str:
    return "task_params" if name == "selective" else "plain"  # selective needs task_params= when compiled


def is_gradient_method(name: str) -> bool:
    model = worker.SharedEncoderModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return isinstance(worker.make_method(name, optimizer, model, variant(name), rank=0), GradientMethod)


NAMES = methods.available()
GRADIENT = [name for name in NAMES if is_gradient_method(name)]
ONE_BACKWARD = [name for name in NAMES if name not in GRADIENT]  # one ordinary backward per forward

_eager: dict[str, dict] = {}


def eager(name: str) -> dict:
    """One eager run of ``name`` (computed once per method)."""
    if name not in _eager:
        _eager[name] = worker.run(name, "eager")
    return _eager[name]


def compiled_after_earlier_runs(name: str, backend: str = "compiled") -> dict:
    """``name`` on a new instance of the model class, compiled, keeping what earlier runs compiled."""
    return worker.run(name, backend, variant(name), reset=False)


def assert_trains_as_eager(result: dict, name: str) -> None:
    assert "error" not in result, result["traceback"]
    for part in ("params", "state", "optimizer"):
        torch.testing.assert_close(result[part], eager(name)[part], msg=lambda m, part=part: f"{name} {part}: {m}")


def assert_refused_naming_the_reset(result: dict, name: str) -> None:
    error = result.get("error", "")
    assert error.startswith("RuntimeError") and f"call torch.compiler.reset() before training with {name}" in error, (
        error or "trained without an error"
    )


def assert_after(first: str, second: str, backend: str = "compiled") -> None:
    """``second`` after ``first``: as eager, or (a gradient method after a one-backward method) refused."""
    result = compiled_after_earlier_runs(second, backend)
    if second in GRADIENT and first in ONE_BACKWARD:
        assert_refused_naming_the_reset(result, second)
    else:
        assert_trains_as_eager(result, second)


def test_the_registry_has_both_kinds():
    assert GRADIENT and ONE_BACKWARD and "gd" in ONE_BACKWARD and "pcgrad" in GRADIENT


@pytest.mark.parametrize(
    "first",
    [pytest.param(name, marks=[] if name in ("gd", "selective") else pytest.mark.slow) for name in ONE_BACKWARD],
)
def test_every_gradient_method_after_a_one_backward_method_is_refused(first):
    torch.compiler.reset()
    assert_trains_as_eager(compiled_after_earlier_runs(first), first)
    for name in GRADIENT:  # refused before any backward: the compiled code stays as it was
        assert_refused_naming_the_reset(compiled_after_earlier_runs(name), name)


def test_after_a_reset_every_method_after_every_gradient_method_trains_as_eager():
    torch.compiler.reset()
    assert_trains_as_eager(compiled_after_earlier_runs("gd"), "gd")
    torch.compiler.reset()  # what the refusal asks for
    for name in GRADIENT:  # each after the previous one, whose compiled backward it reuses
        assert_trains_as_eager(compiled_after_earlier_runs(name), name)
    for name in [*ONE_BACKWARD, GRADIENT[0]]:  # then one backward through that code; the first one again
        assert_trains_as_eager(compiled_after_earlier_runs(name), name)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("first", NAMES)
def test_every_method_after_every_method(first):
    for second in NAMES:
        torch.compiler.reset()
        assert_trains_as_eager(compiled_after_earlier_runs(first), first)
        assert_after(first, second)
        assert_after(first, second)  # the same method again, on another instance: the same outcome


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_inductor_pcgrad_after_gd_is_refused_then_trains_as_eager_across_a_reset(tmp_path, monkeypatch):
    # Inductor's backward does overwrite the donated buffers (aot_eager's happens not to): the
    # case that trained wrongly. After the reset, Inductor's caches hold GD's backward.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.compiler.reset()
    assert_trains_as_eager(compiled_after_earlier_runs("gd", "inductor"), "gd")
    assert_after("gd", "pcgrad", "inductor")
    torch.compiler.reset()
    assert_trains_as_eager(compiled_after_earlier_runs("pcgrad", "inductor"), "pcgrad")
    assert_trains_as_eager(compiled_after_earlier_runs("pcgrad", "inductor"), "pcgrad")


def test_compiled_backwards_says_when_a_backward_was_compiled_and_whether_it_donates():
    # The AOTAutograd state the check reads (torch 2.14): compiled at the first backward,
    # with donated buffers unless that backward retains the graph.
    torch.compiler.reset()
    encoder = torch.nn.Linear(3, 4)
    compiled = torch.compile(lambda x: encoder(x).tanh().pow(2), backend=worker.COMPILE_BACKEND)
    x = torch.randn(5, 3)
    loss = compiled(x).sum()
    assert compiled_backwards([loss]) == [(False, False)]
    loss.backward()
    assert compiled_backwards([compiled(x).sum()]) == [(True, True)]
    torch.compiler.reset()
    loss = compiled(x).sum()
    loss.backward(retain_graph=True)
    assert compiled_backwards([loss]) == [(True, False)]
    features = compiled(x)  # behind the features: not listed
    assert compiled_backwards([(features * 2).sum()], [features]) == []


def test_a_gradient_method_refuses_an_fx_graph_cache_forced_on_by_the_environment(monkeypatch):
    # TORCHINDUCTOR_FX_GRAPH_CACHE=1 overrides any patch (torch reads it at import into the
    # option's forced value, set here): the backward compiled in the step could come from the
    # cache with donated buffers.
    monkeypatch.setattr(torch._inductor.config._config["fx_graph_cache"], "env_value_force", True)
    error = worker.run("pcgrad", "compiled").get("error", "trained without an error")
    assert error.startswith("RuntimeError") and "TORCHINDUCTOR_FX_GRAPH_CACHE forces it on: unset it" in error, error
    monkeypatch.undo()
    assert_trains_as_eager(worker.run("pcgrad", "compiled"), "pcgrad")
