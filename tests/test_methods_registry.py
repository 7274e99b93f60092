import pytest
import torch

import selgroup_fast
from selgroup_fast.losses import parse_closure_output


def test_gd_step_matches_a_hand_written_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)
    gd = selgroup_fast.methods.create("gd", torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=3)
    losses = gd.step(lambda: list(model(x).pow(2).mean(0)))

    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    expected = twin(x).pow(2).mean(0)
    expected.sum().backward()
    opt.step()
    torch.testing.assert_close(losses, expected.detach(), rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_profiling_records_the_phases_only_when_asked():
    model = torch.nn.Linear(2, 2)
    x = torch.randn(4, 2)
    closure = lambda: list(model(x).pow(2).mean(0))  # noqa: E731
    quiet = selgroup_fast.methods.create("gd", torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=2)
    quiet.step(closure)
    assert quiet.timings == {}
    loud = selgroup_fast.methods.create("gd", torch.optim.SGD(model.parameters(), lr=0.1), 2, profile=True)
    loud.step(closure)
    assert list(loud.timings) == ["forward", "backward", "optimizer"]
    assert all(t >= 0.0 for t in loud.timings.values())


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'.*gd"):
        selgroup_fast.methods.create("nope", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 2)


@pytest.mark.parametrize(
    "output, error, match",
    [
        ([torch.tensor(1.0)], ValueError, "returned 1 losses, expected num_tasks=2"),
        ([torch.ones(2), torch.tensor(1.0)], ValueError, "loss 0 must be a scalar"),
        ([torch.tensor(1), torch.tensor(1.0)], TypeError, "loss 0 must be a floating-point"),
        ([1.0, torch.tensor(1.0)], TypeError, "loss 0 is a float"),
        (torch.ones(2, 1), ValueError, "must be 1-D"),
        (3.0, TypeError, "must return the task losses"),
    ],
)
def test_bad_closure_outputs_get_clear_errors(output, error, match):
    with pytest.raises(error, match=match):
        parse_closure_output(output, 2)


def test_closure_outputs_in_every_accepted_form():
    a, b = torch.tensor(1.0), torch.tensor([2.0])
    for output in ([a, b], (a, b), {"depth": a, "seg": b}, torch.tensor([1.0, 2.0])):
        losses = parse_closure_output(output, 2).losses
        assert [loss.shape for loss in losses] == [torch.Size([]), torch.Size([])]
        assert [loss.item() for loss in losses] == [1.0, 2.0]


def test_closure_outputs_with_features():
    a, b, z = torch.tensor(1.0), torch.tensor(2.0), torch.ones(2, 3)
    for output, count in ((([a, b], z), 1), (({"x": a, "y": b}, [z, z]), 2), ((torch.tensor([1.0, 2.0]), (z,)), 1)):
        result = parse_closure_output(output, 2)
        assert [loss.item() for loss in result.losses] == [1.0, 2.0] and len(result.features) == count
        assert all(feature is z for feature in result.features)
    assert parse_closure_output((a, b), 2).features == ()  # two scalar losses, not (losses, features)
    with pytest.raises(TypeError, match="features 0 must be a floating-point tensor"):
        parse_closure_output(([a, b], torch.ones(2, dtype=torch.int64)), 2)


def test_the_registry_lists_methods_by_kind_and_imports_them_loudly(monkeypatch):
    names = selgroup_fast.methods.available()
    assert sorted(names) == sorted(
        n for kind in selgroup_fast.methods.KINDS for n in selgroup_fast.methods.available(kind)
    )
    assert all(selgroup_fast.methods.kind(n) == "gradient" for n in selgroup_fast.methods.available("gradient"))
    with pytest.raises(ValueError, match="kind must be one of"):
        selgroup_fast.methods.available("nope")
    monkeypatch.setitem(selgroup_fast.methods._REGISTRY, "broken", ("loss", "selgroup_fast.no_such_module:X"))
    with pytest.raises(ModuleNotFoundError):
        selgroup_fast.methods.available()


@pytest.mark.parametrize("name", selgroup_fast.methods.available())
def test_every_method_takes_the_options_of_every_method(name):
    """``options(name)`` lists MultiTaskMethod's options for every method (a loss weighting passes them on as
    ``**options``), and ``create`` accepts them."""
    common = {"profile", "process_group", "nonfinite", "grad_scaler"}
    assert common <= selgroup_fast.methods.options(name)
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = selgroup_fast.methods.create(
        name, optimizer, 3, shared_params=model.parameters(), profile=True, nonfinite="raise"
    )
    assert method.profile and method.nonfinite == "raise"


@pytest.mark.parametrize("name", selgroup_fast.methods.available("loss"))
def test_a_loss_weighting_refuses_an_option_it_does_not_take(name):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 3).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        selgroup_fast.methods.create(name, optimizer, 3, no_such_option=1)
