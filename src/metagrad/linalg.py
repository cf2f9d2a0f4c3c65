"""Linear algebra on ``Params``: Hessian-vector products and conjugate gradient.

Both are free of host synchronisation and of data-dependent Python control flow, so they run under
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
