"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .weighting import Aggregator

Leak = float | Sequence[float] | torch.Tensor | None


class GradDrop(Aggregator):  # and a CombinesColumns (selgroup_fast.methods.weighting)
    """GradDrop: per coordinate, keep only the task gradients of one sign, drawn by sign purity.

    Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov,
    "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020 (arXiv 2010.06808).

    For every coordinate p: purity ``P = ½ (1 + Σ_k g_kp / Σ_k |g_kp|)``, a uniform ``U``;
    keep the positive entries if ``U < P``, else the negative ones;
    ``d_p = Σ_k (leak_k + (1-leak_k) mask_kp) g_kp``. The fused op ``ops.graddrop`` does
    it in ONE pass over J (one read, one write) with a counter-based RNG keyed by
    ``(seed, offset, p)``: the CPU and CUDA kernels draw the same U, and each call
    advances ``offset`` by one.

    Convention: the **sum** over tasks of the kept gradients (as the paper and the
    LibMTL/TorchJD implementations: with no sign conflict GradDrop equals GD on
    ``Σ_k L_k``). With ``space="parameters"`` it acts on the gradients of the shared
    parameters (the common benchmark code); with ``space="representation"`` on those
    of the last shared activation (the paper's place). The heads get ``∇ Σ_k L_k``.
    Not a weighting of the task gradients (it needs J, not only its Gram matrix).

    Options: ``leak=0.0`` (a float or K floats), ``seed`` (default: drawn from torch's
    global RNG), ``offset=0``. State: ``seed`` and ``offset``.

    Each column of the direction depends on that column of J only: under FSDP2 every rank
    combines the columns of its shards (:meth:`combine_columns`, with their global column
    indices, so that it draws the one-process run's U).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, -2.0], [3.0, -1.0]])   # no sign conflict: the sum
        >>> selgroup_fast.methods.aggregate("graddrop", J, seed=0)
        tensor([ 4., -3.])
    """

    name = "graddrop"
    saved_state = ("seed", "offset")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        leak: Leak = None,
        seed: int | None = None,
        offset: int = 0,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        values = torch.as_tensor(0.0 if leak is None else leak, dtype=dtype).to(self.device)
        if values.dim() == 0:
            values = values.expand(num_tasks)
        if values.shape != (num_tasks,):
            raise ValueError(f"leak must be a float or {num_tasks} floats, got shape {tuple(values.shape)}")
        self.leak = values.contiguous()
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.offset = int(offset)

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        direction = ops.graddrop(jacobian.contiguous(), self.leak.to(jacobian.dtype), self.seed, self.offset)
        self.offset += 1
        return (direction if out is None else out.copy_(direction)), None

    def combine_columns(self, jacobian: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The direction of some columns of a wider J: ``jacobian``'s columns are ``runs`` of the global ones.

        ``runs`` holds (first global column, width) per run, in ``jacobian``'s column order
        (widths summing to its width). One step: ``offset`` advances once, as in :meth:`combine`.

        >>> J = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, 1.0]])
        >>> whole = GradDrop(2, seed=4).combine(J)[0]
        >>> torch.equal(GradDrop(2, seed=4).combine_columns(J[:, [0, 2]], [(0, 1), (2, 1)]), whole[[0, 2]])
        True
        """
        leak = self.leak.to(jacobian.dtype)
        pieces, start = [], 0
        for first_column, width in runs:
            if width > 0:  # a rank's shard may be empty
                columns = jacobian[:, start : start + width].contiguous()
                pieces.append(ops.graddrop(columns, leak, self.seed, self.offset, first_column))
            start += width
        if start != jacobian.shape[1]:
            raise ValueError(f"the runs cover {start} columns, the jacobian has {jacobian.shape[1]}")
        self.offset += 1
        return torch.cat(pieces) if pieces else jacobian.new_zeros(0)
