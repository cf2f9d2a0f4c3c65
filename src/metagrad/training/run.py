"""What a run is: its folder, ``load_run``, and how a running one reports and stops.

A run folder holds ``config.json`` (the config, the data split and the command), ``metrics.jsonl``
(one JSON line per logged step or evaluation), TensorBoard event files under ``tensorboard/``,
``checkpoint.pt`` (see :mod:`metagrad.training.checkpoint`), ``curves.png`` and the evaluation
results.

>>> from metagrad.training import load_run
>>> run = load_run("runs/quickstart-20260101-120000")     # doctest: +SKIP
>>> run.step, run.config.algo.algorithm, sorted(run.params)[:1]   # doctest: +SKIP
(4000, 'maml', ['body.0.bias'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagrad._types import Params
from metagrad.training.build import build_estimator, build_model
from metagrad.training.checkpoint import CHECKPOINT, load_checkpoint
from metagrad.training.config import Config

CONFIG = "config.json"
METRICS = "metrics.jsonl"


def check_device(config: Config) -> None:
    """``ValueError`` if the config asks for a device this machine does not have."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")


@contextlib.contextmanager
def torch_settings(config: Config) -> Iterator[None]:
    """Deterministic kernels (default on CPU), the thread count and the precision, then restored.

    ``run.precision="bf16"`` runs everything inside under ``torch.autocast(dtype=bfloat16)``.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
    )
    check_device(config)
    on = config.run.is_deterministic
    torch.use_deterministic_algorithms(on, warn_only=config.run.device != "cpu")
    torch.backends.cudnn.benchmark = not on
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    bf16 = config.run.precision == "bf16"
    try:
        with torch.autocast(config.run.device, dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


class RunDir:
    """The run folder. With ``is_main=False`` (a non-zero distributed rank) nothing is written."""

    def __init__(self, path: str | Path, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._tb: Any = None
        self._lock: Any = None

    @classmethod
    def create(
        cls, path: str | Path, config: Config, split: dict | None, *, is_main: bool = True
    ) -> RunDir:
        """A new run folder; ``ValueError`` if ``path`` holds a run or other files."""
        run = cls(path, is_main=is_main)
        if not is_main:  # a distributed rank: rank 0 checks (it may already have made the folder)
            return run
        if (run.path / CONFIG).exists():
            raise ValueError(
                f"{run.path} already holds a run: continue it with `metagrad train --resume "
                f"{run.path}` or choose another --out"
            )
        if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
            raise ValueError(f"{run.path} exists and is not an empty folder: choose another --out")
        if is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.lock()
            record = {
                "config": config.to_dict(),
                "data_split": split,
                "command": sys.argv,
                "torch": torch.__version__,
            }
            text = json.dumps(record, indent=2)
            tmp = run.path / f".{CONFIG}.tmp"
            tmp.write_text(text)
            os.replace(tmp, run.path / CONFIG)
        return run

    @classmethod
    def open(cls, path: str | Path, *, is_main: bool = True) -> tuple[RunDir, Config]:
        """An existing run folder and its config; ``ValueError`` if it holds no run."""
        run = cls(path, is_main=is_main)
        if not (run.path / CONFIG).is_file():
            raise ValueError(
                f"{run.path} holds no metagrad run (no {CONFIG}): start one with "
                f"`metagrad train --out {run.path}`"
            )
        if is_main:
            run.lock()
        return run, run.config()

    def update_config(self, config: Config) -> None:
        """Rewrite the config in ``config.json`` (resuming with a longer run, say)."""
        if self.is_main:
            record = json.loads((self.path / CONFIG).read_text())
            record["config"] = config.to_dict()
            self.write_json(CONFIG, record)

    def config(self) -> Config:
        """The run's config, read from ``config.json``."""
        try:
            record = json.loads((self.path / CONFIG).read_text())
            return Config.from_dict(record["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path / CONFIG} is not a metagrad run config ({e})") from e

    def lock(self) -> None:
        """Hold an exclusive lock on the folder (released at exit, SIGKILL included)."""
        self._lock = open(self.path / ".lock", "w")  # noqa: SIM115 (held for the run's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is training the run in {self.path}") from None

    def start_logs(self, step: int, tensorboard: bool) -> None:
        """Drop log lines past ``step`` (they are redone on resume) and open TensorBoard."""
        if not self.is_main:
            return
        path = self.path / METRICS
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            tmp = self.path / f".{METRICS}.tmp"
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=step)

    def log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Append one line to ``metrics.jsonl`` and write the scalars to TensorBoard."""
        if not self.is_main:
            return
        record = {"step": step, **{prefix + k: v for k, v in values.items()}}
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix.rstrip('_') or 'train'}/{k}", v, step)

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """Write ``data`` to ``name`` in the folder, atomically; returns the path."""
        path = self.path / name
        if self.is_main:
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, path)
        return path

    def metrics(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl``."""
        path = self.path / METRICS
        text = path.read_text() if path.exists() else ""
        text = text[: text.rfind("\n") + 1]  # complete lines: another process may be appending
        return [json.loads(ln) for ln in text.splitlines()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


@dataclass(frozen=True)
class Run:
    """A finished or running run, loaded from its folder: ``params``, ``config``, ``step``.

    ``params`` are the estimator's meta-parameters (``estimator.init_meta(model)``) with the
    checkpoint's values, ``model`` the network they belong to; ``estimator`` adapts with the
    test-time steps.
    """

    path: Path
    config: Config
    step: int
    params: Params
    model: nn.Module
    estimator: Any  # an Estimator whose loss is a metagrad.Loss (predict, accuracy)

    def with_config(self, **changes: Any) -> Run:
        """The same parameters with config fields replaced (for evaluation: data path, steps)."""
        config = self.config.override(**changes)
        return dataclasses.replace(
            self, config=config, estimator=build_estimator(config, self.model, evaluation=True)
        )


def load_run(path: str | Path, map_location: str | torch.device = "cpu") -> Run:
    """The latest checkpoint of the run in ``path`` (``ValueError`` if it holds no run)."""
    run, config = RunDir.open(path, is_main=False)
    if not (run.path / CHECKPOINT).is_file():
        raise ValueError(f"{run.path} holds no checkpoint yet: train it first")
    state = load_checkpoint(run.path, map_location)
    model = build_model(config).to(map_location)
    estimator = build_estimator(config, model, evaluation=True)
    params = estimator.init_meta(model)
    load_params(params, state["params"])
    return Run(run.path, config, int(state["step"]), params, model, estimator)


def load_params(params: Params, saved: Params) -> None:
    """Copy ``saved`` into ``params`` in place; ``ValueError`` if their names differ."""
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"the checkpoint's meta-parameters do not fit this run's estimator (missing "
            f"{missing[:3]}, unexpected {extra[:3]}): was it written by another config?"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


class StopOnSigint:
    """While active, Ctrl-C asks the loop to stop at the end of the step (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one aborts at once

    def __enter__(self) -> StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
