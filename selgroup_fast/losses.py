"""Reading what a training closure returns: the K task losses and, optionally, the shared features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch

#: The K task losses: K scalar tensors as a list/tuple, a dict in task order, or a 1-D tensor of K losses.
TaskLosses = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor]
#: What a closure may return: the task losses, or ``(losses, features)`` where ``features`` is the
#: shared representation ``z`` (the encoder's output: a tensor, or a sequence of tensors for several
#: shared outputs) that ``space="representation"`` differentiates with respect to.
ClosureOutput = Union[TaskLosses, tuple[TaskLosses, Union[torch.Tensor, Sequence[torch.Tensor]]]]


class ClosureResult(NamedTuple):
    """A closure's output, read: K 0-d losses and the shared features (empty when none were returned)."""

    losses: list[torch.Tensor]
    features: tuple[torch.Tensor, ...]


def parse_closure_output(output: ClosureOutput, num_tasks: int) -> ClosureResult:
    """Reads a closure's output into its K task losses (0-d tensors) and its shared features.

    Raises ``TypeError``/``ValueError`` naming the problem when the output is not K real
    scalar losses (optionally with features). Values are not inspected (that would
    synchronise a GPU): non-finite or negative losses are the callers' documented concern.
    With one task, return ``([loss], features)`` (a bare ``(loss, features)`` reads as two losses).

    Example::

        >>> z = torch.ones(2, 3, requires_grad=True)
        >>> result = parse_closure_output(([z.sum(), z.mean()], z), 2)
        >>> len(result.losses), result.features[0] is z
        (2, True)
    """
    features: tuple[torch.Tensor, ...] = ()
    # A pair (losses, features) is told apart from two scalar losses by its first item, itself a
    # collection of losses (a list, tuple, dict or a tensor of more than one element).
    first = output[0] if isinstance(output, tuple) and len(output) == 2 else None
    if isinstance(first, (Sequence, Mapping)) or (isinstance(first, torch.Tensor) and first.numel() > 1):
        shared: Any = output[1]  # type: ignore[index]
        output = first  # type: ignore[assignment]
        features = (shared,) if isinstance(shared, torch.Tensor) else tuple(shared)
        for i, feature in enumerate(features):
            if not isinstance(feature, torch.Tensor) or not feature.is_floating_point():
                raise TypeError(f"features {i} must be a floating-point tensor, got {type(feature).__name__}")
    if isinstance(output, torch.Tensor):
        if output.dim() != 1:
            raise ValueError(f"a tensor of task losses must be 1-D with {num_tasks} entries, got shape {tuple(output.shape)}")
        losses = list(output.unbind(0))
    elif isinstance(output, Mapping):
        losses = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        losses = list(output)  # type: ignore[arg-type]
    else:
        raise TypeError(
            "the closure must return the task losses as a list/tuple of scalar tensors, a dict of them "
            f"or a 1-D tensor (optionally as (losses, features)), got {type(output).__name__}"
        )
    if len(losses) != num_tasks:
        raise ValueError(f"the closure returned {len(losses)} losses, expected num_tasks={num_tasks}")
    for k, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {k} is a {type(loss).__name__}, expected a scalar torch.Tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {k} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"loss {k} must be a floating-point tensor, got {loss.dtype}")
    return ClosureResult([loss.reshape(()) for loss in losses], features)
