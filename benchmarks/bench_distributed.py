"""Distributed benchmark: step time and memory of one process against 2 gloo ranks under torchrun.

Run::

    METAGRAD_OMNIGLOT=../shared/data/omniglot python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --presets sinusoid-maml --steps 300 --log-every 50

Each row is a real ``metagrad train`` run: one process with 1 and with 2 threads, then
``torchrun --standalone --nproc-per-node 2`` (1 thread per rank, torchrun's default). The step
time is the median over the logged windows after the first (``steps_per_s`` in
``metrics.jsonl``, written by rank 0; it includes the all-reduce), the memory each process's peak
resident set (``ru_maxrss``, torch itself included), and the all-reduce the floats each rank sends
per step: the parameters, the metrics and the task count. Prints one Markdown table.

``--worker DIR -- ARGS`` is how the rows are run: ``metagrad ARGS`` in this process, then its
rank and peak memory written to ``DIR/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import metagrad as mg
from metagrad.training import build_estimator, build_model, data_root, task_source

SCRIPT = Path(__file__).resolve()


def worker(out: Path, argv: list[str]) -> int:
    """Run ``metagrad ARGV``; record this process's rank and peak resident memory (MiB)."""
    from metagrad.cli import main

    status = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_mib": peak}))
    return status


def all_reduce_floats(preset: str) -> int:
    """Floats in one step's all-reduce: parameters, metrics (losses, accuracy) and the count."""
    config = data_root(mg.preset(preset))
    model = build_model(config)
    tasks = task_source(config.data).sample("train", 1, torch.Generator().manual_seed(0))
    grads, metrics = mg.meta_gradient(build_estimator(config, model), mg.params_of(model), tasks)
    return sum(v.numel() for v in (*grads.values(), *metrics.values())) + 1


def run(preset: str, ranks: int, threads: int, steps: int, log_every: int) -> dict:
    """One ``metagrad train`` run; its median step time and the peak memory of each rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        args = ["train", "--preset", preset, "--out", str(out / "run"), "--steps", str(steps)]
        args += ["--log-every", str(log_every), "--eval-tasks", "10", "--threads", str(threads)]
        args += ["--no-tensorboard", "--no-progress", "--checkpoint-every", str(steps)]
        command = [sys.executable, str(SCRIPT), "--worker", str(out), "--", *args]
        if ranks > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command = [*launcher, "--nproc-per-node", str(ranks), *command[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        logs = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [m["steps_per_s"] for m in logs if "steps_per_s" in m][1:]  # first: warm-up
        peaks = [json.loads((out / f"rank{r}.json").read_text())["peak_mib"] for r in range(ranks)]
    return {"step_s": statistics.median(1 / r for r in rates), "peaks": peaks}


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        raise SystemExit(worker(Path(sys.argv[i + 1]), sys.argv[i + 3 :]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["omniglot-5w1s-maml"])
    parser.add_argument("--steps", type=int, default=8, help="outer steps per run")
    parser.add_argument("--log-every", type=int, default=2, help="steps per timed window")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, ", end="")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start\n")
    print("| preset | processes x threads | step time (s) | peak memory per process (MiB) "
          "| all-reduce per step (floats) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets:
        floats = all_reduce_floats(preset)
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            r = run(preset, ranks, threads, args.steps, args.log_every)
            peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
            comm = f"{floats:,}" if ranks > 1 else "none"
            print(f"| {preset} | {ranks} x {threads} | {r['step_s']:.3f} | {peaks} | {comm} |")
            sys.stdout.flush()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
