"""Checkpoints: atomic writes of everything a run needs to continue bit for bit.

A checkpoint is a plain dict of tensors, numbers and strings, written with ``torch.save`` to a
temporary file in the same folder, flushed and fsynced, then renamed over the old one
(``os.replace`` is atomic on POSIX), so a kill at any instant leaves either the old or the new
file, never a torn one. It is read with ``torch.load(weights_only=True)``: loading a checkpoint can
never run code.

It holds the meta-parameters, the optimiser state, the step, and every random state: the run's
own ``torch.Generator`` objects plus the global torch, CUDA, NumPy and Python generators.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state: the named generators, global torch, CUDA, NumPy and Python ones."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "generators": {name: g.get_state() for name, g in generators.items()},
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured, into ``generators`` and the global generators."""
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> Path:
    """Write ``folder/checkpoint.pt`` atomically: params, optimiser state, step, random states."""
    state = {
        "step": step,
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(generators),
    }
    path = Path(folder) / CHECKPOINT
    save_atomic(state, path)
    return path


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``folder/checkpoint.pt`` with ``weights_only=True``; ``FileNotFoundError`` if none."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
