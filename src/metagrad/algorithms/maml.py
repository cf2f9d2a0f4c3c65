r"""MAML, first-order MAML, ANIL, truncated and checkpointed MAML, learned step sizes.

Finn, Abbeel & Levine (2017), *Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks*;
Raghu et al. (2020), *Rapid Learning or Feature Reuse?* (ANIL); Shaban et al. (2019), *Truncated
Back-propagation for Bilevel Optimization* (``truncate``).

With the inner solver's steps :math:`s_{k+1} = T_k(s_k)` from :math:`s_0 = \mathrm{init}(\theta)`
(the state :math:`s` holds :math:`\phi` and, for momentum or Adam, the solver's own entries), the
meta-gradient for one task is

.. math::  g = \frac{d}{d\theta} L_q(\phi_S(\theta))
             = J_0^\top J_1^\top \cdots J_{S-1}^\top \nabla L_q(\phi_S), \qquad
             J_k = \partial s_{k+1} / \partial s_k,

differentiated through the unrolled inner loop. First-order MAML takes :math:`J_\phi = I`:
:math:`g = \nabla L_q(\phi)`. ANIL adapts only the head (``head`` name prefixes); the body still
receives its gradient through the query loss.

``truncate=m`` keeps the Jacobians of the last :math:`m` steps and takes the earlier ones as the
identity: :math:`g = J_{S-m}^\top \cdots J_{S-1}^\top \nabla L_q(\phi_S)`, applied to
:math:`\phi_{S-m}` as if it were :math:`\theta` (``m = 0`` is FOMAML, ``m = S`` is MAML); the
first :math:`S - m` steps build no graph, so memory is that of :math:`m` steps.

``learn_lr`` learns the inner step sizes with the initialisation (gradient descent inner loops):
``"parameter"`` one per parameter entry, :math:`\phi_{k+1} = \phi_k - \alpha \odot \nabla
L_s(\phi_k)` (Meta-SGD, Li et al. 2017), ``"layer-step"`` one per parameter tensor and inner step
(MAML++, Antoniou et al. 2019). They are stored as logarithms, ``log_lr/<name>`` (shape of the
parameter, or ``(steps,)``), so they stay positive, start at the solver's ``lr``, and get their
gradient through the same unrolled loop. With more inner steps than learned (at test time), the
last step's rates repeat.

``checkpoint=True`` computes the same product, exactly, by a reverse sweep: the forward pass keeps
only the states :math:`s_k` (parameter-sized tensors), no activations; then, from
:math:`a_S = \nabla L_q(\phi_S)`, each step is recomputed from :math:`s_k` and differentiated
once, :math:`a_k = J_k^\top a_{k+1}` (one step's graph at a time, freed after). It runs on both
backends of :mod:`metagrad.autodiff`, under ``vmap`` too, and combines with ``truncate``.

>>> import metagrad as mg, torch
>>> model = mg.models.MLP()
>>> maml = mg.MAML(mg.loss_fn(model, "mse"), mg.GradientDescent(lr=0.01, steps=1))
>>> task = mg.data.Sinusoid(shots=10, queries=10).sample(1, torch.Generator().manual_seed(0))
>>> grad, metrics = maml(mg.params_of(model), mg.task_at(task, 0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from metagrad import autodiff, tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics
from metagrad.inner import GradientDescent, IterativeSolver, LearnedRates, State, split

LR = "log_lr"
"""The key prefix of learned step sizes' logarithms in the meta-parameters: ``log_lr/<name>``."""


@dataclass(frozen=True, eq=False)
class MAML(EstimatorBase):
    """MAML (second order by default; ``first_order=True`` is FOMAML); ``head`` makes it ANIL.

    ``truncate=m`` differentiates the last ``m`` inner steps only; ``checkpoint=True`` recomputes
    each step in the backward pass instead of storing its activations (the same gradient).
    """

    hyper_prefixes: ClassVar[tuple[str, ...]] = (LR,)

    loss: LossFn
    inner: InnerSolver
    first_order: bool = False
    head: tuple[str, ...] | None = None
    truncate: int | None = None
    checkpoint: bool = False
    learn_lr: Literal["parameter", "layer-step"] | None = None

    def __post_init__(self) -> None:
        self._check_learn_lr()
        if self.head is not None:
            head = (self.head,) if isinstance(self.head, str) else tuple(self.head)
            if not head or not all(isinstance(p, str) and p for p in head):
                raise ValueError(f"head={self.head!r}: give name prefixes, e.g. head=('head.',)")
            object.__setattr__(self, "head", head)
        steps = self.inner.steps
        if self.truncate is not None:
            m = self.truncate
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= steps:
                raise ValueError(
                    f"truncate={m}: give a number of steps in [0, {steps}] (the inner solver's "
                    f"steps; 0 is first-order MAML, {steps} is MAML), or None"
                )
            if self.first_order:
                raise ValueError(
                    f"truncate={m} with first_order=True: first-order MAML is truncate=0; "
                    "give one of them"
                )
        if self.checkpoint and self.first_order:
            raise ValueError(
                "checkpoint=True with first_order=True: first-order MAML keeps no graph to "
                "checkpoint; drop checkpoint=True (or first_order=True for exact MAML)"
            )
        if (self.checkpoint or self.truncate is not None) and not isinstance(
            self.inner, IterativeSolver
        ):
            raise ValueError(
                f"truncate and checkpoint need an inner solver written as steps "
                f"(metagrad.inner.IterativeSolver: init and step), got {type(self.inner).__name__}"
            )

    def _check_learn_lr(self) -> None:
        if self.learn_lr is None:
            return
        if self.learn_lr not in ("parameter", "layer-step"):
            raise ValueError(
                f"learn_lr={self.learn_lr!r}: use 'parameter' (Meta-SGD), 'layer-step' (MAML++) "
                "or None"
            )
        if self.first_order:
            raise ValueError(
                f"learn_lr={self.learn_lr!r} with first_order=True: first-order MAML takes the "
                "query gradient at phi as the meta-gradient, which has no part for the step "
                "sizes, so they would never move; use first_order=False"
            )
        if not isinstance(self.inner, GradientDescent):
            raise ValueError(
                f"learn_lr={self.learn_lr!r} learns gradient descent's step sizes; the inner "
                f"solver is {type(self.inner).__name__}: use metagrad.GradientDescent"
            )
        if self.truncate is not None or self.checkpoint:
            raise ValueError(
                f"learn_lr={self.learn_lr!r} with truncate or checkpoint is not supported: the "
                "step sizes' gradient needs the whole unrolled loop; drop truncate / checkpoint"
            )

    def init_meta(self, model: nn.Module) -> Params:
        """The initialisation, and with ``learn_lr`` the log step sizes (``log_lr/<name>``)."""
        meta: Params = dict(model.named_parameters())
        if self.learn_lr is None:
            return meta
        lr = math.log(self.inner.lr)  # type: ignore[attr-defined]
        for name in self.keys(meta) or list(meta):
            p = meta[name]
            shape = p.shape if self.learn_lr == "parameter" else (self.inner.steps,)
            meta[f"{LR}/{name}"] = nn.Parameter(
                torch.full(shape, lr, dtype=p.dtype, device=p.device)
            )
        return meta

    def solver(self, meta: Params) -> tuple[Params, InnerSolver]:
        """``(theta, inner solver)``: with ``learn_lr``, gradient descent at the learned rates."""
        theta = self.model_params(meta)
        if self.learn_lr is None:
            return theta, self.inner
        logs = {k[len(LR) + 1 :]: v for k, v in meta.items() if k.startswith(LR + "/")}
        if not logs:
            raise ValueError(
                f"learn_lr={self.learn_lr!r} but the meta-parameters hold no {LR}/ entries: "
                "start them with estimator.init_meta(model)"
            )

        def rates(k: int) -> Params:
            if self.learn_lr == "parameter":
                return {n: v.exp() for n, v in logs.items()}
            return {n: v[min(k, v.shape[0] - 1)].exp() for n, v in logs.items()}

        gd: GradientDescent = self.inner  # type: ignore[assignment]
        return theta, LearnedRates(rates, steps=gd.steps, batch_size=gd.batch_size)

    def keys(self, theta: Params) -> list[str] | None:
        """The adapted parameter names: all (None), or those starting with a ``head`` prefix."""
        if self.head is None:
            return None
        keys = [k for k in theta if k.startswith(self.head)]
        if not keys:
            raise ValueError(
                f"head={self.head} matches no parameter; the names are {list(theta)}: give "
                "prefixes of the head's names, e.g. head=('head.',)"
            )
        return keys

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        keys = self.keys(self.model_params(theta))
        score = scored(self.loss)
        if self.first_order:  # J = I: the query gradient at phi
            adapted = self.inner(self.loss, theta, task.support, keys=keys)
            grad, (query_loss, accuracy) = autodiff.grad_and_value(score, has_aux=True)(
                adapted.params, task.query
            )
        elif self.checkpoint:  # J_0^T ... J_{S-1}^T grad L_q(phi), one recomputed step at a time
            grad, adapted, query_loss, accuracy = self._reverse_sweep(theta, task, keys)
        else:  # d/dtheta L_q(phi(theta)), through the unrolled solver (its last `truncate` steps)

            def query_loss_of(meta: Params) -> tuple[Tensor, tuple[tuple, Tensor | None]]:
                adapted = self._unrolled(meta, task.support, keys)
                value, accuracy = score(adapted.params, task.query)
                return value, (adapted[:2], accuracy)

            grad, (query_loss, (aux, accuracy)) = autodiff.grad_and_value(
                query_loss_of, has_aux=True
            )(theta)
            adapted = Adapted(*aux)
        return grad, task_metrics(self.loss, adapted, task.query, query_loss, accuracy)

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        theta, inner = self.solver(theta)
        return inner(self.loss, theta, support, keys=self.keys(theta))

    def _unrolled(self, meta: Params, support: Batch, keys: list[str] | None) -> Adapted:
        """``phi_S(theta)`` with the Jacobians of the last ``truncate`` steps, J = I before."""
        theta, solver = self.solver(meta)
        steps = self.inner.steps
        m = steps if self.truncate is None else self.truncate
        if m == steps:
            return solver(self.loss, theta, support, keys=keys)
        inner: IterativeSolver = self.inner  # type: ignore[assignment]
        phi, frozen = split(theta, keys)
        f = self._objectives(support)
        state, losses = inner.init(tree.detach(phi)), []
        for k in range(steps - m):  # no graph
            state, value, _ = inner.step(f(tree.detach(frozen), k), state, k)
            losses.append(value)
        # phi_{S-m}, with d phi_{S-m} / d theta = I: its value plus zero that carries theta's graph
        start = {n: v.detach() + (phi[n] - phi[n].detach()) for n, v in state["params"].items()}
        state = {**{p: tree.detach(s) for p, s in state.items()}, "params": start}
        for k in range(steps - m, steps):
            state, value, _ = inner.step(f(frozen, k), state, k)
            losses.append(value)
        return Adapted({**frozen, **state["params"]}, torch.stack(losses))

    def _objectives(self, support: Batch) -> Callable[[Params, int], Callable[[Params], Tensor]]:
        """``(frozen, k) ->`` step ``k``'s loss of the adapted parameters, on its mini-batch."""
        batch_at = self.inner.batches(support)  # type: ignore[attr-defined]
        return lambda frozen, k: lambda p: self.loss({**frozen, **p}, batch_at(k))

    def _reverse_sweep(
        self, theta: Params, task: Task, keys: list[str] | None
    ) -> tuple[Params, Adapted, Tensor, Tensor | None]:
        """The checkpointed meta-gradient: the states forward, then ``a_k = J_k^T a_{k+1}``."""
        inner: IterativeSolver = self.inner  # type: ignore[assignment]
        steps = inner.steps
        m = steps if self.truncate is None else self.truncate
        phi, frozen = split(tree.detach(theta), keys)
        f = self._objectives(task.support)
        state, kept, losses = inner.init(phi), [], []
        for k in range(steps):  # no graph; keep the states the sweep starts its steps from
            if k >= steps - m:
                kept.append(state)
            state, value, _ = inner.step(f(frozen, k), state, k)
            losses.append(value)
        final = state["params"]
        grad_q, (query_loss, accuracy) = autodiff.grad_and_value(scored(self.loss), has_aux=True)(
            {**frozen, **final}, task.query
        )
        a = {p: tree.zeros_like(s) for p, s in state.items()}  # a_S = d L_q / d s_S
        a["params"] = {n: grad_q[n] for n in final}
        g_frozen = {n: grad_q[n] for n in frozen}
        for k in reversed(range(steps - m, steps)):

            def pulled(x: Params, k: int = k, a: State = a) -> Tensor:  # <T_k(s, frozen), a>
                s, fr = _unflat(x)
                return _dot(inner.step(f(fr, k), s, k)[0], a)

            dx, _ = autodiff.grad_and_value(pulled)(_flat(kept[k - steps + m], frozen))
            a, d_frozen = _unflat(dx)  # a_k = J_k^T a_{k+1}, and the frozen entries' share
            g_frozen = tree.add(g_frozen, d_frozen)
        if m == steps:  # through s_0 = init(theta)
            g_phi, _ = autodiff.grad_and_value(lambda p: _dot(inner.init(p), a))(phi)
        else:  # d phi_{S-m} / d theta = I
            g_phi = a["params"]
        grad = {**g_frozen, **g_phi}
        adapted = Adapted({**frozen, **final}, _stack(losses, final))
        return {n: grad[n] for n in theta}, adapted, query_loss, accuracy


def _dot(state: State, cotangent: State) -> Tensor:
    """``<state, cotangent>`` over every entry of every part."""
    return torch.stack([tree.vdot(state[p], cotangent[p]) for p in state]).sum()


def _flat(state: State, frozen: Params) -> Params:
    """One ``Params`` of a state and the frozen parameters (keys ``part:name``)."""
    parts = {**state, "frozen": frozen}
    return {f"{p}:{n}": v for p, entries in parts.items() for n, v in entries.items()}


def _unflat(flat: Params) -> tuple[State, Params]:
    """The inverse of :func:`_flat`: ``(state, frozen)``."""
    parts: dict[str, Params] = {}
    for key, v in flat.items():
        p, n = key.split(":", 1)
        parts.setdefault(p, {})[n] = v
    frozen = parts.pop("frozen", {})
    return parts, frozen


def _stack(losses: list[Tensor], like: Params) -> Tensor:
    if losses:
        return torch.stack(losses)
    v = next(iter(like.values()))
    return torch.zeros(0, dtype=v.dtype, device=v.device)


def ANIL(  # noqa: N802 (a constructor, named like the class it stands for)
    loss: LossFn,
    inner: InnerSolver,
    head: Sequence[str] = ("head.",),
    first_order: bool = False,
    **options: Any,
) -> MAML:
    """ANIL: MAML whose inner loop adapts only the parameters named with a ``head`` prefix.

    ``options`` are MAML's (``truncate``, ``checkpoint``, ``learn_lr``).
    """
    return MAML(loss, inner, first_order=first_order, head=tuple(head), **options)
