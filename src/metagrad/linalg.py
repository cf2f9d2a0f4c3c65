"""Linear algebra on ``Params``: Hessian-vector products and three linear solvers.

A linear solver is ``solve(matvec, b, **options) -> (x, residual)``: an approximation of
``x = A^{-1} b`` from the products ``v -> A v`` alone, and its relative residual
``||b - A x|| / ||b||`` (or, for :func:`neumann`, a bound on it). :func:`cg` (conjugate gradient,
``A`` symmetric positive definite), :func:`neumann` (the truncated Neumann series of Lorraine et
al., ``A`` with its spectrum in ``(0, 2 / alpha)``) and :func:`exact` (the dense matrix, built from
one product per unknown, then ``torch.linalg.solve``; for small problems) all have that form, so
:func:`metagrad.implicit.root_vjp` takes any of them.

All are free of host synchronisation and of data-dependent Python control flow, so they run under
``torch.func.vmap`` and on a GPU without a sync per iteration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metagrad import tree
from metagrad._types import Params


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    """The Hessian-vector product ``H v`` with ``H = d^2 f / d params^2``.

    Forward-over-reverse (``jvp`` of ``grad``), the cheaper mode; reverse-over-reverse (``vjp`` of
    ``grad``) where an operator lacks a forward-mode derivative.
    """
    try:
        return torch.func.jvp(torch.func.grad(f), (params,), (v,))[1]
    except (NotImplementedError, RuntimeError):
        # Some operators lack (or have a broken) forward-mode derivative; reverse mode then.
        vjp_fn = torch.func.vjp(torch.func.grad(f), params)[1]
        return vjp_fn(v)[0]  # type: ignore[no-any-return]


def cg(
    matvec: Callable[[Params], Params],
    b: Params,
    steps: int,
    tol: float = 0.0,
) -> tuple[Params, Tensor]:
    """Solve ``A x = b`` (``A`` symmetric positive definite) by conjugate gradient from ``x = 0``.

    Runs exactly ``steps`` iterations; once the squared residual falls to ``tol^2 ||b||^2`` the
    iterate is frozen (masked, not branched on), so no iteration reads a value back to the host.
    Returns ``(x, ||b - A x|| / ||b||)`` (the recursive residual).
    """
    x = tree.zeros_like(b)
    r = b
    p = r
    rs = tree.sqnorm(r)
    bs = rs
    tiny = torch.finfo(rs.dtype).tiny
    threshold = (tol**2) * bs
    for _ in range(steps):
        active = rs > threshold
        ap = matvec(p)
        pap = tree.vdot(p, ap)
        alpha = torch.where(active & (pap != 0), rs / torch.where(pap == 0, 1.0, pap), 0.0)
        x = tree.axpy(alpha, p, x)
        r = tree.axpy(-alpha, ap, r)
        rs_new = tree.sqnorm(r)
        beta = torch.where(active, rs_new / torch.clamp(rs, min=tiny), 0.0)
        p = tree.axpy(beta, p, r)
        rs = torch.where(active, rs_new, rs)
    return x, torch.sqrt(rs / torch.clamp(bs, min=tiny))


def neumann(
    matvec: Callable[[Params], Params],
    b: Params,
    steps: int,
    alpha: float,
) -> tuple[Params, Tensor]:
    r"""``A^{-1} b`` by the truncated Neumann series, with ``steps`` products ``A v``.

    .. math::  A^{-1} b \approx \alpha \sum_{j=0}^{\text{steps}} (I - \alpha A)^j b,

    Lorraine, Vicol & Duvenaud (2020), *Optimizing Millions of Hyperparameters by Implicit
    Differentiation*. The series converges to ``A^{-1} b`` when every eigenvalue of
    ``alpha A`` lies in ``(0, 2)`` (for a symmetric positive definite ``A``: ``alpha ||A|| < 2``),
    and diverges when one lies outside ``[0, 2]``. ``steps=0`` costs no product and returns
    ``alpha b``: with ``alpha=1`` the identity approximation ``A^{-1} ~ I``.

    Returns ``(x, ||(I - alpha A)^steps b|| / ||b||)``: the size of the last term of the series.
    The residual of ``x`` is ``(I - alpha A)^(steps+1) b``, so for a symmetric ``A`` with
    ``0 <= alpha A <= 2`` this bounds the relative residual ``||b - A x|| / ||b||`` without the
    extra product the residual itself would cost.
    """
    if steps < 0:
        raise ValueError(f"steps={steps}: the number of Neumann terms must be >= 0")
    term = b  # (I - alpha A)^j b
    total = b  # sum_{i <= j} (I - alpha A)^i b
    for _ in range(steps):
        term = tree.axpy(-alpha, matvec(term), term)
        total = tree.add(total, term)
    tiny = torch.finfo(next(iter(b.values())).dtype).tiny
    size = torch.sqrt(tree.sqnorm(term) / torch.clamp(tree.sqnorm(b), min=tiny))
    return tree.scale(total, alpha), size


def exact(matvec: Callable[[Params], Params], b: Params) -> tuple[Params, Tensor]:
    """``A^{-1} b`` exactly: ``A`` built densely from one product per unknown, then solved.

    ``A`` need not be symmetric. It costs ``n`` products and an ``n x n`` matrix for ``n`` unknowns
    (every entry of every tensor of ``b``): a reference for small problems. Returns ``(x,
    ||b - A x|| / ||b||)``.
    """
    flat = tree.flatten(b)
    eye = torch.eye(flat.shape[-1], dtype=flat.dtype, device=flat.device)
    columns = [tree.flatten(matvec(tree.unflatten(e, b))) for e in eye]
    a = torch.stack(columns, dim=-1)
    x = torch.linalg.solve(a, flat)
    tiny = torch.finfo(flat.dtype).tiny
    residual = torch.linalg.vector_norm(flat - a @ x) / torch.clamp(
        torch.linalg.vector_norm(flat), min=tiny
    )
    return tree.unflatten(x, b), residual
