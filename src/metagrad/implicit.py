r"""Implicit differentiation: the vector-Jacobian product of a solution defined by a root.

Let :math:`\phi^*(a)` solve an optimality condition :math:`F(\phi, a) = 0` (for a minimisation,
:math:`F = \nabla_\phi f`, the gradient of the inner objective). Differentiating the condition
gives :math:`\partial_\phi F \; d\phi^*/da = -\partial_a F` (the implicit function theorem), so
for the gradient :math:`g` of an outer loss at :math:`\phi^*`

.. math::  \frac{dL}{da} = -(\partial_a F)^\top u, \qquad (\partial_\phi F)^\top u = g.

No derivative of whatever found :math:`\phi^*` is needed, only vector-Jacobian products of
:math:`F` at the solution: one per iteration of the linear solver, and one for the arguments.
The split into an optimality condition, a linear solve and one product is that of Blondel et al.
(2022), *Efficient and Modular Implicit Differentiation*. iMAML is the case
:math:`F = \nabla L_s(\phi) + \lambda(\phi - \theta)`; hyperparameter optimisation (Lorraine,
Vicol & Duvenaud 2020) the case :math:`F = \nabla_\phi L_{train}(\phi, \lambda)`.

>>> import torch, metagrad as mg
>>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
>>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
>>> def optimality(w, args):  # the gradient of ||x w - y||^2 / 2 + lam ||w||^2 / 2
...     return {"w": x.T @ (x @ w["w"] - y) + args["lam"] * w["w"]}
>>> args = {"lam": torch.tensor(1.0, dtype=torch.float64)}
>>> w = {"w": torch.linalg.solve(x.T @ x + torch.eye(2, dtype=torch.float64), x.T @ y)}
>>> grads, residual = mg.implicit.root_vjp(optimality, w, args, {"w": w["w"]}, steps=2)
>>> round(float(grads["lam"]), 6)  # d/dlam of ||w*(lam)||^2 / 2
-0.305923
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad import autodiff, linalg, tree
from metagrad._types import Params

Optimality = Callable[[Params, Params], Params]
"""``F(solution, args) -> Params`` keyed like ``solution``; zero at the solution."""

__all__ = ["Optimality", "root_vjp"]


def root_vjp(
    optimality: Optimality,
    solution: Params,
    args: Params,
    cotangent: Params,
    solve: Callable[..., tuple[Params, Tensor]] = linalg.cg,
    **options: Any,
) -> tuple[Params, Tensor]:
    """The gradient ``dL/dargs`` of an outer loss at a root, by the implicit function theorem.

    ``optimality(solution, args)`` is ``F`` (zero at ``solution``), ``cotangent`` the outer
    gradient ``dL/dsolution`` there (keyed like ``solution``). Solves
    ``(dF/dsolution)^T u = cotangent`` with ``solve(matvec, cotangent, **options)`` (any solver
    of :mod:`metagrad.linalg`: ``cg`` with ``steps`` and ``tol``, ``neumann`` with ``steps`` and
    ``alpha``, ``exact``) and returns ``(-(dF/dargs)^T u, residual)``, the first keyed like
    ``args`` (floating-point tensors), the second the solver's residual.

    ``F`` is evaluated once; each product is one backward pass through its graph, on the backend
    of :mod:`metagrad.autodiff` in force (plain autograd, or ``torch.func``, under ``vmap`` too).
    """
    vjp_solution, vjp_args = _linearize(optimality, solution, args)
    u, residual = solve(vjp_solution, cotangent, **options)  # (dF/dsolution)^T u = cotangent
    return tree.scale(vjp_args(u), -1.0), residual  # -(dF/dargs)^T u


def _linearize(
    f: Optimality, solution: Params, args: Params
) -> tuple[Callable[[Params], Params], Callable[[Params], Params]]:
    """``u -> (dF/dsolution)^T u`` and ``u -> (dF/dargs)^T u`` at ``(solution, args)``.

    On ``"autograd"`` the graph of ``F`` is built once and kept (``retain_graph``); each product
    differentiates it, with a graph of its own only when the inputs carry one (so that the result
    is differentiable in turn). On ``"func"``, ``torch.func.vjp``, which does the same.
    """
    if autodiff.backend() == "func":
        vjp_fn = torch.func.vjp(f, solution, args)[1]
        return (lambda u: vjp_fn(u)[0]), (lambda u: vjp_fn(u)[1])
    graph = any(v.requires_grad for v in [*solution.values(), *args.values()])
    leaves = [{k: _leaf(v, graph) for k, v in p.items()} for p in (solution, args)]
    with torch.enable_grad():
        out = f(*leaves)
    live = [k for k in out if out[k].requires_grad]  # F may be constant in some entries

    def transposed(wrt: Params) -> Callable[[Params], Params]:
        def product(u: Params) -> Params:
            if not live:
                return tree.zeros_like(wrt)
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    [out[k] for k in live],
                    list(wrt.values()),
                    [u[k] for k in live],
                    retain_graph=True,
                    create_graph=graph,
                    allow_unused=True,
                    materialize_grads=True,
                )
            return dict(zip(wrt, grads, strict=True))

        return product

    return transposed(leaves[0]), transposed(leaves[1])


def _leaf(v: Tensor, graph: bool) -> Tensor:
    """``v`` ready to differentiate with respect to: itself where it is part of a graph."""
    return v if graph and v.requires_grad else v.detach().requires_grad_()
