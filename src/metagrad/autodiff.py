"""Gradients on one of two backends, chosen explicitly: plain autograd or ``torch.func``.

``grad_and_value(f)`` has the contract of ``torch.func.grad_and_value``: gradients of ``f`` with
respect to its first argument (a ``Params`` dict), differentiable with respect to whatever those
parameters depend on. ``hessian_at(f, params)`` gives the gradient, the value and Hessian-vector
products. Which backend runs is :func:`backend`, set for a block of code by :func:`use`:

- ``"autograd"`` (the default): ``torch.autograd.grad``, with ``create_graph=True`` only when the
  parameters carry a graph (MAML's unrolled loop), and no graph at all otherwise (FOMAML, Reptile,
  Leap, iMAML's inner loop). One task at a time this is the fast path: ``torch.func.grad`` adds
  work to every operator and always builds the graph of the backward pass.
- ``"func"``: ``torch.func`` itself, which composes with ``vmap``. Code that applies a
  ``torch.func`` transform to an estimator or a model (``meta_gradient(mode="vmap")`` does) runs
  inside ``use("func")``; :class:`metagrad.models.BatchNorm` reads the same setting.

:func:`metagrad.meta_gradient` sets the backend once for the whole meta-batch, from its ``mode``.

>>> import torch
>>> from metagrad import autodiff
>>> f = lambda p: (p["w"] ** 2).sum()
>>> with autodiff.use("func"):
...     g, value = autodiff.grad_and_value(f)({"w": torch.tensor([1.0, 2.0])})
>>> g["w"]
tensor([2., 4.])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import Tensor

from metagrad import linalg
from metagrad._types import Params

Backend = Literal["autograd", "func"]
BACKENDS: tuple[Backend, ...] = ("autograd", "func")

_BACKEND: ContextVar[Backend] = ContextVar("metagrad_autodiff_backend", default="autograd")


def backend() -> Backend:
    """The backend in force here: ``"autograd"`` unless inside :func:`use`."""
    return _BACKEND.get()


@contextlib.contextmanager
def use(name: Backend) -> Iterator[None]:
    """Run the block on backend ``name`` (``"autograd"`` or ``"func"``), then restore the old one.

    The setting is a context variable: it holds in this thread (and in tasks run with a copy of
    this context), not in other threads.
    """
    if name not in BACKENDS:
        raise ValueError(f"autodiff backend {name!r}: use 'autograd' or 'func'")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _leaves(params: Params) -> tuple[Params, bool]:
    """``params`` ready for ``autograd.grad``, and whether they carry a graph to differentiate."""
    graph = any(v.requires_grad for v in params.values())
    if graph:
        return params, True
    return {k: v.detach().requires_grad_() for k, v in params.items()}, False


def grad_and_value(f: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """``torch.func.grad_and_value(f, has_aux=has_aux)``, on the current :func:`backend`."""

    def wrapped(params: Params, *args: Any) -> tuple[Params, Any]:
        if backend() == "func":
            if not has_aux:
                return torch.func.grad_and_value(f)(params, *args)
            holes: list[bool] = []  # torch.func's aux holds tensors only: None travels as a hole

            def f_tensors(p: Params, *a: Any) -> tuple[Tensor, Any]:
                value, aux = f(p, *a)
                return value, _fill(aux, holes)

            grad, (value, aux) = torch.func.grad_and_value(f_tensors, has_aux=True)(params, *args)
            return grad, (value, _unfill(aux, iter(holes)))
        leaves, graph = _leaves(params)
        with torch.enable_grad():
            out = f(leaves, *args)
            value, aux = out if has_aux else (out, None)
            grads = torch.autograd.grad(
                value,
                list(leaves.values()),
                create_graph=graph,
                allow_unused=True,
                materialize_grads=True,
            )
        grad = dict(zip(leaves, grads, strict=True))
        if not graph:
            value = value.detach()
            aux = _detach(aux)
        return grad, ((value, aux) if has_aux else value)

    return wrapped


def _fill(x: Any, holes: list[bool]) -> Any:
    """``x`` with each ``None`` replaced by a 0-d tensor, its place noted in ``holes``."""
    if isinstance(x, tuple | list):
        return type(x)(_fill(v, holes) for v in x)
    if isinstance(x, dict):
        return {k: _fill(v, holes) for k, v in x.items()}
    holes.append(x is None)
    return torch.zeros(()) if x is None else x


def _unfill(x: Any, holes: Iterator[bool]) -> Any:
    if isinstance(x, tuple | list):
        return type(x)(_unfill(v, holes) for v in x)
    if isinstance(x, dict):
        return {k: _unfill(v, holes) for k, v in x.items()}
    return None if next(holes) else x


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_detach(v) for v in x)
    return x


def hessian_at(
    f: Callable[[Params], Tensor], params: Params
) -> tuple[Params, Tensor, Callable[[Params], Params]]:
    """``(grad f, f, v -> H v)`` at ``params``, with ``H`` the Hessian of ``f`` there.

    On ``"autograd"`` the gradient's graph is built once and every product is one backward pass
    through it (reverse over reverse, ``retain_graph``): a CG solve of n steps costs one gradient
    and n backward passes instead of n forward-over-reverse passes (each a forward and a backward
    pass with tangents). On ``"func"`` the products are :func:`metagrad.linalg.hvp`.
    """
    if backend() == "func":
        grad, value = torch.func.grad_and_value(f)(params)
        return grad, value, lambda v: linalg.hvp(f, params, v)
    leaves, graph = _leaves(params)
    keys = list(leaves)
    with torch.enable_grad():
        value = f(leaves)
        grads = torch.autograd.grad(
            value,
            list(leaves.values()),
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a loss linear in some entries

    def product(v: Params) -> Params:
        hv: list[Tensor | None] = [None] * len(keys)
        if live:
            with torch.enable_grad():
                hv = list(
                    torch.autograd.grad(
                        [grads[i] for i in live],
                        list(leaves.values()),
                        [v[keys[i]] for i in live],
                        retain_graph=True,
                        create_graph=graph,
                        allow_unused=True,
                    )
                )
        return {
            k: torch.zeros_like(v[k]) if h is None else h for k, h in zip(keys, hv, strict=True)
        }

    grad = dict(zip(keys, grads if graph else [g.detach() for g in grads], strict=True))
    return grad, (value if graph else value.detach()), product
