"""Part 3 of ``metagrad experiment hypergradients``: learned lam and learned step sizes on sinusoid.

Four models meta-trained on sinusoid regression with the same budget (outer steps), each an
ordinary resumable run under ``OUT/cells/learned``: MAML with its fixed inner step size, MAML with
a learned step size per parameter entry (Meta-SGD, ``learn_lr="parameter"``), iMAML with its fixed
``lam`` (the damped sinusoid preset) and iMAML with ``lam`` learned by implicit gradients
(``learn_lam="global"``). Each is scored by the query MSE after its training number of inner steps
and after 10, on the same fixed test tasks (K = 10), with the learned values at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from metagrad.experiments._cells import Deadline, diverged_notes, run_or_note
from metagrad.experiments._report import Table
from metagrad.training import Config, evaluate_run, load_run, preset

MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "MAML, fixed lr": ("maml-fixed", "sinusoid-maml", {}),
    "MAML, learned lr (Meta-SGD)": ("maml-learned", "sinusoid-maml", {"learn_lr": "parameter"}),
    "iMAML, fixed lam": ("imaml-fixed", "sinusoid-imaml-gd", {}),
    "iMAML, learned lam": ("imaml-learned", "sinusoid-imaml-gd", {"learn_lam": "global"}),
}
"""Row -> (cell folder, preset, overrides)."""


def cell_config(name: str, steps: int, tasks: int, device: str) -> Config:
    """Row ``name``'s training run, shortened to ``steps`` outer steps."""
    _, preset_name, changes = MODELS[name]
    return preset(preset_name).override(
        **changes,
        steps=steps,
        device=device,
        eval_every=0,
        log_every=min(100, steps),
        checkpoint_every=max(1, steps),
        eval_tasks=tasks,
        tensorboard=False,
    )


def learned_values(path: Path) -> str:
    """The learned hyperparameters of a run: step sizes (median, range) or lam."""
    meta = load_run(path).params
    rates = [v.detach().exp().reshape(-1) for k, v in meta.items() if k.startswith("log_lr/")]
    if rates:
        r = torch.cat(rates)
        return f"lr median {float(r.median()):.4f} ({float(r.min()):.4f}-{float(r.max()):.4f})"
    lams = [float(v.detach().exp()) for k, v in meta.items() if k.startswith("log_lam")]
    return ", ".join(f"lam {lam:.3f}" for lam in lams) or "-"


def learned_table(
    out: Path, steps: int, tasks: int, device: str, deadline: Deadline | None = None
) -> tuple[Table, dict[str, Any]]:
    """Train (or reuse) the four cells and score them; the table and the raw numbers."""
    failed: list[str] = []
    rows, info = [], {}
    for name in MODELS:
        path = out / "cells" / "learned" / MODELS[name][0]
        config = cell_config(name, steps, tasks, device)
        if not run_or_note(config, path, failed, deadline):
            rows.append([name, None, None, None])
            continue
        train_steps = config.algo.inner_steps
        mse = {}
        for k in (train_steps, 10):
            ev, _ = evaluate_run(path, tasks=tasks, steps=k)
            mse[k] = (ev.loss, ev.loss_ci)
        values = learned_values(path)
        rows.append([name, _fmt(mse[train_steps]), _fmt(mse[10]), values])
        info[name] = {"mse": {str(k): v for k, v in mse.items()}, "learned": values}
    table = Table(
        "learned_hyperparameters",
        f"Sinusoid, K = 10: query MSE after the training inner steps and after 10 "
        f"({tasks} test tasks, {steps} outer steps each), and the learned values",
        ["model", "MSE, training steps", "MSE, 10 steps", "learned"],
        rows,
        diverged_notes(failed),
    )
    return table, info


def _fmt(pair: tuple[float, float]) -> str:
    mean, ci = pair
    return f"{mean:.3f} ± {ci:.3f}" if math.isfinite(mean) else "diverged"
