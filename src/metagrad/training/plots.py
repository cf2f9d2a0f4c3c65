"""The plots of a run: its training curves, and adapted sinusoids for a regression run.

matplotlib is imported inside the functions that draw (it is slow to import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metagrad._types import Params
from metagrad.algorithms import Posterior, predictive
from metagrad.data import Sinusoid
from metagrad.tasks import task_at, to_device
from metagrad.training.evaluate import eval_seed, inner_steps

__all__ = ["plot_curves", "plot_sinusoid"]


def plot_curves(metrics: list[dict[str, Any]], path: str | Path) -> None:
    """Training curves from ``metrics.jsonl`` lines: losses, accuracies and validation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = {
        "query_loss": "query loss after adaptation",
        "support_loss": "support loss before adaptation",
        "val_loss_before": "validation, before adaptation",
        "val_loss": "validation, after adaptation",
        "query_accuracy": "query accuracy after adaptation",
        "val_accuracy": "validation accuracy",
    }
    panels = [
        ("loss", ["query_loss", "support_loss", "val_loss_before", "val_loss"]),
        ("accuracy", ["query_accuracy", "val_accuracy"]),
    ]
    panels = [(t, [k for k in ks if any(k in m for m in metrics)]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    fig = Figure(figsize=(5 * max(len(panels), 1), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            pts = [(m["step"], m[k]) for m in metrics if k in m]
            marker = "." if len(pts) < 30 else None
            ax.plot(*zip(*pts, strict=True), label=labels[k], marker=marker)
        ax.set(xlabel="outer step", title=title, yscale="log" if title == "loss" else "linear")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_sinusoid(
    estimator: Any, theta: Params, path: str | Path, seed: int, shots: int = 10, n: int = 4
) -> Path:
    """Adapted curves on ``n`` held-out sinusoid tasks: truth, support, before and after."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = torch.Generator().manual_seed(eval_seed(seed, "test", 10**6))
    tasks, truth = Sinusoid(shots=shots, queries=1).sample_with_params(n, g)
    device = next(iter(theta.values())).device
    grid = torch.linspace(-5, 5, 200)
    curves = truth.curve(grid)
    fig = Figure(figsize=(4 * n, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i in range(n):
        support = to_device(task_at(tasks, i), device).support
        adapted = estimator.adapt(theta, support)
        x = grid.view(-1, 1).to(device)
        ax = fig.add_subplot(1, n, i + 1)
        if isinstance(adapted, Posterior):  # the predictive mean with a 95% band
            pred = predictive(estimator, adapted, x, samples=100)
            assert pred.std is not None
            mean, half = pred.mean[:, 0].float().cpu(), 1.96 * pred.std[:, 0].float().cpu()
            ax.fill_between(grid, mean - half, mean + half, color="C1", alpha=0.25, label="95%")
        phi = adapted.mean if isinstance(adapted, Posterior) else adapted
        init = estimator.model_params(theta) if hasattr(estimator, "model_params") else theta
        with torch.no_grad():
            pre, post = estimator.loss.predict(init, x), estimator.loss.predict(phi, x)
        ax.plot(grid, curves[i, :, 0], "k-", label="truth")
        ax.plot(grid, pre[:, 0].float().cpu(), "C0--", label="before adaptation")
        ax.plot(
            grid, post[:, 0].float().cpu(), "C1-", label=f"after {inner_steps(estimator)} steps"
        )
        ax.plot(support.x[:, 0].cpu(), support.y[:, 0].cpu(), "k^", label=f"{shots} support")
        if i == 0:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return Path(path)
