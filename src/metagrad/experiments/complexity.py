r"""The complexity table, measured (Rajeswaran et al. 2019, iMAML, Table 1; the talk's table).

Quadratic tasks with a controlled condition number, in float64, where the exact meta-gradient is
known. The support loss is :math:`L_s(\phi) = \tfrac12 (\phi - c)^\top A (\phi - c)`, the
proximal inner problem :math:`\phi^* = \arg\min_\phi L_s(\phi) + \tfrac\lambda2
\|\phi - \theta\|^2` (:math:`\lambda = 1`), whose Hessian :math:`H = A + \lambda I` has
eigenvalues spread geometrically over :math:`[\mu, \kappa\mu]`, :math:`\mu = 2\lambda`: condition
number exactly :math:`\kappa`, and every direction matters (:math:`A \succeq \lambda I`, so no
direction is solved by the proximal term alone). The query loss is
:math:`L_q(\phi) = \tfrac12 (\phi - c_q)^\top B (\phi - c_q)`. Then
:math:`\phi^* = H^{-1}(A c + \lambda\theta)` and the exact meta-gradient is
:math:`g^* = \lambda H^{-1} B (\phi^* - c_q)`; every estimate is scored by
:math:`\|g - g^*\| / \|g^*\|`. The methods, all on the same inner objective, with budget ``S``:

- **MAML-GD**: :class:`~metagrad.MAML` through S steps of gradient descent (step :math:`1/L`,
  :math:`L = \kappa\mu`); the proximal term's anchor is a frozen parameter (ANIL's key
  filter), so the meta-gradient is its gradient plus the initialisation's.
- **MAML-Nesterov**: the same through S steps of Nesterov's accelerated gradient (step
  :math:`1/L`, momentum :math:`(\sqrt\kappa - 1)/(\sqrt\kappa + 1)`).
- **truncated**: MAML-GD with ``truncate=m`` (Shaban et al. 2019): ``m = ceil(S/2)`` against
  :math:`\kappa`; fixed ``m`` for the error floors, beside :math:`\epsilon(m)` in closed form.
- **checkpointed MAML-GD**: ``checkpoint=True``, the same gradient, each step recomputed.
- **iMAML**: :class:`~metagrad.IMAML` with S Nesterov steps on the proximal problem and S
  conjugate-gradient steps.

Compute is counted, not timed: every product with a task's :math:`d \times d` matrix (A or B) is
counted by a ``torch`` dispatch mode, and one gradient or one Hessian-vector product of a
quadratic costs two of them by autograd, so compute = products / 2 = gradient plus Hessian-vector
evaluations. "Compute to reach delta" is that count for the smallest budget (on a geometric grid,
refined by bisection for the gradient-descent methods, whose error falls monotonically) whose
error is at most delta. Memory is measured: the peak of the tensor memory allocated while one
meta-gradient is computed (the profiler's allocation events, CPU), in units of one parameter
vector (d float64 numbers). Neither depends on the machine's load::

    metagrad experiment complexity --out runs/experiments/complexity [--quick]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from metagrad._types import Batch, Params, Task
from metagrad.algorithms import IMAML, MAML
from metagrad.experiments._cells import machine, reject, save_figure
from metagrad.experiments._report import Options, Report, Table
from metagrad.inner import GradientDescent, Momentum

DESCRIPTION = (
    "iMAML Table 1 (the talk's complexity table), measured on quadratics: compute to reach "
    "meta-gradient error delta against kappa, memory against inner steps, the error reached"
)

LAM = 1.0
LOWEST = 2 * LAM  # the smallest curvature of the inner objective; the largest is kappa times it
DT = torch.float64
FULL: dict[str, Any] = {
    "dim": 20,
    "kappas": (10.0, 31.6, 100.0, 316.0, 1000.0),
    "delta": 1e-6,
    "memory": {"dim": 100, "kappa": 100.0, "steps": (8, 16, 32, 64, 128, 256), "truncate": 8},
    "floors": {
        "kappa": 100.0,
        "budgets": (10, 30, 100, 300, 1000, 3000, 10000),
        "truncate": (4, 16, 64, 256),
        "imaml_inner": (10, 30, 100),
    },
}
QUICK: dict[str, Any] = {
    "dim": 10,
    "kappas": (10.0, 40.0),
    "delta": 1e-4,
    "memory": {"dim": 50, "kappa": 30.0, "steps": (8, 16, 32), "truncate": 4},
    "floors": {
        "kappa": 30.0,
        "budgets": (10, 30, 100, 300),
        "truncate": (2, 8),
        "imaml_inner": (5,),
    },
}
METHODS = ("MAML-GD", "MAML-Nesterov", "truncated, m = S/2", "checkpointed MAML-GD", "iMAML")
MONOTONE = {"MAML-GD", "truncated, m = S/2", "checkpointed MAML-GD"}
TALK = {  # compute, memory, error as the talk's table prints them
    "MAML-GD": ("κ log(D/δ)", "linear in the path", "0"),
    "MAML-Nesterov": ("√κ log(D/δ)", "linear in the path", "0"),
    "truncated, m = S/2": ("κ log(D/δ)", "linear in the truncation", "ε"),
    "checkpointed MAML-GD": ("(not in the table)", "(states only)", "0"),
    "iMAML": ("√κ log(D/δ) (CG)", "flat", "δ"),
}


def loss(params: Params, batch: Batch) -> Tensor:
    """``(phi - c)^T H (phi - c) / 2 + sum_i w_i (phi_i - anchor_i)^2 / 2``.

    ``H = batch.x``, ``(c, w) = batch.y`` (columns); the proximal term only with an ``anchor``.
    """
    r = params["phi"] - batch.y[:, 0]
    value = 0.5 * r @ (batch.x @ r)
    if "anchor" in params:
        value = value + 0.5 * (batch.y[:, 1] * (params["phi"] - params["anchor"]) ** 2).sum()
    return value


def problem(dim: int, kappa: float, seed: int = 0) -> dict[str, Tensor]:
    """One quadratic task whose inner objective has condition number ``kappa``."""
    g = torch.Generator().manual_seed(seed)

    def rotation() -> Tensor:
        return torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))[0]

    qa, qb = rotation(), rotation()
    curvatures = LOWEST * kappa ** torch.linspace(0, 1, dim, dtype=DT)  # of H = A + lam I
    a = qa @ torch.diag(curvatures - LAM) @ qa.T
    b = qb @ torch.diag(torch.linspace(0.5, 1.5, dim, dtype=DT)) @ qb.T
    c, cq, theta = (torch.randn(dim, generator=g, dtype=DT) for _ in range(3))
    shifted = a + LAM * torch.eye(dim, dtype=DT)
    phi = torch.linalg.solve(shifted, a @ c + LAM * theta)
    exact = LAM * torch.linalg.solve(shifted, b @ (phi - cq))
    return {"a": a, "b": b, "c": c, "cq": cq, "theta": theta, "phi": phi, "exact": exact}


def estimate(
    method: str, p: dict[str, Tensor], kappa: float, budget: int, m: int = 0, adapted: bool = False
) -> Tensor:
    """The meta-gradient of ``method`` with budget ``budget``.

    ``m`` is the fixed truncation of ``"truncated"``, or the fixed inner steps of
    ``"iMAML, fixed inner"`` (whose budget is then its CG steps; ``adapted``: its ``phi``).
    """
    lr, mu = 1.0 / (LOWEST * kappa), (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    gd = GradientDescent(lr=lr, steps=budget)
    nag = Momentum(lr=lr, steps=budget, momentum=mu, nesterov=True)

    def batch(hessian: Tensor, centre: Tensor, proximal: float) -> Batch:
        return Batch(hessian, torch.stack([centre, torch.full_like(centre, proximal)], 1))

    query = batch(p["b"], p["cq"], 0.0)
    if method.startswith("iMAML"):  # iMAML adds the proximal term itself
        task = Task(batch(p["a"], p["c"], 0.0), query)
        solve = nag if method == "iMAML" else replace(nag, steps=m)  # m: fixed inner steps
        imaml = IMAML(loss, solve, lam=LAM, cg_steps=budget)
        if adapted:
            return imaml.adapt({"phi": p["theta"]}, task.support)["phi"]
        return imaml({"phi": p["theta"]}, task)[0]["phi"]
    inner, options = {
        "MAML-GD": (gd, {}),
        "MAML-Nesterov": (nag, {}),
        "truncated, m = S/2": (gd, {"truncate": math.ceil(budget / 2)}),
        "truncated": (gd, {"truncate": min(m, budget)}),
        "checkpointed MAML-GD": (gd, {"checkpoint": True}),
    }[method]
    maml = MAML(loss, inner, head=("phi",), **options)  # type: ignore[arg-type]
    task = Task(batch(p["a"], p["c"], LAM), query)
    grad, _ = maml({"phi": p["theta"], "anchor": p["theta"]}, task)
    return grad["phi"] + grad["anchor"]  # theta is both the initialisation and the anchor


def error(g: Tensor, p: dict[str, Tensor]) -> float:
    return float((g - p["exact"]).norm() / p["exact"].norm())


def truncation_floor(p: dict[str, Tensor], kappa: float, m: int) -> float:
    """The closed-form error of truncated MAML-GD as ``S -> inf``: ``J_m`` in place of ``J*``.

    With ``M = I - lr (A + lam I)``, ``J_m = M^m + lr lam sum_{j<m} M^j`` (the identity for the
    earlier steps) and ``J* = lam (A + lam I)^-1``, both applied to ``B (phi* - c_q)``.
    """
    lr, eye = 1.0 / (LOWEST * kappa), torch.eye(len(p["c"]), dtype=DT)
    mat = eye - lr * (p["a"] + LAM * eye)
    power = torch.linalg.matrix_power(mat, m)
    jm = power + LAM * torch.linalg.solve(p["a"] + LAM * eye, eye - power)  # the geometric sum
    return error(jm @ (p["b"] @ (p["phi"] - p["cq"])), p)


class Products(TorchDispatchMode):
    """Counts the matrix products with a ``dim x dim`` matrix (the tasks' A and B)."""

    OPS = {"mv", "mm", "addmv", "addmm", "matmul", "bmm"}

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.count = dim, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket.__name__ in self.OPS and any(
            isinstance(t, Tensor) and t.shape == (self.dim, self.dim) for t in args
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def compute(method: str, p: dict[str, Tensor], kappa: float, budget: int) -> float:
    """Gradient plus Hessian-vector evaluations of one meta-gradient (products / 2)."""
    counter = Products(len(p["c"]))
    with counter:
        estimate(method, p, kappa, budget)
    return counter.count // 2 if counter.count % 2 == 0 else counter.count / 2


def peak_vectors(dim: int, fn: Callable[..., object], *args: Any) -> float:
    """The peak tensor memory allocated by ``fn(*args)``, in parameter vectors (dim float64)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / (dim * 8)


def reach(method: str, p: dict[str, Tensor], kappa: float, delta: float) -> dict[str, Any]:
    """The smallest budget whose error is at most ``delta``, its compute and its error.

    The first budget on a geometric grid that reaches ``delta`` (ratio 1.1); for the methods whose
    error falls monotonically, a coarser grid (ratio 1.5) refined by bisection to 2 %.
    """
    ratio = 1.5 if method in MONOTONE else 1.1
    lo, budget, err = 0, 0, math.inf
    for s in sorted({math.ceil(ratio**j) for j in range(400)}):
        if s > 100 * kappa * math.log(10 / delta):  # far past what gradient descent needs
            return {"budget": None, "compute": None, "error": None}
        budget, err = s, error(estimate(method, p, kappa, s), p)
        if err <= delta:
            break
        lo = s
    while method in MONOTONE and budget - lo > max(1, budget // 50):
        mid = (lo + budget) // 2
        e = error(estimate(method, p, kappa, mid), p)
        lo, budget, err = (lo, mid, e) if e <= delta else (mid, budget, err)
    return {"budget": budget, "compute": compute(method, p, kappa, budget), "error": err}


def slope(kappas: list[float], values: list[float | None]) -> float | None:
    """The least-squares slope of log(value) against log(kappa)."""
    pts = [(math.log(k), math.log(v)) for k, v in zip(kappas, values, strict=True) if v]
    if len(pts) < 2:
        return None
    mx, my = (sum(x) / len(pts) for x in zip(*pts, strict=True))
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def run(options: Options) -> Report:
    """Compute against kappa, memory against S, and the error floors; tables and figure."""
    reject(options, "complexity", "seeds", "steps", "lake_runs", "budget_minutes", "data", "cells")
    if options.device != "cpu":
        raise ValueError("--device does not apply to the complexity experiment (counts on CPU)")
    start = time.perf_counter()
    setting = QUICK if options.quick else FULL
    kappas, delta = list(setting["kappas"]), setting["delta"]
    reached = {n: [reach(n, problem(setting["dim"], k), k, delta) for k in kappas] for n in METHODS}
    mem = setting["memory"]
    p = problem(mem["dim"], mem["kappa"])
    memory: dict[str, list[float]] = {}
    for name in [*METHODS, "truncated"]:
        label = f"truncated, m = {mem['truncate']}" if name == "truncated" else name
        memory[label] = [
            peak_vectors(mem["dim"], estimate, name, p, mem["kappa"], s, mem["truncate"])
            for s in mem["steps"]
        ]
    fl = setting["floors"]
    kappa = fl["kappa"]
    p = problem(setting["dim"], kappa)
    curves = {n: [error(estimate(n, p, kappa, s), p) for s in fl["budgets"]] for n in METHODS}
    floors: dict[str, str] = {}
    for m in fl["truncate"]:
        label = f"truncated, m = {m}"
        curves[label] = [error(estimate("truncated", p, kappa, s, m), p) for s in fl["budgets"]]
        floors[label] = f"ε(m) = {truncation_floor(p, kappa, m):.3g} (closed form)"
    for n in fl["imaml_inner"]:
        label = f"iMAML, {n} inner steps"
        curves[label] = [
            error(estimate("iMAML, fixed inner", p, kappa, s, n), p) for s in fl["budgets"]
        ]
        phi = estimate("iMAML, fixed inner", p, kappa, 0, n, adapted=True)
        inner = float((phi - p["phi"]).norm() / (p["theta"] - p["phi"]).norm())
        floors[label] = f"inner solve's error ‖φ − φ*‖/‖θ − φ*‖ = {inner:.3g}"
    report = _report(setting, reached, memory, curves, floors)
    report.figures.append(_plot(setting, reached, memory, curves, Path(options.out)))
    report.info = {"machine": machine("cpu"), "wall_seconds": round(time.perf_counter() - start, 1)}
    report.info.update(reached=reached, memory=memory, errors=curves)
    return report


def _report(setting: dict, reached: dict, memory: dict, curves: dict, floors: dict) -> Report:
    kappas, delta = setting["kappas"], setting["delta"]
    mem, fl = setting["memory"], setting["floors"]
    steps = mem["steps"]
    per_step = {n: (v[-1] - v[0]) / (steps[-1] - steps[0]) for n, v in memory.items()}
    fixed_m = f"truncated, m = {mem['truncate']}"
    summary = Table(
        "complexity_table",
        "The talk's complexity table beside the measurement",
        ["method", "compute (talk)", "compute ∝ κ^slope (measured)", "memory (talk)",
         "memory (measured)", "error (talk)", "error reached (measured)"],
    )  # fmt: skip
    for name in METHODS:
        c, m, e = TALK[name]
        s = slope(kappas, [r["compute"] for r in reached[name]])
        used = f"{per_step[name]:.2f} vectors per step"
        reached_error = f"{curves[name][-1]:.2g}"
        if name.startswith("truncated"):
            used += f"; m = {mem['truncate']} fixed: {per_step[fixed_m]:.2f} per step"
            reached_error += "; m fixed: " + ", ".join(
                f"{curves[k][-1]:.2g} (m = {k.rsplit(' ', 1)[1]})" for k in curves
                if k.startswith("truncated, m = ") and "S" not in k
            )  # fmt: skip
        if name == "iMAML":
            reached_error += "; inner steps fixed: " + ", ".join(
                f"{curves[k][-1]:.2g} ({k.split(', ')[1]})" for k in curves
                if k.startswith("iMAML, ")
            )  # fmt: skip
        summary.rows.append([name, c, None if s is None else round(s, 2), m, used, e,
                             reached_error])  # fmt: skip
    summary.notes = [
        f"Quadratic tasks, d = {setting['dim']}, lam = {LAM}, float64; compute (gradient plus "
        f"Hessian-vector evaluations, counted) to reach a relative meta-gradient error of "
        f"{delta:g}; slope of log compute against log kappa over kappa = "
        f"{', '.join(f'{k:g}' for k in kappas)}.",
        f"Memory: peak tensor memory allocated by one meta-gradient, in parameter vectors "
        f"(d = {mem['dim']}), kappa = {mem['kappa']:g}; growth per inner step over "
        f"S = {steps[0]}..{steps[-1]}.",
        f"Error reached: at budget S = {fl['budgets'][-1]}, kappa = {fl['kappa']:g}.",
    ]
    computes = Table(
        "complexity_compute",
        f"Compute (gradient + Hessian-vector evaluations) to reach error {delta:g}",
        ["method"] + [f"κ={k:g}" for k in kappas] + ["slope"],
    )
    for name in METHODS:
        values = [r["compute"] for r in reached[name]]
        s = slope(kappas, values)
        computes.rows.append([name, *values, None if s is None else round(s, 2)])
    computes.notes = [
        "Budgets S reached: "
        + "; ".join(f"{n}: {', '.join(str(r['budget']) for r in reached[n])}" for n in METHODS)
    ]
    memories = Table(
        "complexity_memory",
        f"Peak memory (parameter vectors) against inner steps S, kappa = {mem['kappa']:g}",
        ["method"] + [f"S={s}" for s in steps] + ["per step"],
    )
    for name, peaks in memory.items():
        memories.rows.append([name, *(round(v, 1) for v in peaks), round(per_step[name], 2)])
    errors = Table(
        "complexity_error",
        f"Relative error of the meta-gradient against the budget S, kappa = {fl['kappa']:g}",
        ["method"] + [f"S={s}" for s in fl["budgets"]] + ["its floor"],
    )
    for name, values in curves.items():
        errors.rows.append([name, *values, floors.get(name, "0 (exact in the limit)")])
    errors.notes = [
        "S is the number of inner steps; for iMAML also its CG steps, and for 'iMAML, n inner "
        "steps' its CG steps only (the inner solve fixed at n Nesterov steps)."
    ]
    return Report("complexity", [summary, computes, memories, errors])


def _plot(setting: dict, reached: dict, memory: dict, curves: dict, out: Path) -> Path:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    kappas = setting["kappas"]
    for j, name in enumerate(METHODS):
        pts = [(k, r["compute"]) for k, r in zip(kappas, reached[name], strict=True)]
        pts = [(k, c) for k, c in pts if c]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{j}", label=name)
    for power, anchor, style in ((1.0, "MAML-GD", "--"), (0.5, "MAML-Nesterov", ":")):
        first = reached[anchor][0]["compute"]
        if first:  # drawn beside (half) the method it is compared with
            ys = [0.5 * first * (k / kappas[0]) ** power for k in kappas]
            ax.plot(kappas, ys, style, color="gray", label=f"slope {power:g}")
    ax.set(xscale="log", yscale="log", xlabel="condition number κ",
           ylabel=f"compute to reach error {setting['delta']:g}")  # fmt: skip
    ax.legend(fontsize="x-small")
    ax = fig.add_subplot(1, 3, 2)
    mem = setting["memory"]
    for j, (name, peaks) in enumerate(memory.items()):
        ax.plot(mem["steps"], peaks, marker="o", ms=3, color=f"C{j}", label=name)
    ax.set(xscale="log", yscale="log", xlabel="inner steps S",
           ylabel="peak memory (parameter vectors)")  # fmt: skip
    ax.legend(fontsize="x-small")
    ax = fig.add_subplot(1, 3, 3)
    fl = setting["floors"]
    fixed = {"truncated, m = ": ("--", "Greens"), "iMAML, ": (":", "Purples")}  # fixed m, inner
    for j, (name, values) in enumerate(curves.items()):
        line, color = "-", f"C{j}"
        for prefix, (dash, cmap) in fixed.items():
            family = [k for k in curves if k.startswith(prefix) and k not in METHODS]
            if name in family:  # shades of the colour of the method they fix a part of
                shade = matplotlib.colormaps[cmap](0.45 + 0.5 * family.index(name) / len(family))
                line, color = dash, matplotlib.colors.to_hex(shade)
        ax.plot(fl["budgets"], [max(v, 1e-17) for v in values], line, marker="o", ms=3,
                color=color, label=name)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="budget S (inner steps; iMAML: and CG steps)",
           ylabel=f"relative error, κ = {fl['kappa']:g}")  # fmt: skip
    ax.legend(fontsize="x-small")
    return save_figure(fig, out / "complexity.png")
