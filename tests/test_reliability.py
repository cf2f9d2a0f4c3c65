"""Reliability, tried as a user would: edited and corrupt files, signals, a full disk, mistakes.

Each case asserts one line on stderr naming the problem and the fix, a non-zero exit, the run
folder and the user's files unchanged, and (where a run goes on) a result bit-identical to a run
that was never disturbed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, metagrad_command, metagrad_env
from PIL import Image

from metagrad import cli
from metagrad.data import LakeRuns
from metagrad.training import RunDir

TINY = ["--meta-batch", "2", "--eval-tasks", "5", "--no-tensorboard", "--log-every", "1"]
TINY += ["--checkpoint-every", "2", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def state(run: Path, name: str = "checkpoint.pt") -> dict:
    return torch.load(run / name, weights_only=True)


def assert_same_params(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa["step"] == sb["step"]
    for k in sa["params"]:
        assert torch.equal(sa["params"][k], sb["params"][k]), k
    for i, s in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][i][n]) for n, v in s.items())


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """Run ``metagrad ARGV`` in this process; its one stderr line (asserted non-zero exit)."""
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status != 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("metagrad: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of 4 steps (checkpoints at 2 and 4) and a reference run of 6 steps, never stopped."""
    base = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", *TINY, "--steps", "4", "--out", str(base / "run")]) == 0
    assert cli.main(["train", *TINY, "--steps", "6", "--out", str(base / "ref")]) == 0
    assert (
        state(base / "run")["step"] == 4 and state(base / "run", "checkpoint.prev.pt")["step"] == 2
    )
    return base


@pytest.fixture
def run(runs, tmp_path):
    """A fresh copy of the 4-step run."""
    copy = tmp_path / "run"
    shutil.copytree(runs / "run", copy)
    return copy


# 1. An edited config.json is refused, naming the setting; nothing in the folder is written.


@pytest.mark.parametrize(
    ("section", "name", "value"),
    [
        ("algo", "algorithm", "reptile"),
        ("optim", "optimizer", "sgd"),
        ("algo", "inner_lr", 0.5),
        ("run", "seed", 3),
        ("optim", "meta_batch", 3),
    ],
)
def test_edited_config_is_refused_by_resume_and_eval(capsys, runs, run, section, name, value):
    record = json.loads((run / "config.json").read_text())
    record["config"][section][name] = value
    (run / "config.json").write_text(json.dumps(record, indent=2))
    before = snapshot(run)
    one_line_error(
        capsys, ["train", "--resume", str(run), "--steps", "6"], f"{name}=", "config.json"
    )
    assert snapshot(run) == before, "a refused resume writes nothing (config.json's steps included)"
    one_line_error(capsys, ["eval", str(run), "--tasks", "5"], f"{name}=", "config.json")
    assert snapshot(run) == before
    shutil.copy(runs / "run" / "config.json", run / "config.json")  # the user restores it
    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert_same_params(run, runs / "ref")


def test_checkpoint_of_other_shapes_is_refused(capsys, run):
    saved = state(run)
    saved.pop("identity")  # as written before checkpoints recorded their identity
    saved["params"]["head.weight"] = torch.zeros(2, 40)
    torch.save(saved, run / "checkpoint.pt")
    before = snapshot(run)
    one_line_error(capsys, ["train", "--resume", str(run), "--steps", "6"], "head.weight", "shape")
    one_line_error(capsys, ["eval", str(run)], "head.weight", "shape")
    assert snapshot(run) == before


# 2. A corrupt checkpoint is one line offering the previous one; --previous-checkpoint takes it.


class Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif how == "malicious":
        path.write_bytes(pickle.dumps({"step": 1, "evil": Evil()}))
    elif how == "zip-malicious":
        torch.save({"step": 1, "evil": Evil()}, path)


@pytest.mark.parametrize(
    "how", ["truncated", "empty", "random", "foreign", "malicious", "zip-malicious"]
)
def test_corrupt_checkpoint_is_one_line_and_the_previous_one_resumes(
    capsys, runs, run, tmp_path, monkeypatch, how
):
    monkeypatch.chdir(tmp_path)
    damage(run / "checkpoint.pt", how)
    before = snapshot(run)
    fix = "--previous-checkpoint"
    for argv in (["train", "--resume", str(run), "--steps", "6"], ["eval", str(run)]):
        line = one_line_error(capsys, argv, "checkpoint.pt", fix)
        assert "weights_only=False" not in line and "Traceback" not in line
        assert snapshot(run) == before
    assert not (tmp_path / "owned.txt").exists(), "loading a checkpoint never runs code"
    assert cli.main(["train", "--resume", str(run), "--steps", "6", fix]) == 0
    capsys.readouterr()
    assert_same_params(run, runs / "ref")
    assert (run / "checkpoint.pt.set-aside").read_bytes() == before["checkpoint.pt"]
    assert not (tmp_path / "owned.txt").exists()


# 3. A torn last line of metrics.jsonl is dropped, with a warning; resume stays bit-identical.


def test_torn_last_log_line_is_dropped_and_resume_is_bit_identical(capsys, runs, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "query_loss": 0.12')  # killed while appending
    assert RunDir(run).metrics()[-1]["step"] == 4  # the reader leaves it out
    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "dropped the torn last line" in err and "metrics.jsonl" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(ln) for ln in lines)
    assert_same_params(run, runs / "ref")


def test_bad_log_line_before_the_last_is_named(capsys, run):
    text = (run / "metrics.jsonl").read_text().splitlines()
    text[1] = text[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
    before = snapshot(run)
    one_line_error(capsys, ["train", "--resume", str(run), "--steps", "6"], "line 2", "delete")
    assert snapshot(run) == before


# 4. SIGTERM checkpoints and exits like Ctrl-C; the resumed run ends bit-identical.


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path, run_metagrad):
    from test_train_process import start, wait_for_step

    args = ["train", *TINY, "--steps", "40"]
    ref = run_metagrad(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = start(*args, "--steps", "100000", "--checkpoint-every", "1000", "--out", str(run))
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and f"metagrad train --resume {run}" in err and "Traceback" not in err
    step = state(run)["step"]
    assert 3 <= step < 40
    done = run_metagrad("train", "--resume", str(run), "--steps", "40")
    assert done.returncode == 0, done.stderr
    assert_same_params(run, tmp_path / "ref")


# 5, 6. A full disk (a file-size limit) and other file-system errors: one line, nothing lost.


def _limited(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not kills

    return preexec


def run_limited(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        metagrad_command(*args),
        capture_output=True,
        text=True,
        timeout=300,
        env={**metagrad_env(), "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=_limited(limit),
    )


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("metagrad: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_prints_its_result_before_a_failed_write(runs, run):
    before = snapshot(run)
    done = run_limited(100, "eval", str(run), "--tasks", "5")  # eval_test.json needs more
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert str(run / "eval_test.json") in line and "not saved" in line
    expected = json.loads(before["eval_test.json"])  # the same 5 tasks as at the end of training
    assert f"{expected['loss']:.3f}" in done.stdout and "5 test tasks" in done.stdout
    assert snapshot(run) == before, "no temporary file is left, the old result is kept"


def test_full_disk_while_training_is_one_line_and_the_run_resumes(tmp_path, runs):
    run = tmp_path / "run"
    done = run_limited(20_000, "train", *TINY, "--steps", "6", "--out", str(run))
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert "File too large" in line and str(run) in line and "--resume" in line
    assert not list(run.glob(".*.tmp-*")), "the failed write leaves no temporary file"
    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert_same_params(run, runs / "ref")


def test_out_where_a_file_is_is_one_line(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "notes.txt" / "run")],
                   "notes.txt")  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"


# 7. --head that matches no parameter: one line before any folder is made.


def test_head_matching_no_parameter_makes_no_folder(capsys, tmp_path):
    out = tmp_path / "anil"
    argv = ["train", *TINY, "--algorithm", "anil", "--head", "classifier.", "--out", str(out)]
    one_line_error(capsys, argv, "--head classifier.", "matches no parameter", "head.")
    assert not out.exists()


# 8. Lake's runs with a class_labels.txt missing are refused, not scored on fewer runs.


def test_lake_runs_with_a_missing_label_file_are_refused(tmp_path):
    folder = tmp_path / "runs"
    for r in (1, 2):
        run = folder / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        for i in (1, 2):
            Image.new("1", (105, 105), 1).save(run / "training" / f"class{i:02d}.png")
            Image.new("1", (105, 105), 1).save(run / "test" / f"item{i:02d}.png")
        (run / "class_labels.txt").write_text(
            "".join(
                f"run{r:02d}/test/item{i:02d}.png run{r:02d}/training/class{i:02d}.png\n"
                for i in (1, 2)
            )  # fmt: skip
        )
    assert len(LakeRuns(folder)) == 2
    (folder / "run02" / "class_labels.txt").unlink()
    with pytest.raises(ValueError, match=r"run02/class_labels.txt is missing"):
        LakeRuns(folder)
    zipped = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for p in sorted(folder.rglob("*")):
            archive.write(p, p.relative_to(folder).as_posix())
    with pytest.raises(ValueError, match=r"run02/class_labels.txt is missing"):
        LakeRuns(zipped)


# 9. A corrupt zip the user supplied is reported and never moved.


def test_corrupt_user_zip_is_left_in_place(capsys, tmp_path):
    data = tmp_path / "omniglot"
    data.mkdir()
    for top in ("images_background", "images_evaluation"):
        (data / f"{top}.zip").write_bytes(b"PK\x03\x04 not really a zip")
    before = snapshot(data)
    argv = ["train", "--preset", "omniglot-5w1s-maml", "--data", str(data)]
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "r")], "images_", "never moved")
    assert snapshot(data) == before and not (tmp_path / "r").exists()


# 10. Temporary files of killed writers are removed on the next start.


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_stale_temporary_files_are_removed_on_resume(capsys, runs, run):
    pid = _dead_pid()
    stale = [run / f".checkpoint.pt.tmp-{pid}", run / f".metrics.jsonl.tmp-{pid}"]
    for path in stale:
        path.write_bytes(b"half a file")
    live = run / f".checkpoint.pt.tmp-{os.getppid()}"  # a running writer's file stays
    live.write_bytes(b"being written")
    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert_same_params(run, runs / "ref")


# 11. Minor mistakes: one line each.


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--leap-metric", "length"], ["--leap-metric", "maml", "leap"]),
        (["train", "--lam", "3"], ["--lam", "imaml"]),
        (["train", "--inner-betas", "0.5", "0.5"], ["--inner-betas", "adam"]),
        (["train", "--ways", "20"], ["--ways", "sinusoid"]),
        (["train", "--previous-checkpoint"], ["--resume"]),
    ],
)
def test_flags_that_the_run_would_not_read_are_refused(capsys, tmp_path, argv, expected):
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "r")], *expected)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tasks", ["0", "-5"])
def test_eval_tasks_must_be_positive(capsys, run, tasks):
    before = snapshot(run)
    one_line_error(capsys, ["eval", str(run), "--tasks", tasks], "--tasks", tasks)
    assert snapshot(run) == before


def test_resuming_a_finished_run_logs_nothing_again(capsys, run):
    before = snapshot(run)
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert "before adaptation" in capsys.readouterr().out  # the result is still reported
    after = snapshot(run)
    assert after["metrics.jsonl"] == before["metrics.jsonl"]
    assert after["checkpoint.pt"] == before["checkpoint.pt"]
    assert after["eval_test.json"] == before["eval_test.json"]


def test_missing_data_message_is_for_the_command_line(capsys, tmp_path):
    argv = ["train", "--preset", "omniglot-5w1s-maml", "--data", str(tmp_path / "nowhere")]
    line = one_line_error(capsys, [*argv, "--out", str(tmp_path / "r")], "nowhere", "--data")
    assert "download=True" not in line


def test_every_torch_load_is_weights_only():
    calls = []
    for path in (ROOT / "src").rglob("*.py"):
        for n, text in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\btorch\.load\(", text) and not text.lstrip().startswith(("#", ">>>")):
                calls.append((path.name, n, "weights_only=True" in text))
    assert calls and all(ok for *_, ok in calls), calls


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers in /proc")
def test_sigterm_under_torchrun_stops_every_rank_and_rank_0_checkpoints(tmp_path):
    from test_distributed import FAST, LONG, alive, child_with_rank, params, torchrun
    from test_distributed import wait_for_step as wait_for_rank_0

    run = tmp_path / "run"
    proc = torchrun("train", *LONG, *FAST, "--checkpoint-every", "1000", "--out", str(run))
    workers = [child_with_rank(proc.pid, r) for r in (0, 1)]
    wait_for_rank_0(proc, 4)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends torchrun on preemption
    _, err = proc.communicate(timeout=120)  # a guard against a hang, not a measurement
    assert proc.returncode != 0 and not any(alive(pid) for pid in workers), err
    assert err.count("interrupted by SIGTERM") == 1, err
    frames = [ln for ln in err.splitlines() if ln.strip().startswith("File ")]
    assert not [f for f in frames if "metagrad" in f], err  # torchrun's own traceback aside
    assert "metagrad: error:" not in err, err
    step = state(run)["step"]
    assert (
        step >= 4 and not list(run.glob(".*.tmp-*")) and not (run / "checkpoint.prev.pt").exists()
    )
    resumed = torchrun("train", "--resume", str(run), "--steps", str(step + 2), "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    one = cli.main(["train", *LONG[:2], *FAST, "--steps", str(step + 2), "--meta-batch", "5",
                    "--out", str(tmp_path / "one")])  # fmt: skip
    assert one == 0
    a, b = params(tmp_path / "one"), params(run)
    for k in a:  # float32 round-off between one process and two ranks (see test_distributed)
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-5, msg=k)
