"""Meta-gradient speed, memory and agreement: metagrad's estimators against other MAML libraries.

The workload of issue 6: one meta-iteration (the mean meta-gradient of B tasks, then an Adam step)
on Omniglot-shaped random tasks (N-way K-shot, 15 queries per class, 1x28x28), the standard Conv4,
inner SGD at lr 0.4. Every metagrad estimator runs through ``mg.meta_gradient`` with its defaults;
second-order MAML also runs in ``higher`` and ``torchopt`` (when installed: the ``bench`` extra) and
as a plain ``functional_call`` + ``torch.autograd.grad(create_graph=True)`` loop, these on the
usual PyTorch Conv4 (``nn.Conv2d``, ``nn.BatchNorm2d(track_running_stats=False)``), and the plain
loop also on ``mg.models.Conv4``. ``user-maml`` is second-order MAML as a user writes it outside
the package (:class:`UserMAML` below: a frozen dataclass on ``mg.EstimatorBase``, its steps
written by hand with ``mg.autodiff.grad_and_value``), run by ``mg.meta_gradient`` like the
built-in ``maml``: the same execution path, so its time should match. Repetitions are interleaved
(every implementation once per round); the tables give medians, each one's speed-up over the
fastest other library, and ``user-maml``'s time over ``maml``'s.

The ``mini-*`` configs are the mini-ImageNet shapes (3x84x84, 15 queries per class, inner lr
0.01, MAML's meta-batch of 4 tasks for 1-shot and 2 for 5-shot, 5 inner steps): the 32-channel
max-pool Conv4 (``conv4-mini``; the other libraries and the plain loop run the same network
written with ``nn.Conv2d`` and ``nn.BatchNorm2d``) and the ResNet-12 (``resnet12``, 64-160-320-640
channels; every implementation runs metagrad's, as it has no usual plain-PyTorch form). They run
when named; ``--memory`` gives their peak memory (on ``--device cuda``, the allocator's peak).

    python benchmarks/bench_meta.py                  # the four Omniglot configs, 5 rounds, check
    python benchmarks/bench_meta.py --configs mini-5w1s-b4-s5,mini-resnet12-5w1s-b4-s5 --memory
    python benchmarks/bench_meta.py --quick          # a tiny smoke run
    python benchmarks/bench_meta.py --configs 20w5s-b16-s5 --impls maml,plain --reps 3
    python benchmarks/bench_meta.py --configs 5w1s-b32-s5 --impls maml,maml-serial --no-check

An estimator name with ``-serial`` appended runs with ``workers=1`` (its tasks one after another
on torch's intra-op threads) instead of metagrad's default (tasks spread over worker threads);
with ``-vmap`` appended, with ``mode="vmap"`` (all tasks of the meta-batch batched into one call
of each kernel: for a convolution with per-task weights, one grouped convolution).

``--configs trained`` runs the shapes the MAML protocol trains on (the ``omniglot-*-maml``
presets: K query images per class, inner lr 0.4 at 5-way and 0.1 at 20-way), from 10 images a
task at 5-way 1-shot, where per-task overhead dominates, to 200 at 20-way 5-shot. ``--curve``
takes a training run's metrics log (``metrics.jsonl``) and ``--target`` a validation accuracy: the
first validated step at or above it, times each implementation's median seconds per
meta-iteration, gives its time to that accuracy (every implementation computes the same
meta-gradient, which ``--check`` verifies, so each takes the same outer steps; data loading and
validation are not counted).

    python benchmarks/bench_meta.py --configs 5w1s-b32-s1-q1 \
        --impls maml,maml-vmap,maml-serial,plain,higher,torchopt --reps 20 \
        --curve docs/results/omniglot-table/cells/omniglot-table/5w1s/MAML-seed0/metrics.jsonl

``--check`` (on by default) recomputes the MAML meta-gradient of every implementation in float64
on the same weights and 2 tasks of each config and requires a relative difference below 1e-6
from the plain loop. ``--memory`` runs each point once in a fresh process and reports the peak
resident-memory increase over the process's state before the meta-iteration.

Every table also gives each implementation's work (GFLOP of matrix products and convolutions per
meta-iteration, counted by ``torch.utils.flop_counter`` on 2 tasks and scaled) and the rate it
reaches, with the rate MAML would need to run 2x faster than the fastest other library and the
rate the first-order estimators reach on the same kernels and shapes: a yardstick for how far
the kernels, rather than the code around them, set the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

# Benchmark this checkout, whichever copy of metagrad is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import metagrad as mg  # noqa: E402


@dataclass(frozen=True)
class Config:
    """N-way K-shot, B tasks, S inner steps of size ``lr``; images ``channels`` x ``size`` x
    ``size`` and the network ``arch`` of ``mg.models.MODELS`` (for ``resnet12``, ``widths``
    narrows its 64-160-320-640 channels: the quick config only)."""

    ways: int
    shots: int
    tasks: int
    steps: int
    queries: int = 15
    arch: str = "conv4"
    channels: int = 1
    size: int = 28
    lr: float = 0.4
    widths: tuple[int, ...] | None = None


MINI = dict(channels=3, size=84, lr=0.01)  # MAML's mini-ImageNet: 84x84x3, inner lr 0.01
CONFIGS = {
    "5w1s-b32-s1": Config(5, 1, 32, 1),
    "5w1s-b32-s5": Config(5, 1, 32, 5),
    "20w1s-b16-s5": Config(20, 1, 16, 5),
    "20w5s-b16-s5": Config(20, 5, 16, 5),
    # mini-ImageNet shapes: MAML's settings (meta-batch 4 for 1-shot, 2 for 5-shot, 5 steps)
    "mini-5w1s-b4-s5": Config(5, 1, 4, 5, arch="conv4-mini", **MINI),
    "mini-5w5s-b2-s5": Config(5, 5, 2, 5, arch="conv4-mini", **MINI),
    "mini-resnet12-5w1s-b4-s5": Config(5, 1, 4, 5, arch="resnet12", **MINI),
    "mini-resnet12-5w5s-b2-s5": Config(5, 5, 2, 5, arch="resnet12", **MINI),
    # what the MAML protocol trains on: K query images per class (10 to 200 images a task)
    "5w1s-b32-s1-q1": Config(5, 1, 32, 1, queries=1),
    "5w5s-b32-s1-q5": Config(5, 5, 32, 1, queries=5),
    "20w1s-b16-s5-q1": Config(20, 1, 16, 5, queries=1, lr=0.1),
    "20w5s-b16-s5-q5": Config(20, 5, 16, 5, queries=5, lr=0.1),
    "quick": Config(3, 1, 2, 1, queries=2),
    "quick-mini": Config(2, 1, 2, 1, queries=1, arch="conv4-mini", **MINI),
    "quick-resnet12": Config(2, 1, 2, 1, 1, arch="resnet12", **MINI, widths=(4, 8, 8, 16)),
}
OMNIGLOT_CONFIGS = ["5w1s-b32-s1", "5w1s-b32-s5", "20w1s-b16-s5", "20w5s-b16-s5"]
"""What runs by default: issue 6's workload."""
TRAINED_CONFIGS = ["5w1s-b32-s1-q1", "5w5s-b32-s1-q5", "20w1s-b16-s5-q1", "20w5s-b16-s5-q5"]
"""The shapes of the ``omniglot-*-maml`` presets (``--configs trained``)."""
VARIANTS = ("-serial", "-vmap")
"""Suffixes of an estimator's name: ``workers=1``, or ``mode="vmap"`` (the tasks batched)."""
ESTIMATORS = ["maml", "fomaml", "anil", "reptile", "leap", "imaml-gd", "imaml-hf", "user-maml"]
LIBRARIES = ["plain", "higher", "torchopt"]
IMPLS = ESTIMATORS + LIBRARIES + ["plain-mg-conv4"]
SECOND_ORDER = [
    "maml",
    "maml-serial",
    "maml-vmap",
    "user-maml",
    "user-maml-serial",
    *LIBRARIES,
    "plain-mg-conv4",
]
Run = Callable[[], list[Tensor]]
DEVICE = torch.device("cpu")  # --device


def split_variant(name: str) -> tuple[str, str]:
    """``("maml", "-vmap")`` for ``"maml-vmap"``; ``(name, "")`` without a variant."""
    for v in VARIANTS:
        if name.endswith(v):
            return name.removesuffix(v), v
    return name, ""


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def make_tasks(cfg: Config, dtype: torch.dtype, seed: int = 0) -> mg.Task:
    """Random tasks of the config's image shape: support and query images for each class."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.channels, cfg.size, cfg.size)

    def batch(per_class: int) -> mg.Batch:
        x = torch.randn(cfg.tasks, cfg.ways * per_class, *shape, generator=g, dtype=dtype)
        y = torch.arange(cfg.ways).repeat_interleave(per_class).expand(cfg.tasks, -1)
        return mg.Batch(x.to(DEVICE), y.contiguous().to(DEVICE))

    return mg.Task(batch(cfg.shots), batch(cfg.queries))


def standard_conv4(ways: int, hidden: int = 64) -> nn.Sequential:
    """The Conv4 a user of the other libraries writes: native batch norm, default layout."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1)]
        layers += [nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * 4, ways))


def standard_conv4_mini(ways: int, channels: int = 3, size: int = 84) -> nn.Sequential:
    """The mini-ImageNet Conv4 as a user of the other libraries writes it: 32 channels, stride 1,
    native batch norm, 2x2 max-pool."""
    layers: list[nn.Module] = []
    for c_in in (channels, 32, 32, 32):
        layers += [nn.Conv2d(c_in, 32, 3, padding=1)]
        layers += [nn.BatchNorm2d(32, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * (size // 16) ** 2, ways))


def mg_model(cfg: Config) -> nn.Module:
    """metagrad's network of the config (``mg.models.MODELS``)."""
    if cfg.arch == "resnet12" and cfg.widths is not None:
        c1, c2, c3, c4 = cfg.widths
        return mg.models.ResNet12(cfg.ways, cfg.channels, cfg.size, channels=(c1, c2, c3, c4))
    return mg.models.MODELS.build(
        cfg.arch, in_channels=cfg.channels, n_way=cfg.ways, image_size=cfg.size
    )


def standard_model(cfg: Config) -> nn.Module:
    """The network the other libraries and the plain loop run: the usual PyTorch Conv4s; for
    ResNet-12, which has no such usual form, metagrad's own (a plain ``nn.Module``)."""
    if cfg.arch == "conv4":
        return standard_conv4(cfg.ways)
    if cfg.arch == "conv4-mini":
        return standard_conv4_mini(cfg.ways, cfg.channels, cfg.size)
    return mg_model(cfg)


def load(model: nn.Module, init: list[Tensor]) -> nn.Module:
    """``model`` with ``init`` copied into its parameters, in order (the Conv4s agree on it)."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), init, strict=True):
            p.copy_(v)
    return model


@dataclass(frozen=True, eq=False)
class UserMAML(mg.EstimatorBase):
    """Second-order MAML written outside the package: ``phi = theta - lr grad L_s(theta)``,
    ``steps`` times, and the gradient of ``L_q(phi(theta))`` through the steps."""

    loss: mg.LossFn
    inner: mg.GradientDescent

    def meta_grad(self, theta: mg.Params, task: mg.Task) -> tuple[mg.Params, mg.Metrics]:
        def support_loss(p: mg.Params) -> Tensor:
            return self.loss(p, task.support)

        def query_loss(th: mg.Params) -> tuple[Tensor, Tensor]:
            phi, losses = th, []
            for _ in range(self.inner.steps):
                g, value = mg.autodiff.grad_and_value(support_loss)(phi)
                phi = {k: phi[k] - self.inner.lr * g[k] for k in phi}
                losses.append(value)
            return self.loss(phi, task.query), torch.stack(losses)

        grad, (value, losses) = mg.autodiff.grad_and_value(query_loss, has_aux=True)(theta)
        return grad, {"query_loss": value.detach(), "inner_losses": losses.detach()}


def estimator(name: str, loss: mg.Loss, steps: int, lr: float) -> mg.Estimator:
    gd = mg.GradientDescent(lr=lr, steps=steps)
    return {
        "maml": lambda: mg.MAML(loss, gd),
        "fomaml": lambda: mg.MAML(loss, gd, first_order=True),
        "anil": lambda: mg.ANIL(loss, gd, head=("head.",)),
        "reptile": lambda: mg.Reptile(loss, gd),
        "leap": lambda: mg.Leap(loss, gd),
        "imaml-gd": lambda: mg.IMAML(loss, gd, lam=2.0, cg_steps=5),
        "imaml-hf": lambda: mg.IMAML(loss, mg.NewtonCG(steps=steps, cg_steps=5), lam=2.0),
        "user-maml": lambda: UserMAML(loss, gd),
    }[name]()


def make(name: str, cfg: Config, tasks: mg.Task, init: list[Tensor]) -> tuple[Run, list[Tensor]]:
    """``(run, params)``: ``run()`` returns the mean meta-gradient, in ``params``' order."""
    n, steps, lr = cfg.tasks, cfg.steps, cfg.lr
    (xs, ys), (xq, yq) = tasks
    base, variant = split_variant(name)
    if base in ESTIMATORS:
        model = load(mg_model(cfg).to(init[0]), init)
        theta = mg.params_of(model)
        est = estimator(base, mg.loss_fn(model, "cross_entropy"), steps, lr)
        workers = 1 if variant == "-serial" else None
        mode = "vmap" if variant == "-vmap" else "loop"
        return (
            lambda: list(
                mg.meta_gradient(est, theta, tasks, mode=mode, workers=workers)[0].values()
            ),
            list(theta.values()),
        )
    if name in ("plain", "plain-mg-conv4"):
        model = load((standard_model if name == "plain" else mg_model)(cfg).to(init[0]), init)
        theta = dict(model.named_parameters())

        def plain() -> list[Tensor]:
            total = [torch.zeros_like(v) for v in theta.values()]
            for i in range(n):
                phi = theta
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, phi, (xs[i],)), ys[i])
                    g = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
                    phi = {k: v - lr * gk for (k, v), gk in zip(phi.items(), g, strict=True)}
                loss = F.cross_entropy(functional_call(model, phi, (xq[i],)), yq[i])
                for t, gt in zip(
                    total, torch.autograd.grad(loss, list(theta.values())), strict=True
                ):
                    t.add_(gt, alpha=1.0 / n)
            return total

        return plain, list(theta.values())
    model = load(standard_model(cfg).to(init[0]), init)
    params: list[Tensor] = list(model.parameters())
    if name == "higher":
        import higher

        inner_opt = torch.optim.SGD(params, lr=lr)

        def run_higher() -> list[Tensor]:
            for i in range(n):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                    fm,
                    opt,
                ):
                    for _ in range(steps):
                        opt.step(F.cross_entropy(fm(xs[i]), ys[i]))
                    (F.cross_entropy(fm(xq[i]), yq[i]) / n).backward()
            return take_grads(params)

        return run_higher, params
    if name == "torchopt":
        import torchopt

        meta_opt = torchopt.MetaSGD(model, lr=lr)
        state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(meta_opt)

        def run_torchopt() -> list[Tensor]:
            for i in range(n):
                for _ in range(steps):
                    meta_opt.step(F.cross_entropy(model(xs[i]), ys[i]))
                (F.cross_entropy(model(xq[i]), yq[i]) / n).backward()
                torchopt.recover_state_dict(model, state)
                torchopt.recover_state_dict(meta_opt, opt_state)
            return take_grads(params)

        return run_torchopt, params
    raise ValueError(f"unknown implementation {name!r}: choose from {IMPLS}")


def take_grads(params: list[Tensor]) -> list[Tensor]:
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def initial(cfg: Config, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    torch.manual_seed(seed)
    return [p.detach().to(DEVICE, dtype) for p in mg_model(cfg).parameters()]


def available(impls: list[str]) -> list[str]:
    return [i for i in impls if i not in ("higher", "torchopt") or installed(i)]


def check(cfg: Config, impls: list[str]) -> dict[str, float]:
    """Relative difference of each second-order implementation from the plain loop, float64."""
    small = dataclasses.replace(cfg, tasks=2)
    tasks, init = make_tasks(small, torch.float64, seed=1), initial(small, torch.float64, seed=1)
    ref = make("plain", small, tasks, init)[0]()
    out = {}
    for name in [i for i in impls if i in SECOND_ORDER]:
        g = make(name, small, tasks, init)[0]()
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(g, ref, strict=True))
        out[name] = (num / sum(float((b**2).sum()) for b in ref)) ** 0.5
    return out


def flops(cfg: Config, name: str) -> float:
    """Floating-point operations of one meta-gradient (matrix products and convolutions).

    Counted by ``FlopCounterMode`` on 2 tasks and scaled to ``cfg.tasks`` (every task has the same
    shapes, so the count is linear in them); metagrad's estimators run with ``workers=1`` here,
    because the counter sees the calling thread only.
    """
    small = dataclasses.replace(cfg, tasks=min(2, cfg.tasks))
    serial = f"{name}-serial" if name in ESTIMATORS else name
    run = make(serial, small, make_tasks(small, torch.float32), initial(small, torch.float32))[0]
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() * cfg.tasks / small.tasks


def meta_iteration(run: Run, params: list[Tensor], opt: torch.optim.Optimizer) -> None:
    for p, g in zip(params, run(), strict=True):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # the clock stops when the device has finished


def time_config(cfg: Config, impls: list[str], reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per meta-iteration (wall and process CPU), every implementation once per round."""
    tasks, init = make_tasks(cfg, torch.float32), initial(cfg, torch.float32)
    runs = {}
    for name in impls:
        run, params = make(name, cfg, tasks, init)
        runs[name] = (run, params, torch.optim.Adam(params, lr=1e-3))
        meta_iteration(*runs[name])  # warm-up
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in impls}
    for r in range(reps):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotate who goes first
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            meta_iteration(*runs[name])
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_point(cfg: Config, name: str) -> float:
    """Peak resident memory increase (MB) of one meta-iteration, in this (fresh) process."""
    tasks, init = make_tasks(cfg, torch.float32), initial(cfg, torch.float32)
    run, params = make(name, cfg, tasks, init)
    opt = torch.optim.Adam(params, lr=1e-3)
    if DEVICE.type == "cuda":  # the device's allocator: the peak of allocated memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        meta_iteration(run, params, opt)
        return torch.cuda.max_memory_allocated() / 2**20 - before
    try:  # reset the peak (VmHWM) to the current resident size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_mb("VmRSS")
        meta_iteration(run, params, opt)
        return _status_mb("VmHWM") - before
    except OSError:  # no /proc: the peak since the start (ru_maxrss is in KB on Linux)
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        meta_iteration(run, params, opt)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def memory_in_subprocess(cfg: Config, name: str, threads: int | None) -> float:
    spec = json.dumps(cfg.__dict__)
    cmd = [sys.executable, __file__, "--worker", name, "--worker-config", spec]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--device", str(DEVICE)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    """CPU model, cores, torch version and threads, and the load average (the CPU is shared)."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if DEVICE.type == "cuda":
        cpu = f"{torch.cuda.get_device_name(DEVICE)} (host: {cpu})"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def matmul_rate(size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an fp32 ``size`` x ``size`` matrix product here (median of ``reps``): the
    arithmetic this machine's threads reach on the most favourable kernel, for scale."""
    a = torch.randn(size, size, device=DEVICE)
    a @ a
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / median(times) / 1e9


def steps_to(curve: str, target: float) -> int | None:
    """The first validated outer step of a metrics log whose ``val_accuracy`` reaches ``target``
    (``None`` if none does)."""
    with open(curve) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("val_accuracy", -1.0) >= target:
                return int(rec["step"])
    return None


def time_to(times: dict, steps: int | None, target: float) -> str:
    """Steps a second and time to ``target`` validation accuracy of every implementation."""
    lines = [
        f"\nTime to {target:.0%} validation accuracy: {steps} outer steps (the run's first "
        "validation at or above it) times the median seconds per meta-iteration\n",
        "| implementation | outer steps a second | time to target (min) |",
        "| --- | --- | --- |",
    ]
    for k, t in times.items():
        w = median(t["wall"])
        to = f"{steps * w / 60:.1f}" if steps is not None else "not reached"
        lines.append(f"| {k} | {1 / w:.2f} | {to} |")
    return "\n".join(lines)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def report(name: str, cfg: Config, times: dict, errors: dict, memory: dict, work: dict) -> str:
    libs = [k for k in LIBRARIES if k in times]
    best = min((median(times[k]["wall"]) for k in libs), default=None)
    lines = [
        f"\n### {name}: {cfg.ways}-way {cfg.shots}-shot, B={cfg.tasks}, S={cfg.steps}, "
        f"{cfg.arch}{f' {cfg.widths}' if cfg.widths else ''} on "
        f"{cfg.channels}x{cfg.size}x{cfg.size}, inner lr {cfg.lr}\n",
        "| implementation | wall s (median) | CPU s (median) | speed-up vs fastest library |"
        " float64 rel. diff vs plain | peak memory MB | GFLOP | GFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, t in times.items():
        w, c = median(t["wall"]), median(t["cpu"])
        ratio = f"{best / w:.2f}x" if best else "-"
        err = f"{errors[k]:.1e}" if k in errors else "-"
        mem = f"{memory[k]:.0f}" if k in memory else "-"
        gflop, rate = ("-", "-")
        if k in work:
            gflop, rate = f"{work[k] / 1e9:.2f}", f"{work[k] / 1e9 / w:.1f}"
        lines.append(f"| {k} | {w:.3f} | {c:.3f} | {ratio} | {err} | {mem} | {gflop} | {rate} |")
    for user, builtin in (("user-maml", "maml"), ("user-maml-serial", "maml-serial")):
        if user in times and builtin in times:
            over = median(times[user]["wall"]) / median(times[builtin]["wall"])
            lines.append(f"\n{user} / {builtin} (wall, median): {over:.2f}")
    if best and "maml" in work:
        need = work["maml"] / 1e9 / (best / 2)
        lines.append(f"\nMAML at 2x the fastest library: {need:.1f} GFLOP/s.")
        first = [k for k in ("fomaml", "reptile") if k in work and k in times]
        lines += [
            f"{k} (first order: the same kernels and shapes, no double backward) reaches "
            f"{work[k] / 1e9 / median(times[k]['wall']):.1f} GFLOP/s."
            for k in first
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(OMNIGLOT_CONFIGS), help=f"of {list(CONFIGS)}")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="tiny config, 1 round: a smoke run")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--json", default=None, help="also write the raw timings here")
    p.add_argument("--curve", default=None, help="a run's metrics.jsonl: time to --target")
    p.add_argument("--target", type=float, default=0.97, help="validation accuracy (0.97)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench_meta: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if a.worker:
        print(memory_point(Config(**json.loads(a.worker_config)), a.worker))
        return 0
    configs = ["quick"] if a.quick else a.configs.split(",")
    if configs == ["trained"]:
        configs = TRAINED_CONFIGS
    reps = 1 if a.quick else a.reps
    impls = available(a.impls.split(","))
    unknown = [c for c in configs if c not in CONFIGS] + [
        i for i in impls if split_variant(i)[0] not in IMPLS
    ]
    if unknown:
        print(
            f"bench_meta: unknown {unknown}: configs {list(CONFIGS)}, implementations "
            f"{IMPLS} (an estimator's name with -serial or -vmap appended, too)",
            file=sys.stderr,
        )
        return 2
    if a.curve and not Path(a.curve).is_file():
        print(f"bench_meta: --curve {a.curve}: no such file", file=sys.stderr)
        return 2
    to_target = steps_to(a.curve, a.target) if a.curve else None
    rate = f"fp32 2048x2048 matrix product: {matmul_rate():.0f} GFLOP/s"
    print(machine(), f"impls: {impls}", rate, sep="\n")
    results, failed = {}, []
    for name in configs:
        cfg = CONFIGS[name]
        errors = check(cfg, impls) if a.check else {}
        failed += [f"{name}/{k}: {e:.1e}" for k, e in errors.items() if not e < 1e-6]
        times = time_config(cfg, impls, reps)
        memory = {k: memory_in_subprocess(cfg, k, a.threads) for k in impls} if a.memory else {}
        work = {k: flops(cfg, split_variant(k)[0]) for k in impls}
        print(report(name, cfg, times, errors, memory, work), flush=True)
        if a.curve:
            print(time_to(times, to_target, a.target), flush=True)
        print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        results[name] = {"times": times, "errors": errors, "memory": memory, "flops": work}
        if a.curve:
            results[name]["steps_to_target"] = {"target": a.target, "steps": to_target}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": torch.get_num_threads(), **results}, f
            )
    if failed:
        print("meta-gradients disagree (relative difference >= 1e-6):", *failed, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
