"""Arithmetic on parameter dicts, so an update reads like its equation: ``tree.sub(theta, phi)``.

Every function takes and returns ``Params`` (``dict[str, Tensor]``) with the same keys; none mutates
its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from metagrad._types import Params


def map(fn: Callable[[Tensor], Tensor], a: Params) -> Params:
    """``{k: fn(a[k])}``."""
    return {k: fn(v) for k, v in a.items()}


def add(a: Params, b: Params) -> Params:
    """``a + b``."""
    return {k: a[k] + b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    """``a - b``."""
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    """``s * a``."""
    return {k: v * s for k, v in a.items()}


def axpy(s: float | Tensor, x: Params, y: Params) -> Params:
    """``s * x + y``."""
    return {k: s * x[k] + y[k] for k in y}


def vdot(a: Params, b: Params) -> Tensor:
    """The inner product ``<a, b>`` summed over every entry of every tensor."""
    return torch.stack([torch.sum(a[k] * b[k]) for k in a]).sum()


def sqnorm(a: Params) -> Tensor:
    """``||a||^2``."""
    return vdot(a, a)


def norm(a: Params) -> Tensor:
    """``||a||``, the Euclidean norm of all entries together."""
    return torch.sqrt(sqnorm(a))


def detach(a: Params) -> Params:
    """The same values, cut from every autograd graph."""
    return {k: v.detach() for k, v in a.items()}


def zeros_like(a: Params) -> Params:
    """Zeros with ``a``'s keys, shapes, dtypes and devices."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def mean(trees: Sequence[Params]) -> Params:
    """The entry-wise mean of a non-empty sequence of ``Params``."""
    total = trees[0]
    for t in trees[1:]:
        total = add(total, t)
    return scale(total, 1.0 / len(trees))


def select(a: Params, keys: Iterable[str]) -> Params:
    """The sub-dict of ``a`` with the given keys, in ``a``'s order."""
    wanted = set(keys)
    return {k: v for k, v in a.items() if k in wanted}


def flatten(a: Params) -> Tensor:
    """All entries in one 1-d tensor (in key order)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(flat: Tensor, like: Params) -> Params:
    """The inverse of :func:`flatten`, shaped like ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = flat[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out
