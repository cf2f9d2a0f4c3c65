r"""Probabilistic iMAML: a mean-field Gaussian posterior per task, a Gaussian prior across tasks.

The proximal term of iMAML read as a prior. For task :math:`i` the inner problem is variational
inference with the prior :math:`N(\theta_0, s^2)`:

.. math::  q_i = \arg\min_{q = N(\mu, \mathrm{diag}\,\sigma^2)}
           \; \mathbb{E}_{\phi \sim q} L_s(\phi) + \mathrm{KL}(q \,\|\, N(\theta_0, s^2)),

over :math:`z = (\mu, \log\sigma)`, solved approximately by any inner solver from
:math:`\mu = \theta_0`, :math:`\sigma = s`. The expectation is a Monte Carlo mean over ``samples``
reparameterised draws :math:`\phi = \mu + \sigma \odot \epsilon_j` (common random numbers: the same
:math:`\epsilon_j`, from ``seed``, for every task and call, so the objective is deterministic and
the loop and ``vmap`` modes agree), or a closed form ``expected_loss(mu, std, batch)`` where one
is known. The outer loss is the expected query loss :math:`\mathbb{E}_{q_i} L_q`. Its gradient
with respect to the prior's mean :math:`\theta_0` and log-std :math:`\log s` comes from the
implicit function theorem at the inner solution (:func:`metagrad.implicit.root_vjp` of
:math:`\nabla_z J = 0`): no graph of the inner loop is kept, memory is flat in the inner steps.

With ``point=True`` the posterior spread is fixed at zero (the expected loss taken at the mean,
the KL's mean part left): :math:`J = L_s(\mu) + \|\mu - \theta_0\|^2 / (2 s^2)`, which is iMAML
with :math:`\lambda = 1/s^2`.

The likelihood is the support loss as a negative log-likelihood summed over the examples:
``nll_scale`` times the loss, by default ``n / (2 noise_std^2)`` for a mean squared error over
``n`` examples (a Gaussian likelihood), ``n`` for a mean cross-entropy, and 1 for any other loss
(taken to be the negative log-likelihood already); the inner objective is that bound divided by
the scale. The outer loss is the plain expected query loss.

>>> import metagrad as mg, torch
>>> model = mg.models.MLP()
>>> est = mg.ProbabilisticIMAML(mg.loss_fn(model, "mse"), mg.GradientDescent(0.01, 5))
>>> meta = est.init_meta(model)                                   # theta_0 and the prior's log-std
>>> task = mg.task_at(mg.data.Sinusoid(5, 5).sample(1, torch.Generator().manual_seed(0)), 0)
>>> q = est.adapt(meta, task.support)                             # q.mean, q.std: Params
>>> pred = mg.predictive(est, q, task.query.x, samples=50)        # pred.mean, pred.std
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from metagrad import autodiff, implicit, linalg, tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Posterior, Task
from metagrad.algorithms._base import EstimatorBase, check_batch, module_of, scored, task_metrics

PRIOR = "prior_logstd"
"""The meta-parameter key of the prior's log-std (``prior_logstd/<module>`` per module)."""

ExpectedLoss = Callable[[Params, Params, Batch], Tensor]
"""``expected_loss(mean, std, batch)``: :math:`E_{\\phi \\sim N(mean, std^2)} L(\\phi, batch)`."""


class Predictive(NamedTuple):
    """The predictive distribution on inputs ``x``: mean and standard deviation per output
    (regression, noise included), or class probabilities in ``mean`` (classification)."""

    mean: Tensor
    std: Tensor | None


@dataclass(frozen=True, eq=False)
class ProbabilisticIMAML(EstimatorBase):
    """Probabilistic iMAML: a Gaussian posterior per task, meta-gradients by the implicit function
    theorem.

    ``prior_std`` is :math:`s` (its initial value when learned); ``learn_prior_std`` learns its
    logarithm, one for all parameters (``"global"``, or ``True``) or one per module
    (``"module"``); ``False`` keeps it fixed. ``cg_steps`` / ``cg_tol`` solve the implicit system.
    ``cg_damping`` adds ``c u`` to the system's products (Tikhonov damping, 0: the exact system).
    ``noise_std`` is the Gaussian likelihood's noise scale of a regression loss (in the inner
    objective and in :func:`predictive`); ``nll_scale`` overrides the likelihood's weight.
    """

    hyper_prefixes: ClassVar[tuple[str, ...]] = (PRIOR,)

    loss: LossFn
    inner: InnerSolver
    prior_std: float = 0.1
    learn_prior_std: bool | Literal["global", "module"] = "global"
    samples: int = 8
    seed: int = 0
    point: bool = False
    cg_steps: int = 10
    cg_tol: float = 0.0
    cg_damping: float = 0.0
    noise_std: float = 1.0
    nll_scale: float | None = None
    expected_loss: ExpectedLoss | None = None

    def __post_init__(self) -> None:
        if not self.prior_std > 0:
            raise ValueError(f"prior_std={self.prior_std}: the prior's std must be > 0")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}: draw at least 1 posterior sample")
        if self.learn_prior_std not in (True, False, "global", "module"):
            raise ValueError(
                f"learn_prior_std={self.learn_prior_std!r}: use 'global', 'module' or False"
            )
        if self.cg_steps < 0:
            raise ValueError(f"cg_steps={self.cg_steps}: the number of CG steps must be >= 0")
        if self.cg_damping < 0:
            raise ValueError(f"cg_damping={self.cg_damping}: must be >= 0 (0: undamped)")
        if not self.noise_std > 0:
            raise ValueError(f"noise_std={self.noise_std}: the likelihood's noise must be > 0")
        if self.nll_scale is not None and not self.nll_scale > 0:
            raise ValueError(f"nll_scale={self.nll_scale}: must be > 0 (or None: automatic)")

    def likelihood_scale(self, batch: Batch) -> float:
        """The factor that turns the mean support loss into a summed negative log-likelihood."""
        if self.nll_scale is not None:
            return self.nll_scale
        n = batch.x.shape[0]
        kind = getattr(self.loss, "kind", None)
        if kind == "mse":
            return n / (2 * self.noise_std**2)
        return float(n) if kind == "cross_entropy" else 1.0

    # -- meta-parameters ------------------------------------------------------------------------

    def init_meta(self, model: nn.Module) -> Params:
        """The prior mean ``theta_0`` (the model's parameters) and the prior's log-std entries."""
        meta: Params = dict(model.named_parameters())
        like = next(iter(meta.values()))
        log_s = math.log(self.prior_std)
        for key in self._prior_keys(meta):
            meta[key] = nn.Parameter(torch.full((), log_s, dtype=like.dtype, device=like.device))
        return meta

    def _prior_keys(self, theta: Params) -> list[str]:
        if self.learn_prior_std in (True, "global"):
            return [PRIOR]
        if self.learn_prior_std == "module":
            return sorted({f"{PRIOR}/{module_of(k)}" for k in theta if not k.startswith(PRIOR)})
        return []

    def _split(self, meta: Params) -> tuple[Params, Params]:
        """``(theta_0, prior log-std per parameter key)``."""
        theta = self.model_params(meta)
        like = next(iter(theta.values()))
        fixed = torch.full((), math.log(self.prior_std), dtype=like.dtype, device=like.device)
        if self.learn_prior_std in (True, "global"):
            return theta, {k: meta[PRIOR] for k in theta}
        if self.learn_prior_std == "module":
            return theta, {k: meta[f"{PRIOR}/{module_of(k)}"] for k in theta}
        return theta, {k: fixed for k in theta}

    # -- the inner problem ------------------------------------------------------------------------

    def _eps(self, like: Params) -> list[Params]:
        """The ``samples`` standard-normal draws, the same for every task (from ``seed``)."""
        rng = np.random.default_rng(self.seed)
        draws: list[Params] = [{} for _ in range(self.samples)]
        for k, v in like.items():
            values = rng.standard_normal((self.samples, *v.shape))
            for j in range(self.samples):
                draws[j][k] = torch.as_tensor(values[j], dtype=v.dtype, device=v.device)
        return draws

    def _expected(self, mean: Params, std: Params, batch: Batch) -> Tensor:
        """:math:`E_{N(mean, std^2)} L(\\phi, batch)`: the closed form, or the Monte Carlo mean."""
        if self.point:
            return self.loss(mean, batch)
        if self.expected_loss is not None:
            return self.expected_loss(mean, std, batch)
        values = [
            self.loss({k: mean[k] + std[k] * e[k] for k in mean}, batch) for e in self._eps(mean)
        ]
        return torch.stack(values).mean()

    def _unpack(self, z: Params, theta: Params) -> tuple[Params, Params]:
        mean = {k: z[f"mu/{k}"] for k in theta}
        std = {
            k: (torch.zeros_like(mean[k]) if self.point else z[f"logstd/{k}"].exp()) for k in theta
        }
        return mean, std

    def objective(self, theta: Params, log_s: Params) -> LossFn:
        """``J(z, batch) = E_q L(phi, batch) + KL(q || N(theta, s^2)) / w``, ``z = (mu, log std)``.

        ``w`` is :meth:`likelihood_scale`: ``w J`` is the negative evidence lower bound, and
        dividing by ``w`` keeps the objective on the scale of the loss, so inner step sizes carry
        over from the other estimators (the minimiser and the implicit gradient do not change).
        """

        def j(z: Params, batch: Batch) -> Tensor:
            mean, std = self._unpack(z, theta)
            kl = torch.zeros((), dtype=next(iter(theta.values())).dtype)
            for k in theta:
                s2 = torch.exp(2 * log_s[k])
                kl = kl + ((mean[k] - theta[k]) ** 2).sum() / (2 * s2)
                if not self.point:
                    log_sigma = z[f"logstd/{k}"]
                    kl = kl + (log_s[k] - log_sigma + std[k] ** 2 / (2 * s2) - 0.5).sum()
            return self._expected(mean, std, batch) + kl / self.likelihood_scale(batch)

        return j

    def _start(self, theta: Params, log_s: Params) -> Params:
        z = {f"mu/{k}": v for k, v in theta.items()}
        if not self.point:
            z.update({f"logstd/{k}": torch.zeros_like(v) + log_s[k] for k, v in theta.items()})
        return z

    def _solve(self, meta: Params, support: Batch) -> tuple[Params, Params, Params, Adapted]:
        theta, log_s = self._split(meta)
        adapted = self.inner(self.objective(theta, log_s), self._start(theta, log_s), support)
        return theta, log_s, tree.detach(adapted.params), adapted

    def posterior(self, meta: Params, support: Batch) -> Posterior:
        """The task posterior ``q`` after the inner solver (no graph kept)."""
        check_batch(support, "support", 0)
        theta, _, z, _ = self._solve(tree.detach(meta), support)
        return Posterior(*self._unpack(z, theta))

    def adapt(self, theta: Params, support: Batch) -> Posterior:  # type: ignore[override]
        """The task posterior (mean and std per parameter); its mean is the point estimate."""
        return self.posterior(theta, support)

    # -- the meta-gradient ------------------------------------------------------------------------

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        theta0, log_s, z, adapted = self._solve(theta, task.support)

        def outer(z: Params) -> Tensor:  # the expected query loss at q(z)
            return self._expected(*self._unpack(z, theta0), task.query)

        cotangent, query_loss = autodiff.grad_and_value(outer)(z)

        def optimality(z: Params, args: Params) -> Params:  # grad_z J(z; theta_0, log s) = 0
            th, ls = self._split(args)
            return autodiff.grad_and_value(self.objective(th, ls))(z, task.support)[0]

        def solve(matvec: Callable[[Params], Params], b: Params) -> tuple[Params, Tensor]:
            damped = (
                (lambda u: tree.axpy(self.cg_damping, u, matvec(u))) if self.cg_damping else matvec
            )
            return linalg.cg(damped, b, self.cg_steps, self.cg_tol)

        grad, residual = implicit.root_vjp(optimality, z, theta, cotangent, solve=solve)
        mean, _ = self._unpack(z, theta0)
        _, accuracy = scored(self.loss)(mean, task.query)
        metrics = task_metrics(
            self.loss, Adapted(mean, adapted.losses), task.query, query_loss, accuracy
        )
        metrics["cg_residual"] = residual.detach()
        return grad, metrics


def predictive(
    estimator: ProbabilisticIMAML, q: Posterior, x: Tensor, samples: int = 100, seed: int = 0
) -> Predictive:
    """The predictive distribution of ``q`` at inputs ``x``, from ``samples`` parameter draws.

    Regression (a loss with ``predict`` that is not a classifier): the mean of the sampled outputs
    and the std of the Gaussian mixture, ``sqrt(var + noise_std^2)``. Classification: the mean of
    the sampled softmax probabilities (``std`` is None). The draws come from ``seed`` (NumPy, so
    the function also runs under ``vmap``).
    """
    if samples < 1:
        raise ValueError(f"samples={samples}: draw at least 1 parameter sample")
    predict = getattr(estimator.loss, "predict", None)
    if predict is None:
        raise ValueError("predictive needs a metagrad Loss (metagrad.loss_fn) to run the model")
    classify = bool(getattr(estimator.loss, "is_classification", False))
    rng = np.random.default_rng(seed)
    draws = {k: rng.standard_normal((samples, *m.shape)) for k, m in q.mean.items()}
    outs = []
    with torch.no_grad():
        for j in range(samples):
            phi = {
                k: m + q.std[k] * torch.as_tensor(draws[k][j], dtype=m.dtype, device=m.device)
                for k, m in q.mean.items()
            }
            out = predict(phi, x)
            outs.append(out.softmax(-1) if classify else out)
    stacked = torch.stack(outs)
    if classify:
        return Predictive(stacked.mean(0), None)
    var = stacked.var(0, correction=0) + estimator.noise_std**2
    return Predictive(stacked.mean(0), var.sqrt())
