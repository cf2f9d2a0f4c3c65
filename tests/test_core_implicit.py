"""Implicit differentiation and the linear solvers, against closed forms in float64.

``root_vjp`` on ridge regression against autograd through ``torch.linalg.solve`` of the closed
form, for every argument, with each solver, on both autodiff backends and under ``vmap``; the
Neumann series against its matrix formula and the solve; the dense solve on a non-symmetric system.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _core_helpers import DT, rel

import metagrad as mg
from metagrad import autodiff, implicit, linalg

N, D, M = 30, 6, 20  # training points, features, validation points


def ridge(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ridge problem: training data ``x, y``, the regulariser ``lam``, validation data."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 1.5, D, dtype=DT)  # unequal curvatures
    w = torch.randn(D, generator=g, dtype=DT)
    x = torch.randn(N, D, generator=g, dtype=DT) * scale
    xv = torch.randn(M, D, generator=g, dtype=DT) * scale
    return {
        "lam": torch.tensor(0.7, dtype=DT),
        "x": x,
        "y": x @ w + 0.3 * torch.randn(N, generator=g, dtype=DT),
        "xv": xv,
        "yv": xv @ w + 0.3 * torch.randn(M, generator=g, dtype=DT),
    }


def inner_objective(w: mg.Params, args: mg.Params) -> torch.Tensor:
    """``||x w - y||^2 / (2n) + lam ||w||^2 / 2``."""
    r = args["x"] @ w["w"] - args["y"]
    return (r @ r) / (2 * N) + 0.5 * args["lam"] * (w["w"] @ w["w"])


def optimality(w: mg.Params, args: mg.Params) -> mg.Params:
    """The inner objective's gradient, through metagrad.autodiff (so either backend)."""
    return autodiff.grad_and_value(inner_objective)(w, args)[0]


def closed_form(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``w* = (x^T x / n + lam I)^{-1} x^T y / n``."""
    x, y = p["x"], p["y"]
    return torch.linalg.solve(x.T @ x / N + p["lam"] * torch.eye(D, dtype=DT), x.T @ y / N)


def validation_loss(w: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    r = p["xv"] @ w - p["yv"]
    return (r @ r) / (2 * M)


def reference(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d L_v(w*(lam, x, y)) / d(lam, x, y) by autograd through the closed-form solve."""
    args = {k: p[k].clone().requires_grad_() for k in ("lam", "x", "y")}
    loss = validation_loss(closed_form({**p, **args}), p)
    return dict(zip(args, torch.autograd.grad(loss, list(args.values())), strict=True))


def hessian(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["x"].T @ p["x"] / N + p["lam"] * torch.eye(D, dtype=DT)


def solvers(p: dict[str, torch.Tensor]) -> dict[str, functools.partial]:
    top = float(torch.linalg.eigvalsh(hessian(p)).max())
    return {
        "cg": functools.partial(linalg.cg, steps=2 * D),
        "neumann": functools.partial(linalg.neumann, steps=300, alpha=1.0 / top),
        "exact": functools.partial(linalg.exact),
    }


def implicit_grads(p: dict[str, torch.Tensor], solve) -> tuple[mg.Params, torch.Tensor]:
    args = {k: p[k] for k in ("lam", "x", "y")}
    w = {"w": closed_form(p)}
    cotangent = {"w": p["xv"].T @ (p["xv"] @ w["w"] - p["yv"]) / M}
    return implicit.root_vjp(optimality, w, args, cotangent, solve=solve)


@pytest.mark.parametrize("backend", autodiff.BACKENDS)
@pytest.mark.parametrize("solver", ["cg", "neumann", "exact"])
def test_root_vjp_on_ridge_regression_equals_autograd_through_the_solve(backend, solver):
    p = ridge()
    with autodiff.use(backend):
        grads, residual = implicit_grads(p, solvers(p)[solver])
    ref = reference(p)
    assert list(grads) == ["lam", "x", "y"]
    for k in ref:
        assert grads[k].shape == ref[k].shape
        assert rel({k: grads[k]}, {k: ref[k]}) < 1e-9, k
    assert residual < 1e-9


def test_root_vjp_under_vmap_equals_the_reference_of_each_problem():
    problems = [ridge(seed) for seed in range(3)]
    batched = {k: torch.stack([p[k] for p in problems]) for k in problems[0]}
    solve = functools.partial(linalg.cg, steps=2 * D)
    with autodiff.use("func"):
        grads, residual = torch.func.vmap(lambda p: implicit_grads(p, solve))(batched)
    for i, p in enumerate(problems):
        ref = reference(p)
        assert rel({k: grads[k][i] for k in ref}, ref) < 1e-9
    assert residual.shape == (3,) and bool((residual < 1e-9).all())


@pytest.mark.parametrize("backend", autodiff.BACKENDS)
def test_the_optimality_condition_is_evaluated_once_whatever_the_solver_steps(backend):
    """Each product is a backward pass through one retained graph, not a fresh evaluation."""
    p = ridge()
    calls = []

    def counted(w, args):
        calls.append(1)
        return optimality(w, args)

    args = {k: p[k] for k in ("lam", "x", "y")}
    w = {"w": closed_form(p)}
    with autodiff.use(backend):
        implicit.root_vjp(counted, w, args, {"w": torch.ones(D, dtype=DT)}, steps=7)
    assert len(calls) == 1


def test_root_vjp_transposes_a_non_symmetric_jacobian():
    """F(z, {a, b}) = a z - b with a non-symmetric a: z* = a^{-1} b, with z split in two."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=DT) + 4 * torch.eye(6, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)
    like = {"u": torch.zeros(2, dtype=DT), "v": torch.zeros(2, 2, dtype=DT)}

    def f(z, args):
        return mg.tree.unflatten(args["a"] @ mg.tree.flatten(z) - args["b"], like)

    z = mg.tree.unflatten(torch.linalg.solve(a, b), like)
    c = torch.randn(6, generator=g, dtype=DT)  # the outer loss is c . z
    for backend in autodiff.BACKENDS:
        with autodiff.use(backend):
            grads, residual = implicit.root_vjp(
                f, z, {"a": a, "b": b}, mg.tree.unflatten(c, like), solve=linalg.exact
            )
        leaves = {"a": a.clone().requires_grad_(), "b": b.clone().requires_grad_()}
        outer = c @ torch.linalg.solve(leaves["a"], leaves["b"])
        ref = dict(zip(leaves, torch.autograd.grad(outer, list(leaves.values())), strict=True))
        assert rel(grads, ref) < 1e-12 and residual < 1e-12


def _spd(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.linspace(low, high, n, dtype=DT)) @ q.T


def _matvec(a: torch.Tensor):
    return lambda v: {"x": a @ v["x"]}


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_neumann_equals_its_matrix_formula(steps):
    a = _spd(5, 0.5, 4.0, seed=4)
    b = {"x": torch.randn(5, generator=torch.Generator().manual_seed(5), dtype=DT)}
    alpha = 0.3
    x, size = linalg.neumann(_matvec(a), b, steps=steps, alpha=alpha)
    step = torch.eye(5, dtype=DT) - alpha * a
    terms = [torch.linalg.matrix_power(step, j) @ b["x"] for j in range(steps + 1)]
    assert torch.allclose(x["x"], alpha * torch.stack(terms).sum(0), rtol=1e-12, atol=1e-14)
    assert torch.isclose(size, terms[-1].norm() / b["x"].norm(), rtol=1e-12)
    true_residual = (b["x"] - a @ x["x"]).norm() / b["x"].norm()
    assert true_residual <= size * (1 + 1e-12)  # the returned size bounds the residual


def test_neumann_with_no_step_and_alpha_one_is_the_identity_approximation():
    b = {"x": torch.arange(4, dtype=DT), "y": torch.ones(2, 2, dtype=DT)}
    x, _ = linalg.neumann(lambda v: pytest.fail("no product at steps=0"), b, steps=0, alpha=1.0)
    assert all(torch.equal(x[k], b[k]) for k in b)


def test_neumann_converges_to_the_solve_when_alpha_norm_is_below_two_and_diverges_above():
    a = _spd(8, 0.5, 4.0, seed=6)
    b = {"x": torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=DT)}
    truth = torch.linalg.solve(a, b["x"])
    norm = float(torch.linalg.matrix_norm(a, ord=2))

    def error(alpha: float, steps: int) -> float:
        x, _ = linalg.neumann(_matvec(a), b, steps=steps, alpha=alpha)
        return float((x["x"] - truth).norm() / truth.norm())

    for ratio in (0.5, 1.0, 1.9):  # alpha ||A|| < 2
        assert error(ratio / norm, 500) < 1e-10, ratio
    errors = [error(2.1 / norm, k) for k in (50, 100, 200)]  # alpha ||A|| > 2
    assert errors[0] > 1 and errors[0] < errors[1] < errors[2]


def test_exact_solves_a_non_symmetric_system_held_in_several_tensors():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(7, 7, generator=g, dtype=DT) + 3 * torch.eye(7, dtype=DT)
    like = {"p": torch.zeros(3, dtype=DT), "q": torch.zeros(2, 2, dtype=DT)}
    b = mg.tree.unflatten(torch.randn(7, generator=g, dtype=DT), like)

    def matvec(v):
        return mg.tree.unflatten(a @ mg.tree.flatten(v), like)

    x, residual = linalg.exact(matvec, b)
    assert list(x) == ["p", "q"] and x["q"].shape == (2, 2)
    assert torch.allclose(mg.tree.flatten(x), torch.linalg.solve(a, mg.tree.flatten(b)))
    assert residual < 1e-13


def test_neumann_refuses_a_negative_number_of_steps():
    with pytest.raises(ValueError, match=r"steps=-1.*>= 0"):
        linalg.neumann(lambda v: v, {"x": torch.ones(2)}, steps=-1, alpha=1.0)
