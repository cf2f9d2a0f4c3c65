"""Data benchmark: Omniglot's first load (decode) against a cached load, and episode sampling speed.

Run::

    METAGRAD_OMNIGLOT=../shared/data/omniglot python benchmarks/bench_data.py
    python benchmarks/bench_data.py --root /path/to/omniglot --repeats 3 --threads 1
    python benchmarks/bench_data.py --quick      # synthetic sampling only, one short round

Prints one table, each row with the speed the project claims for it and whether this run met it.
Each first load decodes into a fresh temporary cache folder; each cached load reads that cache
back (claim: at least 10x faster than the first load). Sampling draws meta-batches of ``--batch``
tasks with one ``torch.Generator``, on one thread: from a synthetic Omniglot-sized class set (1623
random characters of 20 28x28 drawings, four rotations each; no data needed; claim: at least
10,000 5-way 1-shot tasks a minute) and, given the data, from the ``maml`` train split (1100
characters, 4 rotations each). Tasks/minute is the batch size over the median time of one
``sample`` call. All numbers are medians over ``--repeats`` runs (``--calls`` sample calls each
for sampling). Without ``--root`` (or ``$METAGRAD_OMNIGLOT``) only the synthetic rows run.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Benchmark this checkout, whichever copy of metagrad is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from metagrad.data import ClassSet, FewShotSampler, Omniglot  # noqa: E402

CACHED_SPEED_UP = 10.0  # claimed: a cached load at least this many times faster than the first
TASKS_PER_MINUTE = 10_000  # claimed: synthetic 5-way 1-shot, 15 queries, one thread


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_times(root: str, repeats: int) -> tuple[float, float]:
    """Median first load (decode and write the cache) and median cached load, in seconds."""
    first, cached = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            load = functools.partial(Omniglot, root, cache_dir=cache)
            first.append(median_seconds(load, 1))
            cached.append(median_seconds(load, 3))
    return statistics.median(first), statistics.median(cached)


def tasks_per_minute(sampler: FewShotSampler, batch: int, calls: int, repeats: int) -> float:
    """Tasks a minute: ``batch`` over the median time of one ``sample(batch)`` call."""
    g = torch.Generator().manual_seed(0)
    sampler.sample(batch, g)  # warm up
    per_call = [median_seconds(lambda: sampler.sample(batch, g), calls) for _ in range(repeats)]
    return batch / statistics.median(per_call) * 60


def synthetic_classes(seed: int = 0) -> ClassSet:
    """1623 random characters of 20 28x28 drawings: Omniglot's size, without the data."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1623, 20, 28, 28), generator=g, dtype=torch.uint8)
    names = tuple(f"A/character{c}/rot000" for c in range(1623))
    return ClassSet(images, torch.arange(1623), torch.zeros(1623, dtype=torch.int64), names)


def verdict(value: float, target: float) -> str:
    return "yes" if value >= target else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.environ.get("METAGRAD_OMNIGLOT"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="synthetic sampling only, 1 repeat of 2 calls"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        print(f"bench_data: --threads {args.threads}: give at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.quick:
        args.root, args.repeats, args.calls = None, 1, 2

    # (measure, value, claim, met)
    rows: list[tuple[str, str, str, str]] = []
    sampler = FewShotSampler(synthetic_classes(), 5, 1, 15, rotations=True)
    rate = tasks_per_minute(sampler, args.batch, args.calls, args.repeats)
    rows.append(
        (
            "synthetic 5-way 1-shot, 15 queries",
            f"{rate:,.0f} tasks/min",
            f">= {TASKS_PER_MINUTE:,} tasks/min",
            verdict(rate, TASKS_PER_MINUTE),
        )
    )
    if args.root:
        first, cached = load_times(args.root, args.repeats)
        with tempfile.TemporaryDirectory() as cache:
            ds = Omniglot(args.root, cache_dir=cache)
        train = ds.split("maml", seed=0)["train"]
        rows += [
            ("first load (decode + cache)", f"{first:.2f} s", "-", "-"),
            ("cached load", f"{cached * 1000:.0f} ms", "-", "-"),
            (
                "first / cached",
                f"{first / cached:.0f}x",
                f">= {CACHED_SPEED_UP:.0f}x",
                verdict(first / cached, CACHED_SPEED_UP),
            ),
        ]
        for ways, shots, queries in [(5, 1, 15), (20, 5, 15)]:
            sampler = FewShotSampler(train, ways, shots, queries)
            rate = tasks_per_minute(sampler, args.batch, args.calls, args.repeats)
            name = f"Omniglot {ways}-way {shots}-shot, {queries} queries"
            rows.append((name, f"{rate:,.0f} tasks/min", "-", "-"))

    print(
        f"# metagrad data benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, medians of {args.repeats}, batch {args.batch}"
    )
    header = ("measure", "value", "claim", "met")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
