r"""Inner solvers: adapt ``theta`` to a task's support set.

A solver is a frozen dataclass called as ``solver(loss, init, batch, *, keys=None, record=False)``
and returns :class:`~metagrad.Adapted`. Its gradients come from :mod:`metagrad.autodiff`, on the
backend in force (plain autograd, or ``torch.func`` under transforms). Either way the result is
differentiable when ``init`` carries a graph (MAML, under an outer ``torch.func.grad`` or on leaves
that require grad) and no graph is built otherwise (FOMAML, Reptile, Leap, iMAML). No step reads
a value back to the host.

Each solver here is also a pure step, as in optax: ``state = solver.init(params)`` and
``state, value, grad = solver.step(f, state, k)`` for step ``k`` on the objective ``f`` (the
state is a dict of ``Params``: ``"params"`` and the solver's own entries, such as a velocity).
``__call__`` is the loop over those steps (:class:`IterativeSolver`); MAML's ``truncate`` and
``checkpoint`` options drive the same steps themselves.

Mini-batches (``batch_size=b``): step ``k`` uses the examples at positions ``k b, ..., k b + b - 1``
(modulo the support set's size ``n``) of one permutation of the support set, so the steps cycle
through it. The permutation is a pure function of the task: :func:`permutation` sorts an integer
hash of each example's values (exact integer arithmetic, the same on every device, one task at a
time or under ``vmap``), so the same task always gets the same mini-batches, different tasks get
different ones, and nothing is read back to the host. ``batch_size=None`` or ``n``: the full set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad import autodiff, linalg, tree
from metagrad._registry import Registry
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Params

State = dict[str, Params]
"""A solver's state: ``{"params": phi, ...}`` and its own entries (a velocity, Adam's moments)."""

Objective = Callable[[Params], Tensor]

_P = 2**31 - 1  # a prime: the product of two residues fits in int64


def split(init: Params, keys: Sequence[str] | None) -> tuple[Params, Params]:
    """``(adapted, frozen)``: the entries named in ``keys`` (all when None) and the rest."""
    if keys is None:
        return dict(init), {}
    wanted = set(keys)
    return (
        {k: v for k, v in init.items() if k in wanted},
        {k: v for k, v in init.items() if k not in wanted},
    )


def permutation(x: Tensor) -> Tensor:
    """A permutation of the examples on dim 0 of ``x``, a pure function of their values.

    Each example's values, in steps of ``2^-20``, are hashed with integer arithmetic modulo a
    prime (exact, so identical on every device and under ``vmap``); its position breaks ties
    between identical examples. The permutation sorts the hashes.
    """
    n = x.shape[0]
    q = torch.floor(x.reshape(n, -1).to(torch.float64) * 2.0**20).clamp(-(2.0**60), 2.0**60)
    q = q.to(torch.int64) % _P
    weights = torch.arange(1, q.shape[1] + 1, device=x.device, dtype=torch.int64) * 48271 % _P
    content = (q * weights % _P).sum(1) % _P
    key = (content * 65536 + torch.arange(n, device=x.device)) % _P
    return torch.argsort(key, stable=True)


def minibatch(batch: Batch, size: int, k: int, order: Tensor | None = None) -> Batch:
    """Mini-batch ``k``: positions ``k size .. k size + size - 1`` (mod n) of ``order``.

    ``order`` defaults to :func:`permutation` of ``batch.x``.
    """
    n = batch.x.shape[0]
    order = permutation(batch.x) if order is None else order
    index = order[torch.tensor([(k * size + j) % n for j in range(size)], device=order.device)]
    return Batch(batch.x[index], batch.y[index])


def _check(solver: object) -> None:
    """The checks every solver shares: ``steps >= 0``, ``lr > 0``, ``batch_size >= 1``."""
    steps, lr, size = (getattr(solver, a, None) for a in ("steps", "lr", "batch_size"))
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps}: the number of inner steps must be an integer >= 0")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr={lr}: the inner learning rate must be > 0")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(
            f"batch_size={size}: give a mini-batch size >= 1, or None for the full support set"
        )


class IterativeSolver:
    """A solver written as a pure step; ``__call__`` runs ``steps`` of them on the support set.

    Subclasses define ``init(params) -> state`` (default ``{"params": params}``) and
    ``step(f, state, k) -> (state, f(x), grad f(x))``, with ``x`` the point where step ``k``
    takes its gradient (``state["params"]``, or a look-ahead point when ``looks_ahead``).
    """

    steps: int
    batch_size: int | None = None
    looks_ahead: bool = False

    def init(self, params: Params) -> State:
        return {"params": params}

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        raise NotImplementedError

    def batches(self, batch: Batch) -> Callable[[int], Batch]:
        """``k -> `` the batch of step ``k``: mini-batches when ``batch_size`` is set, else all.

        Raises ``ValueError`` if ``batch_size`` is larger than the support set.
        """
        n, size = batch.x.shape[0], self.batch_size
        if size is None or size == n:
            return lambda k: batch
        if size > n:
            raise ValueError(
                f"batch_size={size} is larger than the support set ({n} examples): give "
                f"batch_size <= {n}, or None for the full set"
            )
        order = permutation(batch.x)
        return lambda k: minibatch(batch, size, k, order)

    def __call__(
        self,
        loss: LossFn,
        init: Params,
        batch: Batch,
        *,
        keys: Sequence[str] | None = None,
        record: bool = False,
        start: State | None = None,
    ) -> Adapted:
        """``steps`` steps from ``init``; ``start``: the solver's own state to begin from (its
        entries other than ``"params"``, as :attr:`Adapted.state` returns them), else
        ``init(phi)``'s."""
        phi, frozen = split(init, keys)
        batch_at = self.batches(batch)
        f = lambda k: lambda p: loss({**frozen, **p}, batch_at(k))  # noqa: E731
        state = self.init(phi) if start is None else {**start, "params": phi}
        losses, path, grads, path_losses = [], [phi], [], []
        for k in range(self.steps):
            before = state["params"]
            state, value, g = self.step(f(k), state, k)
            losses.append(value)
            if record:
                if self.looks_ahead:  # the path's own gradient and loss, not the look-ahead's
                    g, value = autodiff.grad_and_value(f(k))(before)
                path.append(state["params"])
                grads.append(g)
                path_losses.append(value)
        phi = state["params"]
        own = {k: v for k, v in state.items() if k != "params"} or None
        if not record:
            return Adapted({**frozen, **phi}, _stack(losses, init), state=own)
        return Adapted(
            {**frozen, **phi},
            _stack(losses, init),
            path=[{**frozen, **p} for p in path],
            grads=grads,
            path_losses=torch.stack([*path_losses, f(self.steps)(phi)]),
            state=own,
        )


def _stack(losses: list[Tensor], like: Params) -> Tensor:
    if losses:
        return torch.stack(losses)
    v = next(iter(like.values()))
    return torch.zeros(0, dtype=v.dtype, device=v.device)


@dataclass(frozen=True)
class GradientDescent(IterativeSolver):
    """Gradient descent, ``steps`` times: ``phi_{k+1} = phi_k - lr grad L_k(phi_k)`` from ``init``.

    ``L_k`` is the loss on step ``k``'s mini-batch (the whole support set by default).

    >>> gd = GradientDescent(lr=0.4, steps=5)
    """

    lr: float = 0.4
    steps: int = 1
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self)

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        g, value = autodiff.grad_and_value(f)(state["params"])
        return {"params": tree.axpy(-self.lr, g, state["params"])}, value, g


@dataclass(frozen=True, eq=False)
class LearnedRates(IterativeSolver):
    """Gradient descent with a step size per parameter entry: ``phi_{k+1} = phi_k - a_k * g_k``.

    ``rates(k)`` gives step ``k``'s step sizes, keyed like the adapted parameters and broadcast
    against them (a tensor of each parameter's shape, or a scalar). The rates are meta-parameters
    (Meta-SGD, MAML++): :class:`metagrad.MAML` builds this solver from them in ``learn_lr`` mode,
    and differentiates through it with respect to the rates too.
    """

    rates: Callable[[int], Params]
    steps: int = 1
    batch_size: int | None = None

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        g, value = autodiff.grad_and_value(f)(state["params"])
        a = self.rates(k)
        return {"params": {n: p - a[n] * g[n] for n, p in state["params"].items()}}, value, g


@dataclass(frozen=True)
class Momentum(IterativeSolver):
    r"""Heavy-ball momentum, or Nesterov's accelerated gradient with ``nesterov=True``.

    In the form of Sutskever et al. (2013), *On the importance of initialization and momentum
    in deep learning*, with the velocity :math:`v_0 = 0` at the start of every task:

    .. math::  v_{k+1} = \mu v_k - \eta \nabla L_k(\phi_k + [\text{nesterov}]\,\mu v_k), \qquad
               \phi_{k+1} = \phi_k + v_{k+1}.

    Heavy ball (Polyak, 1964) takes the gradient at :math:`\phi_k` (the iterates of
    ``torch.optim.SGD(momentum=mu)``); Nesterov (1983) at the look-ahead point
    :math:`\phi_k + \mu v_k` (``torch.optim.SGD(nesterov=True)`` holds that point instead). On a
    strongly convex quadratic with condition number :math:`\kappa`, :math:`\eta = 1/L` and
    :math:`\mu = (\sqrt\kappa - 1)/(\sqrt\kappa + 1)`, Nesterov's iterates converge in
    :math:`O(\sqrt\kappa \log 1/\delta)` steps against gradient descent's
    :math:`O(\kappa \log 1/\delta)`. With ``nesterov=True`` the ``losses`` are those at the
    look-ahead points (where the gradient is taken); a recorded path holds the gradients and
    losses at :math:`\phi_k` itself.

    >>> nag = Momentum(lr=0.1, steps=5, momentum=0.9, nesterov=True)
    """

    lr: float = 0.1
    steps: int = 5
    momentum: float = 0.9
    nesterov: bool = False
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self)
        if not 0 <= self.momentum < 1:
            raise ValueError(
                f"momentum={self.momentum}: must be in [0, 1) (0 is gradient descent, 0.9 usual)"
            )

    @property
    def looks_ahead(self) -> bool:  # type: ignore[override]
        return self.nesterov

    def init(self, params: Params) -> State:
        return {"params": params, "velocity": tree.zeros_like(params)}

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        phi, v = state["params"], state["velocity"]
        at = tree.axpy(self.momentum, v, phi) if self.nesterov else phi
        g, value = autodiff.grad_and_value(f)(at)
        v = tree.axpy(-self.lr, g, tree.scale(v, self.momentum))
        return {"params": tree.add(phi, v), "velocity": v}, value, g


@dataclass(frozen=True)
class Adam(IterativeSolver):
    r"""Adam (Kingma & Ba, 2015, Algorithm 1), its moments starting at zero for every task.

    .. math::  m_{k+1} = \beta_1 m_k + (1 - \beta_1) g_k, \quad
               v_{k+1} = \beta_2 v_k + (1 - \beta_2) g_k^2, \quad
               \phi_{k+1} = \phi_k - \eta\, \frac{m_{k+1} / (1 - \beta_1^{t+k+1})}
               {\sqrt{v_{k+1} / (1 - \beta_2^{t+k+1})} + \epsilon},

    with :math:`g_k = \nabla L_k(\phi_k)` and :math:`t = 0`. Reptile's Omniglot runs use Adam with
    :math:`\beta_1 = 0` on mini-batches (Nichol et al., 2018). Where an entry's gradients have all
    been exactly zero (:math:`v = 0`) its square root is given the derivative 0, so that MAML
    through Adam stays finite there.

    Started from a carried state (``start=`` of ``__call__``: ``m``, ``v`` and ``count``, the
    steps :math:`t` taken before), the moments and the bias correction go on from there, as one
    ``torch.optim.Adam`` kept from task to task; :meth:`carry` advances such a state over a batch
    of tasks.

    >>> adam = Adam(lr=1e-3, steps=5, betas=(0.0, 0.999), batch_size=10)
    """

    lr: float = 1e-3
    steps: int = 5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={self.betas}: give two numbers in [0, 1), e.g. (0.9, 0.999)")
        object.__setattr__(self, "betas", betas)
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps}: must be > 0 (1e-8 is usual)")

    def init(self, params: Params) -> State:
        return {"params": params, "m": tree.zeros_like(params), "v": tree.zeros_like(params)}

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        (b1, b2), phi = self.betas, state["params"]
        g, value = autodiff.grad_and_value(f)(phi)
        m = tree.axpy(1 - b1, g, tree.scale(state["m"], b1))
        v = tree.axpy(1 - b2, tree.map(torch.square, g), tree.scale(state["v"], b2))
        t = k + 1 if "count" not in state else state["count"]["t"] + (k + 1)
        c1, c2 = 1 - b1**t, 1 - b2**t
        update = {n: (m[n] / c1) / (_sqrt(v[n] / c2) + self.eps) for n in phi}
        new = {"params": tree.axpy(-self.lr, update, phi), "m": m, "v": v}
        return {**state, **new}, value, g

    def carried(self, params: Params) -> State:
        """The state to carry from task to task, before the first: zero moments, ``count`` 0."""
        zero = next(iter(params.values())).new_zeros((), dtype=torch.float64)
        own = {k: tree.zeros_like(v) for k, v in self.init(params).items() if k != "params"}
        return {**own, "count": {"t": zero}}

    def carry(self, start: State, mean: State, tasks: int) -> State:
        r"""The carried state after ``tasks`` tasks that each began at ``start`` and ended, on
        average, at ``mean`` (their :attr:`Adapted.state`), as if they had run one after another.

        Each moment decays by :math:`\beta^{S n}` over :math:`n` tasks of :math:`S` steps, and
        each task adds what it added to ``start``:
        :math:`s \leftarrow \beta^{S n} s + n\,(\bar s - \beta^S s)`. Exact for the decays; the
        additions of the earlier tasks would have decayed by at most :math:`\beta^{S (n - 1)}`
        (0.98 for Reptile's :math:`\beta_2 = 0.999`, 5 steps, 5 tasks): the tasks ran side by
        side, from the same state. ``count`` grows by :math:`S n`.
        """
        out: State = {"count": {"t": start["count"]["t"] + self.steps * tasks}}
        for name, beta in zip(("m", "v"), self.betas, strict=True):
            s, bar = start[name], mean[name]
            decay = beta**self.steps
            out[name] = {n: decay**tasks * s[n] + tasks * (bar[n] - decay * s[n]) for n in s}
        return out


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0``, with the derivative 0 (not infinity) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


@dataclass(frozen=True)
class NewtonCG(IterativeSolver):
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

    def step(self, f: Objective, state: State, k: int) -> tuple[State, Tensor, Params]:
        phi = state["params"]
        g, value, hvp = autodiff.hessian_at(f, phi)
        d, _ = linalg.cg(hvp, tree.scale(g, -1.0), self.cg_steps)
        descent = tree.vdot(g, d) < 0
        d = {n: torch.where(descent, d[n], -g[n]) for n in d}
        slope = tree.vdot(g, d)
        t = torch.zeros_like(value)
        for c in reversed([2.0**-i for i in range(self.line_search)]):  # the largest c that passes
            ok = f(tree.axpy(c, d, phi)) <= value + self.armijo * c * slope
            t = torch.where(ok, torch.as_tensor(c, dtype=value.dtype), t)
        return {"params": tree.axpy(t, d, phi)}, value, g


def _nesterov(**options: object) -> Momentum:
    """``Momentum(nesterov=True, ...)``: Nesterov's accelerated gradient."""
    return Momentum(nesterov=True, **options)  # type: ignore[arg-type]


INNER_SOLVERS: Registry[InnerSolver] = Registry("inner solver")
"""Name -> ``build(steps=, **options) -> solver``; ``options`` map keywords to config fields."""
_MINIBATCH = {"lr": "inner_lr", "batch_size": "inner_batch_size"}
INNER_SOLVERS.register("gd", GradientDescent, options=_MINIBATCH, help="gradient descent")
INNER_SOLVERS.register(
    "momentum",
    Momentum,
    options={**_MINIBATCH, "momentum": "inner_momentum"},
    help="heavy-ball momentum",
)
INNER_SOLVERS.register(
    "nesterov",
    _nesterov,
    options={**_MINIBATCH, "momentum": "inner_momentum"},
    help="Nesterov's accelerated gradient",
)
INNER_SOLVERS.register(
    "adam",
    Adam,
    options={**_MINIBATCH, "betas": "inner_betas"},
    help="Adam, its moments zero at the start of each task (or carried: --inner-carry)",
)
INNER_SOLVERS.register(
    "newton-cg",
    NewtonCG,
    options={"cg_steps": "newton_cg_steps"},
    help="Hessian-free Newton-CG with a line search",
)
