"""The paper's multi-task model: a ViT encoder with one single-conv decoder per task (the bench's and the trainer's).

Jeong & Yoon (ICLR 2025), Appendix C / Table C.1: a ViT encoder shared by all tasks
and, as each task's decoder, a single convolution producing a dense map. Here the
encoder is a timm ViT built without pretrained weights (nothing is downloaded); the
patch tokens are reshaped to the patch grid, each task's 1×1 convolution maps them
to its output channels, and the map is upsampled bilinearly to the image size.
Targets are synthetic (generated once on the device from a fixed seed); the tasks, their
presets and losses are those of :mod:`selgroup_fast.tasks` (cross-entropy for
segmentation-like tasks, L1 for regression tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tasks import PRESETS, TaskSpec, task_losses
from .factory import BenchModel, ModelError, ModelRequest


def generic_tasks(num_tasks: int) -> list[TaskSpec]:
    """K tasks cycling through the NYUD kinds (semseg, depth, normals, edge, semseg_2, ...)."""
    if num_tasks < 1:
        raise ValueError(f"the number of tasks must be positive, got {num_tasks}")
    base = PRESETS["nyud"]
    specs = []
    for k in range(num_tasks):
        spec = base[k % len(base)]
        cycle = k // len(base)
        specs.append(TaskSpec(spec.name if cycle == 0 else f"{spec.name}_{cycle + 1}", spec.kind, spec.channels))
    return specs


def parse_tasks(text: str) -> list[TaskSpec]:
    """The tasks named by ``--tasks``: a preset of :data:`selgroup_fast.tasks.PRESETS` or a number K."""
    key = text.strip().lower()
    if key in PRESETS:
        return list(PRESETS[key])
    try:
        num_tasks = int(key)
    except ValueError:
        raise ValueError(f"--tasks must be a positive number or one of {', '.join(PRESETS)}, got {text!r}") from None
    return generic_tasks(num_tasks)


class MultiTaskViT(nn.Module):
    """A timm ViT encoder shared by K tasks, each decoded by one 1×1 convolution.

    ``forward(images)`` returns one dense map per task, ``[B, channels_k, H, W]``.

    Example::

        >>> import torch
        >>> from selgroup_fast.models import MultiTaskViT, parse_tasks
        >>> model = MultiTaskViT(parse_tasks("nyud"), "vit_tiny_patch16_224", img_size=32, patch_size=8)
        >>> [tuple(out.shape) for out in model(torch.randn(2, 3, 32, 32))]
        [(2, 40, 32, 32), (2, 1, 32, 32), (2, 3, 32, 32), (2, 2, 32, 32)]
    """

    def __init__(self, tasks: list[TaskSpec], backbone: str, img_size: int, patch_size: int) -> None:
        super().__init__()
        import timm  # the bench extra; imported here so that the package imports without it
        from timm.models.vision_transformer import VisionTransformer

        if img_size % patch_size != 0:
            raise ModelError(f"the image size {img_size} must be a multiple of the patch size {patch_size}")
        if not timm.is_model(backbone):
            raise ModelError(
                f"--backbone {backbone!r} is not a timm model name (a timm ViT such as vit_tiny_patch16_224)"
            )
        not_a_vit = f"--backbone {backbone!r} is not a timm ViT (timm.models.vision_transformer.VisionTransformer)"
        try:
            encoder = timm.create_model(
                backbone, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size
            )
        except TypeError:  # the models that are not ViTs take no img_size / patch_size
            raise ModelError(not_a_vit) from None
        if not isinstance(encoder, VisionTransformer):
            raise ModelError(not_a_vit)
        self.tasks = list(tasks)
        self.img_size = img_size
        self.encoder = encoder
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.decoders = nn.ModuleList(nn.Conv2d(self.encoder.embed_dim, spec.channels, 1) for spec in self.tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (what gradient-manipulation methods operate on)."""
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """Each task's own parameters (its decoder), in task order: ``task_params=`` of the methods."""
        return [list(decoder.parameters()) for decoder in self.decoders]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens as a feature map ``[B, D, H/patch, W/patch]``."""
        tokens = self.encoder.forward_features(images)
        patches = tokens[:, getattr(self.encoder, "num_prefix_tokens", 0) :]
        height, width = self.grid
        if patches.shape[1] != height * width:
            raise ModelError(
                f"the backbone produced {patches.shape[1]} patch tokens, expected {height}×{width}: "
                "use a plain ViT backbone"
            )
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], height, width)

    def decode(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The task decoders on the shared feature map: one dense map per task at the image size."""
        size = (self.img_size, self.img_size)
        return [
            F.interpolate(decoder(features), size=size, mode="bilinear", align_corners=False)
            for decoder in self.decoders
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.decode(self.features(images))


def vit_bench_model(
    request: ModelRequest,
    *,
    backbone: str = "vit_tiny_patch16_224",
    img_size: int = 64,
    patch_size: int = 8,
) -> BenchModel:
    """The built-in model factory: :class:`MultiTaskViT` on a :func:`synthetic_batch` (selgroup-bench's default).

    ``request.tasks`` is parsed by :func:`parse_tasks` (default ``nyud``); the weights
    and the batch come from ``request.seed``.

    Example::

        >>> import torch
        >>> from selgroup_fast.models import ModelRequest, vit_bench_model
        >>> built = vit_bench_model(ModelRequest(tasks="3", batch_size=2), backbone="test_vit", img_size=32)
        >>> losses, features = built.closure()  # the K losses and the encoder's output z
        >>> built.task_names, len(losses), tuple(features.shape)
        (['semseg', 'depth', 'normals'], 3, (2, 64, 4, 4))
    """
    try:
        tasks = parse_tasks(request.tasks or "nyud")
    except ValueError as error:
        raise ModelError(str(error)) from None
    torch.manual_seed(request.seed)
    model = MultiTaskViT(tasks, backbone, img_size, patch_size).to(request.device, request.dtype)
    batch = synthetic_batch(tasks, request.batch_size, img_size, request.device, request.dtype, request.seed)

    def closure_on(rows: slice) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        def closure() -> tuple[list[torch.Tensor], torch.Tensor]:
            # The shared representation goes with the losses, for --space representation.
            features = model.features(batch.images[rows])
            return task_losses(model.decode(features), [target[rows] for target in batch.targets], tasks), features

        return closure

    half = request.batch_size // 2
    return BenchModel(
        model=model,
        shared_params=model.shared_parameters(),
        task_params=list(model.decoders.parameters()),
        closure=closure_on(slice(None)),
        task_names=[spec.name for spec in tasks],
        description=f"{backbone} (random init), {img_size} px images, patch {patch_size}",
        halves=(closure_on(slice(None, half)), closure_on(slice(half, None))) if half > 0 else None,
    )


@dataclass
class SyntheticBatch:
    """One fixed batch: images ``[B, 3, H, W]`` and one dense target per task."""

    images: torch.Tensor
    targets: list[torch.Tensor]


def synthetic_batch(
    tasks: list[TaskSpec],
    batch_size: int,
    img_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
) -> SyntheticBatch:
    """Random images and targets generated on ``device`` from ``seed``.

    Segmentation targets are integer label maps ``[B, H, W]`` in ``[0, classes)``;
    regression targets are standard-normal maps ``[B, channels, H, W]``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    spatial = (batch_size, img_size, img_size)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator, device=device, dtype=dtype)
    targets = []
    for spec in tasks:
        if spec.kind == "segmentation":
            targets.append(torch.randint(0, spec.channels, spatial, generator=generator, device=device))
        else:
            shape = (batch_size, spec.channels, img_size, img_size)
            targets.append(torch.randn(shape, generator=generator, device=device, dtype=dtype))
    return SyntheticBatch(images, targets)
