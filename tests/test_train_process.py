"""`metagrad train` as a process: the default run, Ctrl-C, and SIGKILL then resume, bit for bit."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import metagrad_command, metagrad_env

FAST = ["--meta-batch", "5", "--eval-tasks", "20", "--no-tensorboard", "--no-progress"]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        metagrad_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=metagrad_env(),
    )


def wait_for_step(proc: subprocess.Popen[str], step: int, timeout: float = 240) -> str:
    """Read the process's log lines until it reports ``step`` or more; returns what it read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None, "start the process with stderr=subprocess.PIPE"
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"the run ended before step {step}:\n{''.join(seen)}")
        seen.append(line)
        m = re.match(r"step (\d+)/", line)
        if m and int(m.group(1)) >= step:
            return "".join(seen)
    raise AssertionError(f"no step {step} within {timeout}s:\n{''.join(seen)}")


def state(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_default_run_shortened(tmp_path, run_metagrad):
    out = tmp_path / "default"
    done = run_metagrad("train", "--steps", "300", "--eval-tasks", "100", "--out", str(out))
    assert done.returncode == 0, done.stderr
    before = float(re.search(r"before adaptation: +([\d.]+)", done.stdout).group(1))
    after = float(re.search(r"after 10 gradient steps: +([\d.]+)", done.stdout).group(1))
    assert after < 0.8 * before, done.stdout
    assert "MAML paper" in done.stdout and "0.35" in done.stdout
    plots = re.findall(r"plot: (\S+)", done.stdout)
    assert str(out / "adapted.png") in plots and all((tmp_path / p).exists() for p in plots)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, run_metagrad):
    run = tmp_path / "run"
    args = ["train", *FAST, "--steps", "100000", "--log-every", "1", "--checkpoint-every", "1000"]
    proc = start(*args, "--out", str(run))
    wait_for_step(proc, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"metagrad train --resume {run}" in err and "Traceback" not in err
    step = state(run)["step"]
    assert step >= 5
    done = run_metagrad("train", "--resume", str(run), "--steps", str(step + 3), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert state(run)["step"] == step + 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "learned",
    [
        pytest.param([], id="init"),
        pytest.param(["--learn-lr", "parameter"], id="learned-lr"),  # Meta-SGD's step sizes
        pytest.param(["--algorithm", "imaml", "--learn-lam", "module"], id="learned-lam"),
    ],
)
def test_sigkill_twice_then_resume_ends_bit_identical(tmp_path, run_metagrad, learned):
    args = ["train", *FAST, "--steps", "200", "--log-every", "1", "--checkpoint-every", "7"]
    args += learned
    reference = start(*args, "--out", str(tmp_path / "ref"))
    rng = random.Random()
    first, second = sorted(rng.sample(range(15, 185), 2))
    run = tmp_path / "killed"
    proc = start(*args, "--out", str(run))
    for target, command in ((first, None), (second, ["train", "--resume", str(run)])):
        if command:
            proc = start(*command, "--no-progress")
        wait_for_step(proc, target)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in a step, a checkpoint write included
        assert proc.poll() is None, "the run must still be going when it is killed"
        proc.kill()
        proc.wait(timeout=60)
    done = run_metagrad("train", "--resume", str(run), "--no-progress")
    assert done.returncode == 0, done.stderr
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    a, b = state(tmp_path / "ref"), state(run)
    assert a["step"] == b["step"] == 200
    assert any(k.startswith("log_") for k in a["params"]) == bool(learned)  # learned entries kept
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), f"{k} (killed at {first}, {second})"
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][n]) for n, v in s.items())
