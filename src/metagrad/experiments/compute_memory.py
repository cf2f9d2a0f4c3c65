r"""Compute and memory against the number of inner steps (Rajeswaran et al. 2019, iMAML, Fig. 2b).

Omniglot 20-way 5-shot (5 query images per class) with the Conv4 network; for inner steps
:math:`S \in \{1, 5, 10, 20, 40\}`, one meta-iteration (the meta-gradient of a meta-batch, in
``loop`` mode, and an Adam step) of MAML, FOMAML, Reptile, Leap, iMAML-GD and iMAML-HF, each with
its ``omniglot-20w5s-*`` preset and ``inner_steps = S`` (Leap: MAML's preset with Leap's
estimator; iMAML-HF: S Newton-CG steps, each 1 gradient, 5 Hessian-vector products and a line
search of up to 10 losses, then 5 CG steps for the meta-gradient).

What the theory says: MAML differentiates through the S steps, so it keeps S steps of activations
and its memory grows linearly in S; FOMAML, Reptile and Leap keep none; iMAML's meta-gradient needs
only the end point :math:`\phi` (a CG solve with :math:`I + H/\lambda`), so its memory is flat in S.
Checkpointed MAML (``checkpoint=True``, the same gradient as MAML) keeps only the parameters of
each step, recomputing its activations in the backward pass; MAML truncated to its last 5 steps
(``truncate=5``) keeps the activations of at most 5 steps.
Time grows linearly in S for every method.

Each point runs in a fresh process (``python -m metagrad.experiments.compute_memory SPECS``; with
``--quick``, the points share one process): a
warm-up iteration on one image per class (it loads the kernels), then the peak is reset and the
full iterations run. Memory on a CPU is the increase of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set before the first full
iteration; on a GPU, ``torch.cuda.max_memory_allocated`` over ``memory_allocated``. Seconds are the
median of the timed iterations after the first full one. On a CPU each point uses one thread.
Images are Omniglot's when ``--data`` or ``$METAGRAD_OMNIGLOT`` is given, else uniform noise (the
time and memory of these networks do not depend on the pixels).

Points are saved one JSON file each under ``OUT/cells/compute-memory``; no new point starts once
it would pass ``--budget-minutes`` (default 20) by its estimated time, and calling again with
the same ``--out`` completes the rest::

    metagrad experiment compute-memory --out runs/exp/cm [--budget-minutes 60] [--device cuda]
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metagrad._types import Batch, Task
from metagrad.algorithms import meta_gradient
from metagrad.experiments._cells import Deadline, load_json, machine, reject, save_figure, save_json
from metagrad.experiments._report import Options, Report, Table
from metagrad.tasks import map_tensors, to_device
from metagrad.training import Config, build_estimator, build_model, preset, task_source

DESCRIPTION = (
    "iMAML Fig. 2b: seconds and peak memory per meta-iteration against inner steps S, Omniglot "
    "20-way 5-shot Conv4, MAML / FOMAML / Reptile / Leap / iMAML-GD / iMAML-HF / checkpointed "
    "and truncated MAML"
)

ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "MAML": ("omniglot-20w5s-maml", {}),
    "FOMAML": ("omniglot-20w5s-fomaml", {}),
    # Full-batch gradient descent, as in the earlier tables: S steps over the whole support set
    # (the paper's Adam on mini-batches of 20 would not fit 5-way 1-shot's 5 images in --quick).
    "Reptile": (
        "omniglot-20w5s-reptile",
        {"inner": "gd", "inner_lr": 0.1, "inner_batch_size": None, "eval_inner_batch_size": None},
    ),
    "Leap": ("omniglot-20w5s-maml", {"algorithm": "leap"}),
    "iMAML-GD": ("omniglot-20w5s-imaml-gd", {}),
    "iMAML-HF": ("omniglot-20w5s-imaml-hf", {}),
    "MAML, checkpointed": ("omniglot-20w5s-maml", {}),
    "MAML, truncated to 5": ("omniglot-20w5s-maml", {}),
}
ESTIMATOR_OPTIONS: dict[str, dict[str, Any]] = {  # MAML's options that have no config field yet
    "MAML, checkpointed": {"checkpoint": True},  # the same gradient; each step recomputed
    "MAML, truncated to 5": {"truncate": 5},  # the last min(5, S) steps differentiated
}
FULL: dict[str, Any] = {
    "ways": 20,
    "shots": 5,
    "steps": (1, 5, 10, 20, 40),
    "meta_batch": 1,
    "repeats": 2,
}
QUICK: dict[str, Any] = {"ways": 5, "shots": 1, "steps": (1, 5), "meta_batch": 1, "repeats": 1}
BUDGET_MINUTES = 20.0


def point_config(name: str, steps: int, setting: dict[str, Any], device: str) -> Config:
    """The configuration of one point: the algorithm's preset with ``inner_steps = steps``."""
    preset_name, changes = ALGORITHMS[name]
    return preset(preset_name).override(
        **changes,
        ways=setting["ways"],
        shots=setting["shots"],
        queries=setting["shots"],
        eval_shots=None,
        inner_steps=steps,
        meta_batch=setting["meta_batch"],
        device=device,
    )


def _rss_mb(key: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One point, in this (fresh) process: seconds per meta-iteration and peak memory in MB."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    config = Config.from_dict(spec["config"])
    model = build_model(config).to(device)
    estimator = build_estimator(config, model)
    if spec.get("estimator"):
        estimator = dataclasses.replace(estimator, **spec["estimator"])  # type: ignore[type-var]
    theta = estimator.init_meta(model)
    optimizer = torch.optim.Adam(list(theta.values()), lr=1e-3)
    support, query = torch.load(spec["tasks"], weights_only=True)  # plain tuples (_tasks)
    tasks = to_device(Task(Batch(*support), Batch(*query)), device)
    shots = config.data.shots
    warm = map_tensors(tasks, lambda t: t[:, ::shots])  # one example per class

    def iteration(batch: Task) -> float:
        start = time.perf_counter()
        grads, _ = meta_gradient(estimator, theta, batch, mode=config.algo.mode)  # type: ignore[arg-type]
        for k, p in theta.items():
            p.grad = grads[k]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del grads
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    iteration(warm)
    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated"
    else:
        try:  # hand freed memory back to the OS, so the warm-up's pages do not hide the peak
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        base = _rss_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            method = "VmHWM after reset"
        except OSError:
            method = "VmHWM since start (reset refused)"
    times = [iteration(tasks) for _ in range(1 + spec["repeats"])]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")
    return {
        "seconds": statistics.median(times[1:]),
        "first_seconds": times[0],
        "times": times,
        "peak_mb": peak - base,
        "base_mb": base,
        "method": method,
    }


def _tasks(options: Options, setting: dict[str, Any], path: Path) -> str:
    """Sample the meta-batch once (Omniglot if a folder is known, else noise); save it."""
    g = torch.Generator().manual_seed(0)
    n, ways, shots = setting["meta_batch"], setting["ways"], setting["shots"]
    root = options.data or os.environ.get("METAGRAD_OMNIGLOT")
    if root:
        config = point_config("MAML", 1, setting, "cpu").override(root=str(root))
        task = task_source(config.data).sample("train", n, g)
        source = f"Omniglot from {root}"
    else:
        labels = torch.arange(ways).repeat_interleave(shots).expand(n, -1)
        batch = lambda: Batch(torch.rand(n, ways * shots, 1, 28, 28, generator=g), labels)  # noqa: E731
        task = Task(batch(), batch())
        source = "uniform noise images"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tuple(tuple(b) for b in task), path)
    return source


def run(options: Options) -> Report:
    """Measure every point not measured yet (each in a fresh process); tables and figure."""
    reject(options, "compute-memory", "seeds", "steps", "lake_runs", "cells")
    start = time.perf_counter()
    setting = QUICK if options.quick else FULL
    budget = options.budget_minutes or (None if options.quick else BUDGET_MINUTES)
    deadline = Deadline(budget)
    cells = Path(options.out) / "cells" / "compute-memory"
    images = _tasks(options, setting, cells / "tasks.pt")
    results: dict[str, dict[int, dict[str, Any]]] = {}
    pending, failed = [], []
    # By S, then algorithm; iMAML-HF last, as its Newton-CG steps make it the costliest by far.
    points = [(name, s) for s in setting["steps"] for name in ALGORITHMS if name != "iMAML-HF"]
    for name, s in points + [("iMAML-HF", s) for s in setting["steps"]]:
        config = point_config(name, s, setting, options.device)
        spec = {"config": config.to_dict(), "tasks": str(cells / "tasks.pt")}
        if name in ESTIMATOR_OPTIONS:  # truncate to at most the S steps there are
            extra = dict(ESTIMATOR_OPTIONS[name])
            spec["estimator"] = {**extra, **({"truncate": min(extra["truncate"], s)}
                                             if "truncate" in extra else {})}  # fmt: skip
        spec.update(device=options.device, repeats=setting["repeats"], images=images)
        spec = json.loads(json.dumps(spec))  # as saved (tuples become lists), to compare
        result = load_json(cells / f"{name}-S{s}.json")
        if result is not None and result["spec"] == spec:
            results.setdefault(name, {})[s] = result
        else:  # not measured yet, or with other settings
            pending.append((name, s, spec))
    # The full run measures each point in its own process; --quick all in one (faster start).
    for group in [pending] if options.quick else [[p] for p in pending]:
        group = [p for p in group if _fits(results.get(p[0], {}), p[1], setting, deadline)]
        try:
            measured = _in_fresh_process([p[2] for p in group])
        except RuntimeError as e:  # out of memory, say: the table marks the point missing
            failed.append(f"{', '.join(f'{n} S={s}' for n, s, _ in group)}: {e}")
            continue
        for (name, s, spec), result in zip(group, measured, strict=True):
            result = {"spec": spec, **result}
            save_json(cells / f"{name}-S{s}.json", result)
            results.setdefault(name, {})[s] = result
    report = _report(options, setting, results, images, time.perf_counter() - start, budget)
    for table in report.tables:
        table.notes += [f"failed: {f}" for f in failed]
    return report


def _fits(done: dict[int, dict[str, Any]], s: int, setting: dict, deadline: Deadline) -> bool:
    """Whether the point is expected to finish within the budget (linear in S from the last)."""
    if deadline.minutes is None:
        return True
    if deadline.expired:
        return False
    if not done:
        return True
    last = max(done)
    per_iteration = done[last]["seconds"] * s / last
    expected = per_iteration * (2.2 + setting["repeats"]) + 10  # warm-up, first, timed, start
    return deadline.elapsed() + expected < 60 * deadline.minutes


def _in_fresh_process(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`measure` each spec, in order, in one new Python process."""
    if not specs:
        return []
    command = [sys.executable, "-m", "metagrad.experiments.compute_memory", json.dumps(specs)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise RuntimeError(tail[0])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(
    options: Options, setting: dict, results: dict, images: str, wall: float, budget: float | None
) -> Report:
    steps = setting["steps"]
    where = f"{options.device}" + (", 1 thread" if options.device == "cpu" else "")
    notes = [
        f"{setting['ways']}-way {setting['shots']}-shot Conv4, {setting['shots']} query "
        f"image(s) per class, meta-batch {setting['meta_batch']}, {images}; {where}; "
        + (
            "all points in one process (--quick)"
            if options.quick
            else "each point in a fresh process"
        )
        + f", median of {setting['repeats']} timed iteration(s) after the first.",
    ]
    if any(s not in results.get(n, {}) for n in ALGORITHMS for s in steps):
        notes.append(
            f"— : not measured within the budget ({budget} minutes); run again with the same "
            "--out and a larger --budget-minutes to complete it."
        )
    memory = "peak memory increase" if options.device == "cpu" else "peak GPU memory allocated"
    tables = []
    for key, title, digits in (
        ("seconds", "Seconds per meta-iteration against inner steps S", 2),
        ("peak_mb", f"{memory.capitalize()} (MB) against inner steps S", None),
    ):
        table = Table(f"compute_memory_{key}", title, ["algorithm"] + [f"S={s}" for s in steps])
        table.notes = list(notes)
        for name in ALGORITHMS:
            row = [results.get(name, {}).get(s, {}).get(key) for s in steps]
            table.rows.append([name] + [None if v is None else round(v, digits) for v in row])
        tables.append(table)
    figure = _plot(results, memory, Path(options.out) / "compute_memory.png")
    info = {"machine": machine(options.device), "wall_seconds": round(wall, 1), "images": images}
    info["points"] = {n: {str(s): {k: v for k, v in r.items() if k != "spec"}
                          for s, r in pts.items()} for n, pts in results.items()}  # fmt: skip
    return Report("compute-memory", tables, [figure], info)


def _plot(results: dict, memory: str, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("seconds", "seconds per meta-iteration"),
                                      ("peak_mb", f"{memory} (MB)"))):  # fmt: skip
        ax = fig.add_subplot(1, 2, i + 1)
        for j, name in enumerate(ALGORITHMS):
            points = sorted(results.get(name, {}).items())
            if points:
                xs, ys = zip(*((s, r[key]) for s, r in points), strict=True)
                ax.plot(xs, ys, marker="o", ms=3, color=f"C{j}", label=name)
        ax.set(xlabel="inner steps S", ylabel=label)
        if results:
            ax.legend(fontsize="small")
    return save_figure(fig, path)


if __name__ == "__main__":
    print(json.dumps([measure(spec) for spec in json.loads(sys.argv[1])]))
