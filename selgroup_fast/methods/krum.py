"""Krum and Multi-Krum: Byzantine-robust selection of task gradients (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import torch

from ..checks import check_int
from .weighting import Weighting


class Krum(Weighting):
    """Krum: the task gradient(s) closest to their ``K − f − 2`` nearest neighbours.

    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017; TorchJD 0.18 ``Krum``.

    Rule: the pairwise distances from G, ``‖g_i − g_j‖ = sqrt(G_ii + G_jj − 2 G_ij)``;
    the score of i is the sum of its ``K − f − 2`` smallest distances to the other rows
    (f = ``n_byzantine``); the ``n_selected`` rows of least score are averaged
    (Multi-Krum; 1: Krum). As TorchJD, the score sums distances; the paper's sums their
    squares, which can select another row where distances are uneven (docs/baselines.md).
    Plain torch on the device: one K×K elementwise pass, a ``topk`` per row and one over
    the scores, no host synchronisation, and the weights are a function of G: the
    Gramian path applies. Ties (duplicate rows) are broken as
    ``torch.topk`` breaks them, as in TorchJD.

    Options: ``n_byzantine=0`` (TorchJD requires it; f ≥ 0 with ``K ≥ f + 3``, TorchJD's
    bound; the paper's guarantee needs ``K > 2f + 2``), ``n_selected=1`` (TorchJD's;
    1 ≤ m ≤ K). Both are checked against K at construction. Stateless.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [1.2, 0.0], [0.95, 0.1], [-5.0, 9.0]])
        >>> selgroup_fast.methods.aggregate("krum", J)   # the most central row; never the outlier
        tensor([1., 0.])
    """

    name = "krum"

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        n_byzantine: int = 0,
        n_selected: int = 1,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.n_byzantine = check_int("n_byzantine", n_byzantine, minimum=0)
        self.n_selected = check_int("n_selected", n_selected)
        if num_tasks < self.n_byzantine + 3:
            raise ValueError(f"krum needs num_tasks >= n_byzantine + 3, got {num_tasks} for n_byzantine={n_byzantine}")
        if self.n_selected > num_tasks:
            raise ValueError(f"krum: n_selected must be at most num_tasks={num_tasks}, got {n_selected}")

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        squared_norms = gram.diagonal()
        distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp_min(0).sqrt()
        # A row's own distance is exactly 0, so the first of its K − f − 1 smallest: dropped.
        closest = distances.topk(self.num_tasks - self.n_byzantine - 1, dim=1, largest=False).values
        scores = closest[:, 1:].sum(dim=1)
        selected = scores.topk(self.n_selected, largest=False).indices
        weights = torch.zeros_like(squared_norms)
        return weights.index_fill_(0, selected, 1.0 / self.n_selected)
