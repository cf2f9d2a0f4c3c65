"""Cells: the resumable pieces an experiment's table is assembled from.

A cell is either an ordinary training run (a run folder made by :func:`metagrad.training.train`) or
a measurement saved as one JSON file. :func:`run_cell` trains, resumes or reuses a run, so that
calling an experiment again with the same ``--out`` completes whatever had not finished, and a
:class:`Deadline` (``--budget-minutes``) stops new cells from starting; the table marks the cells
that have no result with :data:`~metagrad.experiments.MISSING`.

>>> from metagrad.training import preset
>>> config = preset("sinusoid-maml").override(steps=200)
>>> run_cell(config, "runs/exp/maml")           # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from metagrad.experiments._report import Options
from metagrad.training import Config, TrainingError, resume, train
from metagrad.training.checkpoint import UNCHECKED
from metagrad.training.run import CONFIG, RunDir

__all__ = [
    "Deadline",
    "finished",
    "load_json",
    "machine",
    "reject",
    "run_cell",
    "save_figure",
    "save_json",
    "select_cells",
]


class Deadline:
    """A wall-clock allowance in minutes (None: none). ``expired`` once it has run out."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes
        self.start = time.monotonic()

    @property
    def expired(self) -> bool:
        return self.minutes is not None and time.monotonic() - self.start > 60 * self.minutes

    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return time.monotonic() - self.start


def reject(options: Options, experiment: str, *names: str) -> None:
    """Raise ``ValueError`` if an option in ``names`` is set: it does not apply here."""
    for name in names:
        if getattr(options, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to the {experiment} experiment: drop it")


def select_cells(
    cells: tuple[str, ...] | None,
    columns: list[str],
    rows: list[str],
    kinds: tuple[str, str],
) -> set[tuple[str, str]]:
    """The ``(column, row)`` cells that ``--cells`` asks for (all of them without it).

    Each entry names one cell ``COLUMN/ROW``, a whole column or a whole row, case-insensitively;
    ``kinds`` names the two (``("setting", "algorithm")``) in the ``ValueError`` that lists the
    valid ones for anything else.
    """
    every = {(c, r) for c in columns for r in rows}
    if cells is None:
        return every
    if not cells:
        example = f"{columns[0]}/{rows[0]}"
        raise ValueError(f"--cells is empty: name cells as {example}, {kinds[0]}s or {kinds[1]}s")
    lower = {c.lower() for c in columns}
    chosen: set[tuple[str, str]] = set()
    for entry in cells:
        column, _, row = entry.lower().rpartition("/")
        if not column and row in lower:
            column, row = row, ""  # a column alone
        match = {
            (c, r)
            for c, r in every
            if (not column or c.lower() == column) and (not row or r.lower() == row)
        }
        if not match:
            a, b = (k.upper().replace(" ", "_") for k in kinds)
            raise ValueError(
                f"--cells: no cell {entry!r}: give {a}/{b}, {a} or {b}, "
                f"{kinds[0]}s {', '.join(columns)}, {kinds[1]}s {', '.join(rows)}"
            )
        chosen |= match
    return chosen


def _changed(a: Config, b: Config) -> dict[str, Any]:
    """The fields (flat names) whose values differ between ``a`` and ``b``, with ``b``'s values."""
    out = {}
    for section in ("model", "data", "algo", "optim", "run"):
        x, y = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        out.update({k: y[k] for k in x if x[k] != y[k]})
    return out


def finished(path: str | Path, steps: int | None = None) -> bool:
    """Whether the run in ``path`` reached ``steps`` (default: its config's) and was evaluated."""
    run = RunDir(path)
    if not (run.path / CONFIG).is_file():
        return False
    steps = run.config().optim.steps if steps is None else steps
    return any(m["step"] == steps and "test_loss" in m for m in run.metrics())


def run_cell(config: Config, path: str | Path, deadline: Deadline | None = None) -> bool:
    """Train ``config`` in ``path``, resume it there, or reuse it; True once it has finished.

    A folder that holds a run of other settings raises ``ValueError``, unless only settings that
    may change on resume differ (a longer ``steps`` continues the run) or the data folder (a
    finished cell is reused wherever its data now lies; an unfinished one resumes from there).
    Nothing new starts once ``deadline`` has expired. A Ctrl-C stops the cell at a checkpoint and
    raises ``KeyboardInterrupt``: the next call resumes it.
    """
    path = Path(path)
    if (path / CONFIG).is_file():
        changes = _changed(RunDir(path).config(), config)
        fixed = sorted(set(changes) - set(UNCHECKED))
        if fixed:
            raise ValueError(
                f"{path} holds a run with other settings ({', '.join(fixed)}): remove it, or "
                "choose another --out"
            )
        if set(changes) <= {"root"} and finished(path):  # the data may have moved since
            return True
        if deadline is not None and deadline.expired:
            return False
        result = resume(path, progress=False, **changes)
    else:
        if deadline is not None and deadline.expired:
            return False
        result = train(config, path, progress=False)
    if result.interrupted:
        raise KeyboardInterrupt
    return finished(path)


def run_or_note(
    config: Config, path: str | Path, failed: list[str], deadline: Deadline | None = None
) -> bool:
    """:func:`run_cell`, except that a run that diverges (``TrainingError``) is not finished: its
    folder's name and the reason are appended to ``failed`` (see :func:`diverged_notes`)."""
    try:
        return run_cell(config, path, deadline)
    except TrainingError as e:
        failed.append(f"{Path(path).name}: {e}")
        return False


def diverged_notes(failed: list[str]) -> list[str]:
    """A table's note line for each run that diverged, which its table marks missing."""
    return [f"Diverged (missing): {f}" for f in failed]


def save_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a measurement cell atomically (temp file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_json(path: str | Path) -> dict[str, Any] | None:
    """A measurement cell, or None if it has not been written."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine an experiment ran on: CPU model and cores (or GPU), torch, Python, commit."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["commit"] = _commit()
    return info


def _commit() -> str | None:
    """The git commit of the metagrad source tree (``+dirty`` with local edits), if in one."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=here, capture_output=True, text=True, timeout=10
        )
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", str(here.parent))
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save_figure(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Save a Matplotlib figure as a small PNG; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
