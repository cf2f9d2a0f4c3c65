r"""Accuracy of the meta-gradient against compute (Rajeswaran et al. 2019, iMAML, Fig. 2a).

Linear regression tasks, where everything is known in closed form. With inputs
:math:`X \in \mathbb{R}^{n \times d}` and the loss :math:`L(\phi) = \frac1n\|X\phi - y\|^2`, the
support loss has Hessian :math:`H = \frac2n X_s^\top X_s` and gradient
:math:`H\phi - c`, :math:`c = \frac2n X_s^\top y_s`. The proximal inner problem
:math:`\phi^* = \arg\min_\phi L_s(\phi) + \frac\lambda2\|\phi - \theta\|^2` is solved by

.. math::  \phi^* = (H + \lambda I)^{-1}(c + \lambda\theta), \qquad
           \frac{d\phi^*}{d\theta} = (I + H/\lambda)^{-1},

so the exact meta-gradient of :math:`L_q(\phi^*(\theta))` is
:math:`g^* = (I + H/\lambda)^{-1}\nabla L_q(\phi^*)`, computed with ``torch.linalg.solve`` in
float64. Every estimate is scored by its relative error :math:`\|g - g^*\| / \|g^*\|`, averaged over
the tasks. The estimators, all on the same proximal objective and from the same :math:`\theta`:

- **MAML**: K steps of gradient descent (step :math:`\alpha = 1/(\max_{tasks}\|H\| + \lambda)`),
  differentiated through the unrolled steps. Compute: K gradients, K Hessian-vector products for
  the backward pass through the steps, 1 query gradient: :math:`2K + 1`.
- **FOMAML**: the query gradient at the K-th step, :math:`\nabla L_q(\phi_K)`. Compute
  :math:`K + 1`. Biased: as :math:`K \to \infty` it tends to :math:`\nabla L_q(\phi^*) \ne g^*`.
- **iMAML**: metagrad's :class:`~metagrad.IMAML`: K steps of gradient descent, then ``c`` steps of
  conjugate gradient on :math:`(I + H/\lambda) v = \nabla L_q(\phi_K)`. Compute
  :math:`K + 1 + c`; shown with :math:`c = K` (the same compute as MAML) and :math:`c = 5` (the
  paper's Omniglot setting). A second panel isolates CG: the inner problem solved exactly (one
  Newton-CG step, exact on a quadratic), error against ``c``.

One unit of compute is one gradient or one Hessian-vector product (the latter costs about two
gradients in practice; the count says how many evaluations, not their seconds)::

    metagrad experiment metagrad-accuracy --out runs/exp/accuracy
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from metagrad import autodiff
from metagrad._types import Batch, Params, Task
from metagrad.algorithms import IMAML
from metagrad.experiments._cells import machine, reject, save_figure
from metagrad.experiments._report import Options, Report, Table
from metagrad.inner import GradientDescent, NewtonCG
from metagrad.models import Loss, loss_fn
from metagrad.tasks import task_at, to_device

DESCRIPTION = (
    "iMAML Fig. 2a: relative error of the meta-gradient against compute for MAML, FOMAML and "
    "iMAML, on linear regression with a closed-form exact meta-gradient"
)

DIM, SUPPORT, QUERY, LAM = 50, 25, 50, 1.0
FULL: dict[str, Any] = {"tasks": 20, "steps": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}
QUICK: dict[str, Any] = {"tasks": 4, "steps": (1, 4, 16, 64)}
PAPER_CG = 5


def make_tasks(n: int, generator: torch.Generator) -> tuple[Task, torch.Tensor]:
    """``n`` regression tasks (float64) and the starting point ``theta``.

    Input scales spread log-uniformly over [0.3, 3] (so curvatures differ), weights
    ``w ~ N(w0, I)`` around a shared ``w0``, targets ``X w`` plus noise of standard deviation 0.1.
    """
    g = generator
    scale = torch.logspace(-0.5, 0.5, DIM, dtype=torch.float64)
    w0 = torch.randn(DIM, generator=g, dtype=torch.float64)
    w = w0 + torch.randn(n, DIM, generator=g, dtype=torch.float64)

    def batch(m: int) -> Batch:
        x = torch.randn(n, m, DIM, generator=g, dtype=torch.float64) * scale
        y = x @ w.unsqueeze(-1) + 0.1 * torch.randn(n, m, 1, generator=g, dtype=torch.float64)
        return Batch(x, y)

    theta = torch.randn(1, DIM, generator=g, dtype=torch.float64)
    return Task(batch(SUPPORT), batch(QUERY)), theta


def exact(task: Task, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g* = (I + H/lam)^{-1} grad L_q(phi*)`` for one task, in closed form, and
    ``grad L_q(phi*)`` (FOMAML's limit as K grows)."""
    (xs, ys), (xq, yq) = task
    h = 2 * xs.T @ xs / len(xs)
    c = 2 * xs.T @ ys[:, 0] / len(xs)
    eye = torch.eye(DIM, dtype=torch.float64)
    phi = torch.linalg.solve(h + LAM * eye, c + LAM * theta[0])
    grad_q = 2 * xq.T @ (xq @ phi - yq[:, 0]) / len(xq)
    return torch.linalg.solve(eye + h / LAM, grad_q), grad_q


def estimates(loss: Loss, task: Task, theta: Params, k: int, lr: float) -> dict:
    """MAML, FOMAML and iMAML (c = K and c = 5) meta-gradients after K inner steps."""
    gd: Any = GradientDescent(lr=lr, steps=k)  # Any: frozen, so not InnerSolver to mypy
    imaml = IMAML(loss, gd, lam=LAM, cg_steps=k)

    def query_after_steps(th: Params) -> torch.Tensor:
        return loss(gd(imaml.proximal_loss(th), th, task.support).params, task.query)

    phi = imaml.adapt(theta, task.support)
    with autodiff.use("func"):  # torch.func transforms of the inner loop and the loss
        maml = torch.func.grad(query_after_steps)(theta)
        fomaml = torch.func.grad(loss)(phi, task.query)
    return {
        "MAML": maml,
        "FOMAML": fomaml,
        "iMAML, c = K": imaml(theta, task)[0],
        f"iMAML, c = {PAPER_CG}": IMAML(loss, gd, lam=LAM, cg_steps=PAPER_CG)(theta, task)[0],
    }


def exact_inner(loss: Loss, task: Task, theta: Params, c: int) -> Params:
    """iMAML with the inner problem solved exactly (one Newton-CG step) and ``c`` CG steps."""
    newton: Any = NewtonCG(steps=1, cg_steps=2 * DIM)
    return IMAML(loss, newton, lam=LAM, cg_steps=c)(theta, task)[0]


COMPUTE = {
    "MAML": lambda k: 2 * k + 1,
    "FOMAML": lambda k: k + 1,
    "iMAML, c = K": lambda k: 2 * k + 1,
    f"iMAML, c = {PAPER_CG}": lambda k: k + 1 + PAPER_CG,
}
"""Gradient and Hessian-vector evaluations of each estimator after K inner steps."""


def run(options: Options) -> Report:
    """Relative errors over the tasks for every K; table and a two-panel log-scale figure."""
    reject(
        options,
        "metagrad-accuracy",
        "data",
        "seeds",
        "budget_minutes",
        "steps",
        "lake_runs",
        "cells",
    )
    start = time.perf_counter()
    setting = QUICK if options.quick else FULL
    tasks, theta0 = make_tasks(setting["tasks"], torch.Generator().manual_seed(0))
    model = torch.nn.Linear(DIM, 1, bias=False).double().to(options.device)
    loss = loss_fn(model, "mse")
    theta = {"weight": theta0.to(options.device)}
    hessians = 2 * tasks.support.x.mT @ tasks.support.x / SUPPORT
    lr = 1.0 / (float(torch.linalg.eigvalsh(hessians).max()) + LAM)
    errors: dict[str, dict[int, float]] = {}
    for i in range(setting["tasks"]):
        task = to_device(task_at(tasks, i), options.device)
        truth, fomaml_limit = exact(task, theta["weight"])

        def err(g: Params, truth: torch.Tensor = truth) -> float:
            return float((g["weight"][0] - truth).norm() / truth.norm())

        for k in setting["steps"]:
            for name, g in estimates(loss, task, theta, k, lr).items():
                errors.setdefault(name, {}).setdefault(k, 0.0)
                errors[name][k] += err(g) / setting["tasks"]
            name = "iMAML, exact inner"
            errors.setdefault(name, {}).setdefault(k, 0.0)
            errors[name][k] += err(exact_inner(loss, task, theta, k)) / setting["tasks"]
        bias = float((fomaml_limit - truth).norm() / truth.norm())
        errors.setdefault("FOMAML, K = inf", {0: 0.0})[0] += bias / setting["tasks"]
    names = [*COMPUTE, "iMAML, exact inner"]
    table = Table(
        "metagrad_accuracy",
        "Relative error of the meta-gradient, ‖g − g*‖ / ‖g*‖ (mean over tasks), after K steps",
        ["K"] + [f"{n} [{_formula(n)}]" for n in names],
        notes=[
            f"{setting['tasks']} linear-regression tasks, d = {DIM}, {SUPPORT} support and "
            f"{QUERY} query points, lam = {LAM}, float64; inner GD step 1/(max ‖H‖ + lam) = "
            f"{lr:.4f}.",
            "Compute in brackets: gradient plus Hessian-vector evaluations. K is the number of "
            "inner GD steps; for 'iMAML, exact inner' K is the number of CG steps and the inner "
            "problem is solved exactly (one Newton-CG step), its cost not counted.",
            f"FOMAML's limit as K grows, grad L_q(phi*) in closed form: relative error "
            f"{errors['FOMAML, K = inf'][0]:.3f} (its bias).",
        ],
    )
    for k in setting["steps"]:
        table.rows.append([k] + [errors[n][k] for n in names])
    figure = _plot(errors, Path(options.out) / "metagrad_accuracy.png")
    info = {
        "machine": machine(options.device),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "errors": {n: {str(k): v for k, v in e.items()} for n, e in errors.items()},
        "inner_lr": lr,
    }
    return Report("metagrad-accuracy", [table], [figure], info)


def _formula(name: str) -> str:
    return {"MAML": "2K+1", "FOMAML": "K+1", "iMAML, c = K": "2K+1"}.get(
        name, f"K+{PAPER_CG + 1}" if name in COMPUTE else "K+1, inner not counted"
    )


def _plot(errors: dict[str, dict[int, float]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    floor = 1e-16
    for name, cost in COMPUTE.items():
        ks = sorted(errors[name])
        ys = [max(errors[name][k], floor) for k in ks]
        left.plot([cost(k) for k in ks], ys, marker="o", ms=3, label=name)
    left.set(xscale="log", yscale="log", xlabel="compute: gradients + Hessian-vector products",
             ylabel="relative error of the meta-gradient")  # fmt: skip
    left.set_title("K inner GD steps (all compute counted)", fontsize="medium")
    left.legend(fontsize="small")
    exact = errors["iMAML, exact inner"]
    ks = sorted(exact)
    right.plot(ks, [max(exact[k], floor) for k in ks], marker="o", ms=3, color="C2",
               label="iMAML, exact inner solution")  # fmt: skip
    fo = errors["FOMAML, K = inf"][0]
    right.axhline(fo, color="C1", ls="--", label="FOMAML, K = inf (closed form)")
    right.set(xscale="log", yscale="log", xlabel="CG steps c", ylabel="relative error")
    right.set_title("conjugate gradient alone", fontsize="medium")
    right.legend(fontsize="small")
    return save_figure(fig, path)
