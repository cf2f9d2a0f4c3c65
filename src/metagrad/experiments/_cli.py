"""``metagrad experiment NAME`` and ``metagrad experiment list``: flags to :class:`Options`.

::

    metagrad experiment list
    metagrad experiment sinusoid --quick
    metagrad experiment compute-memory --out runs/exp/cm --data PATH
    metagrad experiment omniglot-table --budget-minutes 15 --seeds 1

Calling an experiment again with the same ``--out`` reuses its finished cells and completes the
others. A user mistake is one line on stderr and a non-zero exit. :mod:`metagrad.cli` registers
:func:`add_arguments` and :func:`run` as the ``experiment`` subcommand.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from metagrad.experiments import EXPERIMENTS, Options, describe, run_experiment

HELP = "run a published experiment (`experiment list`)"


class UsageError(Exception):
    """A mistake on the command line (``metagrad`` prints it in one line and exits with 2)."""


def positive(kind: type) -> Callable[[str], object]:
    """An argparse ``type``: the text as ``kind``, refused unless it is > 0 (nan included)."""

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``metagrad experiment``."""
    p.add_argument("name", metavar="NAME", help="the experiment, or `list` to list them")
    p.add_argument("--quick", action="store_true", help="a smoke version (minutes, not hours)")
    p.add_argument("--data", type=Path, help="Omniglot folder (default: $METAGRAD_OMNIGLOT)")
    p.add_argument("--out", type=Path, help="results folder (default: runs/experiments/NAME)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seeds", type=positive(int), help="training seeds per cell")
    p.add_argument(
        "--budget-minutes",
        type=positive(float),
        metavar="M",
        help="wall-clock budget (see each experiment: per cell, or no new cell after M minutes)",
    )
    p.add_argument("--steps", type=positive(int), help="outer steps (or iterations) per cell")
    p.add_argument("--lake-runs", type=Path, metavar="PATH", help="Lake's all_runs.zip")
    p.add_argument(
        "--cells",
        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        metavar="LIST",
        help="train only these cells (omniglot-table: e.g. 5w1s/iMAML-HF,20w1s, or MAML; "
        "leap-omniglot: e.g. 5/Leap,25, or Leap)",
    )


def run(args: argparse.Namespace) -> int:
    """List the experiments, or run one and print its tables."""
    if args.name == "list":
        for name in EXPERIMENTS:
            try:
                text = describe(name)
            except ImportError:
                text = "(not available yet)"
            print(f"{name:<18} {text}")
        return 0
    if args.name not in EXPERIMENTS:
        raise UsageError(
            f"unknown experiment {args.name!r}: choose one of {', '.join(EXPERIMENTS)} "
            "(`metagrad experiment list`)"
        )
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device: use --device cpu")
    options = Options(
        out=args.out or Path("runs") / "experiments" / args.name,
        quick=args.quick,
        data=args.data,
        device=args.device,
        seeds=args.seeds,
        budget_minutes=args.budget_minutes,
        steps=args.steps,
        lake_runs=args.lake_runs,
        cells=args.cells,
    )
    run_experiment(args.name, options)
    print(f"written: {options.out}")
    return 0
