"""Inner solvers: adapt ``theta`` to a task's support set.

A solver is a frozen dataclass called as ``solver(loss, init, batch, *, keys=None, record=False)``
and returns :class:`~metagrad.Adapted`. Its gradients come from :mod:`metagrad.autodiff`, on the
backend in force (plain autograd, or ``torch.func`` under transforms). Either way the result is
differentiable when ``init`` carries a graph (MAML, under an outer ``torch.func.grad`` or on leaves
that require grad) and no graph is built otherwise (FOMAML, Reptile, Leap, iMAML). No step reads
a value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad import autodiff, linalg, tree
from metagrad._registry import Registry
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Params


def _split(init: Params, keys: Sequence[str] | None) -> tuple[Params, Params]:
    """``(adapted, frozen)``: the entries named in ``keys`` (all when None) and the rest."""
    if keys is None:
        return dict(init), {}
    wanted = set(keys)
    return (
        {k: v for k, v in init.items() if k in wanted},
        {k: v for k, v in init.items() if k not in wanted},
    )


def _stack(losses: list[Tensor], like: Params) -> Tensor:
    if losses:
        return torch.stack(losses)
    v = next(iter(like.values()))
    return torch.zeros(0, dtype=v.dtype, device=v.device)


def _adapted(
    f: LossFn | object,
    phi: Params,
    frozen: Params,
    losses: list[Tensor],
    init: Params,
    path: list[Params] | None,
    grads: list[Params],
) -> Adapted:
    """Assemble :class:`Adapted`; with a recorded ``path``, add the final loss ``f(phi_K)``."""
    if path is None:
        return Adapted({**frozen, **phi}, _stack(losses, init))
    return Adapted(
        {**frozen, **phi},
        _stack(losses, init),
        path=[{**frozen, **p} for p in path],
        grads=grads,
        path_losses=torch.stack([*losses, f(phi)]),  # type: ignore[operator, call-arg]
    )


@dataclass(frozen=True)
class GradientDescent:
    """Gradient descent, ``steps`` times: ``phi_{k+1} = phi_k - lr grad L(phi_k)`` from ``init``.

    >>> gd = GradientDescent(lr=0.4, steps=5)
    """

    lr: float = 0.4
    steps: int = 1

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps={self.steps}: the number of inner steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: the inner learning rate must be > 0")

    def __call__(
        self,
        loss: LossFn,
        init: Params,
        batch: Batch,
        *,
        keys: Sequence[str] | None = None,
        record: bool = False,
    ) -> Adapted:
        phi, frozen = _split(init, keys)
        f = lambda p: loss({**frozen, **p}, batch)  # noqa: E731
        losses, path, grads = [], [phi], []
        for _ in range(self.steps):
            g, value = autodiff.grad_and_value(f)(phi)
            phi = tree.axpy(-self.lr, g, phi)
            losses.append(value)
            if record:
                path.append(phi)
                grads.append(g)
        return _adapted(f, phi, frozen, losses, init, path if record else None, grads)


@dataclass(frozen=True)
class NewtonCG:
    """Hessian-free Newton: ``phi <- phi + t d`` with ``H d = -g`` solved by ``cg_steps`` of CG.

    The Hessian enters only through Hessian-vector products. The step size ``t`` is the largest of
    ``1, 1/2, ..., 2^-(line_search - 1)`` that satisfies Armijo's condition
    ``L(phi + t d) <= L(phi) + c t <g, d>`` (no step when none does); every candidate is evaluated,
    so the choice needs no host synchronisation. Where CG's ``d`` is not a descent direction
    (negative curvature), ``d = -g``. On a strongly convex quadratic one step reaches the minimiser.

    >>> hf = NewtonCG(steps=3, cg_steps=10)
    """

    steps: int = 3
    cg_steps: int = 10
    line_search: int = 10
    armijo: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("steps", "cg_steps", "line_search"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")

    def __call__(
        self,
        loss: LossFn,
        init: Params,
        batch: Batch,
        *,
        keys: Sequence[str] | None = None,
        record: bool = False,
    ) -> Adapted:
        phi, frozen = _split(init, keys)
        f = lambda p: loss({**frozen, **p}, batch)  # noqa: E731
        losses, path, grads = [], [phi], []
        ts = [2.0**-i for i in range(self.line_search)]
        for _ in range(self.steps):
            g, value, hvp = autodiff.hessian_at(f, phi)
            d, _ = linalg.cg(hvp, tree.scale(g, -1.0), self.cg_steps)
            descent = tree.vdot(g, d) < 0
            d = {k: torch.where(descent, d[k], -g[k]) for k in d}
            slope = tree.vdot(g, d)
            step = torch.zeros_like(value)
            for t in reversed(ts):  # the largest admissible t wins: later candidates overwrite
                ok = f(tree.axpy(t, d, phi)) <= value + self.armijo * t * slope
                step = torch.where(ok, torch.as_tensor(t, dtype=value.dtype), step)
            phi = tree.axpy(step, d, phi)
            losses.append(value)
            if record:
                path.append(phi)
                grads.append(g)
        return _adapted(f, phi, frozen, losses, init, path if record else None, grads)


INNER_SOLVERS: Registry[InnerSolver] = Registry("inner solver")
"""Name -> ``build(steps=, **options) -> solver``; ``options`` map keywords to config fields."""
INNER_SOLVERS.register("gd", GradientDescent, options={"lr": "inner_lr"}, help="gradient descent")
INNER_SOLVERS.register(
    "newton-cg",
    NewtonCG,
    options={"cg_steps": "newton_cg_steps"},
    help="Hessian-free Newton-CG with a line search",
)
