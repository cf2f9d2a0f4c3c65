"""The meta-gradients against independent truth: closed forms, naive loops, finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _core_helpers import (
    DT,
    linear_regression,
    naive_maml,
    naive_sgd_path,
    rel,
    small_conv_task,
    small_mlp_task,
    theta_of,
)
from torch.func import functional_call

import metagrad as mg


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maml_equals_naive_autograd_loop(steps):
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    maml = mg.MAML(loss, mg.GradientDescent(lr=0.05, steps=steps))
    for i in range(3):
        task = mg.task_at(tasks, i)
        grad, _ = maml(theta, task)
        assert rel(grad, naive_maml(model, theta, task, 0.05, steps)) < 1e-10


def test_maml_with_batch_norm_equals_naive_autograd_loop():
    model, loss, tasks = small_conv_task()
    theta = theta_of(model)
    task = mg.task_at(tasks, 0)
    grad, _ = mg.MAML(loss, mg.GradientDescent(lr=0.3, steps=2))(theta, task)
    ref = naive_maml(model, theta, task, 0.3, 2, loss_kind="cross_entropy")
    assert rel(grad, ref) < 1e-10


def _unrolled_objective(model, loss, task, steps):
    keys = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    gd = mg.GradientDescent(lr=0.05, steps=steps)

    def f(flat):
        theta = mg.tree.unflatten(
            flat, dict(zip(keys, [torch.empty(s) for s in shapes], strict=True))
        )
        return loss(gd(loss, theta, task.support).params, task.query)

    return f, mg.tree.flatten(theta_of(model))


def test_gradcheck_and_gradgradcheck_through_unrolled_loop():
    model, loss, tasks = small_mlp_task(sizes=(1, 4, 1))
    f, flat = _unrolled_objective(model, loss, mg.task_at(tasks, 0), steps=2)
    x = flat.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_maml_equals_central_finite_differences():
    model, loss, tasks = small_mlp_task(sizes=(1, 4, 1))
    task = mg.task_at(tasks, 1)
    f, flat = _unrolled_objective(model, loss, task, steps=3)
    grad, _ = mg.MAML(loss, mg.GradientDescent(lr=0.05, steps=3))(theta_of(model), task)
    eps = 1e-6
    fd = torch.stack(
        [
            (f(flat + eps * e) - f(flat - eps * e)) / (2 * eps)
            for e in torch.eye(len(flat), dtype=DT)
        ]
    )
    assert torch.allclose(mg.tree.flatten(grad), fd, rtol=1e-6, atol=1e-9)


def _lr_hessian_and_grad(task, w):
    """Closed forms for L(w) = mean((X w - y)^2): H = 2 X^T X / n, grad = H w - 2 X^T y / n."""
    x, y = task.x, task.y
    n = x.shape[0]
    h = 2 * x.T @ x / n
    return h, h @ w - 2 * x.T @ y / n


def test_one_step_maml_on_linear_regression_equals_closed_form():
    model, loss, tasks = linear_regression()
    task, alpha = mg.task_at(tasks, 0), 0.1
    w = model.weight.detach().T  # (d, 1)
    hs, gs = _lr_hessian_and_grad(task.support, w)
    _, gq = _lr_hessian_and_grad(task.query, w - alpha * gs)
    expected = (torch.eye(len(w), dtype=DT) - alpha * hs) @ gq
    grad, _ = mg.MAML(loss, mg.GradientDescent(lr=alpha, steps=1))(theta_of(model), task)
    assert torch.allclose(grad["weight"].T, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "inner", [mg.GradientDescent(lr=0.05, steps=800), mg.NewtonCG(steps=2, cg_steps=8)]
)
def test_imaml_on_linear_regression_equals_linear_solve(inner):
    model, loss, tasks = linear_regression()
    task, lam = mg.task_at(tasks, 0), 2.0
    theta = theta_of(model)
    w = theta["weight"].T
    hs, _ = _lr_hessian_and_grad(task.support, torch.zeros_like(w))
    eye = torch.eye(len(w), dtype=DT)
    # phi* = argmin L_s + lam/2 ||phi - w||^2  <=>  (H_s + lam I) phi = 2 X^T y / n + lam w
    x, y = task.support
    phi = torch.linalg.solve(hs + lam * eye, 2 * x.T @ y / x.shape[0] + lam * w)
    _, gq = _lr_hessian_and_grad(task.query, phi)
    expected = torch.linalg.solve(eye + hs / lam, gq)
    grad, metrics = mg.IMAML(loss, inner, lam=lam, cg_steps=8)(theta, task)
    assert torch.allclose(grad["weight"].T, expected, rtol=1e-9, atol=1e-12)
    assert metrics["cg_residual"] < 1e-8


def test_imaml_pullback_is_plain_gd_then_one_proximal_step_on_linear_regression():
    # The released code's inner loop: K plain GD steps (closed-form gradients here), then
    # phi <- phi - pb lam (phi - w); the meta-gradient (I + H_s / lam)^-1 grad L_q at that phi.
    model, loss, tasks = linear_regression()
    task, lam, lr, steps, pb = mg.task_at(tasks, 0), 2.0, 0.05, 7, 0.1
    theta = theta_of(model)
    w = theta["weight"].T
    hs, _ = _lr_hessian_and_grad(task.support, w)
    phi = w.clone()
    for _ in range(steps):
        phi = phi - lr * _lr_hessian_and_grad(task.support, phi)[1]
    pulled = phi - pb * lam * (phi - w)
    _, gq = _lr_hessian_and_grad(task.query, pulled)
    expected = torch.linalg.solve(torch.eye(len(w), dtype=DT) + hs / lam, gq)
    imaml = mg.IMAML(loss, mg.GradientDescent(lr=lr, steps=steps), lam=lam, cg_steps=8, pullback=pb)
    grad, metrics = imaml(theta, task)
    assert torch.allclose(grad["weight"].T, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(
        metrics["query_loss"], ((task.query.x @ pulled - task.query.y) ** 2).mean()
    )
    # test time: the plain solve, no pull-back
    assert torch.allclose(imaml.adapt(theta, task.support)["weight"].T, phi, rtol=1e-12)
    with pytest.raises(ValueError, match="pull-back step size must be > 0"):
        mg.IMAML(loss, mg.GradientDescent(lr=lr, steps=steps), pullback=0.0)


def test_newton_cg_reaches_minimiser_of_strongly_convex_quadratic_in_one_step():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=DT)
    a, b = m @ m.T + 0.5 * torch.eye(6, dtype=DT), torch.randn(6, generator=g, dtype=DT)

    def quadratic(p, batch):
        w = torch.cat([p["u"], p["v"].reshape(-1)])
        return 0.5 * w @ batch.x @ w - batch.y @ w

    init = {"u": torch.zeros(2, dtype=DT), "v": torch.ones(2, 2, dtype=DT)}
    out = mg.NewtonCG(steps=1, cg_steps=6)(quadratic, init, mg.Batch(a, b)).params
    w = torch.cat([out["u"], out["v"].reshape(-1)])
    assert torch.allclose(w, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_cg_solves_spd_system():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(7, 7, generator=g, dtype=DT)
    a = m @ m.T + torch.eye(7, dtype=DT)
    b = {"x": torch.randn(7, generator=g, dtype=DT)}
    x, res = mg.linalg.cg(lambda v: {"x": a @ v["x"]}, b, steps=7)
    assert torch.allclose(x["x"], torch.linalg.solve(a, b["x"]), rtol=1e-9)
    assert res < 1e-9


def test_hvp_equals_explicit_hessian():
    model, loss, tasks = small_mlp_task(sizes=(1, 3, 1))
    theta, batch = theta_of(model), mg.task_at(tasks, 0).support
    flat = mg.tree.flatten(theta)
    h = torch.autograd.functional.hessian(lambda w: loss(mg.tree.unflatten(w, theta), batch), flat)
    v = torch.randn_like(flat)
    hv = mg.linalg.hvp(lambda p: loss(p, batch), theta, mg.tree.unflatten(v, theta))
    assert torch.allclose(mg.tree.flatten(hv), h @ v, rtol=1e-10, atol=1e-12)


def test_reptile_equals_theta_minus_naive_phi():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    grad, _ = mg.Reptile(loss, mg.GradientDescent(lr=0.02, steps=4))(theta, task)
    path, _, _ = naive_sgd_path(model, theta, task.support, 0.02, 4, create_graph=False)
    assert rel(grad, {k: theta[k] - path[-1][k] for k in theta}) < 1e-12


def test_reptile_on_support_and_query_together():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    grad, _ = mg.Reptile(loss, mg.GradientDescent(lr=0.02, steps=3), use_query=True)(theta, task)
    both = mg.Batch(
        torch.cat([task.support.x, task.query.x]), torch.cat([task.support.y, task.query.y])
    )
    path, _, _ = naive_sgd_path(model, theta, both, 0.02, 3, create_graph=False)
    assert rel(grad, {k: theta[k] - path[-1][k] for k in theta}) < 1e-12


def test_leap_simplest_setting_is_parallel_to_reptile_direction():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    gd = mg.GradientDescent(lr=0.02, steps=5)
    leap = mg.Leap(loss, gd, metric="energy", loss_term=False)
    grad, _ = leap(theta, task)
    path, _, _ = naive_sgd_path(model, theta, task.support, 0.02, 5, create_graph=False)
    direction = mg.tree.flatten({k: theta[k] - path[-1][k] for k in theta})
    cos = torch.nn.functional.cosine_similarity(mg.tree.flatten(grad), direction, dim=0)
    assert cos > 1 - 1e-12


@pytest.mark.parametrize("metric", ["energy", "length"])
@pytest.mark.parametrize("stabilizer", [False, True])
def test_leap_equals_naive_formula(metric, stabilizer):
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 2)
    lr, steps = 0.05, 4
    grad, _ = mg.Leap(loss, mg.GradientDescent(lr, steps), metric=metric, stabilizer=stabilizer)(
        theta, task
    )
    path, losses, grads = naive_sgd_path(model, theta, task.support, lr, steps, create_graph=False)
    # The paper's formula, written out in NumPy, one step at a time.
    flat = [mg.tree.flatten(p).detach().numpy() for p in path]
    gflat = [mg.tree.flatten(g).detach().numpy() for g in grads]
    f = [float(v.detach()) for v in losses]
    expected = np.zeros_like(flat[0])
    for k in range(steps):
        dtheta, df = flat[k + 1] - flat[k], f[k + 1] - f[k]
        if stabilizer and df > 0:
            df = -df
        term = dtheta + df * gflat[k]
        if metric == "length":
            term = term / np.sqrt(dtheta @ dtheta + df * df)
        expected -= term
    np.testing.assert_allclose(mg.tree.flatten(grad).numpy(), expected, rtol=1e-10, atol=1e-13)


def test_anil_with_every_parameter_in_the_head_equals_maml():
    model, loss, tasks = small_conv_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    gd = mg.GradientDescent(lr=0.3, steps=2)
    anil, _ = mg.ANIL(loss, gd, head=["body.", "head."])(theta, task)
    maml, _ = mg.MAML(loss, gd)(theta, task)
    assert rel(anil, maml) < 1e-13


def test_anil_adapts_only_the_head_and_the_body_gets_the_outer_gradient():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    gd = mg.GradientDescent(lr=0.05, steps=2)
    anil = mg.ANIL(loss, gd, head=["head."])
    phi = anil.adapt(theta, task.support)
    assert all(torch.equal(phi[k], theta[k]) for k in theta if k.startswith("body."))
    assert not torch.equal(phi["head.weight"], theta["head.weight"])
    grad, _ = anil(theta, task)
    assert rel(grad, naive_maml(model, theta, task, 0.05, 2, head="head.")) < 1e-10
    assert float(grad["body.0.weight"].abs().sum()) > 0


def test_maml_with_zero_inner_steps_is_query_gradient():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    grad, _ = mg.MAML(loss, mg.GradientDescent(lr=0.1, steps=0))(theta, task)
    th = {k: v.clone().requires_grad_() for k, v in theta.items()}
    q = torch.nn.functional.mse_loss(functional_call(model, th, (task.query.x,)), task.query.y)
    ref = dict(zip(th, torch.autograd.grad(q, list(th.values())), strict=True))
    assert rel(grad, ref) < 1e-13


def test_fomaml_is_query_gradient_at_adapted_params():
    model, loss, tasks = small_mlp_task()
    theta, task = theta_of(model), mg.task_at(tasks, 1)
    grad, _ = mg.MAML(loss, mg.GradientDescent(lr=0.05, steps=3), first_order=True)(theta, task)
    path, _, _ = naive_sgd_path(model, theta, task.support, 0.05, 3, create_graph=False)
    phi = {k: v.detach().clone().requires_grad_() for k, v in path[-1].items()}
    q = torch.nn.functional.mse_loss(functional_call(model, phi, (task.query.x,)), task.query.y)
    ref = dict(zip(phi, torch.autograd.grad(q, list(phi.values())), strict=True))
    assert rel(grad, ref) < 1e-12
