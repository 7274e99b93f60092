"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from .. import ops
from .weighting import Weighting


def seeded_generator(
    device: torch.device, seed: int | None, generator: torch.Generator | None = None
) -> torch.Generator:
    """``generator`` (a method's ``generator=``), else one on ``device`` seeded with ``seed`` or from torch's global
    RNG (reproducible under ``manual_seed``); ``seed=`` and ``generator=`` together are one ``ValueError`` line."""
    if generator is not None and seed is not None:
        raise ValueError("give seed= or generator=, not both")
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())  # CPU RNG at construction only: no device sync
    return torch.Generator(device=device).manual_seed(seed)


def projection_orders(num_tasks: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """K random permutations of 0..K-1 (row i: the order task i is projected in), drawn on ``device``."""
    return torch.rand(num_tasks, num_tasks, generator=generator, device=device).argsort(dim=1)


class PCGrad(Weighting):
    """PCGrad: each task gradient is projected off the others it conflicts with, then all are summed.

    T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020 (arXiv 2001.06782), Algorithm 1.

    For every task i, in a random order of the other tasks j: if ``g_i^PC · g_j < 0``,
    ``g_i^PC -= (g_i^PC · g_j) / ‖g_j‖² · g_j``. Everything is a function of the Gram
    matrix, so the fused op ``ops.pcgrad_weights`` returns the weights ``w`` with
    ``d = wᵀJ = Σ_i g_i^PC``.

    Convention: the **sum** of the projected gradients (the authors' code, the Nash-MTL
    benchmark code with its default ``reduction="sum"``, and TorchJD), so with no
    conflict PCGrad equals GD on ``Σ_k L_k``. The heads get ``∇ Σ_k L_k``. The random
    orders are drawn on the device from the generator (one K×K uniform draw, arg-sorted
    per row), so the method is reproducible and never syncs; the generator's state is
    the method's state. Not permutation-equivariant for one draw (the orders are not
    permuted with the tasks).

    Options: ``seed`` (int, default: drawn from torch's global RNG) or ``generator``
    (a ``torch.Generator`` on the device).

    Example::

        >>> import torch, selgroup_fast
        >>> enc, heads = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
        >>> m = selgroup_fast.methods.create("pcgrad", opt, 2, shared_params=enc.parameters(), seed=0)
        >>> x = torch.randn(8, 4)
        >>> m.step(lambda: list(heads(enc(x)).pow(2).mean(0))).shape
        torch.Size([2])
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("pcgrad", J)
        tensor([0.5000, 1.5000])
    """

    name = "pcgrad"
    saved_state = ("generator",)

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.generator = seeded_generator(self.device, seed, generator)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.pcgrad_weights(gram, projection_orders(gram.shape[0], gram.device, self.generator))
