"""Reading the K task losses that a training closure returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch

#: What a closure may return: K scalar tensors as a list/tuple, a dict in task
#: order, or a 1-D tensor of K losses.
ClosureOutput = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor]


def task_losses(output: ClosureOutput, num_tasks: int) -> list[torch.Tensor]:
    """Returns the K task losses of a closure's output as a list of 0-d tensors.

    Raises ``TypeError``/``ValueError`` naming the problem when the output is not
    K real scalar losses. Values are not inspected (that would synchronise a GPU):
    non-finite or negative losses are the callers' documented concern.
    """
    if isinstance(output, torch.Tensor):
        if output.dim() != 1:
            raise ValueError(f"a tensor of task losses must be 1-D with {num_tasks} entries, got shape {tuple(output.shape)}")
        losses = list(output.unbind(0))
    elif isinstance(output, Mapping):
        losses = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        losses = list(output)
    else:
        raise TypeError(
            "the closure must return the task losses as a list/tuple of scalar tensors, a dict of them "
            f"or a 1-D tensor, got {type(output).__name__}"
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
    return [loss.reshape(()) for loss in losses]
