r"""iMAML: implicit meta-gradients of a proximally regularised inner problem.

Rajeswaran, Finn, Kakade & Levine (2019), *Meta-Learning with Implicit Gradients*.

The inner problem is :math:`\phi^*(\theta) = \arg\min_\phi L_s(\phi) + \tfrac{\lambda}{2}
\|\phi - \theta\|^2`, solved approximately from :math:`\theta` by the inner solver (gradient
descent: iMAML-GD; Newton-CG: iMAML-HF). Its optimality condition

.. math::  F(\phi; \theta, \lambda) = \nabla L_s(\phi) + \lambda(\phi - \theta) = 0

gives the meta-gradient by the implicit function theorem (:func:`metagrad.implicit.root_vjp`):
:math:`-(\partial_\theta F)^\top u = \lambda u` with :math:`(H_s(\phi) + \lambda I) u = \nabla
L_q(\phi)`, that is the paper's

.. math::  \left(I + \tfrac{1}{\lambda} H_s(\phi)\right) v = \nabla L_q(\phi), \qquad v = \lambda u,

found by ``cg_steps`` of conjugate gradient on Hessian-vector products. No graph of the inner
loop is kept: memory does not depend on the number of inner steps.

**Learned lam** (``learn_lam``). :math:`\lambda` becomes a meta-parameter, kept positive by
storing its logarithm in the dict of :meth:`IMAML.init_meta`: one entry ``"log_lam"``
(``learn_lam="global"``), or one ``"log_lam/<module>"`` per module (``"module"``, the proximal
strength per module of Chen et al. 2019, *Modular Meta-Learning with Shrinkage*; a module is a
parameter's name without its last part, ``"body.0"`` for ``"body.0.weight"``, and a parameter
of the root module is a module of its own). Its gradient comes from the same solve:
:math:`-(\partial_\lambda F)^\top u = -\tfrac{1}{\lambda} v \cdot (\phi - \theta)` (the dot
product over the module's parameters for a module's lam), so the entry ``log_lam`` receives
:math:`-v \cdot (\phi - \theta)`. The loss only ever sees the model's parameters.

**Damping.** The paper's form is the default. The authors' released code damps the system to
:math:`(1 + c) v + H_s v / (\lambda + d) = \nabla L_q`; ``cg_damping=c`` and ``lam_damping=d``
reproduce it (that code's defaults: ``cg_damping=1.0, lam_damping=10.0``). The damping changes
the linear solve only: CG runs on :math:`H_s + (1 + c)(\lambda + d) I` in place of the Jacobian
:math:`H_s + \lambda I`, and its solution is scaled by :math:`(\lambda + d)/\lambda`, which gives
that :math:`v` for :math:`\theta` and :math:`-\tfrac{1}{\lambda} v \cdot (\phi - \theta)` for a
learned :math:`\lambda`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from metagrad import autodiff, implicit, linalg, tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, check_batch, module_of, scored, task_metrics

LAM = "log_lam"
"""The key of a learned lam's logarithm in the meta-parameters (``log_lam/<module>`` per module)."""

LearnLam = Literal["global", "module"]


def _is_lam(key: str) -> bool:
    return key == LAM or key.startswith(LAM + "/")


@dataclass(frozen=True, eq=False)
class IMAML(EstimatorBase):
    """iMAML: the implicit meta-gradient ``v = (I + H_s(phi)/lam)^{-1} grad L_q(phi)``.

    ``lam`` is the proximal strength (its initial value when ``learn_lam`` is ``"global"`` or
    ``"module"``; ``None`` keeps it fixed).
    """

    hyper_prefixes: ClassVar[tuple[str, ...]] = (LAM,)

    loss: LossFn
    inner: InnerSolver
    lam: float = 1.0
    cg_steps: int = 5
    cg_tol: float = 0.0
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    learn_lam: LearnLam | None = None
    pullback: float | None = None
    """``None``: ``phi`` solves the proximal problem (the paper). A step size: the released
    code's inner loop instead, the inner solver on ``L_s`` alone, then one gradient step of this
    size on the proximal term, ``phi <- phi - pullback lam (phi - theta)``; :meth:`adapt` (test
    time) returns the plain solve, without the pull-back, as that code tests with lam 0."""

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"lam={self.lam}: the proximal regularisation must be > 0")
        if self.pullback is not None and not self.pullback > 0:
            raise ValueError(
                f"pullback={self.pullback}: the pull-back step size must be > 0 (None: solve "
                "the proximal problem)"
            )
        if self.cg_steps < 0:
            raise ValueError(f"cg_steps={self.cg_steps}: the number of CG steps must be >= 0")
        if self.cg_damping < 0 or self.lam_damping < 0:
            raise ValueError(
                f"cg_damping={self.cg_damping}, lam_damping={self.lam_damping}: must be >= 0 "
                "(0 and 0 is the paper's form)"
            )
        if self.learn_lam not in (None, "global", "module"):
            raise ValueError(
                f"learn_lam={self.learn_lam!r}: use 'global' (one learned lam), 'module' (one "
                "per module) or None (lam fixed)"
            )

    def init_meta(self, model: nn.Module) -> Params:
        """The model's parameters, and ``log(lam)`` under :data:`LAM` keys when lam is learned."""
        meta: Params = dict(model.named_parameters())
        if self.learn_lam is not None:
            clash = [k for k in meta if _is_lam(k)]
            if clash:
                raise ValueError(
                    f"the model has a parameter named {clash[0]!r}, a key IMAML keeps for a "
                    "learned lam: rename that parameter"
                )
            like = next(iter(meta.values()))
            for key in self._lam_keys(meta):
                meta[key] = nn.Parameter(
                    torch.full((), math.log(self.lam), dtype=like.dtype, device=like.device)
                )
        return meta

    def _lam_keys(self, theta: Params) -> list[str]:
        if self.learn_lam == "global":
            return [LAM]
        if self.learn_lam == "module":
            return list(dict.fromkeys(f"{LAM}/{module_of(k)}" for k in theta))
        return []

    def _split(self, meta: Params) -> tuple[Params, dict[str, Tensor | float]]:
        """``(theta, lam of each parameter)`` from the meta-parameters."""
        if self.learn_lam is None:
            stray = [k for k in meta if _is_lam(k)]
            if stray:
                raise ValueError(
                    f"meta-parameter {stray[0]!r} holds a learned lam, but learn_lam=None: "
                    "pass the learn_lam it was made with, or drop the entry"
                )
            return meta, dict.fromkeys(meta, self.lam)
        theta = {k: v for k, v in meta.items() if not _is_lam(k)}
        expected, given = self._lam_keys(theta), [k for k in meta if _is_lam(k)]
        if set(expected) != set(given):
            raise ValueError(
                f"learn_lam={self.learn_lam!r} needs the meta-parameters {expected}, got "
                f"{given or 'none'}: build them with estimator.init_meta(model)"
            )
        if self.learn_lam == "global":
            return theta, dict.fromkeys(theta, meta[LAM].exp())
        return theta, {k: meta[f"{LAM}/{module_of(k)}"].exp() for k in theta}

    def proximal_loss(self, meta: Params) -> LossFn:
        """``L_s(phi) + sum_k lam_k/2 ||phi_k - theta_k||^2``, the inner objective."""
        theta, lam = self._split(meta)

        def objective(phi: Params, batch: Batch) -> Tensor:
            d = tree.sub(phi, theta)
            penalty = torch.stack([lam[k] * torch.sum(d[k] * d[k]) for k in d]).sum()
            return self.loss(phi, batch) + 0.5 * penalty

        return objective

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        th, lam = self._split(theta)
        if self.pullback is None:
            return self.inner(self.proximal_loss(theta), th, support)
        adapted = self.inner(self.loss, th, support)
        phi = adapted.params
        pulled = {k: phi[k] - self.pullback * lam[k] * (phi[k] - th[k]) for k in phi}
        return adapted._replace(params=pulled)

    def adapt(self, theta: Params, support: Batch) -> Params:
        """``phi`` for one task's support set; with ``pullback``, the inner solve on ``L_s``
        alone (the released code's test time)."""
        if self.pullback is None:
            return super().adapt(theta, support)
        check_batch(support, "support", 0)
        theta = tree.detach(theta)
        return tree.detach(self.inner(self.loss, self._split(theta)[0], support).params)

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        """The meta-gradient for every entry of ``theta`` (the meta-parameters, lam's included)."""
        adapted = self._adapt(theta, task.support)
        phi = tree.detach(adapted.params)
        grad_query, (query_loss, accuracy) = autodiff.grad_and_value(
            scored(self.loss), has_aux=True
        )(phi, task.query)

        def optimality(phi: Params, meta: Params) -> Params:  # grad L_s(phi) + lam (phi - theta)
            th, lam = self._split(meta)
            grad = autodiff.grad_and_value(self.loss)(phi, task.support)[0]
            return {k: grad[k] + lam[k] * (phi[k] - th[k]) for k in phi}

        grad, residual = implicit.root_vjp(
            optimality, phi, theta, grad_query, solve=self._solve(theta)
        )
        metrics = task_metrics(self.loss, adapted, task.query, query_loss, accuracy)
        metrics["cg_residual"] = residual.detach()
        return grad, metrics

    def _solve(self, meta: Params) -> Callable[..., tuple[Params, Tensor]]:
        """CG on the Jacobian ``H_s + lam``; with damping, on the released code's system."""
        steps, tol, c, d = self.cg_steps, self.cg_tol, self.cg_damping, self.lam_damping
        if c == 0 and d == 0:
            return lambda matvec, b: linalg.cg(matvec, b, steps, tol)
        _, lam = self._split(meta)

        def damped(matvec: Callable[[Params], Params], b: Params) -> tuple[Params, Tensor]:
            shift = {k: c * lam[k] + (1 + c) * d for k in b}  # (1 + c)(lam + d) - lam

            def shifted(w: Params) -> Params:
                aw = matvec(w)
                return {k: aw[k] + shift[k] * w[k] for k in w}

            u, residual = linalg.cg(shifted, b, steps, tol)
            return {k: u[k] * (1 + d / lam[k]) for k in u}, residual

        return damped
