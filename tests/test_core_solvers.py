"""The inner solvers (gradient descent, momentum, Nesterov, Adam, mini-batches) against independent
references: naive autograd loops, closed-form recursions, ``torch.optim``, finite differences."""

from __future__ import annotations

import itertools

import pytest
import torch
from _core_helpers import DT, rel, small_conv_task, small_mlp_task, theta_of
from torch import nn
from torch.func import functional_call

import metagrad as mg
from metagrad import autodiff
from metagrad.inner import minibatch, permutation

CRIT = {"mse": nn.functional.mse_loss, "cross_entropy": nn.functional.cross_entropy}


# ---------------------------------------------------------------- naive reference loops


def _naive_steps(kind, lr, steps, mu=0.0, betas=(0.9, 0.999), eps=1e-8):
    """``(phi, state, k, grad_at) -> (phi, state)``: one step written from the paper's equation."""

    def step(phi, state, k, grad_at):
        if kind == "momentum" or kind == "nesterov":
            v = state or {n: torch.zeros_like(p) for n, p in phi.items()}
            at = {n: phi[n] + mu * v[n] for n in phi} if kind == "nesterov" else phi
            g = grad_at(at)
            v = {n: mu * v[n] - lr * g[n] for n in phi}
            return {n: phi[n] + v[n] for n in phi}, v
        if kind == "adam":
            m, s = state or ({n: 0 * p for n, p in phi.items()}, {n: 0 * p for n, p in phi.items()})
            g = grad_at(phi)
            m = {n: betas[0] * m[n] + (1 - betas[0]) * g[n] for n in phi}
            s = {n: betas[1] * s[n] + (1 - betas[1]) * g[n] ** 2 for n in phi}
            t = k + 1
            # sqrt with the derivative 0 where v = 0 (an entry whose gradients were all 0, as a
            # dead ReLU unit's): the convention metagrad documents; elsewhere the plain sqrt.
            root = {
                n: (s[n] / (1 - betas[1] ** t)).clamp_min(1e-300).sqrt() * (s[n] > 0) for n in s
            }
            return {n: phi[n] - lr * (m[n] / (1 - betas[0] ** t)) / (root[n] + eps) for n in phi}, (
                m,
                s,
            )
        g = grad_at(phi)
        return {n: phi[n] - lr * g[n] for n in phi}, None

    return step


def naive_maml(model, theta, task, step, steps, kind="mse", batches=None):
    """Second-order MAML through ``step``, with ``torch.autograd.grad(create_graph=True)``."""
    crit = CRIT[kind]
    th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    phi, state = dict(th), None
    for k in range(steps):
        b = task.support if batches is None else batches[k]

        def grad_at(p, b=b):
            value = crit(functional_call(model, p, (b.x,)), b.y)
            grads = torch.autograd.grad(value, list(p.values()), create_graph=True)
            return dict(zip(p, grads, strict=True))

        phi, state = step(phi, state, k, grad_at)
    q = crit(functional_call(model, phi, (task.query.x,)), task.query.y)
    return dict(zip(th, torch.autograd.grad(q, list(th.values())), strict=True))


SOLVERS = {
    "momentum": (mg.Momentum(lr=0.05, steps=3, momentum=0.7), dict(mu=0.7)),
    "nesterov": (mg.Momentum(lr=0.05, steps=3, momentum=0.7, nesterov=True), dict(mu=0.7)),
    "adam": (mg.Adam(lr=0.01, steps=3), {}),
    "adam-beta1-0": (mg.Adam(lr=0.01, steps=3, betas=(0.0, 0.99), eps=1e-6), {}),
}


def _reference_step(name, solver, extra):
    kind = name.split("-")[0]
    if kind == "adam":
        return _naive_steps("adam", solver.lr, solver.steps, betas=solver.betas, eps=solver.eps)
    return _naive_steps(kind, solver.lr, solver.steps, **extra)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_maml_through_each_solver_equals_a_naive_loop_on_an_mlp(name):
    solver, extra = SOLVERS[name]
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    for i in range(3):
        task = mg.task_at(tasks, i)
        grad, _ = mg.MAML(loss, solver)(theta, task)
        ref = naive_maml(model, theta, task, _reference_step(name, solver, extra), solver.steps)
        assert rel(grad, ref) < 1e-10


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_maml_through_each_solver_equals_a_naive_loop_on_conv4_with_batch_norm(name):
    solver, extra = SOLVERS[name]
    model, loss, tasks = small_conv_task()
    theta = theta_of(model)
    task = mg.task_at(tasks, 1)
    grad, _ = mg.MAML(loss, solver)(theta, task)
    step = _reference_step(name, solver, extra)
    ref = naive_maml(model, theta, task, step, solver.steps, kind="cross_entropy")
    assert rel(grad, ref) < 1e-10


def test_maml_through_adam_on_mini_batches_equals_a_naive_loop():
    solver = mg.Adam(lr=0.01, steps=4, batch_size=4)
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    task = mg.task_at(tasks, 0)
    order = permutation(task.support.x)
    positions = [
        [(4 * k + j) % 10 for j in range(4)] for k in range(4)
    ]  # cycles: 0-3, 4-7, 8 9 0 1
    batches = [mg.Batch(*(t[order[p]] for t in task.support)) for p in positions]
    grad, _ = mg.MAML(loss, solver)(theta, task)
    step = _naive_steps("adam", solver.lr, solver.steps, betas=solver.betas, eps=solver.eps)
    assert rel(grad, naive_maml(model, theta, task, step, 4, batches=batches)) < 1e-10


@pytest.mark.parametrize(
    "solver",
    [
        mg.Momentum(lr=0.05, steps=2, momentum=0.7),
        mg.Momentum(lr=0.05, steps=2, momentum=0.7, nesterov=True),
        mg.Adam(lr=0.01, steps=2),
        mg.GradientDescent(lr=0.05, steps=3, batch_size=4),
    ],
    ids=["momentum", "nesterov", "adam", "gd-minibatch"],
)
def test_gradcheck_through_each_solver(solver):
    model, loss, tasks = small_mlp_task(sizes=(1, 4, 1))
    task = mg.task_at(tasks, 0)
    like = theta_of(model)

    def f(flat):
        theta = mg.tree.unflatten(flat, like)
        return loss(solver(loss, theta, task.support).params, task.query)

    x = mg.tree.flatten(like).clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- iterates in closed form


def _quadratic(d=5, seed=0):
    """``L(w) = w^T A w / 2 - b^T w`` with A in ``batch.x`` and b in ``batch.y``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    a = q @ torch.diag(torch.linspace(0.1, 1.0, d, dtype=DT)) @ q.T
    b = torch.randn(d, generator=g, dtype=DT)

    def loss(p, batch):
        w = p["w"]
        return 0.5 * w @ (batch.x @ w) - batch.y @ w

    w0 = {"w": torch.randn(d, generator=g, dtype=DT)}
    return loss, mg.Batch(a, b), w0


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_iterates_equal_their_closed_form_recursion_on_a_quadratic(nesterov):
    loss, batch, w0 = _quadratic()
    a, b = batch
    lr, mu, steps = 0.9, 0.6, 25
    path = mg.Momentum(lr=lr, steps=steps, momentum=mu, nesterov=nesterov)(
        loss, w0, batch, record=True
    ).path
    # x_{k+1} = y_k - lr (A y_k - b), with y_k = x_k + mu (x_k - x_{k-1}) for Nesterov;
    # heavy ball: x_{k+1} = x_k - lr (A x_k - b) + mu (x_k - x_{k-1}); x_{-1} = x_0.
    prev, x = w0["w"], w0["w"]
    for k in range(steps):
        if nesterov:
            y = x + mu * (x - prev)
            prev, x = x, y - lr * (a @ y - b)
        else:
            prev, x = x, x - lr * (a @ x - b) + mu * (x - prev)
        assert torch.allclose(path[k + 1]["w"], x, rtol=1e-12, atol=1e-14)
    w_star = torch.linalg.solve(a, b)
    assert (x - w_star).norm() < (w0["w"] - w_star).norm()


@pytest.mark.parametrize(
    "solver,optimizer",
    [
        (mg.GradientDescent(lr=0.3, steps=8), lambda p: torch.optim.SGD(p, lr=0.3)),
        (
            mg.Momentum(lr=0.3, steps=8, momentum=0.8),
            lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8),
        ),
        (
            mg.Adam(lr=0.05, steps=8, betas=(0.5, 0.9), eps=1e-6),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.5, 0.9), eps=1e-6),
        ),
    ],
    ids=["gd", "momentum", "adam"],
)
def test_iterates_equal_torch_optim(solver, optimizer):
    loss, batch, w0 = _quadratic(seed=1)
    path = solver(loss, w0, batch, record=True).path
    w = w0["w"].clone().requires_grad_()
    opt = optimizer([w])
    for k in range(solver.steps):
        opt.zero_grad()
        loss({"w": w}, batch).backward()
        opt.step()
        assert torch.allclose(path[k + 1]["w"], w.detach(), rtol=1e-12, atol=1e-14)


def test_nesterov_look_ahead_points_are_the_iterates_of_torch_sgd_nesterov():
    """torch's SGD(nesterov=True) holds ``phi_k + mu v_k``, where the gradient is taken."""
    loss, batch, w0 = _quadratic(seed=2)
    mu = 0.8
    nag = mg.Momentum(lr=0.3, steps=6, momentum=mu, nesterov=True)
    path = nag(loss, w0, batch, record=True).path
    w = w0["w"].clone().requires_grad_()
    opt = torch.optim.SGD([w], lr=0.3, momentum=mu, nesterov=True)
    for k in range(nag.steps):
        opt.zero_grad()
        loss({"w": w}, batch).backward()
        opt.step()
        look_ahead = path[k + 1]["w"] + mu * (path[k + 1]["w"] - path[k]["w"])
        assert torch.allclose(look_ahead, w.detach(), rtol=1e-12, atol=1e-14)


def test_adam_state_starts_at_zero_for_every_task():
    model, loss, tasks = small_mlp_task(n_tasks=2)
    theta = theta_of(model)
    adam = mg.Adam(lr=0.01, steps=3)
    first = adam(loss, theta, mg.task_at(tasks, 1).support).params
    adam(loss, theta, mg.task_at(tasks, 0).support)  # another task in between changes nothing
    again = adam(loss, theta, mg.task_at(tasks, 1).support).params
    assert all(torch.equal(first[k], again[k]) for k in theta)
    # The first Adam step moves each entry by lr * sign(g) (up to eps): the moments start at 0.
    one = mg.Adam(lr=0.01, steps=1, eps=1e-12)(loss, theta, mg.task_at(tasks, 1).support).params
    g, _ = autodiff.grad_and_value(lambda p: loss(p, mg.task_at(tasks, 1).support))(theta)
    for k in theta:
        assert torch.allclose(theta[k] - one[k], 0.01 * torch.sign(g[k]), atol=1e-9)


def test_adam_through_an_entry_with_zero_gradients_stays_finite():
    """An entry whose gradient is exactly zero (v = 0) gets the derivative 0, not nan."""
    loss, batch, w0 = _quadratic()
    x = batch.x.clone()
    x[0], x[:, 0] = 0.0, 0.0
    b = batch.y.clone()
    b[0] = 0.0
    w = {"w": torch.cat([torch.zeros(1, dtype=DT), w0["w"][1:]]).requires_grad_()}
    phi = mg.Adam(lr=0.1, steps=3)(loss, w, mg.Batch(x, b)).params
    (g,) = torch.autograd.grad(phi["w"].sum(), w["w"])
    assert torch.isfinite(g).all() and g[0] == 1.0  # phi_0 = w_0: the identity there


# ---------------------------------------------------------------- mini-batches


def test_permutation_is_a_pure_function_of_the_task_and_the_same_under_vmap():
    _, _, tasks = small_conv_task(n_tasks=4)
    x = tasks.support.x
    orders = [permutation(x[i]) for i in range(4)]
    for i, order in enumerate(orders):
        assert torch.equal(torch.sort(order).values, torch.arange(x.shape[1]))
        assert torch.equal(order, permutation(x[i].clone()))
    assert len({tuple(o.tolist()) for o in orders}) == 4, "different tasks, different orders"
    assert torch.equal(torch.func.vmap(permutation)(x), torch.stack(orders))
    # Identical examples still get a permutation (their positions break the tie).
    same = torch.zeros(7, 3)
    assert torch.equal(torch.sort(permutation(same)).values, torch.arange(7))


def test_minibatches_cycle_through_the_permutation():
    _, _, tasks = small_mlp_task(n_tasks=1)
    support = mg.task_at(tasks, 0).support  # 10 examples
    order = permutation(support.x)
    seen = torch.cat([minibatch(support, 5, k).x for k in range(2)])
    assert torch.equal(seen, support.x[order]), "one pass covers every example once"
    assert torch.equal(minibatch(support, 5, 2).x, minibatch(support, 5, 0).x), "then cycles"
    wrap = minibatch(support, 4, 2).x  # positions 8, 9, 0, 1
    assert torch.equal(wrap, support.x[order[[8, 9, 0, 1]]])


def test_a_batch_size_of_the_whole_support_set_is_full_batch_gradient_descent():
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    support = mg.task_at(tasks, 0).support
    full = mg.GradientDescent(lr=0.05, steps=3)(loss, theta, support).params
    same = mg.GradientDescent(lr=0.05, steps=3, batch_size=10)(loss, theta, support).params
    assert all(torch.equal(full[k], same[k]) for k in theta)


@pytest.mark.parametrize(
    "solver",
    [mg.GradientDescent(lr=0.05, steps=4, batch_size=3), mg.Adam(lr=0.01, steps=4, batch_size=3)],
    ids=["gd", "adam"],
)
def test_mini_batch_solvers_are_deterministic_per_task(solver):
    model, loss, tasks = small_mlp_task(n_tasks=3)
    theta = theta_of(model)
    est = mg.Reptile(loss, solver)
    one = [est(theta, mg.task_at(tasks, i))[0] for i in range(3)]
    again = [est(theta, mg.task_at(tasks, i))[0] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, again, strict=True) for k in theta)
    reordered = mg.tasks.select(tasks, [2, 0, 1])
    for mode in ("loop", "vmap"):
        g, _ = mg.meta_gradient(est, theta, reordered, mode=mode)
        assert rel(g, mg.tree.mean(one)) < 1e-12
    full = mg.Reptile(loss, mg.GradientDescent(lr=0.05, steps=4))(theta, mg.task_at(tasks, 0))[0]
    assert rel(one[0], full) > 1e-3, "mini-batches are not the full batch"


def test_sgd_on_mini_batches_equals_a_naive_loop_over_the_same_batches():
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    support = mg.task_at(tasks, 2).support
    order = permutation(support.x)
    phi = {k: v.clone() for k, v in theta.items()}
    for k in range(5):  # positions 3k .. 3k + 2 mod 10 of the permutation
        index = order[[(3 * k + j) % 10 for j in range(3)]]
        x, y = support.x[index], support.y[index]
        p = {n: v.detach().requires_grad_() for n, v in phi.items()}
        value = nn.functional.mse_loss(functional_call(model, p, (x,)), y)
        grads = torch.autograd.grad(value, list(p.values()))
        phi = {n: v - 0.05 * g for (n, v), g in zip(p.items(), grads, strict=True)}
    got = mg.GradientDescent(lr=0.05, steps=5, batch_size=3)(loss, theta, support).params
    assert rel(got, phi) < 1e-13


# ---------------------------------------------------------------- recording, graphs, estimators

RECORDED = {
    "gd": mg.GradientDescent(lr=0.05, steps=3),
    "gd-minibatch": mg.GradientDescent(lr=0.05, steps=3, batch_size=4),
    "momentum": mg.Momentum(lr=0.05, steps=3, momentum=0.5),
    "nesterov": mg.Momentum(lr=0.05, steps=3, momentum=0.5, nesterov=True, batch_size=4),
    "adam": mg.Adam(lr=0.01, steps=3, batch_size=4),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_a_recorded_path_holds_the_gradients_and_losses_at_its_points(name):
    solver = RECORDED[name]
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    support = mg.task_at(tasks, 0).support
    out = solver(loss, theta, support, record=True)
    assert len(out.path) == solver.steps + 1 and len(out.grads) == solver.steps
    assert all(torch.equal(out.path[0][k], theta[k]) for k in theta)
    assert all(torch.equal(out.path[-1][k], out.params[k]) for k in theta)
    for k, point in enumerate(out.path):
        batch = support if solver.batch_size is None else minibatch(support, 4, k)
        p = {n: v.detach().requires_grad_() for n, v in point.items()}
        value = nn.functional.mse_loss(functional_call(model, p, (batch.x,)), batch.y)
        assert torch.allclose(out.path_losses[k], value, rtol=1e-12, atol=0)
        if k < solver.steps:
            grads = dict(zip(p, torch.autograd.grad(value, list(p.values())), strict=True))
            assert rel(out.grads[k], grads) < 1e-12


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_first_order_use_builds_no_graph(name):
    """Called on parameters that carry no graph (FOMAML, Reptile, Leap, iMAML), nothing does."""
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    out = RECORDED[name](loss, theta, mg.task_at(tasks, 0).support, record=True)
    tensors = [*out.params.values(), out.losses, out.path_losses]
    tensors += [v for p in [*out.path, *out.grads] for v in p.values()]
    assert not any(t.requires_grad for t in tensors)


def test_imaml_runs_the_solver_on_the_proximal_problem():
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    support = mg.task_at(tasks, 0).support
    lam = 2.0
    phi = mg.IMAML(loss, mg.Adam(lr=0.01, steps=4, betas=(0.5, 0.9)), lam=lam).adapt(theta, support)
    w = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.Adam(list(w.values()), lr=0.01, betas=(0.5, 0.9))
    for _ in range(4):
        opt.zero_grad()
        prox = sum(((w[k] - theta[k]) ** 2).sum() for k in w)
        value = nn.functional.mse_loss(functional_call(model, w, (support.x,)), support.y)
        (value + 0.5 * lam * prox).backward()
        opt.step()
    assert rel(phi, {k: v.detach() for k, v in w.items()}) < 1e-11


def test_reptile_with_momentum_is_theta_minus_torch_sgds_result():
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    task = mg.task_at(tasks, 1)
    grad, _ = mg.Reptile(loss, mg.Momentum(lr=0.05, steps=4, momentum=0.5))(theta, task)
    w = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.SGD(list(w.values()), lr=0.05, momentum=0.5)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(
            functional_call(model, w, (task.support.x,)), task.support.y
        ).backward()
        opt.step()
    assert rel(grad, {k: theta[k] - w[k].detach() for k in theta}) < 1e-12


ESTIMATORS = {
    "maml": lambda loss, s: mg.MAML(loss, s),
    "fomaml": lambda loss, s: mg.MAML(loss, s, first_order=True),
    "anil": lambda loss, s: mg.ANIL(loss, s),
    "maml-truncate-1": lambda loss, s: mg.MAML(loss, s, truncate=1),
    "maml-checkpoint": lambda loss, s: mg.MAML(loss, s, checkpoint=True),
    "anil-checkpoint": lambda loss, s: mg.MAML(loss, s, head=("head.",), checkpoint=True),
    "reptile": lambda loss, s: mg.Reptile(loss, s),
    "leap": lambda loss, s: mg.Leap(loss, s),
    "imaml": lambda loss, s: mg.IMAML(loss, s, lam=2.0, cg_steps=3),
}
EVERY_SOLVER = {
    "gd-minibatch": mg.GradientDescent(lr=0.05, steps=2, batch_size=4),
    "momentum": mg.Momentum(lr=0.05, steps=2, momentum=0.5),
    "nesterov": mg.Momentum(lr=0.05, steps=2, momentum=0.5, nesterov=True),
    "adam": mg.Adam(lr=0.01, steps=2),
    "adam-minibatch": mg.Adam(lr=0.01, steps=3, batch_size=4),
    "newton-cg": mg.NewtonCG(steps=1, cg_steps=2),
}


@pytest.mark.parametrize(
    "estimator,solver", list(itertools.product(sorted(ESTIMATORS), sorted(EVERY_SOLVER)))
)
def test_loop_and_vmap_agree_for_every_solver_and_estimator(estimator, solver):
    model, loss, tasks = small_mlp_task(n_tasks=3)
    est = ESTIMATORS[estimator](loss, EVERY_SOLVER[solver])
    theta = theta_of(model)
    loop, mloop = mg.meta_gradient(est, theta, tasks, mode="loop")
    vmap, mvmap = mg.meta_gradient(est, theta, tasks, mode="vmap")
    assert rel(vmap, loop) < 1e-10
    for k in mloop:
        assert torch.allclose(mloop[k], mvmap[k], rtol=1e-10, atol=1e-12)
    singles = [est(theta, mg.task_at(tasks, i))[0] for i in range(3)]
    assert rel(loop, mg.tree.mean(singles)) < 1e-12


def test_every_registered_solver_builds_and_adapts():
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    assert {"gd", "momentum", "nesterov", "adam", "newton-cg"} <= set(mg.INNER_SOLVERS)
    assert mg.INNER_SOLVERS.build("nesterov", steps=2).nesterov
    for name in mg.INNER_SOLVERS:
        solver = mg.INNER_SOLVERS.build(name, steps=2)
        assert solver.steps == 2
        phi = solver(loss, theta, mg.task_at(tasks, 0).support).params
        assert list(phi) == list(theta) and not torch.equal(phi["head.bias"], theta["head.bias"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: mg.Momentum(momentum=1.0), r"momentum=1.0: must be in \[0, 1\)"),
        (lambda: mg.Momentum(momentum=-0.1), r"momentum=-0.1"),
        (lambda: mg.Momentum(lr=0.0), r"lr=0.0"),
        (lambda: mg.Adam(betas=(0.9, 1.0)), r"betas=\(0.9, 1.0\)"),
        (lambda: mg.Adam(eps=0.0), r"eps=0.0"),
        (lambda: mg.Adam(steps=-1), r"steps=-1"),
        (lambda: mg.GradientDescent(batch_size=0), r"batch_size=0"),
        (lambda: mg.Adam(batch_size=2.5), r"batch_size=2.5"),
    ],
)
def test_bad_solver_settings_raise_naming_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "solver", [mg.GradientDescent(lr=0.1, steps=1, batch_size=11), mg.Adam(batch_size=20)]
)
def test_a_batch_size_larger_than_the_support_set_raises(solver):
    model, loss, tasks = small_mlp_task()
    with pytest.raises(ValueError, match=rf"batch_size={solver.batch_size} is larger than the "):
        mg.MAML(loss, solver)(theta_of(model), mg.task_at(tasks, 0))
    with pytest.raises(ValueError, match=r"support set \(10 examples\): give batch_size <= 10"):
        mg.meta_gradient(mg.Reptile(loss, solver), theta_of(model), tasks, mode="vmap")
