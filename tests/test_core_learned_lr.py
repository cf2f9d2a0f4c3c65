"""Learned inner step sizes (Meta-SGD per entry, MAML++ per tensor and step) against closed forms
on linear regression and a naive ``autograd.grad(create_graph=True)`` loop on Conv4."""

from __future__ import annotations

import math

import pytest
import torch
from _core_helpers import DT, linear_regression, rel, small_conv_task
from torch.func import functional_call

import metagrad as mg
from metagrad.algorithms.maml import LR

LR0 = 0.05


def _closed_form(w, xs, ys, xq, yq, alphas):
    """phi and d L_q / d alpha_k for gradient descent with per-entry rates ``alphas[k]``.

    L(w) = mean((X w - y)^2), so grad = (2/n) X^T (X w - y) and H = (2/n) X^T X. With
    phi_{k+1} = phi_k - alpha_k * g_k: d phi_{k+1} / d alpha_j = (I - diag(alpha_k) H) d phi_k /
    d alpha_j for j < k, and -diag(g_k) for j = k.
    """
    n, d = xs.shape
    h = 2 / n * xs.T @ xs
    phi, jac = w.clone(), []  # jac[j]: d phi / d alpha_j, (d, d)
    for alpha in alphas:
        g = 2 / n * xs.T @ (xs @ phi - ys)
        jac = [(torch.eye(d, dtype=DT) - torch.diag(alpha) @ h) @ j for j in jac]
        jac.append(-torch.diag(g[:, 0]))
        phi = phi - alpha.reshape(-1, 1) * g
    gq = 2 / yq.shape[0] * xq.T @ (xq @ phi - yq)
    return phi, [j.T @ gq[:, 0] for j in jac]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mode", ["parameter", "layer-step"])
def test_step_size_gradient_equals_the_closed_form_on_linear_regression(mode, steps):
    model, loss, tasks = linear_regression()
    est = mg.MAML(loss, mg.GradientDescent(lr=LR0, steps=steps), learn_lr=mode)
    meta = est.init_meta(model)
    key = f"{LR}/weight"
    d = meta["weight"].shape[1]
    with torch.no_grad():  # rates away from their common start, so a mix-up would show
        if mode == "parameter":
            meta[key].copy_(torch.log(torch.linspace(0.02, 0.08, d, dtype=DT)).reshape(1, d))
        else:
            meta[key].copy_(torch.log(torch.tensor([0.03, 0.07][:steps], dtype=DT)))
    task = mg.task_at(tasks, 0)
    grad, _ = est(meta, task)

    rates = meta[key].detach().exp()
    per_step = [
        rates.reshape(-1) if mode == "parameter" else rates[k].expand(d) for k in range(steps)
    ]
    w = meta["weight"].detach().reshape(-1, 1)
    (xs, ys), (xq, yq) = task
    _, d_alpha = _closed_form(w, xs, ys, xq, yq, per_step)
    if mode == "parameter":  # one rate for every step: the sum over steps, times alpha (log)
        want = sum(d_alpha) * rates.reshape(-1)
        assert rel({"a": grad[key].reshape(-1)}, {"a": want}) < 1e-12
    else:  # one rate per step, shared by the tensor's entries
        want = torch.stack([dk.sum() * rates[k] for k, dk in enumerate(d_alpha)])
        assert rel({"a": grad[key]}, {"a": want}) < 1e-12


def test_conv4_with_batch_norm_equals_a_naive_loop():
    model, loss, tasks = small_conv_task()
    steps = 2
    est = mg.MAML(loss, mg.GradientDescent(lr=LR0, steps=steps), learn_lr="layer-step")
    meta = {k: v.detach().clone() for k, v in est.init_meta(model).items()}
    with torch.no_grad():
        for k in meta:
            if k.startswith(LR):
                meta[k].add_(torch.linspace(-0.3, 0.3, steps, dtype=DT))
    grad, _ = mg.meta_gradient(est, meta, tasks, mode="loop", workers=1)

    leaves = {k: v.clone().requires_grad_() for k, v in meta.items()}
    names = [k for k in meta if not k.startswith(LR)]
    total = None
    for i in range(mg.tasks.count(tasks)):
        (xs, ys), (xq, yq) = mg.task_at(tasks, i)
        phi = {k: leaves[k] for k in names}
        for step in range(steps):
            out = functional_call(model, phi, (xs,))
            value = torch.nn.functional.cross_entropy(out, ys)
            gs = torch.autograd.grad(value, [phi[k] for k in names], create_graph=True)
            phi = {
                k: phi[k] - leaves[f"{LR}/{k}"][step].exp() * g
                for k, g in zip(names, gs, strict=True)
            }
        q = torch.nn.functional.cross_entropy(functional_call(model, phi, (xq,)), yq)
        total = q if total is None else total + q
    assert total is not None
    want = torch.autograd.grad(total / mg.tasks.count(tasks), list(leaves.values()))
    assert rel(grad, dict(zip(leaves, want, strict=True))) < 1e-10


def test_loop_and_vmap_agree_and_init_meta():
    model, loss, tasks = small_conv_task(n_tasks=3)
    for mode in ("parameter", "layer-step"):
        est = mg.ANIL(loss, mg.GradientDescent(lr=LR0, steps=2), learn_lr=mode)
        meta = est.init_meta(model)
        rates = {k: v for k, v in meta.items() if k.startswith(LR)}
        assert set(rates) == {f"{LR}/head.weight", f"{LR}/head.bias"}  # ANIL: the head's only
        for k, v in rates.items():
            want = meta[k[len(LR) + 1 :]].shape if mode == "parameter" else (2,)
            assert v.shape == want and torch.allclose(v, torch.full_like(v, math.log(LR0)))
        theta = {k: v.detach().clone() for k, v in meta.items()}
        loop, _ = mg.meta_gradient(est, theta, tasks, mode="loop")
        vmap, _ = mg.meta_gradient(est, theta, tasks, mode="vmap")
        assert list(loop) == list(theta) and rel(vmap, loop) < 1e-10
        phi = est.adapt(theta, mg.task_at(tasks, 0).support)
        assert list(phi) == list(mg.params_of(model))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"learn_lr": "layer"}, "learn_lr='layer'"),
        ({"learn_lr": "parameter", "first_order": True}, "first_order=True"),
        ({"learn_lr": "parameter", "truncate": 1}, "truncate"),
        ({"learn_lr": "parameter", "checkpoint": True}, "checkpoint"),
    ],
)
def test_bad_input(kw, match):
    _, loss, _ = linear_regression()
    with pytest.raises(ValueError, match=match):
        mg.MAML(loss, mg.GradientDescent(lr=LR0, steps=2), **kw)
    with pytest.raises(ValueError, match="GradientDescent"):
        mg.MAML(loss, mg.Adam(lr=LR0, steps=2), learn_lr="parameter")
    with pytest.raises(ValueError, match="lr=-0.1"):
        mg.MAML(loss, mg.GradientDescent(lr=-0.1, steps=2), learn_lr="parameter")
    model, loss, tasks = linear_regression()
    est = mg.MAML(loss, mg.GradientDescent(lr=LR0, steps=1), learn_lr="parameter")
    with pytest.raises(ValueError, match="init_meta"):
        est(mg.params_of(model), mg.task_at(tasks, 0))
