"""GD: plain multi-task gradient descent on the sum of the task losses."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..losses import ClosureOutput
from .base import MultiTaskMethod, detached


class GD(MultiTaskMethod):
    """One backward of ``Σ_k L_k`` and one optimizer step per batch (equal loss weights).

    The baseline every table of the paper is measured against (Table E.1's "GD").

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> gd = selgroup_fast.methods.create("gd", opt, num_tasks=2)
        >>> x = torch.randn(8, 4)
        >>> losses = gd.step(lambda: list(model(x).pow(2).mean(0)))
        >>> losses.shape
        torch.Size([2])
    """

    name = "gd"

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._forward(closure)
        self._nonfinite.check(losses)
        with self._timer.phase("backward"):
            self._scaling.loss(torch.stack(losses).sum()).backward()
        self._scaling.unscale_optimizers(self.optimizer)
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.optimizer)
        self._scaling.update()
        return detached(losses)
