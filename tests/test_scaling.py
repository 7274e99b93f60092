"""Every method under torch.compile, DDP and FSDP2 trains as one eager process on the global batch (issue 10).

The runs live in ``scaling_worker.py``; the distributed ones run on 2 gloo ranks on
127.0.0.1, started ONCE per test-file run for every selected case (module fixture
``distributed``). Parameters, method state and optimizer state are compared with one eager
process on both ranks' data to float32 rounding, and the two ranks with each other bitwise.
The default suite runs one DDP and one FSDP2 case per method family (selective, gradient,
loss-weighting); the rest are marked slow.
"""

from __future__ import annotations

import re

import pytest
import scaling_worker as worker
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

import selgroup_fast
from selgroup_fast import methods

NAMES = methods.available()
GRADIENT = [
    *("pcgrad", "cagrad", "mgda", "graddrop", "imtl", "aligned_mtl", "nash_mtl"),
    *("upgrad", "dualproj", "gradnorm", "cr_mogm", "gradvac"),
    *("fairgrad", "config", "krum", "trimmed_mean", "pcd"),
]
#: Gradient methods with K×P state over the shared parameters' coordinates: DDP only (FSDP2 shards the
#: coordinates, the features of space="representation" change with every batch); both are refused in one line.
TRACKED = ["db_mtl", "moco", "excess_mtl"]
#: Gradient methods of two batches' task gradients (J_1 J_2ᵀ): DDP; FSDP2 refused in one line (REFUSED).
TWO_BATCH = ["modo", "sdmgrad"]
LOSS_WEIGHTING = ["uw", "dwa", "dtp", "famo", "stch", "gls", "imtl_l", "cosmos", "pbi", "rlw"]
#: One DDP and one FSDP2 case per family runs in the default suite, with GradDrop under FSDP2 (its
#: own path: each rank draws for its columns), Nash-MTL's reused weights, one process_group= case,
#: one representation-space case under each, DDP of a compiled model, and a grad scaler's skip under each.
DEFAULT_DISTRIBUTED = {
    ("selective", "ddp", "plain"),
    ("selective", "ddp", "unseeded"),
    ("pcgrad", "ddp", "plain"),
    ("pcgrad", "ddp", "loop"),
    ("pcgrad", "ddp", "unseeded"),
    ("famo", "ddp", "plain"),
    ("selective", "fsdp2", "task_params"),
    ("selective", "fsdp2", "plain"),
    ("mgda", "fsdp2", "plain"),
    ("mgda", "fsdp2", "loop"),
    ("mgda", "fsdp2", "chunked"),
    ("pcgrad", "ddp", "chunked"),
    ("graddrop", "fsdp2", "plain"),
    ("trimmed_mean", "fsdp2", "plain"),  # the other column-wise aggregator: each rank its own columns
    ("uw", "fsdp2", "plain"),
    ("nash_mtl", "ddp", "reuse"),
    ("nash_mtl", "fsdp2", "reuse"),
    ("pcgrad", "ddp", "process_group"),
    ("pcgrad", "ddp", "representation"),
    ("mgda", "fsdp2", "representation"),
    ("selective", "ddp_compiled", "task_params"),
    ("pcgrad", "ddp_compiled", "plain"),
    (worker.FINITE_COLUMN_SUM, "fsdp2", "overflow"),
    (worker.FINITE_COLUMN_SUM, "fsdp2", "overflow_raise"),
    ("graddrop", "fsdp2", "overflow"),
    ("graddrop", "fsdp2", "scaled"),
    ("pcgrad", "ddp", "overflow"),
}

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def test_the_registry_is_what_the_families_cover():
    # Every registered method is tested in each configuration below (a new one must join a family).
    assert sorted(NAMES) == sorted(["gd", "selective", *GRADIENT, *TRACKED, *TWO_BATCH, *LOSS_WEIGHTING])


def distributed_case(name: str, config: str, variant: str = "plain"):
    marks = [needs_gloo] + ([] if (name, config, variant) in DEFAULT_DISTRIBUTED else [pytest.mark.slow])
    return pytest.param((name, config, variant), marks=marks, id=f"{name}-{config}-{variant}")


@pytest.fixture(scope="module")
def distributed(request, tmp_path_factory) -> list[dict]:
    """The two ranks' results of every selected distributed case, from ONE pair of processes."""
    cases = sorted(
        {
            item.callspec.params["case"]
            for item in request.session.items
            if getattr(item, "module", None) is request.module
            and "case" in getattr(getattr(item, "callspec", None), "params", {})
        }
    )
    out_dir = tmp_path_factory.mktemp("scaling")
    context = mp.spawn(worker.serve, args=(free_port(), cases, str(out_dir)), nprocs=worker.WORLD_SIZE, join=False)
    while not context.join(timeout=300):
        pass
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(worker.WORLD_SIZE)]


_references: dict[tuple[str, str], dict] = {}


def reference(name: str, variant: str = "plain") -> dict:
    """One eager process on the global batch (computed once per method and algorithm variant)."""
    key = (name, variant if variant in worker.ALGORITHM_VARIANTS else "plain")
    if key not in _references:
        _references[key] = worker.run(name, "eager", key[1])
        assert "error" not in _references[key], _references[key]["traceback"]
    return _references[key]


def assert_same_training(result: dict, expected: dict, exact: bool = False) -> None:
    assert "error" not in result, result["traceback"]
    tolerance = {"rtol": 0, "atol": 0} if exact else {}  # default float32 tolerances otherwise
    for part in ("params", "state", "optimizer"):
        torch.testing.assert_close(result[part], expected[part], **tolerance, msg=lambda m, part=part: f"{part}: {m}")


# ---------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    "name, variant",
    [(name, "task_params" if name == "selective" else "plain") for name in NAMES]
    + [pytest.param(name, "loop", marks=[] if name == "pcgrad" else [pytest.mark.slow]) for name in GRADIENT]
    + [pytest.param(name, "representation", marks=[] if name == "pcgrad" else [pytest.mark.slow]) for name in GRADIENT],
)
def test_compiled_model_trains_as_the_eager_one(name, variant):
    assert_same_training(worker.run(name, "compiled", variant), reference(name, variant))


def test_representation_space_on_a_model_compiled_whole_raises_naming_the_fix():
    # One compiled region returns the features beside the predictions: the losses do not reach them.
    torch._dynamo.reset()
    model = worker.SharedEncoderModel(with_features=True)
    compiled = torch.compile(model, backend=worker.COMPILE_BACKEND)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = methods.create("mgda", optimizer, worker.NUM_TASKS, shared_params=model.encoder, space="representation")
    x, y = worker.batches()[0]
    with pytest.raises(ValueError, match="compile the encoder and the heads separately"):
        method.step(lambda: worker.squared_errors(compiled(x), y))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["gd", "selective", "pcgrad", "uw"])
def test_inductor_compiled_model_trains_as_the_eager_one(name):
    assert_same_training(
        worker.run(name, "inductor", "task_params" if name == "selective" else "plain"), reference(name)
    )


def test_selective_on_a_compiled_model_without_task_params_raises_naming_it():
    result = worker.run("selective", "compiled")
    assert result.get("error", "").startswith("ValueError") and "task_params=" in result["error"]


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_selective_compiled_leaves_heads_outside_the_group_and_their_state_bitwise_untouched(optimizer_class):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = worker.SharedEncoderModel()
    compiled = torch.compile(model, backend=worker.COMPILE_BACKEND)
    optimizer = optimizer_class(model.parameters(), lr=0.05, weight_decay=0.1)
    heads = [list(head.parameters()) for head in model.heads]
    sel = selgroup_fast.SelectiveGroupUpdate(
        optimizer,
        worker.NUM_TASKS,
        grouping=[[0], [1, 2]],
        order="forward",
        shared_params=model.encoder,
        task_params=heads,
    )
    snapshots = []  # at every forward: each head's parameters and optimizer state

    def snapshot(k):
        return [p.detach().clone() for p in heads[k]], [
            {key: value.clone() for key, value in optimizer.state[p].items()} for p in heads[k]
        ]

    x, y = worker.batches()[0]

    def closure():
        snapshots.append([snapshot(k) for k in range(worker.NUM_TASKS)])
        return [(out - y[:, k]).pow(2).mean() for k, out in enumerate(compiled(x))]

    for _ in range(3):
        sel.step(closure)
    closure()
    steps = [[0], [1, 2]] * 3  # the group stepped between forward m and m + 1
    for m, group in enumerate(steps):
        for k in range(worker.NUM_TASKS):
            before, after = snapshots[m][k], snapshots[m + 1][k]
            if k in group:
                assert not torch.equal(before[0][0], after[0][0])  # it did train
            else:
                torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])  # the heads' gradient unweighted, and weighted
def test_a_gradient_method_runs_one_compiled_backward_per_task(name):
    # A compiled backward computes every gradient of its region: the heads' must come from the
    # K task backwards, not from one more (benchmarks/results/compile_cpu.md).
    torch._dynamo.reset()
    model = worker.SharedEncoderModel()
    compiled = torch.compile(model, backend=worker.COMPILE_BACKEND)
    method = methods.create(
        name, torch.optim.SGD(model.parameters(), lr=0.1), worker.NUM_TASKS, shared_params=model.encoder
    )
    x, y = worker.batches()[0]
    calls = []

    def closure():
        losses = [(out - y[:, k]).pow(2).mean() for k, out in enumerate(compiled(x))]
        node = losses[0].grad_fn
        while type(node).__name__ != "CompiledFunctionBackward":
            node = next(next_node for next_node, _ in node.next_functions if next_node is not None)
        node.register_prehook(lambda grad_outputs: calls.append(len(grad_outputs)))
        return losses

    for _ in range(2):
        method.step(closure)
    assert len(calls) == 2 * worker.NUM_TASKS


@pytest.mark.parametrize(
    "name, variant",
    [(name, "scaled") for name in ("gd", "mgda", "db_mtl", "stch")]
    + [pytest.param(name, "overflow", marks=pytest.mark.slow) for name in ("gd", "mgda", "db_mtl", "stch")],
)
def test_a_compiled_model_with_a_grad_scaler_trains_as_the_eager_one(name, variant):
    # GD, a weighting of G, J with K×P tracked state, a loss weighting; "overflow": the second step skipped.
    compiled, eager = worker.run(name, "compiled", variant), worker.run(name, "eager", variant)
    assert_same_training(compiled, eager)
    assert compiled["skipped_steps"] == eager["skipped_steps"] == (variant == "overflow")
    assert compiled["scale"] == eager["scale"]


def test_representation_space_with_inductor_compiled_encoder_and_heads_trains_as_the_eager_one():
    # J w.r.t. the features runs the heads' compiled backward, which cannot run under vmap with
    # Inductor (aot_eager's happens to): the default jacobian="batched" must loop.
    assert_same_training(worker.run("mgda", "inductor", "representation"), reference("mgda", "representation"))


# ---------------------------------------------------------------------- DDP and FSDP2

SUPPORTED = (
    [distributed_case(name, "ddp") for name in NAMES]
    + [
        distributed_case(name, "fsdp2", "task_params" if name == "selective" else "plain")
        for name in NAMES
        if name not in TRACKED
    ]
    + [
        distributed_case(name, config, variant)
        for name in GRADIENT
        for config in ("ddp", "fsdp2")
        for variant in ("loop", "chunked")
    ]
    + [distributed_case(name, "ddp", variant) for name in TRACKED + TWO_BATCH for variant in ("loop", "chunked")]
    + [distributed_case(name, "ddp", "unseeded") for name in ["pcgrad", "graddrop", "selective"]]
    + [distributed_case("graddrop", "fsdp2", "unseeded")]
    + [distributed_case("nash_mtl", config, "reuse") for config in ("ddp", "fsdp2")]
    + [
        distributed_case(name, config, "process_group")
        for name, config in [("pcgrad", "ddp"), ("selective", "ddp"), ("famo", "ddp"), ("mgda", "fsdp2")]
    ]
    + [distributed_case(name, config, "representation") for name in GRADIENT for config in ("ddp", "fsdp2")]
    + [
        distributed_case("selective", "ddp_compiled", "task_params"),
        distributed_case("pcgrad", "ddp_compiled"),
        distributed_case("mgda", "ddp_compiled", "representation"),
    ]
)


#: The configurations a method refuses at construction, with the start of its one error line (docs/baselines.md).
REFUSED = {
    # The two-batch methods read J_1 J_2ᵀ over the shared parameters, whose columns FSDP2 splits over ranks.
    ("modo", "fsdp2", "plain"): "ValueError: modo reads J_1 J_2ᵀ of two batches' task gradients",
    ("sdmgrad", "fsdp2", "plain"): "ValueError: sdmgrad reads J_1 J_2ᵀ of two batches' task gradients",
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", SUPPORTED)
def test_two_ranks_train_as_one_process_on_the_global_batch(case, distributed):
    name, _, variant = case
    rank0, rank1 = (ranks[case] for ranks in distributed)
    if case in REFUSED:
        assert rank0.get("error", "").startswith(REFUSED[case]) and rank1.get("error") == rank0["error"], rank0
        return
    assert_same_training(rank1, rank0, exact=True)  # the ranks agree bitwise (random draws included)
    if variant != "unseeded":
        # GradDrop under FSDP2: each rank draws U for its own columns; one draw unlike the one-process
        # run's flips a conflicting column's sign, far beyond the float32 tolerance.
        assert_same_training(rank0, reference(name, variant))
    if variant == "process_group":
        assert all(rank0["through_the_group"]) and rank0["through_the_group"], "a collective bypassed process_group="


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "case",
    [
        distributed_case(name, "fsdp2", variant)
        for name in (worker.FINITE_COLUMN_SUM, "graddrop", "mgda", "uw", "gd")
        for variant in ("scaled", "overflow")
    ]
    + [distributed_case(name, "ddp", variant) for name in ("pcgrad", "uw") for variant in ("scaled", "overflow")]
    + [distributed_case(worker.FINITE_COLUMN_SUM, "fsdp2", "overflow_raise")],
)
def test_a_grad_scaler_skips_on_every_rank_or_on_none(case, distributed):
    """A scaled run trains as the unscaled one-process run; an overflow skips the second step on both ranks and backs
    both scales off, as the one process on the global batch does. Under FSDP2 the overflow is in rank 0's shard only
    (its columns of J; the finite column sum's direction drops it, so that only rank 0's check of J sees it)."""
    name, _, variant = case
    rank0, rank1 = (ranks[case] for ranks in distributed)
    assert_same_training(rank1, rank0, exact=True)
    expected = reference(name, variant)  # "scaled": the run without a scaler
    assert_same_training(rank0, expected)
    skipped = int(variant in worker.OVERFLOW_VARIANTS)
    assert expected["skipped_steps"] == skipped  # the one process skipped it too
    for result in (rank0, rank1):
        assert (result["skipped_steps"], result["scale"]) == (skipped, worker.SCALE / 2**skipped)


SHARED_SIZE = worker.HIDDEN * (worker.IN_FEATURES + 1)  # P_s: the encoder's weight and bias
HEADS_SIZE = worker.NUM_TASKS * (worker.HIDDEN + 1)  # P_h
#: Under FSDP2 the gradient methods' ONE reduce-scatter of the K task gradients: every rank's K rows of
#: its shards, each parameter's shard padded to ⌈rows / W⌉ rows (a head's single row: one row per rank).
TASK_GRADIENTS_SCATTERED = worker.WORLD_SIZE * worker.NUM_TASKS * (SHARED_SIZE // worker.WORLD_SIZE + HEADS_SIZE)


#: The non-finite guard's flags (``nonfinite="skip"``, the default): one all-reduce of K numbers after the forward.
GUARD = [worker.NUM_TASKS]


@pytest.mark.parametrize(
    "case, per_step",
    [
        # J and the heads' per-task gradients, in one all-reduce
        (("pcgrad", "ddp", "plain"), {"all_reduce": [*GUARD, worker.NUM_TASKS * (SHARED_SIZE + HEADS_SIZE)]}),
        # the losses before and after the step
        (("famo", "ddp", "plain"), {"all_reduce": [*GUARD, worker.NUM_TASKS, worker.NUM_TASKS]}),
        (("uw", "fsdp2", "plain"), {"all_reduce": [*GUARD, worker.NUM_TASKS]}),  # (and FSDP2's own reduce-scatters)
        # the task gradients in one reduce-scatter (FSDP2 reduces none), the Gram matrix
        (
            ("mgda", "fsdp2", "plain"),
            {"reduce_scatter": [TASK_GRADIENTS_SCATTERED], "all_reduce": [*GUARD, worker.NUM_TASKS**2]},
        ),
        (("graddrop", "fsdp2", "plain"), {"reduce_scatter": [TASK_GRADIENTS_SCATTERED], "all_reduce": GUARD}),
        # with a grad scaler the guard's flag crosses the ranks after the backward, with the scaler's: 2 numbers
        (("graddrop", "fsdp2", "scaled"), {"reduce_scatter": [TASK_GRADIENTS_SCATTERED], "all_reduce": [2]}),
        # nonfinite="raise" must know its flags before the backward: the scaler's cross the ranks in one more
        ((worker.FINITE_COLUMN_SUM, "fsdp2", "overflow_raise"), {"all_reduce": [*GUARD, 2]}),
        # the features' Gram matrix (the reducer / FSDP2 averages the one backward's gradients)
        (("pcgrad", "ddp", "representation"), {"all_reduce": [*GUARD, worker.NUM_TASKS**2]}),
        (("mgda", "fsdp2", "representation"), {"all_reduce": [*GUARD, worker.NUM_TASKS**2]}),  # (and FSDP2's own)
        # each rank combines its own samples' feature columns
        pytest.param(("graddrop", "ddp", "representation"), {"all_reduce": GUARD}, marks=pytest.mark.slow),
    ],
)
def test_the_methods_own_communication_is_what_the_readme_says(case, per_step, distributed):
    """The collectives issued from Python per step (DDP's reducer's are not counted), of the kinds listed."""
    for step in distributed[0][case]["collectives"]:
        assert {kind: [numel for called, numel in step if called == kind] for kind in per_step} == per_step
    assert len(distributed[0][case]["collectives"]) == worker.STEPS


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "case",
    [distributed_case(name, "fsdp2") for name in TRACKED]
    + [distributed_case(name, "ddp", "representation") for name in TRACKED],
)
def test_the_tracked_methods_refuse_sharded_and_feature_jacobians_in_one_line(case, distributed):
    name, config, _ = case
    expected = "does not support sharded" if config == "fsdp2" else "keeps a state per task over the shared param"
    for ranks in distributed:
        error = ranks[case].get("error", "")
        assert error.startswith(f"ValueError: {name}") and expected in error and "\n" not in error, error


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", [distributed_case("selective", "fsdp2")])
def test_selective_under_fsdp2_without_task_params_raises_naming_it(case, distributed):
    for ranks in distributed:
        error = ranks[case].get("error", "")
        assert error.startswith("ValueError") and "task_params=" in error, error


def test_process_group_without_torch_distributed_is_refused():
    model = worker.SharedEncoderModel()
    optimizer = torch.optim.Adam(model.parameters())
    for name in ["selective", "pcgrad", "uw", "gd"]:
        with pytest.raises(ValueError, match="process_group= needs torch.distributed initialised"):
            methods.create(name, optimizer, worker.NUM_TASKS, shared_params=model.encoder, process_group=object())


# ---------------------------------------------------------------------- task_params= checks


def bad_task_params_cases():
    model = worker.SharedEncoderModel()
    heads = [list(head.parameters()) for head in model.heads]
    return [
        pytest.param(
            model,
            [*heads[:2], heads[2] + [model.encoder.weight]],
            "in task_params[2] and in shared_params",
            id="overlap-with-shared",
        ),
        pytest.param(
            model,
            [heads[0], heads[1] + heads[0][:1], heads[2]],
            "in task_params[1] and in task_params[0]",
            id="in-two-tasks",
        ),
        pytest.param(model, heads[:2], "got 2 for num_tasks=3", id="wrong-K"),
        pytest.param(model, model.heads[0], "must be a list of K iterables", id="not-a-list"),
    ]


@pytest.mark.parametrize("name", ["selective", "pcgrad", "uw"])
@pytest.mark.parametrize("model, task_params, message", bad_task_params_cases())
def test_bad_task_params_get_a_clear_error(name, model, task_params, message):
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        methods.create(name, optimizer, worker.NUM_TASKS, shared_params=model.encoder, task_params=task_params)


def test_task_params_outside_the_optimizer_are_refused():
    model = worker.SharedEncoderModel()
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.heads[0].parameters()])
    with pytest.raises(ValueError, match="not in the optimizer"):
        selgroup_fast.SelectiveGroupUpdate(
            optimizer,
            worker.NUM_TASKS,
            shared_params=model.encoder,
            task_params=[list(head.parameters()) for head in model.heads],
        )
