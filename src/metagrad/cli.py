"""The command line: a thin translator from flags to the config dataclasses and library calls.

::

    metagrad train [--preset NAME] [--out DIR] [--FIELD VALUE ...]   # every config field a flag
    metagrad train --resume DIR [--steps N]
    metagrad eval DIR [--tasks 600] [--split test] [--lake-runs PATH]
    metagrad presets
    metagrad experiment NAME [--quick] [--out DIR] ...               # see metagrad.experiments

The flags come from the config dataclasses of :mod:`metagrad.training.config`, whose choices come
from the registries. A subcommand is added with :func:`register`. Under ``torchrun``, ``metagrad
train`` hands the outer loop the reducer of :func:`metagrad.training.distributed.session`.
A user mistake prints one line on stderr and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from metagrad.algorithms import ALGORITHMS
from metagrad.data import BENCHMARKS
from metagrad.data.registry import SPLITS
from metagrad.experiments import _cli as experiment_cli
from metagrad.experiments._cli import UsageError, positive
from metagrad.inner import INNER_SOLVERS
from metagrad.training import (
    DEFAULT_PRESET,
    PRESETS,
    SECTIONS,
    Config,
    TrainingError,
    TrainResult,
    evaluate_run,
    load_run,
    preset,
    resume,
    train,
)
from metagrad.training.config import tuple_fields
from metagrad.training.distributed import session
from metagrad.training.reduce import Reducer

__all__ = ["SUBCOMMANDS", "UsageError", "add_config_flags", "main", "parser", "register"]

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SUBCOMMANDS: dict[str, Command] = {}
"""Subcommand name -> (help, add_arguments(parser), run(args) -> exit status)."""

PAPER_SINUSOID = (
    "MAML paper (Finn et al. 2017, Fig. 3, K=10): about 0.35 after 10 steps, read off the "
    "figure; its pretrained baseline stays far higher"
)


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add the subcommand ``metagrad NAME``; ``run`` returns the exit status."""
    SUBCOMMANDS[name] = (help, add_arguments, run)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """``(base type, is optional)`` of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return args[0], True
    return hint, False


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--inner-steps``), defaulting to the preset's value."""
    for section, kind in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (default: the preset's)")
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
            base, _ = _flag_type(hints[f.name])
            kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
            kw["help"] = f.metadata.get("help")
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base) is tuple:
                item, *rest = typing.get_args(base)  # tuple[str, ...] or tuple[float, float]
                nargs = "+" if rest == [Ellipsis] else 1 + len(rest)
                kw.update(nargs=nargs, type=item, metavar="PREFIX" if item is str else "X")
            else:
                kw.update(type=base, choices=f.metadata.get("choices"))
                kw["metavar"] = None if kw["choices"] else base.__name__.upper()
            group.add_argument(flag, **kw)


def _config_changes(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
    changes = {k: v for k, v in vars(args).items() if k in names}
    for name in changes.keys() & {n for kind in SECTIONS.values() for n in tuple_fields(kind)}:
        changes[name] = tuple(changes[name])
    return changes


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"named settings (default: {DEFAULT_PRESET}); see presets")
    p.add_argument("--out", help="run folder (default: runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument(
        "--previous-checkpoint", action="store_true",
        help="with --resume: continue from the checkpoint before the last (if that one is corrupt)",
    )  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar")
    p.add_argument(
        "--dist-timeout", type=float, default=300, metavar="S",
        help="under torchrun: seconds a rank waits for the others before it stops with an error",
    )  # fmt: skip
    add_config_flags(p)


def _run_train(args: argparse.Namespace) -> int:
    with session(args.dist_timeout) as reducer:  # under torchrun: the all-reduce; else Local
        return _train(args, reducer)


def _train(args: argparse.Namespace, reducer: Reducer) -> int:
    changes = _config_changes(args)
    if args.resume:
        if args.preset or args.out:
            raise UsageError("--resume continues a run as configured: drop --preset and --out")
        result = resume(
            args.resume,
            progress=args.progress,
            reducer=reducer,
            previous=args.previous_checkpoint,
            **changes,
        )
    else:
        if args.previous_checkpoint:
            raise UsageError("--previous-checkpoint goes with --resume DIR")
        name = args.preset or DEFAULT_PRESET
        config = preset(name).override(**changes)
        _check_read(config, changes)
        out = Path(args.out) if args.out else _default_out(name)
        print(f"metagrad: training {name} in {out}", file=sys.stderr)
        result = train(config, out, progress=args.progress, reducer=reducer)
    if result.interrupted:
        by = f" by {result.signal}" if result.signal else " (another rank was stopped)"
        print(
            f"metagrad: interrupted{by} at step {result.step}; checkpoint saved. Resume with: "
            f"metagrad train --resume {result.path}",
            file=sys.stderr,
        )
        return 143 if result.signal == "SIGTERM" else 130
    _report(result)
    return 0


def _check_read(config: Config, changes: dict[str, Any]) -> None:
    """``UsageError`` for a flag of another algorithm, inner solver or benchmark.

    A field that some registry entry reads (its ``options``) is given only where the chosen
    entry reads it: ``--leap-metric`` with ``maml`` would be written to config.json and ignored.
    """
    algo = ALGORITHMS[config.algo.algorithm]
    inner = INNER_SOLVERS[config.algo.inner]
    bench = BENCHMARKS[config.data.benchmark]
    groups = [
        ((ALGORITHMS, INNER_SOLVERS), (algo, inner),
         f"{algo.name} with the {inner.name} inner solver", "--algorithm or --inner"),
        ((BENCHMARKS,), (bench,), f"benchmark {bench.name}", "--benchmark"),
    ]  # fmt: skip
    for registries, chosen, what, which in groups:
        some = {f for r in registries for e in r.entries() for f in e.options.values()}
        read = {f for e in chosen for f in e.options.values()}
        for name in sorted(changes.keys() & (some - read)):
            flag = _flag(name)
            readers = [
                e.name for r in registries for e in r.entries() if name in e.options.values()
            ]
            raise UsageError(
                f"{flag} is not read by {what}: drop it, or choose {which} that reads it "
                f"({', '.join(readers)})"
            )


def _flag(name: str) -> str:
    for kind in SECTIONS.values():
        for f in dataclasses.fields(kind):
            if f.name == name:
                return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
    return "--" + name.replace("_", "-")


def _default_out(name: str) -> Path:
    out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while out.exists():
        out, n = Path(f"{out}-{n}"), n + 1
    return out


def _report(result: TrainResult) -> None:
    ev = result.evaluation
    print(f"run: {result.path} (step {result.step})")
    if ev is not None and ev.accuracy is None:
        print(f"query MSE on {ev.tasks} held-out tasks, mean +- 95% CI:")
        print(f"  before adaptation:        {ev.loss_before:.3f} +- {ev.loss_before_ci:.3f}")
        print(f"  after {ev.steps:2d} gradient steps:  {ev.loss:.3f} +- {ev.loss_ci:.3f}")
        print(f"  {PAPER_SINUSOID}")
    elif ev is not None:
        print(f"test: {ev.summary()}")
    for path in result.plots:
        print(f"plot: {path}")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder")
    p.add_argument(
        "--tasks", type=positive(int), help="evaluation tasks (default: the run's eval_tasks)"
    )
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--lake-runs", metavar="PATH", help="Lake's one-shot runs: report error rate")
    p.add_argument("--data", help="Omniglot folder, if it moved since training")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--eval-inner-steps", type=int, help="test-time inner steps")


def _run_eval(args: argparse.Namespace) -> int:
    ev, path = evaluate_run(
        args.run,
        tasks=args.tasks,
        split=args.split,
        lake_runs=args.lake_runs,
        data=args.data,
        device=args.device,
        steps=args.eval_inner_steps,
        report=lambda ev: print(ev.summary(), flush=True),  # printed before it is written
    )
    for line in load_run(args.run).learned():
        print(line)
    print(f"written: {path}")
    return 0


def _presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one preset's full settings")


def _run_presets(args: argparse.Namespace) -> int:
    if args.name:
        config = preset(args.name)
        print(f"{args.name}: {PRESETS[args.name].source}")
        for section in SECTIONS:
            for k, v in dataclasses.asdict(getattr(config, section)).items():
                print(f"  --{k.replace('_', '-'):<18} {v}")
        return 0
    for name, p in PRESETS.items():
        c = p.config
        what = f"{c.algo.algorithm}, {c.data.benchmark}, {c.optim.steps} steps"
        print(f"{name:<24} {what}")
        print(textwrap.fill(p.source, 96, initial_indent=" " * 4, subsequent_indent=" " * 4))
    return 0


register("train", "meta-train (default: MAML on sinusoid)", _train_arguments, _run_train)
register("eval", "evaluate a run on fixed held-out tasks", _eval_arguments, _run_eval)
register("presets", "list the presets and their sources", _presets_arguments, _run_presets)
register("experiment", experiment_cli.HELP, experiment_cli.add_arguments, experiment_cli.run)


def parser() -> argparse.ArgumentParser:
    """The argument parser, with every registered subcommand."""
    top = _Parser(prog="metagrad", description="Gradient-based meta-learning on PyTorch.")
    subs = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(subs.add_parser(name, help=help, description=help))
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``metagrad ARGS``; returns the exit status (user mistakes: one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
        if args.command is None:
            parser().print_help()
            return 2
        return SUBCOMMANDS[args.command][2](args)
    except (UsageError, ValueError, FileNotFoundError, TrainingError) as e:
        print(f"metagrad: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("metagrad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `metagrad presets | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silences the flush at exit)
        return 141
    except OSError as e:  # the file system: permissions, a file for a folder, a full disk
        print(f"metagrad: error: {_os_error(e)}", file=sys.stderr)
        return 1


def _os_error(e: OSError) -> str:
    if e.filename is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"{e.strerror or type(e).__name__}: {e.filename}: check its permissions and the free "
        "space, or choose another path (a run's last checkpoint is kept; resume with "
        "`metagrad train --resume DIR`)"
    )
