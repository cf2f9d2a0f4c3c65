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
from metagrad.training.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    check_identity,
    load_checkpoint,
)
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
            run.write_json(CONFIG, record)
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
        """Drop log lines past ``step`` (they are redone on resume) and open TensorBoard.

        A torn last line (the process was killed, or the disk filled, while appending it) is
        dropped with a warning; a bad line before the last is a ``ValueError`` naming it.
        """
        if not self.is_main:
            return
        path = self.path / METRICS
        if path.exists():
            keep = [r for r in self._records(warn=True) if r["step"] <= step]
            self._write_text(METRICS, "".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=step)

    def log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Append one line to ``metrics.jsonl`` and write the scalars to TensorBoard."""
        if not self.is_main:
            return
        record = {"step": step, **{prefix + k: v for k, v in values.items()}}
        try:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a torn line is dropped on resume
            raise OSError(e.errno, e.strerror, str(self.path / METRICS)) from e
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix.rstrip('_') or 'train'}/{k}", v, step)

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """Write ``data`` to ``name`` in the folder, atomically; returns the path."""
        if self.is_main:
            self._write_text(name, json.dumps(data, indent=2))
        return self.path / name

    def _write_text(self, name: str, text: str) -> None:
        path = self.path / name
        tmp = self.path / f".{name}.tmp-{os.getpid()}"  # the pid: stale ones are found and removed
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as e:  # a full disk, say: name the file (a failed write() does not)
            raise OSError(e.errno, e.strerror, str(path)) from e
        finally:
            tmp.unlink(missing_ok=True)

    def metrics(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` (a torn last line is left out)."""
        return self._records(warn=False)

    def _records(self, warn: bool) -> list[dict[str, Any]]:
        path = self.path / METRICS
        lines = (path.read_text(errors="replace") if path.exists() else "").split("\n")
        out = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                if n < len(lines) - 1 and any(ln.strip() for ln in lines[n:]):
                    raise ValueError(
                        f"{path}, line {n}, is not a metagrad log line ({line[:40]!r}): delete "
                        "that line (or the lines from it on) and resume again"
                    ) from None
                if warn:  # the last line, torn by a kill or a full disk while it was appended
                    print(f"metagrad: warning: dropped the torn last line of {path} (an "
                          "interrupted write)", file=sys.stderr)  # fmt: skip
                break
            out.append(record)
        return out

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

    def learned(self) -> list[str]:
        """One line per learned hyperparameter group (step sizes, lam, a prior's std), if any.

        The groups are the meta-parameters that are not the model's (``log_lr/...``,
        ``log_lam``, ``prior_logstd/...``), stored as logarithms and shown as their values.
        """
        model = set(dict(self.model.named_parameters()))
        groups: dict[str, list[torch.Tensor]] = {}
        for key, value in self.params.items():
            if key not in model:
                groups.setdefault(key.split("/")[0], []).append(value.detach().reshape(-1))
        lines = []
        for name, parts in groups.items():
            values = torch.cat(parts).double().exp()
            shown = name.removeprefix("log_").replace("logstd", "std")
            if values.numel() == 1:
                lines.append(f"learned {shown}: {float(values):.4g}")
            else:
                lines.append(
                    f"learned {shown} ({values.numel()} values in {len(parts)} tensors): median "
                    f"{float(values.median()):.4g}, range {float(values.min()):.4g} to "
                    f"{float(values.max()):.4g}"
                )
        return lines

    def with_config(self, **changes: Any) -> Run:
        """The same parameters with config fields replaced (for evaluation: data path, steps)."""
        config = self.config.override(**changes)
        return dataclasses.replace(
            self, config=config, estimator=build_estimator(config, self.model, evaluation=True)
        )


def load_run(
    path: str | Path, map_location: str | torch.device = "cpu", *, previous: bool = False
) -> Run:
    """The latest checkpoint of the run in ``path`` (``ValueError`` if it holds no run).

    The checkpoint must belong to the run's ``config.json`` (see
    :func:`~metagrad.training.checkpoint.check_identity`). ``previous=True``: the checkpoint
    before it (``checkpoint.prev.pt``). Nothing is written.
    """
    run, config = RunDir.open(path, is_main=False)
    name = PREVIOUS if previous else CHECKPOINT
    if not (run.path / name).is_file():
        raise ValueError(f"{run.path} holds no {name} yet: train it first")
    state = load_checkpoint(run.path, map_location, name=name)
    model = build_model(config).to(map_location)
    estimator = build_estimator(config, model, evaluation=True)
    params = estimator.init_meta(model)
    check_identity(state, config, params, run.path / name)
    load_params(params, state["params"])
    return Run(run.path, config, int(state["step"]), params, model, estimator)


def load_params(params: Params, saved: Params) -> None:
    """Copy ``saved`` into ``params`` in place; ``ValueError`` if their names or shapes differ."""
    if set(params) != set(saved) or any(params[k].shape != saved[k].shape for k in params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"the checkpoint's meta-parameters do not fit this run's estimator (missing "
            f"{missing[:3]}, unexpected {extra[:3]}, or other shapes): was it written by "
            "another config?"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


class StopOnSignal:
    """While active, Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun's stop) asks
    the loop to stop at the end of the step; a second SIGINT aborts at once.

    ``signal`` names the first one received.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one aborts

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


StopOnSigint = StopOnSignal  # the former name
