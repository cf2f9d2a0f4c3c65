"""Data benchmark: Omniglot's first load (decode) against a cached load, and episode sampling speed.

Run::

    METAGRAD_OMNIGLOT=../shared/data/omniglot python benchmarks/bench_data.py
    python benchmarks/bench_data.py --root /path/to/omniglot --repeats 3 --threads 1

Prints one table. Each first load decodes into a fresh temporary cache folder; each cached load
reads that cache back. Sampling draws meta-batches of ``--batch`` tasks from the ``maml`` train
split (1100 characters, 4 rotations each) with one ``torch.Generator``; tasks/minute is the batch
size over the median time of one ``sample`` call. All numbers are medians over ``--repeats`` runs
(``--calls`` sample calls each for sampling).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from metagrad.data import FewShotSampler, Omniglot


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
            first.append(median_seconds(lambda c=cache: Omniglot(root, cache_dir=c), 1))
            cached.append(median_seconds(lambda c=cache: Omniglot(root, cache_dir=c), 3))
    return statistics.median(first), statistics.median(cached)


def tasks_per_minute(sampler: FewShotSampler, batch: int, calls: int, repeats: int) -> float:
    """Tasks a minute: ``batch`` over the median time of one ``sample(batch)`` call."""
    g = torch.Generator().manual_seed(0)
    sampler.sample(batch, g)  # warm up
    per_call = [median_seconds(lambda: sampler.sample(batch, g), calls) for _ in range(repeats)]
    return batch / statistics.median(per_call) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.environ.get("METAGRAD_OMNIGLOT"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if not args.root:
        parser.error("give --root or set METAGRAD_OMNIGLOT to the Omniglot folder")
    if args.threads:
        torch.set_num_threads(args.threads)

    first, cached = load_times(args.root, args.repeats)
    with tempfile.TemporaryDirectory() as cache:
        ds = Omniglot(args.root, cache_dir=cache)
    train = ds.split("maml", seed=0)["train"]
    rows = [
        ("first load (decode + cache)", f"{first:.2f} s"),
        ("cached load", f"{cached * 1000:.0f} ms"),
        ("first / cached", f"{first / cached:.0f}x"),
    ]
    for ways, shots, queries in [(5, 1, 15), (20, 5, 15)]:
        sampler = FewShotSampler(train, ways, shots, queries)
        rate = tasks_per_minute(sampler, args.batch, args.calls, args.repeats)
        rows.append((f"{ways}-way {shots}-shot, {queries} queries", f"{rate:,.0f} tasks/min"))

    print(
        f"# metagrad data benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, medians of {args.repeats}, batch {args.batch}"
    )
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |\n| {'-' * width} | ----- |")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
