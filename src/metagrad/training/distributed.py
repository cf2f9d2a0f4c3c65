"""Data-parallel meta-training over tasks on ``torch.distributed``, launched by ``torchrun``.

``metagrad train`` runs under ``torchrun`` with no other change::

    torchrun --standalone --nproc-per-node 2 -m metagrad train --preset sinusoid-maml --out runs/d
    torchrun --standalone --nproc-per-node 2 -m metagrad train --resume runs/d --steps 20000
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m metagrad train --preset omniglot-20w5s-imaml-gd --data PATH --out runs/z

Every rank draws the same **global** meta-batch from the run's seed (so it does not depend on the
world size), takes its contiguous share (:func:`share`), computes the mean meta-gradient of that
share, and joins one all-reduce (sum) per step of

    ``[k * mean gradient (flattened), k * mean metrics, k]``   with ``k`` the share's size,

which every rank divides by the summed ``k``: the mean over the global meta-batch, weighted
correctly when it does not divide evenly (a rank with no task sends zeros). Every rank holds the
whole model, the optimiser state and the global meta-batch, and applies the same update, so the
parameters stay identical without a broadcast. Evaluation tasks are split the same way and their
per-task scores summed into one table. Rank 0 alone writes the run folder and prints; the other
ranks print nothing but their errors. A rank that dies or hangs makes the others raise
:class:`DistributedError` (one line on stderr, exit status 1) within ``--dist-timeout`` seconds.
All of this is :class:`AllReduce`, the reducer that :func:`session` gives the outer loop (its one
seam for distribution, :mod:`metagrad.training.reduce`).

Backends: gloo for CPU tensors and, where CUDA is available, NCCL for CUDA tensors (each rank on
GPU ``LOCAL_RANK``). Under NCCL a hung peer is caught by NCCL's watchdog, which ends the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

from metagrad import tree
from metagrad._types import Estimator, Metrics, Params, Task
from metagrad.algorithms import meta_gradient
from metagrad.algorithms.batching import Mode
from metagrad.tasks import count, select
from metagrad.training.loop import TrainingError
from metagrad.training.reduce import SCORES, Local, Reducer, ScoreFn

__all__ = [
    "DEFAULT_TIMEOUT",
    "AllReduce",
    "DistributedError",
    "is_launched",
    "rank",
    "session",
    "share",
    "world_size",
]

DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits in a collective for the others before it stops (``--dist-timeout``)."""


class DistributedError(TrainingError):
    """Another rank died or hung: this one stops; the last checkpoint in the run folder is kept."""


def is_launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` tasks: the first ``n % world`` ranks get one more.

    >>> [share(5, r, 2) for r in range(2)]
    [slice(0, 3, None), slice(3, 5, None)]
    >>> share(1, 1, 2)
    slice(1, 1, None)
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


_PEER_ENDED = "another rank ended (it died or stopped with its own error)"
_KEPT = "the last checkpoint in the run folder is kept, resume it with `metagrad train --resume`"


def _peer_error(what: str, waited: float, timeout: float, error: BaseException) -> DistributedError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    detail = re.sub(r"^\[[^\]]*\] *", "", detail)[:160]  # gloo's "[source file:line]" prefix
    cause = (
        f"no answer within --dist-timeout {timeout:g}s (a rank hung)"
        if "timed out" in detail.lower() or "timeout" in detail.lower()
        else _PEER_ENDED
    )
    return DistributedError(
        f"rank {rank()} of {world_size()}: {what} failed after {waited:.1f}s: {cause}; {_KEPT} "
        f"({detail})"
    )


class AllReduce:
    """The reducer under ``torchrun``: this rank's :func:`share` of the tasks, then a sum.

    Made by :func:`session` once the process group is up; ``timeout`` is the group's collective
    timeout in seconds (named in the error when a peer hangs).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        nccl = torch.cuda.is_available()  # NCCL reduces CUDA tensors only
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def meta_gradient(
        self, estimator: Estimator, theta: Params, tasks: Task, mode: str
    ) -> tuple[Params, Metrics]:
        """The mean meta-gradient and metrics over the global meta-batch ``tasks``, across ranks.

        This rank computes the mean over its :func:`share` of ``tasks``; one all-reduce (sum) of
        ``k * gradient``, ``k * metrics`` and ``k`` (the share's size), divided by the global
        count, gives every rank the global mean.
        """
        n = count(tasks)
        part = share(n, self.rank, self.world)
        k = part.stop - part.start
        # A rank with no task computes the last one to learn the metrics' shapes, then sends
        # zeros (it would wait for the others anyway).
        mine = select(tasks, part if k else slice(n - 1, n))
        grads, metrics = meta_gradient(estimator, theta, mine, mode=cast(Mode, mode))
        flat = tree.flatten(grads)
        parts = [flat, *(m.reshape(-1).to(flat.dtype) for m in metrics.values())]
        buffer = torch.cat([torch.cat(parts) * k, flat.new_tensor([k])])
        self._all_reduce(buffer, "the meta-gradient all-reduce")
        mean = buffer[:-1] / buffer[-1]
        grads = tree.unflatten(mean[: flat.numel()], grads)
        out, i = {}, flat.numel()
        for name, m in metrics.items():
            out[name] = mean[i : i + m.numel()].view(m.shape).to(m.dtype)
            i += m.numel()
        return grads, out

    def score(self, score: ScoreFn, tasks: Task) -> torch.Tensor:
        """The ``[n, len(SCORES)]`` scores of all ``tasks``: this rank scores its share, a sum."""
        n = count(tasks)
        part = share(n, self.rank, self.world)
        table = torch.zeros(n, len(SCORES), dtype=torch.float64, device=tasks.support.x.device)
        if part.stop > part.start:
            table[part] = score(select(tasks, part)).to(table.dtype)
        self._all_reduce(table, "the evaluation all-reduce")
        return table

    def any_stop(self, requested: bool) -> bool:
        """Whether any rank was asked to stop (SIGINT, SIGTERM): one all-reduce (max) of a flag."""
        flag = torch.tensor([float(requested)], device=self._device)
        self._all_reduce(flag, "the stop-flag all-reduce", op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _all_reduce(self, buffer: torch.Tensor, what: str, op: Any = dist.ReduceOp.SUM) -> None:
        """Sum ``buffer`` over the ranks in place; :class:`DistributedError` if a peer failed."""
        start = time.monotonic()
        try:
            dist.all_reduce(buffer, op=op)
        except RuntimeError as e:  # gloo: a closed connection or a timeout (DistBackendError)
            raise _peer_error(what, time.monotonic() - start, self.timeout, e) from e


def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session(timeout: float = DEFAULT_TIMEOUT) -> Iterator[Reducer]:
    """The reducer for ``train`` and ``resume``: :class:`AllReduce` under ``torchrun``, else
    :class:`~metagrad.training.reduce.Local`.

    Under ``torchrun`` with several ranks it initialises the process group from torchrun's
    environment (``timeout`` seconds for every collective), silences the output of ranks other
    than 0, and tears the group down at the end.
    """
    if not is_launched():
        yield Local()
        return
    if timeout <= 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout:g}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(_backend(), timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        raise _peer_error("joining the process group", timeout, timeout, e) from e
    ok = False
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        reducer = AllReduce(timeout)
        with contextlib.ExitStack() as quiet:
            if not reducer.is_main:  # rank 0 alone prints; errors still show (printed after)
                devnull = quiet.enter_context(open(os.devnull, "w"))  # noqa: SIM115
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
            yield reducer
        _barrier(timeout)  # every rank done before any leaves: no collective is cut short
        ok = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        _teardown(ok)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM from torchrun, which sends it to the survivors when a rank fails, outside the
    outer loop (inside it, SIGTERM checkpoints and stops every rank at the same step).

    Rank 0 says why in one line (it may be terminated before its next all-reduce notices the dead
    peer); the other ranks end quietly, as the line of rank 0 or of the failed rank says it all.
    """
    if rank() != 0:
        raise SystemExit(128 + signum)
    raise DistributedError(
        f"rank {rank()} of {world_size()}: stopped by the launcher (SIGTERM), which torchrun sends "
        f"when {_PEER_ENDED} or the job is stopped; {_KEPT}"
    )


def _barrier(timeout: float) -> None:
    start = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError as e:
        raise _peer_error("the final barrier", time.monotonic() - start, timeout, e) from e


def _teardown(ok: bool) -> None:
    try:
        dist.destroy_process_group()
    except Exception as e:  # a broken group may fail to close; the process ends anyway
        if ok:
            print(f"metagrad: warning: closing the process group: {e}", file=sys.stderr)
