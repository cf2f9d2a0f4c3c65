"""Peak memory against the number of inner steps: iMAML (flat) against MAML (linear).

Each point is one meta-iteration (meta-gradient of B tasks, then an Adam step) in a fresh
process; the peak resident-memory increase over that process's state before the iteration is
measured as in ``bench_meta.py`` (``/proc/self/status`` VmHWM after resetting it). 20-way 5-shot,
15 queries per class, B=4, Conv4, inner SGD at lr 0.4; iMAML with lam=2 and 5 CG steps.

    python benchmarks/bench_memory.py                      # S = 1, 5, 10, 20, 40
    python benchmarks/bench_memory.py --steps 1,5 --impls imaml-gd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_meta import Config, memory_in_subprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="1,5,10,20,40")
    p.add_argument("--impls", default="imaml-gd,imaml-hf,maml")
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",")]
    impls = a.impls.split(",")
    print(
        f"{a.ways}-way {a.shots}-shot, B={a.tasks}: peak memory increase (MB), fresh process each"
    )
    print("| inner steps S | " + " | ".join(impls) + " |")
    print("| --- |" + " --- |" * len(impls))
    table: dict[str, list[float]] = {k: [] for k in impls}
    for s in steps:
        cfg = Config(a.ways, a.shots, a.tasks, s)
        row = [memory_in_subprocess(cfg, k, a.threads) for k in impls]
        for k, mb in zip(impls, row, strict=True):
            table[k].append(mb)
        print(f"| {s} | " + " | ".join(f"{mb:.0f}" for mb in row) + " |", flush=True)
    for k, mbs in table.items():
        if len(mbs) > 1:
            print(f"{k}: S={steps[-1]} / S={steps[0]} = {mbs[-1] / mbs[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
