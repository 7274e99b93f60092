"""Trimmed mean: the coordinate-wise Byzantine-robust mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int
from .weighting import Aggregator


class TrimmedMean(Aggregator):
    """Trimmed mean: per coordinate, the mean of the task gradients less the ``t`` largest and ``t`` smallest.

    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018 (Definition 2); TorchJD 0.18 ``TrimmedMean``.

    Rule: ``d_p = mean of J[t : K − t, p]`` after sorting column p (t = ``trim_number``).
    Not a weighting: each coordinate keeps other rows, so no K weights of G give d, and the
    Gramian path (``jacobian="gramian"``) refuses it with one error. Each column of the
    direction depends on that column of J only: under FSDP2 every rank combines the columns
    of its shards (:meth:`combine_columns`). Plain torch on the device (one sort along the K
    rows, one mean; no host synchronisation). A column with a NaN or an infinity gives NaN (the sort would trim
    it away silently; the library flags non-finite gradients, :mod:`selgroup_fast.methods.nonfinite`), where
    TorchJD's trims it.

    Convention: the heads get ``Σ_k ∇L_k``. Options: ``trim_number=1`` (TorchJD requires it;
    ours the least that trims; ``K ≥ 2t + 1``, i.e. t < K/2, checked at construction). Stateless.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 100.0], [2.0, 0.0], [3.0, -1.0]])
        >>> selgroup_fast.methods.aggregate("trimmed_mean", J)   # the median of 3 rows, per column
        tensor([2., 0.])
    """

    name = "trimmed_mean"

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        trim_number: int = 1,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.trim_number = check_int("trim_number", trim_number, minimum=0)
        if num_tasks < 2 * self.trim_number + 1:
            raise ValueError(
                f"trimmed_mean needs num_tasks >= 2 * trim_number + 1, got {num_tasks} for trim_number={trim_number}"
            )

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ordered = jacobian.sort(dim=0).values
        kept = ordered.narrow(0, self.trim_number, self.num_tasks - 2 * self.trim_number)
        # The sort moves NaN to the end, where it is trimmed: a non-finite column gives NaN, flagged, not hidden.
        # Sorted, a column holds a non-finite entry iff its first (−inf) or last (+inf, NaN) is: two rows, not K.
        finite = ordered[0].isfinite() & ordered[-1].isfinite()
        direction = torch.where(finite, kept.mean(dim=0), torch.nan)
        return (direction if out is None else out.copy_(direction)), None

    def combine_columns(self, jacobian: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The direction of some columns of a wider J (``runs``: their (first global column, width) runs, unused:
        each column is its own)."""
        return self.combine(jacobian)[0]
