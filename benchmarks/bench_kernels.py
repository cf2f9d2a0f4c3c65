"""How much of a meta-gradient is spent in the convolution and matrix-product kernels.

Two tables. **Kernels alone:** each of Conv4's four 3x3 stride-2 convolutions (Omniglot sizes,
channels-last as Conv4 runs them) at the batch sizes of the benchmark's tasks, timed in a loop: the
forward pass, the input gradient and the weight gradient (``aten.convolution_backward`` with one
output each), in GFLOP/s, with an fp32 matrix product for scale. **Kernels in a meta-gradient:**
each estimator's meta-gradient on the configs of ``bench_meta.py``, one task after another on one
thread under ``torch.profiler``: the time inside the kernels (``mkldnn_convolution``,
``convolution_backward``, ``_convolution``, ``mm``, ``addmm``, ``bmm``) against the whole. On two
cores the kernel time alone, halved, is the least any implementation running these kernels at
this speed can take; ``bench_meta.py`` gives the time the other libraries take.

    python benchmarks/bench_kernels.py                    # both tables
    python benchmarks/bench_kernels.py --batches 75,300 --configs 20w5s-b16-s5 --impls maml
    python benchmarks/bench_kernels.py --quick            # a tiny smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_meta  # noqa: E402  (the configs and implementations of the speed benchmark)
from bench_data import median_seconds  # noqa: E402

LAYERS = [(1, 28), (64, 14), (64, 7), (64, 4)]  # (input channels, input size); 64 out, stride 2
HIDDEN = 64
KERNELS = {
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_convolution",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
}


def seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    return median_seconds(fn, reps)


def layer_rates(batch: int, c_in: int, size: int, reps: int) -> dict[str, float]:
    """GFLOP/s of one convolution's forward pass, input gradient and weight gradient."""
    cl = torch.channels_last
    x = torch.randn(batch, c_in, size, size).contiguous(memory_format=cl)
    w = torch.randn(HIDDEN, c_in, 3, 3).contiguous(memory_format=cl)
    out = (size + 1) // 2
    gy = torch.randn(batch, HIDDEN, out, out).contiguous(memory_format=cl)
    flop = 2 * batch * c_in * HIDDEN * 9 * out * out  # each of the three passes

    def backward(mask: list[bool]) -> Callable[[], object]:
        args = (gy, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, mask)
        return lambda: torch.ops.aten.convolution_backward(*args)

    passes = {
        "forward": lambda: F.conv2d(x, w, None, stride=2, padding=1),
        "input gradient": backward([True, False, False]),
        "weight gradient": backward([False, True, False]),
    }
    return {name: flop / seconds(fn, reps) / 1e9 for name, fn in passes.items()}


def kernel_share(config: str, impl: str) -> tuple[float, float, float]:
    """``(wall s, profiled op s, kernel s)`` of one meta-gradient of ``impl`` on one thread."""
    cfg = bench_meta.CONFIGS[config]
    tasks, init = bench_meta.make_tasks(cfg, torch.float32), bench_meta.initial(cfg, torch.float32)
    serial = f"{impl}-serial" if impl in bench_meta.ESTIMATORS else impl
    run = bench_meta.make(serial, cfg, tasks, init)[0]
    run()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    kernels = sum(e.self_cpu_time_total for e in events if e.key in KERNELS) / 1e6
    return wall, total, kernels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="5,75,100,300", help="images per convolution call")
    p.add_argument("--reps", type=int, default=15)
    default_configs = ",".join(c for c in bench_meta.CONFIGS if c != "quick")
    p.add_argument("--configs", default=default_configs, help="for the second table")
    p.add_argument("--impls", default="maml,fomaml,torchopt", help="for the second table")
    p.add_argument("--quick", action="store_true", help="small batches, 2 repetitions")
    a = p.parse_args(argv)
    if a.threads < 1:
        print(f"bench_conv: --threads {a.threads}: give at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    try:
        batches = [int(b) for b in a.batches.split(",")] if not a.quick else [2]
    except ValueError:
        print(f"bench_conv: --batches {a.batches!r}: give integers, e.g. 5,75", file=sys.stderr)
        return 2
    reps = 2 if a.quick else a.reps
    configs = ["quick"] if a.quick else a.configs.split(",")
    impls = bench_meta.available(a.impls.split(","))
    unknown = [c for c in configs if c not in bench_meta.CONFIGS] + [
        i for i in impls if i not in bench_meta.IMPLS
    ]
    if unknown:
        print(
            f"bench_kernels: unknown {unknown}: configs {list(bench_meta.CONFIGS)}, "
            f"implementations {bench_meta.IMPLS}",
            file=sys.stderr,
        )
        return 2
    print(f"torch {torch.__version__}, {a.threads} thread(s), medians of {reps}")
    print(f"fp32 matrix product 1024x1024: {bench_meta.matmul_rate(1024, reps):.1f} GFLOP/s\n")
    print("| batch | layer (in -> out) | forward | input gradient | weight gradient |")
    print("| --- | --- | --- | --- | --- |")
    for batch in batches:
        for c_in, size in LAYERS:
            rates = layer_rates(batch, c_in, size, reps)
            shape = f"{c_in}x{size}x{size} -> {HIDDEN}x{(size + 1) // 2}x{(size + 1) // 2}"
            cells = " | ".join(f"{r:.1f}" for r in rates.values())
            print(f"| {batch} | {shape} | {cells} |", flush=True)
    print("\n| config | implementation | wall s, one thread | profiled op s | kernel s | share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config in configs:
        for impl in impls:
            wall, total, kernels = kernel_share(config, impl)
            cells = f"{wall:.2f} | {total:.2f} | {kernels:.2f} | {kernels / total:.0%}"
            print(f"| {config} | {impl} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
