r"""Hypergradients by implicit differentiation (Lorraine, Vicol & Duvenaud 2020).

A hyperparameter :math:`\lambda` (here weight decays, stored as logarithms) is scored by the
validation loss at the training optimum, :math:`\min_\lambda L_V(w^*(\lambda))` with
:math:`w^*(\lambda) = \arg\min_w L_T(w, \lambda)`. Its gradient is
:func:`metagrad.implicit.root_vjp` of the optimality condition :math:`\nabla_w L_T = 0`: solve
:math:`H u = \nabla L_V(w^*)` (:math:`H` the training Hessian), return :math:`-\partial_\lambda
\nabla_w L_T \cdot u`. The linear solve is approximated from Hessian-vector products.

1. **Accuracy** (Lorraine et al., the comparison of inverse-Hessian approximations): multinomial
   logistic regression on synthetic data (:data:`FEATURES` features of unequal scales,
   :data:`CLASSES` classes) with a weight decay per parameter, the training optimum found by
   Newton-CG. The exact hypergradient uses the dense Hessian
   (:func:`metagrad.linalg.exact`); against it, CG, the Neumann series (``alpha`` = 1 and 1.9
   over ``||H||``, the norm from the dense Hessian here; in practice an estimate) and the identity
   approximation (:math:`H^{-1} \approx I`, no product) after ``k`` Hessian-vector products
   (counted as the solver calls them): relative error and cosine similarity, averaged over
   problems.
2. **Per-parameter weight decay on Omniglot**: a linear softmax classifier on 14x14 drawings of
   every character of one alphabet, fitted by Newton-CG on :data:`SPLIT` ``[0]`` drawings per
   character; the best single weight decay of a grid (by validation loss) against a weight decay
   per parameter learned by Adam on implicit hypergradients (CG) of the validation loss, from the
   grid's best; also a single decay learned the same way, as a check on the grid. Validation and
   test accuracy of each (the test drawings are used for nothing else).
3. Learned lam and learned inner step sizes on sinusoid, beside MAML and iMAML with fixed values
   (:mod:`metagrad.experiments._learned`): four resumable runs of 2,000 outer steps each under
   ``OUT/cells/learned``, the query MSE and the learned values.

::

    metagrad experiment hypergradients --out runs/exp/hypergradients  # --data or $METAGRAD_OMNIGLOT
    metagrad experiment hypergradients --quick
    metagrad experiment hypergradients --steps 200                     # hyper-steps of part 2
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagrad import autodiff, implicit, linalg, tree
from metagrad._types import Batch, LossFn, Params
from metagrad.data import Omniglot
from metagrad.experiments._cells import machine, reject, save_figure
from metagrad.experiments._learned import learned_table
from metagrad.experiments._report import Options, Report, Table
from metagrad.inner import NewtonCG
from metagrad.models import Loss, loss_fn

DESCRIPTION = (
    "Lorraine et al. 2020: hypergradient error of CG, Neumann and identity against Hessian-vector "
    "products; per-parameter weight decay on Omniglot drawings against a grid-searched one"
)

DT = torch.float64
FEATURES, CLASSES, POINTS = 20, 4, 100
SPLIT = (5, 8, 7)  # drawings per character: train, validation, test (of 20)
FULL: dict[str, Any] = {
    "problems": 10, "products": (0, 1, 2, 4, 8, 16, 32, 64, 128),
    "alphabets": ("Latin", "Greek", "Futurama"), "grid": tuple(10 ** (e / 2) for e in range(-8, 1)),
    "steps": 100, "global_steps": 40, "sinusoid_steps": 2000, "sinusoid_tasks": 600,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "problems": 2, "products": (0, 2, 8), "alphabets": ("Latin",), "grid": (1e-3, 1e-2),
    "steps": 3, "global_steps": 2, "sinusoid_steps": 3, "sinusoid_tasks": 10,
}  # fmt: skip
NEWTON = NewtonCG(steps=8, cg_steps=20)  # a fit from scratch
WARM = NewtonCG(steps=2, cg_steps=20)  # a fit from the previous hyper-step's solution
CG_STEPS, LR, GLOBAL_LR, GLOBAL_START = 50, 0.05, 0.2, 0.1


def penalised(loss: Loss, hyper: Params) -> LossFn:
    """``L(w) + sum_k exp(s_k) ||w_k||^2 / 2``; ``hyper`` holds ``log_decay`` (one decay for all
    parameters) or ``log_decay/<name>`` (one per parameter entry)."""

    def f(w: Params, batch: Batch) -> Tensor:
        s = {k: hyper["log_decay"] if "log_decay" in hyper else hyper[f"log_decay/{k}"] for k in w}
        return loss(w, batch) + 0.5 * torch.stack([(s[k].exp() * w[k] ** 2).sum() for k in w]).sum()

    return f


def hypergradient(
    loss: Loss, w: Params, hyper: Params, train: Batch, val: Batch, solve: Callable
) -> tuple[Params, Tensor]:
    """``d L_V(w*) / d hyper`` at the training optimum ``w``, by ``root_vjp`` with ``solve``."""

    def optimality(w: Params, hyper: Params) -> Params:  # grad_w L_T(w, hyper) = 0
        return autodiff.grad_and_value(penalised(loss, hyper))(w, train)[0]

    cotangent = autodiff.grad_and_value(loss)(w, val)[0]
    return implicit.root_vjp(optimality, w, hyper, cotangent, solve=solve)


# -- 1. accuracy of the approximations ------------------------------------------------------------


def logistic_problem(seed: int) -> tuple[Loss, Params, Params, Batch, Batch]:
    """Logistic regression: loss, optimum ``w*``, per-parameter log decays, training, validation."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-0.5, 0.5, FEATURES, dtype=DT)
    means = torch.randn(CLASSES, FEATURES, generator=g, dtype=DT)

    def batch() -> Batch:
        y = torch.arange(POINTS) % CLASSES
        return Batch((means[y] + torch.randn(POINTS, FEATURES, generator=g, dtype=DT)) * scale, y)

    train, val = batch(), batch()
    model = nn.Linear(FEATURES, CLASSES).to(DT)
    loss = loss_fn(model, "cross_entropy")
    zeros = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    hyper = {  # decays log-uniform in [1e-2, 1e-1]
        f"log_decay/{k}": math.log(1e-2) + math.log(10) * torch.rand(v.shape, generator=g, dtype=DT)
        for k, v in zeros.items()
    }
    fit = NewtonCG(steps=12, cg_steps=64)  # (CG past n steps only wanders in round-off)
    w = tree.detach(fit(penalised(loss, hyper), zeros, train).params)
    return loss, w, hyper, train, val


def _counted(solve: Callable[..., Any], calls: list[int], **options: Any) -> Callable:
    def run(matvec: Callable[[Params], Params], b: Params) -> tuple[Params, Tensor]:
        def counting(v: Params) -> Params:
            calls.append(1)
            return matvec(v)

        return solve(counting, b, **options)

    return run


METHODS: dict[str, tuple[Callable[..., Any], float | None]] = {
    "CG": (linalg.cg, None),
    "Neumann, alpha = 1/||H||": (linalg.neumann, 1.0),
    "Neumann, alpha = 1.9/||H||": (linalg.neumann, 1.9),
}
"""Each approximate solver, and for Neumann its ``alpha`` times ``||H||``."""


def accuracy(problems: int, products: tuple[int, ...]) -> tuple[dict[str, Any], float]:
    """``{method: {products: [mean relative error, mean cosine]}}`` over ``problems`` problems,
    and the largest training-gradient norm at the problems' optima."""
    out: dict[str, dict[int, list[float]]] = {}
    inner = 0.0
    for seed in range(problems):
        loss, w, hyper, train, val = logistic_problem(seed)
        g = autodiff.grad_and_value(penalised(loss, hyper))(w, train)[0]
        inner = max(inner, float(tree.norm(g)))
        truth = tree.flatten(hypergradient(loss, w, hyper, train, val, linalg.exact)[0])
        top = hessian_norm(loss, w, hyper, train)
        runs = [
            (name, k, solve, {"steps": k} if ratio is None else {"steps": k, "alpha": ratio / top})
            for name, (solve, ratio) in METHODS.items()
            for k in products
        ]
        runs.append(("identity", 0, linalg.neumann, {"steps": 0, "alpha": 1.0}))
        for name, k, solve, solver_options in runs:
            calls: list[int] = []
            g, _ = hypergradient(
                loss, w, hyper, train, val, _counted(solve, calls, **solver_options)
            )
            assert len(calls) == k, (name, k, len(calls))  # k products, as the solver called them
            a = tree.flatten(g)
            cos = float(a @ truth / (a.norm() * truth.norm()))
            cell = out.setdefault(name, {}).setdefault(k, [0.0, 0.0])
            cell[0] += float((a - truth).norm() / truth.norm()) / problems
            cell[1] += (cos if math.isfinite(cos) else 0.0) / problems  # CG at k = 0: zero
    return out, inner


def hessian_norm(loss: Loss, w: Params, hyper: Params, train: Batch) -> float:
    """``||H||`` of the training objective at ``w``, from the dense Hessian."""
    _, _, hvp = autodiff.hessian_at(lambda p: penalised(loss, hyper)(p, train), w)
    eye = torch.eye(sum(v.numel() for v in w.values()), dtype=DT)
    dense = torch.stack([tree.flatten(hvp(tree.unflatten(e, w))) for e in eye])
    return float(torch.linalg.eigvalsh(dense).max())


# -- 2. per-parameter weight decay on Omniglot ----------------------------------------------------


def drawings(ds: Omniglot, alphabet: str, device: str) -> tuple[Batch, ...]:
    """Train, validation and test drawings of every character of ``alphabet``, 14x14 pixels."""
    chars = torch.tensor(ds.characters(alphabet))
    images = nn.functional.avg_pool2d(ds.images[chars].to(DT) / 255.0, 2).flatten(2)
    order = torch.randperm(images.shape[1], generator=torch.Generator().manual_seed(0))
    bounds = [0, SPLIT[0], SPLIT[0] + SPLIT[1], sum(SPLIT)]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        idx = order[lo:hi]
        y = torch.arange(len(chars)).repeat_interleave(len(idx))
        out.append(Batch(images[:, idx].flatten(0, 1).to(device), y.to(device)))
    return tuple(out)


def scores(loss: Loss, w: Params, data: tuple[Batch, ...]) -> dict[str, float]:
    with torch.no_grad():
        return {
            f"{name}_{kind}": float(f(w, batch))
            for name, batch in zip(("train", "val", "test"), data, strict=True)
            for kind, f in (("loss", loss), ("accuracy", loss.accuracy))
        }


def learn(
    loss: Loss, data: tuple[Batch, ...], hyper: Params, steps: int, lr: float
) -> tuple[Params, dict[str, Any]]:
    """Adam on ``hyper`` with implicit hypergradients, the fit warm-started at each step."""
    train, val, _ = data
    hyper = {k: v.clone().requires_grad_() for k, v in hyper.items()}
    optimizer = torch.optim.Adam(list(hyper.values()), lr=lr)
    zeros = {k: torch.zeros_like(v) for k, v in loss.model.named_parameters()}
    w = tree.detach(NEWTON(penalised(loss, tree.detach(hyper)), zeros, train).params)
    curve, residuals = [], []
    for _ in range(steps):
        h = {k: v.detach().clone() for k, v in hyper.items()}
        w = tree.detach(WARM(penalised(loss, h), w, train).params)
        grads, residual = hypergradient(
            loss, w, h, train, val, functools.partial(linalg.cg, steps=CG_STEPS)
        )
        curve.append(scores(loss, w, data))
        residuals.append(float(residual))
        for k, v in hyper.items():
            v.grad = grads[k]
        optimizer.step()
    h = tree.detach(hyper)
    w = tree.detach(WARM(penalised(loss, h), w, train).params)
    g = autodiff.grad_and_value(penalised(loss, h))(w, train)[0]
    curve.append(scores(loss, w, data))
    return h, {"curve": curve, "cg_residual": residuals, "inner_grad_norm": float(tree.norm(g))}


def weight_decay(ds: Omniglot, alphabet: str, setting: dict[str, Any], device: str) -> dict:
    """Grid search, a learned single decay and learned per-parameter decays on one alphabet."""
    data = drawings(ds, alphabet, device)
    model = nn.Linear(data[0].x.shape[1], int(data[0].y.max()) + 1).to(DT).to(device)
    loss = loss_fn(model, "cross_entropy")
    zeros = {k: torch.zeros_like(v) for k, v in model.named_parameters()}

    def constant(decay: float) -> Params:
        return {"log_decay": torch.tensor(math.log(decay), dtype=DT, device=device)}

    grid = []
    for decay in setting["grid"]:
        w = NEWTON(penalised(loss, constant(decay)), zeros, data[0]).params
        grid.append({"decay": decay, **scores(loss, tree.detach(w), data)})
    best = min(grid, key=lambda r: r["val_loss"])
    single, single_info = learn(
        loss, data, constant(GLOBAL_START), setting["global_steps"], GLOBAL_LR
    )
    per = {f"log_decay/{k}": torch.full_like(v, math.log(best["decay"])) for k, v in zeros.items()}
    per, per_info = learn(loss, data, per, setting["steps"], LR)
    decays = torch.cat([v.flatten() for v in per.values()])
    return {
        "alphabet": alphabet, "grid": grid, "best": best,
        "single": {"decay": math.exp(float(single["log_decay"])), **single_info},
        "per_parameter": {
            "geometric_mean_decay": float(decays.mean().exp()), **per_info,
            "log10_decay_map": (per["log_decay/weight"] / math.log(10)).mean(0).tolist(),
        },
    }  # fmt: skip


# -- the report -----------------------------------------------------------------------------------


def omniglot_root(options: Options) -> Path:
    """``--data``, else ``$METAGRAD_OMNIGLOT``; ``ValueError`` naming the fix without either."""
    root = options.data or os.environ.get("METAGRAD_OMNIGLOT")
    if not root:
        raise ValueError(
            "the hypergradients experiment needs Omniglot for its part 2: pass --data PATH (a "
            "folder holding images_background.zip and images_evaluation.zip) or set "
            "METAGRAD_OMNIGLOT"
        )
    return Path(root)


def run(options: Options) -> Report:
    """Part 1 (synthetic, exact inverse), part 2 (Omniglot); tables and two figures."""
    reject(options, "hypergradients", "seeds", "budget_minutes", "lake_runs", "cells")
    setting = dict(QUICK if options.quick else FULL)
    if options.steps is not None:
        setting["steps"] = options.steps
    ds = Omniglot(omniglot_root(options))  # fails here, before any work, without data
    errors, inner = accuracy(setting["problems"], setting["products"])
    decay = [weight_decay(ds, a, setting, options.device) for a in setting["alphabets"]]
    out = Path(options.out)
    learned, learned_info = learned_table(
        out, setting["sinusoid_steps"], setting["sinusoid_tasks"], options.device
    )
    figures = [
        _plot_accuracy(errors, out / "hypergradients_accuracy.png"),
        _plot_decay(decay[0], out / "hypergradients_weight_decay.png"),
    ]
    info = {
        "machine": machine(options.device),
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "accuracy": {n: {str(k): v for k, v in e.items()} for n, e in errors.items()},
        "weight_decay": decay,
        "learned": learned_info,
    }
    tables = [_accuracy_table(errors, inner, setting), _decay_table(decay, setting), learned]
    return Report("hypergradients", tables, figures, info)


def _accuracy_table(errors: dict[str, Any], inner: float, setting: dict[str, Any]) -> Table:
    names = [n for n in errors if n != "identity"]
    table = Table(
        "hypergradients_accuracy",
        "Hypergradient against the exact one: relative error (cosine similarity) after k "
        "Hessian-vector products",
        ["k", *names],
        notes=[
            f"Mean over {setting['problems']} logistic-regression problems ({FEATURES} features "
            f"of scales 0.3 to 3, {CLASSES} classes, {POINTS} training and {POINTS} validation "
            f"points), a weight decay per parameter (log-uniform in [1e-2, 1e-1]), float64; the "
            "exact hypergradient from the dense Hessian, at the training optimum of each problem "
            f"(Newton-CG; training-gradient norm at most {inner:.0e}).",
            "identity approximation (H^-1 ~ I, no product): relative error "
            f"{errors['identity'][0][0]:.3f}, cosine {errors['identity'][0][1]:.3f}.",
            "k = 0: CG's estimate is zero; Neumann's is alpha times the identity's.",
        ],
    )
    for k in setting["products"]:
        table.rows.append([k] + [f"{errors[n][k][0]:.2e} ({errors[n][k][1]:.3f})" for n in names])
    return table


def _decay_table(results: list[dict[str, Any]], setting: dict[str, Any]) -> Table:
    table = Table(
        "hypergradients_weight_decay",
        "Weight decay of a linear classifier on a few Omniglot drawings: grid search against "
        "implicit hypergradients",
        ["alphabet", "weight decay", "decay", "val loss", "val acc", "test loss", "test acc"],
    )
    for r in results:
        single, per = r["single"]["curve"][-1], r["per_parameter"]["curve"][-1]
        rows = [
            ("single, grid search (best val loss)", r["best"]["decay"], r["best"]),
            ("single, learned", r["single"]["decay"], single),
            ("per parameter, learned", r["per_parameter"]["geometric_mean_decay"], per),
        ]  # fmt: skip
        for name, value, s in rows:
            table.rows.append([r["alphabet"], name, f"{value:.2e}", s["val_loss"],
                               s["val_accuracy"], s["test_loss"], s["test_accuracy"]])  # fmt: skip
    residual = max(max(r[p]["cg_residual"]) for r in results for p in ("single", "per_parameter"))
    inner = max(r[p]["inner_grad_norm"] for r in results for p in ("single", "per_parameter"))
    table.notes += [
        f"Every character of the alphabet; of its 20 drawings (seeded permutation) {SPLIT[0]} to "
        f"train, {SPLIT[1]} to validate, {SPLIT[2]} to test; 14x14 pixels; softmax regression "
        "(weights and biases), float64, fitted by Newton-CG.",
        f"Grid: {len(setting['grid'])} decays from {min(setting['grid']):.0e} to "
        f"{max(setting['grid']):.0e}, each fitted from zero; the best by validation loss.",
        f"Learned: Adam on the log-decays with hypergradients of the validation loss by root_vjp "
        f"(CG, {CG_STEPS} steps), the fit warm-started (2 Newton-CG steps) at each step; single "
        f"decay from {GLOBAL_START:g}, {setting['global_steps']} steps, lr {GLOBAL_LR}; one "
        f"decay per weight and bias from the grid's best, {setting['steps']} steps, lr {LR}. "
        "Per parameter, 'decay' is the geometric mean.",
        f"Largest CG residual {residual:.1e}; largest training-gradient norm at the end "
        f"{inner:.1e}. The test drawings chose nothing.",
    ]
    return table


def _plot_accuracy(errors: dict[str, dict[int, list[float]]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (name, cells) in enumerate(errors.items()):
        ks = sorted(cells)
        if name == "identity":
            left.axhline(cells[0][0], color="k", ls="--", label="identity (no product)")
            right.axhline(cells[0][1], color="k", ls="--", label="identity (no product)")
            continue
        x = [k + 1 for k in ks]  # log axis: k + 1
        left.plot(
            x, [max(cells[k][0], 1e-16) for k in ks], marker="o", ms=3, color=f"C{i}", label=name
        )
        right.plot(x, [cells[k][1] for k in ks], marker="o", ms=3, color=f"C{i}", label=name)
    left.set(xscale="log", yscale="log", xlabel="Hessian-vector products + 1",
             ylabel="relative error of the hypergradient")  # fmt: skip
    right.set(xscale="log", xlabel="Hessian-vector products + 1", ylabel="cosine similarity")
    left.legend(fontsize="small")
    return save_figure(fig, path)


def _plot_decay(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid_ax, curve_ax, map_ax = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    decays = [r["decay"] for r in result["grid"]]
    for split, style in (("val", "-"), ("test", "--")):
        grid_ax.plot(decays, [r[f"{split}_loss"] for r in result["grid"]], "o" + style, ms=3,
                     color="C0", label=f"grid, {split} loss")  # fmt: skip
    grid_ax.axvline(result["single"]["decay"], color="C1", label="learned single decay")
    grid_ax.set(xscale="log", xlabel="weight decay", ylabel="cross-entropy")
    grid_ax.legend(fontsize="small")
    for name, color in (("single", "C1"), ("per_parameter", "C2")):
        curve = result[name]["curve"]
        for split, style in (("val", "-"), ("test", "--")):
            curve_ax.plot([c[f"{split}_loss"] for c in curve], style, color=color,
                          label=f"{name.replace('_', ' ')}, {split}")  # fmt: skip
    curve_ax.axhline(result["best"]["val_loss"], color="C0", lw=0.8, label="grid best, val")
    curve_ax.set(xlabel="hyper-step", ylabel="cross-entropy")
    curve_ax.legend(fontsize="x-small")
    image = torch.tensor(result["per_parameter"]["log10_decay_map"])
    side = int(math.isqrt(image.numel()))
    shown = map_ax.imshow(image.view(side, side).numpy(), cmap="viridis")
    fig.colorbar(shown, ax=map_ax, label="log10 decay (mean over classes)")
    map_ax.set_title(f"learned decay per pixel, {result['alphabet']}", fontsize="medium")
    map_ax.set_axis_off()
    return save_figure(fig, path)
