"""iMAML with a learned lam (global and per module), against closed forms and finite differences.

The proximal problem of linear regression is quadratic, so ``phi*(theta, lam)`` has a closed form
and autograd through ``torch.linalg.solve`` gives the exact gradient for ``theta`` and ``log lam``.
On a small tanh network the inner problem is solved to convergence by a plain Newton loop written
here, and the gradient for ``log lam`` is checked against central finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _core_helpers import DT, linear_regression, rel, small_conv_task
from torch import nn
from torch.func import functional_call

import metagrad as mg
from metagrad import autodiff

LAM = 2.0
D1, D2 = 3, 2  # the two parts of the linear model with two modules


class TwoPart(nn.Module):
    """``y = a(x[:, :D1]) + b(x[:, D1:])``: linear in its parameters; modules ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D1, 1, bias=False)
        self.b = nn.Linear(D2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[..., :D1]) + self.b(x[..., D1:])


def two_part_regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoPart().to(DT)
    x = torch.randn(2, 12, D1 + D2, generator=g, dtype=DT)
    y = x @ torch.randn(D1 + D2, 1, generator=g, dtype=DT) + 0.5
    task = mg.Task(mg.Batch(x[0], y[0]), mg.Batch(x[1], y[1]))
    return model, mg.loss_fn(model, "mse"), task


def _design(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1) if bias else x


def closed_form_grads(task, w, log_lams, sizes, bias):
    """Autograd through the closed-form proximal solution.

    ``w`` is the flat initialisation, ``log_lams[m]`` the log lam of the ``m``-th block of
    ``sizes`` entries. Returns ``(dL_q/dw, [dL_q/dlog_lam_m], phi, v)`` with ``v`` the theta part.
    """
    w = w.clone().requires_grad_()
    s = [torch.tensor(v, dtype=DT, requires_grad=True) for v in log_lams]
    zs, zq = _design(task.support.x, bias), _design(task.query.x, bias)
    n = len(zs)
    h = 2 * zs.T @ zs / n
    lam = torch.cat([si.exp().expand(k) for si, k in zip(s, sizes, strict=True)])
    phi = torch.linalg.solve(h + torch.diag(lam), 2 * zs.T @ task.support.y[:, 0] / n + lam * w)
    query = ((zq @ phi - task.query.y[:, 0]) ** 2).mean()
    grads = torch.autograd.grad(query, [w, *s])
    return grads[0], list(grads[1:]), phi.detach(), h


def test_global_lam_gradient_equals_autograd_through_the_closed_form():
    model, loss, tasks = linear_regression()
    task = mg.task_at(tasks, 0)
    est = mg.IMAML(loss, mg.NewtonCG(steps=2, cg_steps=8), lam=LAM, cg_steps=8, learn_lam="global")
    meta = est.init_meta(model)
    grad, metrics = est(meta, task)
    assert list(grad) == ["weight", "log_lam"]
    w = meta["weight"].detach()[0]
    dw, (ds,), phi, h = closed_form_grads(task, w, [math.log(LAM)], [len(w)], bias=False)
    assert torch.allclose(grad["weight"][0], dw, rtol=1e-9, atol=1e-12)
    assert torch.isclose(grad["log_lam"], ds, rtol=1e-9, atol=1e-12)
    # The documented form: d/dlog lam = lam dL/dlam = -v . (phi - theta), v the theta part.
    assert torch.isclose(grad["log_lam"], -(dw @ (phi - w)), rtol=1e-9)
    assert metrics["cg_residual"] < 1e-8


@pytest.mark.parametrize("inner", [mg.NewtonCG(steps=2, cg_steps=12), mg.GradientDescent(0.1, 800)])
def test_per_module_lam_gradient_equals_autograd_through_the_closed_form(inner):
    model, loss, task = two_part_regression()
    est = mg.IMAML(loss, inner, lam=LAM, cg_steps=12, learn_lam="module")
    meta = est.init_meta(model)
    with torch.no_grad():
        meta["log_lam/b"].fill_(math.log(0.5))  # two different lams
    assert list(meta) == ["a.weight", "b.weight", "b.bias", "log_lam/a", "log_lam/b"]
    grad, _ = est(meta, task)
    assert list(grad) == list(meta)
    w = mg.tree.flatten({k: meta[k].detach() for k in ("a.weight", "b.weight", "b.bias")})
    dw, ds, _, _ = closed_form_grads(task, w, [math.log(LAM), math.log(0.5)], [D1, D2 + 1], True)
    flat = mg.tree.flatten({k: grad[k] for k in ("a.weight", "b.weight", "b.bias")})
    assert torch.allclose(flat, dw, rtol=1e-8, atol=1e-11)
    assert torch.isclose(grad["log_lam/a"], ds[0], rtol=1e-8, atol=1e-11)
    assert torch.isclose(grad["log_lam/b"], ds[1], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("learn_lam", ["global", "module"])
def test_damped_system_with_learned_lam_gives_the_released_code_v_and_the_documented_lam_grad(
    learn_lam,
):
    """(1 + c) v + H v / (lam + d) = g_q for theta; -(1/lam) v . (phi - theta) for each lam."""
    c, d = 1.0, 10.0
    model, loss, task = two_part_regression(seed=1)
    est = mg.IMAML(
        loss, mg.NewtonCG(steps=2, cg_steps=12), lam=LAM, cg_steps=12, cg_damping=c,
        lam_damping=d, learn_lam=learn_lam,
    )  # fmt: skip
    meta = est.init_meta(model)
    grad, _ = est(meta, task)
    keys = ["a.weight", "b.weight", "b.bias"]
    w = mg.tree.flatten({k: meta[k].detach() for k in keys})
    zs, zq = _design(task.support.x, True), _design(task.query.x, True)
    h = 2 * zs.T @ zs / len(zs)
    eye = torch.eye(len(w), dtype=DT)
    phi = torch.linalg.solve(h + LAM * eye, 2 * zs.T @ task.support.y[:, 0] / len(zs) + LAM * w)
    gq = 2 * zq.T @ (zq @ phi - task.query.y[:, 0]) / len(zq)
    v = torch.linalg.solve((1 + c) * eye + h / (LAM + d), gq)  # the released code's system
    assert torch.allclose(mg.tree.flatten({k: grad[k] for k in keys}), v, rtol=1e-9, atol=1e-12)
    step = v * (phi - w)  # per entry; lam's log gradient is -LAM * (1/LAM) * the sum
    if learn_lam == "global":
        assert torch.isclose(grad["log_lam"], -step.sum(), rtol=1e-9)
    else:
        assert torch.isclose(grad["log_lam/a"], -step[:D1].sum(), rtol=1e-9)
        assert torch.isclose(grad["log_lam/b"], -step[D1:].sum(), rtol=1e-9)


def _tanh_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    x = torch.rand(2, 10, 1, generator=g, dtype=DT) * 4 - 2
    y = torch.sin(2 * x) + 0.5
    return model, mg.Task(mg.Batch(x[0], y[0]), mg.Batch(x[1], y[1]))


def _converged_query_loss(model, task, theta, lams, modules):
    """L_q(phi*) with phi* from 30 plain Newton steps on the proximal objective (no metagrad)."""
    keys = list(theta)
    flat0 = mg.tree.flatten(theta)
    lam = torch.cat([torch.full((theta[k].numel(),), lams[modules[k]], dtype=DT) for k in keys])

    def params(flat):
        return mg.tree.unflatten(flat, theta)

    def objective(flat):
        out = functional_call(model, params(flat), (task.support.x,))
        return F.mse_loss(out, task.support.y) + 0.5 * (lam * (flat - flat0) ** 2).sum()

    phi = flat0.clone()
    for _ in range(30):
        g = torch.autograd.functional.jacobian(objective, phi)
        h = torch.autograd.functional.hessian(objective, phi)
        phi = phi - torch.linalg.solve(h, g)
    g = torch.autograd.functional.jacobian(objective, phi)
    assert g.norm() < 1e-13, "the reference inner solve did not converge"
    assert torch.linalg.eigvalsh(torch.autograd.functional.hessian(objective, phi)).min() > 0
    return float(F.mse_loss(functional_call(model, params(phi), (task.query.x,)), task.query.y))


@pytest.mark.parametrize("learn_lam", ["global", "module"])
def test_lam_gradient_equals_central_finite_differences_at_the_converged_inner_solution(learn_lam):
    model, task = _tanh_task()
    lam = 3.0
    est = mg.IMAML(
        mg.loss_fn(model, "mse"), mg.NewtonCG(steps=12, cg_steps=32), lam=lam, cg_steps=16,
        learn_lam=learn_lam,
    )  # fmt: skip
    meta = est.init_meta(model)
    grad, metrics = est(meta, task)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    modules = {k: ("all" if learn_lam == "global" else k.split(".")[0]) for k in theta}
    names = sorted(set(modules.values()))
    key = {m: "log_lam" if m == "all" else f"log_lam/{m}" for m in names}
    eps = 1e-5
    for m in names:

        def f(shift: float, m: str = m) -> float:
            lams = {n: lam * math.exp(shift if n == m else 0.0) for n in names}
            return _converged_query_loss(model, task, theta, lams, modules)

        fd = (f(eps) - f(-eps)) / (2 * eps)
        assert grad[key[m]].item() == pytest.approx(fd, rel=1e-6, abs=1e-10), m
    assert metrics["cg_residual"] < 1e-8


@pytest.mark.parametrize(
    "learn_lam,native_batch_norm,damping",
    [
        ("global", False, 0.0),
        ("module", False, 0.0),
        pytest.param("global", True, 0.0, marks=pytest.mark.slow),
        pytest.param("module", True, 1.0, marks=pytest.mark.slow),
    ],
)
def test_loop_vmap_and_threads_agree_with_learned_lam(learn_lam, native_batch_norm, damping):
    model, loss, tasks = small_conv_task(n_tasks=3, native=native_batch_norm)
    est = mg.IMAML(
        loss, mg.GradientDescent(0.2, 2), lam=LAM, cg_steps=3, cg_damping=damping,
        lam_damping=10 * damping, learn_lam=learn_lam,
    )  # fmt: skip
    meta = est.init_meta(model)
    with torch.no_grad():
        for k in meta:
            if k.startswith("log_lam"):
                meta[k].add_(0.1 * len(k) % 0.7)  # unequal lams per module
    loop, m_loop = mg.meta_gradient(est, meta, tasks, mode="loop", workers=1)
    assert list(loop) == list(meta)
    for k in meta:
        assert loop[k].shape == meta[k].shape and loop[k].dtype == meta[k].dtype
        assert torch.isfinite(loop[k]).all() and not loop[k].requires_grad
    vmap, m_vmap = mg.meta_gradient(est, meta, tasks, mode="vmap")
    threads, _ = mg.meta_gradient(est, meta, tasks, mode="loop", workers=3)
    assert rel(vmap, loop) < 1e-10 and rel(threads, loop) < 1e-12
    for k in m_loop:
        assert torch.allclose(m_loop[k], m_vmap[k], rtol=1e-10, atol=1e-12)
    singles = [est(meta, mg.task_at(tasks, i))[0] for i in range(3)]
    assert rel(loop, mg.tree.mean(singles)) < 1e-12
    again, _ = mg.meta_gradient(est, meta, tasks, mode="loop", workers=1)
    assert all(torch.equal(loop[k], again[k]) for k in meta), "not deterministic"


@pytest.mark.parametrize("learn_lam", [None, "global", "module"])
def test_the_loss_sees_only_the_model_parameters(learn_lam):
    model, loss, tasks = small_conv_task(n_tasks=2)
    seen: list[set[str]] = []

    def spy(params, batch):
        seen.append(set(params))
        return loss(params, batch)

    est = mg.IMAML(spy, mg.GradientDescent(0.2, 2), lam=LAM, cg_steps=2, learn_lam=learn_lam)
    meta = est.init_meta(model)
    for mode in ("loop", "vmap"):
        mg.meta_gradient(est, meta, tasks, mode=mode, workers=1)
    phi = est.adapt(meta, mg.task_at(tasks, 0).support)
    names = {k for k, _ in model.named_parameters()}
    assert seen and all(s == names for s in seen)
    assert set(phi) == names


def test_init_meta_holds_the_live_parameters_and_log_lam():
    model, loss, _ = small_conv_task()
    est = mg.IMAML(loss, mg.GradientDescent(), lam=0.5, learn_lam="module")
    meta = est.init_meta(model)
    params = dict(model.named_parameters())
    assert all(meta[k] is params[k] for k in params)
    lam_keys = [k for k in meta if k not in params]
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))
    assert lam_keys == [f"log_lam/{m}" for m in modules]
    for k in lam_keys:
        assert meta[k].shape == () and meta[k].requires_grad and meta[k].dtype == DT
        assert meta[k].item() == pytest.approx(math.log(0.5))
    assert list(mg.IMAML(loss, mg.GradientDescent()).init_meta(model)) == list(params)
    assert list(est.model_params(meta)) == list(params)  # what evaluation hands the model
    assert "log_lam" in mg.build("imaml", loss, mg.GradientDescent(), learn_lam="global").init_meta(
        model
    )
    assert mg.ALGORITHMS["imaml"].options["learn_lam"] == "learn_lam"


@pytest.mark.parametrize("backend", autodiff.BACKENDS)
def test_cg_steps_add_no_forward_pass(backend):
    """The Hessian-vector products reuse one graph of the support gradient."""
    model, loss, tasks = small_conv_task()
    task = mg.task_at(tasks, 0)
    counts = []
    for cg_steps in (1, 6):
        calls: list[int] = []
        handle = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        est = mg.IMAML(loss, mg.GradientDescent(0.2, 2), cg_steps=cg_steps, learn_lam="global")
        with autodiff.use(backend):
            est.meta_grad(mg.tree.detach(est.init_meta(model)), task)
        handle.remove()
        counts.append(len(calls))
    assert counts[0] == counts[1]


def test_bad_learned_lam_settings_name_the_value_and_the_fix():
    model, loss, tasks = linear_regression()
    with pytest.raises(ValueError, match=r"lam=-1.0.*> 0"):
        mg.IMAML(loss, mg.GradientDescent(), lam=-1.0, learn_lam="global")
    with pytest.raises(ValueError, match=r"learn_lam='layer'.*'global'.*'module'.*None"):
        mg.IMAML(loss, mg.GradientDescent(), learn_lam="layer")  # type: ignore[arg-type]
    est = mg.IMAML(loss, mg.GradientDescent(), learn_lam="module")
    with pytest.raises(ValueError, match=r"log_lam/weight.*got none.*init_meta\(model\)"):
        est(mg.params_of(model), mg.task_at(tasks, 0))
    other = mg.IMAML(loss, mg.GradientDescent(), learn_lam="global").init_meta(model)
    with pytest.raises(ValueError, match=r"\['log_lam/weight'\], got \['log_lam'\]"):
        mg.meta_gradient(est, other, tasks)

    with pytest.raises(ValueError, match=r"'log_lam' holds a learned lam, but learn_lam=None"):
        mg.IMAML(loss, mg.GradientDescent())(other, mg.task_at(tasks, 0))

    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_lam = nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match=r"parameter named 'log_lam'.*rename that parameter"):
        est.init_meta(Clash())
