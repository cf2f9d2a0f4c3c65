"""A fuzz test of the command line: random flags and values against `metagrad train`, `eval` and
`experiment`, each a fresh process.

The oracle: never a traceback; a failure is exactly one ``metagrad: error:`` line on stderr with
exit status 1 or 2; a success (exit 0) has done what was asked: for ``train`` a checkpoint at the
requested step whose config.json holds every flag's value, and no flag that the chosen algorithm,
inner solver or benchmark does not read; for ``eval`` the result file with the requested task count
on an intact run. Most combinations fail at argument or config validation (fast); those that train
are tiny (1 or 2 steps of sinusoid). ``METAGRAD_FUZZ_CASES`` and ``METAGRAD_FUZZ_SEED`` change the
number of cases (default 200) and the seed (default 0; a failure names its case).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import metagrad_command, metagrad_env

from metagrad import cli
from metagrad.algorithms import ALGORITHMS
from metagrad.data import BENCHMARKS
from metagrad.experiments import EXPERIMENTS
from metagrad.inner import INNER_SOLVERS
from metagrad.training import PRESETS, SECTIONS, preset

CASES = int(os.environ.get("METAGRAD_FUZZ_CASES", "200"))
SEED = int(os.environ.get("METAGRAD_FUZZ_SEED", "0"))
TINY = ["--no-progress", "--no-tensorboard", "--log-every", "1"]
INTS = ["-2", "-1", "0", "1", "2", "3", "x", "1.5", ""]
FLOATS = ["-1", "0", "0.001", "0.5", "nan", "inf", "-inf", "x", "1e-300"]
FIELDS = {f.name: (f, typing.get_type_hints(kind)[f.name])
          for kind in SECTIONS.values() for f in dataclasses.fields(kind)}  # fmt: skip
SLOW_FIELDS = {"steps", "meta_batch", "eval_tasks", "val_tasks", "eval_every", "inner_steps",
               "eval_inner_steps", "cg_steps", "newton_cg_steps", "threads"}  # fmt: skip


def _flag(name: str) -> str:
    field = FIELDS[name][0]
    return "--" + (field.metadata.get("flag") or name).replace("_", "-")


def _value(rng: random.Random, name: str, paths: dict[str, Path]) -> list[str]:
    """Command-line words that set field ``name`` to a random, often invalid, value."""
    field, hint = FIELDS[name]
    flag = _flag(name)
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = base[0]
    choices = field.metadata.get("choices")
    if kind is bool:
        return [rng.choice([flag, flag.replace("--", "--no-"), f"{flag}=yes"])]
    if typing.get_origin(kind) is tuple:
        items = [
            rng.choice(["head.", "body.", "x", "0.5", "nan", "2"]) for _ in range(rng.randint(0, 3))
        ]
        return [flag, *items]
    if choices:
        return [flag, rng.choice([*choices, "bogus", ""])]
    if kind is int:
        small = ["1", "2"] if name in SLOW_FIELDS else INTS
        return [flag, rng.choice(INTS if rng.random() < 0.3 else small)]
    if kind is float:
        return [flag, rng.choice(FLOATS)]
    return [flag, rng.choice([str(p) for p in paths.values()] + ["", "nowhere/at/all"])]


def train_case(rng: random.Random, paths: dict[str, Path], out: Path) -> list[str]:
    names = list(PRESETS)
    sinusoid = [n for n in names if PRESETS[n].config.data.benchmark == "sinusoid"]
    words = ["train"]
    if rng.random() < 0.1:
        target = rng.choice(
            [paths["run"], paths["corrupt_run"], paths["edited_run"], paths["none"]]
        )
        words += ["--resume", str(target)]
        if rng.random() < 0.5:
            words += rng.choice(
                [["--steps", "1"], ["--previous-checkpoint"], ["--inner-lr", "0.5"]]
            )
        return words + TINY
    words += ["--preset", rng.choice(sinusoid if rng.random() < 0.8 else [*names, "bogus"])]
    words += ["--steps", rng.choice(["1", "2"]), "--meta-batch", rng.choice(["1", "2"])]
    words += ["--eval-tasks", rng.choice(["1", "3"]), "--out", str(out)]
    for name in rng.sample(sorted(FIELDS), rng.choice([0, 1, 1, 2, 3])):
        words += _value(rng, name, paths)
    if rng.random() < 0.1:
        words.append(rng.choice(["--bogus", "--steps", "--out"]))
    return words + TINY


def eval_case(rng: random.Random, paths: dict[str, Path]) -> list[str]:
    target = rng.choice(["run", "run", "corrupt_run", "edited_run", "none", "file", "empty"])
    words = ["eval", str(paths[target])]
    if rng.random() < 0.7:
        words += ["--tasks", rng.choice(["-5", "0", "1", "3", "x", "2.5"])]
    if rng.random() < 0.4:
        words += ["--split", rng.choice(["train", "val", "test", "lake", "bogus"])]
    if rng.random() < 0.2:
        words += ["--lake-runs", str(rng.choice([paths["none"], paths["zip"], paths["empty"]]))]
    if rng.random() < 0.2:
        words += ["--device", rng.choice(["cpu", "cuda", "tpu"])]
    if rng.random() < 0.3:
        words += ["--eval-inner-steps", rng.choice(["-1", "0", "1", "2", "a"])]
    if rng.random() < 0.1:
        words += ["--data", str(rng.choice([paths["none"], paths["zip"]]))]
    return words


def experiment_case(rng: random.Random, paths: dict[str, Path], out: Path) -> list[str]:
    if rng.random() < 0.15:
        return ["experiment", "list"]
    name = rng.choice([*EXPERIMENTS, "bogus", ""])
    words = ["experiment", name, "--out", str(out)]
    # A valid name always gets an invalid value, so that no experiment actually runs here.
    bad = [["--seeds", "0"], ["--seeds", "-1"], ["--budget-minutes", "0"], ["--steps", "-2"],
           ["--budget-minutes", "x"], ["--device", "tpu"], ["--steps", "nan"],
           ["--bogus"]]  # fmt: skip
    words += rng.choice(bad)
    if rng.random() < 0.3:
        words += ["--quick"]
    if rng.random() < 0.3:
        words += ["--data", str(rng.choice([paths["none"], paths["zip"]]))]
    return words


def _expected_value(name: str, words: list[str]) -> object:
    """The value that the last occurrence of field ``name``'s flag on ``words`` asks for."""
    return cli._config_changes(cli.parser().parse_args(words)).get(name)


def check_train(words: list[str], out: Path, done: subprocess.CompletedProcess[str]) -> None:
    if "--resume" in words:
        target = Path(words[words.index("--resume") + 1])
        assert target.name == "run", "only the intact run may resume"
        return
    args = cli.parser().parse_args(words)
    changes = cli._config_changes(args)
    config = preset(args.preset).override(**changes)
    read = set()
    for registry, name in ((ALGORITHMS, config.algo.algorithm), (INNER_SOLVERS, config.algo.inner),
                           (BENCHMARKS, config.data.benchmark)):  # fmt: skip
        read |= set(registry[name].options.values())
    specific = {f for r in (ALGORITHMS, INNER_SOLVERS, BENCHMARKS) for e in r.entries()
                for f in e.options.values()}  # fmt: skip
    assert not (changes.keys() & (specific - read)), "a flag the run does not read was accepted"
    record = json.loads((out / "config.json").read_text())["config"]
    flat = {k: v for s in record.values() if isinstance(s, dict) for k, v in s.items()}
    for name, value in changes.items():
        saved = flat[name]
        want = list(value) if isinstance(value, tuple) else value
        if isinstance(want, float) and math.isnan(want):
            raise AssertionError(f"{name}=nan was accepted")
        assert saved == want, (name, saved, want)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == config.optim.steps
    assert all(bool(v.isfinite().all()) for v in state["params"].values())
    assert f"run: {out} (step {config.optim.steps})" in done.stdout


def check_eval(words: list[str], paths: dict[str, Path], done: subprocess.CompletedProcess[str]):
    assert Path(words[1]) == paths["run"], "only the intact run may be evaluated"
    args = cli.parser().parse_args(words)
    name = "eval_lake.json" if args.lake_runs else f"eval_{args.split}.json"
    found = re.search(r"\((\d+) (\w+) tasks, (\d+) steps\)", done.stdout)  # the summary line
    assert found, done.stdout
    tasks, split, steps = int(found[1]), found[2], int(found[3])
    assert tasks == (args.tasks or 3) and split == args.split, done.stdout
    assert args.eval_inner_steps is None or steps == args.eval_inner_steps, done.stdout
    assert f"written: {paths['run'] / name}" in done.stdout


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    run = base / "run"
    argv = ["train", "--steps", "2", "--meta-batch", "2", "--eval-tasks", "3", "--out", str(run)]
    assert cli.main([*argv, *TINY]) == 0
    corrupt, edited = base / "corrupt_run", base / "edited_run"
    shutil.copytree(run, corrupt)
    (corrupt / "checkpoint.pt").write_bytes(b"\x00" * 100)
    (corrupt / "checkpoint.prev.pt").unlink(missing_ok=True)
    shutil.copytree(run, edited)
    record = json.loads((edited / "config.json").read_text())
    record["config"]["algo"]["algorithm"] = "reptile"
    (edited / "config.json").write_text(json.dumps(record))
    (base / "file.txt").write_text("not a folder")
    (base / "bad.zip").write_bytes(b"PK\x03\x04 not a zip")
    (base / "empty").mkdir()
    return {
        "run": run, "corrupt_run": corrupt, "edited_run": edited, "none": base / "nowhere",
        "file": base / "file.txt", "zip": base / "bad.zip", "empty": base / "empty",
    }  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_random_command_lines_never_end_in_a_traceback_or_a_wrong_success(paths, tmp_path):
    rng = random.Random(SEED)
    protected = {k: _snapshot(paths[k]) for k in ("corrupt_run", "edited_run")}
    cases = []
    for i in range(CASES):
        out = tmp_path / f"out{i}"
        kind = rng.choices(["train", "eval", "experiment"], weights=[6, 3, 1])[0]
        if kind == "train":
            words = train_case(rng, paths, out)
        elif kind == "eval":
            words = eval_case(rng, paths)
        else:
            words = experiment_case(rng, paths, out)
        cases.append((i, kind, words, out))

    def run(case):
        i, kind, words, out = case
        done = subprocess.run(
            metagrad_command(*words),
            capture_output=True,
            text=True,
            timeout=240,
            env=metagrad_env(),
            cwd=tmp_path,
        )
        return case, done

    failures = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for (i, kind, words, out), done in pool.map(run, cases):
            try:
                assert "Traceback" not in done.stderr, "a traceback"
                if done.returncode == 0:
                    if kind == "train":
                        check_train(words, out, done)
                    elif kind == "eval":
                        check_eval(words, paths, done)
                    else:
                        assert words[1] == "list", "an experiment ran"
                else:
                    assert done.returncode in (1, 2), f"exit status {done.returncode}"
                    errors = [ln for ln in done.stderr.splitlines() if "error:" in ln]
                    assert len(errors) == 1 and errors[0].startswith("metagrad: error: ")
            except (AssertionError, KeyError, OSError, ValueError, SystemExit) as e:
                failures.append(f"case {i} {words}: {e!r}\n{done.stderr[-800:]}")
    for k, before in protected.items():
        assert _snapshot(paths[k]) == before, f"{k} was changed"
    assert not failures, f"{len(failures)} of {CASES} failed:\n" + "\n".join(failures[:5])
