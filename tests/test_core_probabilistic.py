"""Probabilistic iMAML against closed forms: Bayesian linear regression, and iMAML at zero spread.

On a linear model with a Gaussian likelihood the expected loss under a mean-field Gaussian has a
closed form, the mean-field optimum is known exactly (the posterior mean; variances the inverse
diagonal of the posterior precision), and so is the expected query loss as a function of the
prior: the meta-gradients are checked against autograd through that closed form and against
central finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
from _core_helpers import DT, rel, small_mlp_task
from torch import nn

import metagrad as mg
from metagrad.algorithms.probabilistic import PRIOR

D, N, NOISE = 3, 6, 0.5


def _nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum() / (2 * NOISE**2)


def _expected_nll(mean, std, batch):
    """E over w ~ N(mean, std^2) of the Gaussian NLL of the linear model, in closed form."""
    x, y = batch
    w, s = mean["weight"], std["weight"]
    fit = ((x @ w.T - y) ** 2).sum()
    spread = ((x**2).sum(0) * s.reshape(-1) ** 2).sum()
    return (fit + spread) / (2 * NOISE**2)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(D, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=DT))
    xs, xq = torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, D, generator=g, dtype=DT)
    w = torch.randn(D, 1, generator=g, dtype=DT)
    task = mg.Task(mg.Batch(xs, xs @ w), mg.Batch(xq, xq @ w))
    return model, mg.loss_fn(model, _nll), task


def _mean_field(theta0: torch.Tensor, log_s: torch.Tensor, batch: mg.Batch):
    """The exact mean-field optimum: posterior mean, and 1 / diag of the posterior precision."""
    x, y = batch
    s2 = torch.exp(2 * log_s)
    precision = x.T @ x / NOISE**2 + torch.eye(D, dtype=DT) / s2
    mean = torch.linalg.solve(precision, x.T @ y / NOISE**2 + theta0.reshape(D, 1) / s2)
    return mean.reshape(1, D), (1 / torch.diagonal(precision)).sqrt().reshape(1, D)


def _closed_form_outer(theta0, log_s, task):
    mean, std = _mean_field(theta0, log_s, task.support)
    return _expected_nll({"weight": mean}, {"weight": std}, task.query)


def _estimator(loss, **kw):
    kw.setdefault("expected_loss", _expected_nll)
    inner = mg.NewtonCG(steps=25, cg_steps=4 * D)
    return mg.ProbabilisticIMAML(loss, inner, prior_std=0.7, cg_steps=8 * D, **kw)


def test_inner_solution_is_the_exact_mean_field_optimum():
    model, loss, task = _problem()
    est = _estimator(loss)
    meta = est.init_meta(model)
    q = est.adapt(meta, task.support)
    mean, std = _mean_field(meta["weight"].detach(), meta[PRIOR].detach(), task.support)
    assert rel(q.mean, {"weight": mean}) < 1e-9
    assert rel(q.std, {"weight": std}) < 1e-9


def test_meta_gradient_equals_autograd_through_the_closed_form_and_finite_differences():
    model, loss, task = _problem(1)
    est = _estimator(loss)
    meta = est.init_meta(model)
    grad, metrics = est(meta, task)
    theta0 = meta["weight"].detach().clone().requires_grad_()
    log_s = meta[PRIOR].detach().clone().requires_grad_()
    outer = _closed_form_outer(theta0, log_s, task)
    g_theta, g_s = torch.autograd.grad(outer, (theta0, log_s))
    assert rel({"w": grad["weight"]}, {"w": g_theta}) < 1e-8
    assert rel({"s": grad[PRIOR]}, {"s": g_s}) < 1e-8
    assert float(metrics["query_loss"]) == pytest.approx(float(outer.detach()), rel=1e-9)

    h = 1e-5  # central differences of the query loss at the converged inner solution
    with torch.no_grad():
        e = torch.zeros(1, D, dtype=DT)
        e[0, 1] = h
        fd_theta = (
            _closed_form_outer(theta0 + e, log_s, task)
            - _closed_form_outer(theta0 - e, log_s, task)
        ) / (2 * h)
        fd_s = (
            _closed_form_outer(theta0, log_s + h, task)
            - _closed_form_outer(theta0, log_s - h, task)
        ) / (2 * h)
    assert float(grad["weight"][0, 1]) == pytest.approx(float(fd_theta), rel=1e-6)
    assert float(grad[PRIOR]) == pytest.approx(float(fd_s), rel=1e-6)


def test_monte_carlo_expected_loss_approaches_the_closed_form():
    model, loss, task = _problem(2)
    meta = mg.ProbabilisticIMAML(loss, mg.GradientDescent(0.01, 1)).init_meta(model)
    mean, std = {"weight": meta["weight"].detach()}, {"weight": torch.full((1, D), 0.3, dtype=DT)}
    exact = float(_expected_nll(mean, std, task.support))
    est = mg.ProbabilisticIMAML(loss, mg.GradientDescent(0.01, 1), samples=4000, seed=3)
    mc = float(est._expected(mean, std, task.support))
    assert mc == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("nll_scale", [1.0, None])
def test_zero_spread_is_imaml_with_lam_one_over_s_squared(nll_scale):
    """J = L_s(mu) + |mu - theta|^2 / (2 w s^2) is iMAML's objective with lam = 1 / (w s^2)."""
    model, loss, tasks = small_mlp_task()
    s = 0.8
    prob = mg.ProbabilisticIMAML(
        loss,
        mg.GradientDescent(lr=0.05, steps=4),
        prior_std=s,
        point=True,
        learn_prior_std=False,
        cg_steps=6,
        noise_std=2.0,
        nll_scale=nll_scale,
    )
    w = prob.likelihood_scale(mg.task_at(tasks, 0).support)
    assert w == (1.0 if nll_scale else 10 / (2 * 2.0**2))  # 10 support points, noise 2
    imaml = mg.IMAML(loss, mg.GradientDescent(lr=0.05, steps=4), lam=1 / (w * s**2), cg_steps=6)
    theta = mg.params_of(model)
    assert list(prob.init_meta(model)) == list(theta)
    for mode in ("loop", "vmap"):
        g_prob, m_prob = mg.meta_gradient(prob, theta, tasks, mode=mode)
        g_imaml, m_imaml = mg.meta_gradient(imaml, theta, tasks, mode=mode)
        assert rel(g_prob, g_imaml) < 1e-10, mode
        assert float(m_prob["query_loss"]) == pytest.approx(float(m_imaml["query_loss"]), rel=1e-12)


@pytest.mark.parametrize("learn", ["global", "module", False])
def test_loop_and_vmap_agree_and_are_deterministic(learn):
    model, loss, tasks = small_mlp_task()
    # 3 CG steps: after a few inner steps the system in (mu, log sigma) can be indefinite, where
    # longer CG runs amplify the two backends' round-off (seen: 5e-10 after 10 steps).
    est = mg.ProbabilisticIMAML(
        loss,
        mg.GradientDescent(lr=0.05, steps=3),
        prior_std=0.5,
        learn_prior_std=learn,
        samples=3,
        cg_steps=3,
    )
    meta = est.init_meta(model)
    keys = [k for k in meta if k.startswith(PRIOR)]
    assert len(keys) == {"global": 1, "module": 3, False: 0}[learn]  # MLP: body.0, body.2, head
    loop, _ = mg.meta_gradient(est, meta, tasks, mode="loop")
    again, _ = mg.meta_gradient(est, meta, tasks, mode="loop")
    vmap, _ = mg.meta_gradient(est, meta, tasks, mode="vmap")
    assert list(loop) == list(meta)
    assert all(torch.equal(loop[k], again[k]) for k in loop)
    assert rel(loop, vmap) < 1e-10


def test_predictive_spread_grows_away_from_the_data():
    model, loss, task = _problem(3)
    est = _estimator(loss, learn_prior_std=False)
    q = est.adapt(est.init_meta(model), task.support)
    near = task.support.x[:1]
    far = near * 50
    p_near = mg.predictive(est, q, near, samples=200)
    p_far = mg.predictive(est, q, far, samples=200)
    assert p_near.std is not None and p_far.std is not None
    assert float(p_near.std.min()) >= NOISE * (1 - 1e-12)  # the noise is always included
    assert float(p_far.std.min()) > 3 * float(p_near.std.max())
    # The mean of the sampled predictions approaches the prediction of the posterior mean.
    exact = near @ q.mean["weight"].T
    assert float((p_near.mean - exact).abs().max()) < 4 * float(p_near.std.max()) / math.sqrt(200)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"samples": 0}, "samples=0"),
        ({"prior_std": 0.0}, "prior_std=0.0"),
        ({"prior_std": -1.0}, "prior_std=-1.0"),
        ({"learn_prior_std": "layer"}, "learn_prior_std='layer'"),
        ({"cg_steps": -1}, "cg_steps=-1"),
    ],
)
def test_bad_input(kw, match):
    _, loss, _ = small_mlp_task()
    with pytest.raises(ValueError, match=match):
        mg.ProbabilisticIMAML(loss, mg.GradientDescent(0.1, 1), **kw)
