"""Gradient Vaccine: EMA targets of the tasks' gradient cosines (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int
from .cr_mogm import check_unit_interval
from .pcgrad import seeded_generator
from .tracked import check_decay_exponent
from .weighting import Aggregator, ParameterLayout, Weighting


def vaccine_orders(num_tasks: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """K × (K − 1): row i, the other tasks in the order task i visits them, drawn on ``device``.

    One ``randperm(K − 1)`` per task in turn, as TorchJD's ``GradVac`` draws them from torch's global RNG:
    on the CPU, a generator seeded ``s`` gives TorchJD's orders under ``torch.manual_seed(s)``.
    """
    positions = (
        torch.stack([torch.randperm(num_tasks - 1, generator=generator, device=device) for _ in range(num_tasks)])
        if num_tasks > 1
        else torch.zeros(1, 0, dtype=torch.long, device=device)
    )
    return positions + (positions >= torch.arange(num_tasks, device=device)[:, None])  # skip task i itself


def vaccinate(
    grams: torch.Tensor, targets: torch.Tensor, orders: torch.Tensor, beta: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac's step on B independent blocks at once, from their Gram matrices (B × K × K) and targets (B × K × K).

    Returns the weights (B × K: block b's direction is ``w_bᵀ J_b``) and the new targets. ``g_i^PC = Σ_k C_ik g_k``,
    so ``(C G)_ij = g_i^PC · g_j`` and ``‖g_i^PC‖² = (C G C ᵀ)_ii``; the K tasks' corrections are independent, so
    all tasks' j-th visits (``orders[:, j]``, the same in every block, as LibMTL's) are one batched update.
    """
    blocks, count = grams.shape[0], grams.shape[1]
    rows = torch.arange(count, device=grams.device)
    coefficients = torch.eye(count, device=grams.device, dtype=grams.dtype).repeat(blocks, 1, 1)
    products = grams.clone()
    norms = grams.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # B × K
    targets = targets.clone()
    for visit in range(count - 1):
        others = orders[:, visit]
        cosine_now = products[:, rows, others]
        norm_now = (products * coefficients).sum(dim=2).clamp_min(0).sqrt()
        norm_other = norms[:, others]
        cosine = cosine_now / (norm_now * norm_other + eps)
        target = targets[:, rows, others]
        sine, target_sine = (1 - cosine.square()).clamp_min(0).sqrt(), (1 - target.square()).clamp_min(0).sqrt()
        step = norm_now * (target * sine - cosine * target_sine) / (norm_other * target_sine + eps)
        step = torch.where(cosine < target, step, torch.zeros_like(step))
        coefficients[:, rows, others] += step
        products += step[:, :, None] * grams[:, others]
        targets[:, rows, others] = (1 - beta) * target + beta * cosine
    return coefficients.sum(dim=1), targets


class GradVac(Weighting):
    """GradVac: each task gradient is moved towards every other task's until their cosine reaches its EMA target.

    Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (arXiv 2010.05874), Algorithm 1; TorchJD's
    ``GradVac`` (0.18, the whole vector). Rule, for every task i and every other task j in a seeded random
    order, ``g_i^PC`` starting at ``g_i``::

        φ = cos(g_i^PC, g_j),   φ̂ = the target φ̂_ij
        if φ < φ̂:  g_i^PC += ‖g_i^PC‖ (φ̂ sqrt(1 − φ²) − φ sqrt(1 − φ̂²)) / (‖g_j‖ sqrt(1 − φ̂²) + eps) · g_j
        φ̂_ij ← (1 − beta) φ̂_ij + beta φ                (φ̂ = 0 at first)
        d = Σ_i g_i^PC

    All of it from G: ``g_i^PC = Σ_k C_ik g_k`` and ``w = Σ_i C_i``. The K tasks' corrections are
    independent of each other, so the step takes K − 1 batched updates (all tasks' j-th visit at once) on the
    device, with no host sync, where TorchJD loops over the K (K − 1) pairs on the host. A weighting of G:
    every path of the gradient step serves it. The heads get their own gradients. Not permutation
    invariant for one draw (the orders are not permuted with the tasks). State (saved, on the device): φ̂
    (K × K) and the generator of the orders.

    Options: ``beta=0.5`` (in [0, 1]) and ``eps=1e-8`` (≥ 0), TorchJD's names and defaults; ``seed`` (int,
    default: drawn from torch's global RNG) or ``generator`` (a ``torch.Generator`` on the device), as PCGrad's.

    Example::

        >>> import torch, selgroup_fast
        >>> vac = selgroup_fast.methods.aggregator("gradvac", 2, dtype=torch.float64, seed=0)
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> vac(J).round(decimals=12)   # φ̂ = 0: g_0^PC = (½, ½) ⊥ g_1, g_1^PC = (0, 1) ⊥ g_0
        tensor([0.5000, 1.5000], dtype=torch.float64)
    """

    name = "gradvac"
    saved_state = ("targets", "generator")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        beta: float = 0.5,
        eps: float = 1e-8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.beta = check_unit_interval("beta", beta)
        self.eps = check_decay_exponent("eps", eps)
        self.generator = seeded_generator(self.device, seed, generator)
        #: φ̂: the EMA targets of the cosines, ``targets[i, j]`` for ``g_i^PC`` against ``g_j``.
        self.targets = torch.zeros(num_tasks, num_tasks, device=self.device, dtype=dtype)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        orders = vaccine_orders(gram.shape[0], gram.device, self.generator)
        weights, targets = vaccinate(gram[None], self.targets.to(gram.dtype)[None], orders, self.beta, self.eps)
        self.targets = targets[0].to(self.targets.dtype)
        return weights[0]


#: LibMTL's ``GradVac_group_type`` granularities: one block (0, ``"whole_model"``) or each shared parameter tensor
#: (2, ``"all_matrix"``); ``block_sizes=`` gives any other grouping (LibMTL's 1, ``"all_layer"``: each leaf module's
#: parameter count, in the order of the shared parameters).
GROUP_TYPES: tuple[str, ...] = ("whole_model", "all_matrix")


class BlockwiseGradVac(Aggregator):
    """GradVac per block of the shared parameters (LibMTL's ``GradVac_group_type`` 1 and 2): one target φ̂ per task
    pair and block, each block vaccinated on its own columns of J with the same visiting orders.

    Block b's direction is ``w_bᵀ J_b`` with ``w_b`` from ``G_b = J_b J_bᵀ`` (:func:`vaccinate`, all blocks in one
    batched step). It reads J's columns block by block: not a weighting of one G, so no Gramian path, no
    representation space (no parameter blocks there), no FSDP2 (J's columns split over ranks); DDP and
    ``torch.compile`` as for the other methods (:attr:`needs` names the shared parameters' layout, so the
    training step refuses the others). The blocks are the shared parameters' (bound by the training step,
    :meth:`bind`) or ``block_sizes``. The targets are updated at every visit (the paper's
    Algorithm 1 and TorchJD's); LibMTL updates them only where it corrects. State (saved, on the device): the
    B × K × K targets and the generator.
    """

    name = "gradvac"
    needs = frozenset({"parameter_layout"})
    saved_state = ("targets", "generator")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        beta: float,
        eps: float,
        seed: int | None,
        generator: torch.Generator | None,
        block_sizes: Sequence[int] | None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.beta = check_unit_interval("beta", beta)
        self.eps = check_decay_exponent("eps", eps)
        self.generator = seeded_generator(self.device, seed, generator)
        self.block_sizes: list[int] = []
        #: φ̂ per block: ``targets[b, i, j]`` (B × K × K; B = 0 until the blocks are bound).
        self.targets = torch.zeros(0, num_tasks, num_tasks, device=self.device, dtype=dtype)
        if block_sizes is not None:
            self.bind(ParameterLayout(tuple(check_int("block_sizes", size) for size in block_sizes)))

    def bind(self, layout: ParameterLayout) -> None:
        """Takes the blocks' widths (the shared parameters' sizes, from the training step) and allocates φ̂ once."""
        sizes = list(layout.block_sizes)
        if self.block_sizes and self.block_sizes != sizes:
            raise ValueError(f"gradvac: blocks of sizes {self.block_sizes} given, the step's are {sizes}")
        if not self.block_sizes:
            self.block_sizes = list(sizes)
            self.targets = torch.zeros(len(sizes), self.num_tasks, self.num_tasks, device=self.device, dtype=self.dtype)

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if sum(self.block_sizes) != jacobian.shape[1]:
            raise ValueError(
                f"gradvac: its blocks cover {sum(self.block_sizes)} columns, J has {jacobian.shape[1]}: train it with "
                'a gradient method\'s step (space="parameters") or pass block_sizes='
            )
        blocks = jacobian.split(self.block_sizes, dim=1)
        grams = torch.stack([block @ block.T for block in blocks])
        orders = vaccine_orders(self.num_tasks, jacobian.device, self.generator)
        weights, targets = vaccinate(grams, self.targets.to(jacobian.dtype), orders, self.beta, self.eps)
        self.targets = targets.to(self.targets.dtype)
        direction = torch.empty(jacobian.shape[1], device=jacobian.device, dtype=jacobian.dtype) if out is None else out
        for block, block_weights, part in zip(blocks, weights, direction.split(self.block_sizes), strict=True):
            torch.mv(block.T, block_weights, out=part)
        return direction, None


def gradvac(
    num_tasks: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    group_type: str = "whole_model",
    block_sizes: Sequence[int] | None = None,
) -> Aggregator:
    """The ``gradvac`` aggregator: :class:`GradVac` (the whole vector, a weighting of G) or, with ``group_type=
    "all_matrix"`` or ``block_sizes=``, :class:`BlockwiseGradVac` (per block, LibMTL's ``GradVac_group_type``).

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    >>> gradvac(2, dtype=torch.float64, seed=0, block_sizes=[2, 1])(J)   # the first block as GradVac's example
    tensor([0.5000, 1.5000, 2.0000], dtype=torch.float64)
    """
    if group_type not in GROUP_TYPES:
        raise ValueError(f"gradvac: group_type must be one of {GROUP_TYPES}, got {group_type!r}")
    if group_type == "whole_model" and block_sizes is None:
        return GradVac(num_tasks, device, dtype, beta=beta, eps=eps, seed=seed, generator=generator)
    return BlockwiseGradVac(
        num_tasks, device, dtype, beta=beta, eps=eps, seed=seed, generator=generator, block_sizes=block_sizes
    )
