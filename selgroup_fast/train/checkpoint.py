"""Checkpoints of a training run: written atomically, refused when corrupted or written for another run.

A checkpoint holds everything the next iteration depends on (model, optimizer, LR scheduler,
grad scaler, the method's own state, every RNG state, the position in the data, the iteration
and the run's history), so that ``--resume`` continues exactly: on the CPU, N iterations
straight and N/2 + kill + resume give bitwise identical parameters.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .config import TrainError

#: Bumped when the layout changes; older files are refused with a clear error.
FORMAT = "selgroup-train checkpoint v1"
FILENAME = "checkpoint.pt"

#: The config fields a resumed run must share with the checkpoint (the rest, such as
#: --iters, --eval-every or --out, may change between the runs).
IDENTITY_FIELDS = (
    "dataset",
    "tasks",
    "method",
    "method_options",
    "backbone",
    "img_size",
    "patch_size",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "amp",
    "seed",
)


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed from (corrupted, foreign, or for another run)."""


def rng_states() -> dict[str, Any]:
    """The states of every generator the run draws from (torch CPU and CUDA, Python, NumPy)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # NumPy's key array as a tensor, so that the file loads with torch.load(weights_only=True).
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(_as_tuples(states["python"]))
    kind, key, *rest = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def _as_tuples(value: Any) -> Any:
    """Python's RNG state is nested tuples; a round trip through the file may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically: a temporary file beside it, flushed, then renamed.

    A crash at any moment leaves either the previous complete checkpoint or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Reads a checkpoint and checks that it belongs to a run with this ``identity``.

    Raises :class:`CheckpointError` with one clear line when the file is missing, unreadable,
    not a selgroup-train checkpoint, or written for another run (a different method, tasks,
    model size...).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many types for a damaged file)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    saved = state.get("identity", {})
    differences = [
        f"{name}={saved.get(name)!r} (this run: {identity[name]!r})"
        for name in IDENTITY_FIELDS
        if saved.get(name) != identity[name]
    ]
    if state.get("world_size") != identity["world_size"]:
        differences.append(f"{state.get('world_size')} processes (this run: {identity['world_size']})")
    if differences:
        raise CheckpointError(f"checkpoint {path} was written by another run: " + "; ".join(differences))
    return state


def identity_of(config_dict: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The fields of a resolved config that must match between a checkpoint and a resumed run."""
    return {**{name: config_dict[name] for name in IDENTITY_FIELDS}, "world_size": world_size}


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


class CheckpointSaver:
    """Writes and restores one run's checkpoint: its parts' states (model, optimizer, schedule, grad
    scaler, method: by name, ``None`` for a part the run lacks), every RNG state and the run's progress
    (a dict of plain values: iteration, data position, history, timers).

    ``identity`` (:func:`identity_of`) is saved with it and must match on :meth:`restore`.
    """

    def __init__(self, path: Path, identity: dict[str, Any], parts: dict[str, Stateful | None]) -> None:
        self.path, self.identity, self.parts = path, identity, parts

    def save(self, progress: dict[str, Any]) -> None:
        parts = {name: None if part is None else part.state_dict() for name, part in self.parts.items()}
        save(
            self.path,
            {
                "identity": self.identity,
                "world_size": self.identity["world_size"],
                **progress,
                **parts,
                "rng": rng_states(),
            },
        )

    def restore(self, source: Path) -> dict[str, Any]:
        """Loads ``source`` into the parts and the RNGs; returns the checkpoint, whose progress the caller
        reads inside :func:`fitting` (a value that does not fit is one :class:`CheckpointError` line)."""
        state = load(source, self.identity)
        with fitting(source):
            for name, part in self.parts.items():
                if part is not None and state[name] is not None:
                    part.load_state_dict(state[name])
            set_rng_states(state["rng"])
        return state


@contextmanager
def fitting(source: Path) -> Iterator[None]:
    """Turns an error of restoring ``source``'s values into one :class:`CheckpointError` line."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {source} does not fit this run ({first_line})") from None
