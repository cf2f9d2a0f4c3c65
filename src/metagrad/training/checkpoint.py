"""Checkpoints: atomic writes of everything a run needs to continue bit for bit.

A checkpoint is a plain dict of tensors, numbers and strings, written with ``torch.save`` to a
temporary file in the same folder, flushed and fsynced, then renamed over the old one
(``os.replace`` is atomic on POSIX), so a kill at any instant leaves either the old or the new
file, never a torn one. It is read with ``torch.load(weights_only=True)``: loading a checkpoint can
never run code.

It holds the meta-parameters, the optimiser state, the step, and every random state: the run's
own ``torch.Generator`` objects plus the global torch, CUDA, NumPy and Python generators. It also
records what it belongs to (:func:`identity`): the settings of the config that change results
(with their fingerprint), the meta-parameters' names and shapes and the optimiser, so that a
checkpoint is never continued under an edited ``config.json`` (:func:`check_identity`).

Before a new checkpoint replaces ``checkpoint.pt``, the old one is kept as ``checkpoint.prev.pt``
(a hard link, so some ``checkpoint.pt`` exists at every instant). A checkpoint that cannot be read
raises :class:`CorruptCheckpointError`, one line that names the previous one if it exists.
Temporary files left by a killed writer are removed by :func:`remove_stale_temps`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"

RESUMABLE = ("steps", "device", "log_every", "eval_every", "val_tasks", "eval_tasks",
             "checkpoint_every", "tensorboard")  # fmt: skip
"""Settings that may change when a run is resumed; the others would change its results."""

UNCHECKED = (*RESUMABLE, "root")
"""Settings outside a checkpoint's identity: the resumable ones and the data folder (may move)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read: truncated, empty, random bytes, or not metagrad's."""


def settings(config: Any) -> dict[str, Any]:
    """The config's settings that change a run's results, flat and JSON-plain: ``{name: value}``.

    Every field of every section except :data:`UNCHECKED`.
    """
    flat = {k: v for section in config.to_dict().values() if isinstance(section, dict)
            for k, v in section.items() if k not in UNCHECKED}  # fmt: skip
    return json.loads(json.dumps(flat))  # tuples -> lists, as in config.json


def fingerprint(values: dict[str, Any]) -> str:
    """sha256 of the :func:`settings` (sorted JSON)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def identity(config: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a checkpoint belongs to: settings and fingerprint, meta-parameter shapes, optimiser."""
    values = settings(config)
    return {
        "fingerprint": fingerprint(values),
        "settings": values,
        "shapes": {k: list(v.shape) for k, v in params.items()},
        "optimizer": config.optim.optimizer,
    }


def check_identity(
    state: dict[str, Any], config: Any, params: dict[str, torch.Tensor], where: Path
) -> None:
    """``ValueError`` naming the first difference between the checkpoint and the run's config.

    ``config`` is the one in ``config.json``, ``params`` its estimator's meta-parameters
    (``estimator.init_meta(model)``). A checkpoint written before identities were recorded is
    checked on its parameter shapes only.
    """
    if not isinstance(state, dict) or not all(k in state for k in _KEYS):
        found = sorted(map(str, state))[:4] if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpointError(
            f"{where} is not a metagrad checkpoint (it holds {found}, not {list(_KEYS)}); "
            f"{_fix(where)}"
        )
    if not isinstance(state["params"], dict) or not all(
        isinstance(v, torch.Tensor) for v in state["params"].values()
    ):
        raise CorruptCheckpointError(f"{where} holds no meta-parameters; {_fix(where)}")
    config_json = where.parent / "config.json"
    saved = state.get("identity")
    if isinstance(saved, dict) and saved.get("fingerprint") != fingerprint(settings(config)):
        now = settings(config)
        old = saved.get("settings", {})
        for name in [*now, *(k for k in old if k not in now)]:
            if name in old and name in now and old[name] != now[name]:
                raise ValueError(
                    f"{config_json} sets {name}={now[name]!r}, but {where} was trained with "
                    f"{name}={old[name]!r}: restore {name} in config.json, or start a new run "
                    "with --out"
                )
    shapes = {k: list(v.shape) for k, v in state["params"].items()}
    wanted = {k: list(v.shape) for k, v in params.items()}
    if shapes != wanted:
        missing, extra = sorted(set(wanted) - set(shapes)), sorted(set(shapes) - set(wanted))
        changed = sorted(k for k in wanted.keys() & shapes.keys() if wanted[k] != shapes[k])
        what = (
            f"{changed[0]} has shape {shapes[changed[0]]} there, {wanted[changed[0]]} here"
            if changed
            else f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
        raise ValueError(
            f"the meta-parameters in {where} do not fit the estimator of {config_json} ({what}): "
            "was config.json edited? Restore it, or start a new run with --out"
        )


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
    except (OSError, RuntimeError) as e:  # a full disk, say: name the file (write() does not)
        cause = _os_cause(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _os_cause(error: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``error`` (torch's zip writer raises ``RuntimeError`` after it)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


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
    belongs_to: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/checkpoint.pt`` atomically: params, optimiser state, step, random states.

    ``belongs_to``: the run's :func:`identity`. The checkpoint it replaces stays as
    ``checkpoint.prev.pt``.
    """
    state = {
        "step": step,
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(generators),
    }
    if belongs_to is not None:
        state["identity"] = belongs_to
    path = Path(folder) / CHECKPOINT
    if path.is_file():  # keep the current one as the previous: link it, then rename the link
        link = path.with_name(f".{PREVIOUS}.tmp-{os.getpid()}")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links: a copy (briefly two full files)
            shutil.copyfile(path, link)
        os.replace(link, path.with_name(PREVIOUS))
    save_atomic(state, path)
    return path


_KEYS = ("step", "params", "optimizer", "rng")


def load_checkpoint(
    folder: str | Path, map_location: str | torch.device = "cpu", *, name: str = CHECKPOINT
) -> dict[str, Any]:
    """Read ``folder/name`` with ``weights_only=True``; ``FileNotFoundError`` if none.

    :class:`CorruptCheckpointError` (one line naming the file, and the previous checkpoint where
    there is one) if it is not a readable metagrad checkpoint.
    """
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, empty, random, foreign or malicious: all one answer
        raise CorruptCheckpointError(f"{path} {_why(e)}; {_fix(path)}") from None
    return state


def _why(error: Exception) -> str:
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text:
        return (
            "holds objects other than tensors and plain data, which the weights only loader "
            "refuses (loading it could run code)"
        )
    if isinstance(error, EOFError) or "failed finding central directory" in text or not text:
        return "is truncated or empty (an interrupted copy?)"
    return f"is corrupt ({type(error).__name__}: {text.splitlines()[0][:80]})"


def _fix(path: Path) -> str:
    previous = path.with_name(PREVIOUS)
    if path.name == CHECKPOINT and previous.is_file():
        return (
            f"continue from the previous checkpoint {previous} with `metagrad train --resume "
            f"{path.parent} --previous-checkpoint`"
        )
    return "restore it from a copy, or start a new run with --out"


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files (``.NAME.tmp-PID``) of writers that no longer run.

    A writer killed between writing and renaming (SIGKILL, power loss) leaves one behind.
    Returns the files removed.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        match = re.fullmatch(r"\..+\.tmp-(\d+)", tmp.name)
        if match and not _alive(int(match.group(1))) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
