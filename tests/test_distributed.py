"""Distributed training: 2 gloo ranks under torchrun on this machine against one process.

The same global meta-batch gives the same parameters (float32 round-off) for MAML and iMAML, also
when the meta-batch does not divide evenly and when a rank gets no task; a one-process run resumes
under torchrun; a rank that is killed or hangs makes the other stop with one line and torchrun
exit non-zero within ``--dist-timeout``, and the last checkpoint stays usable.

    python -m pytest -q tests/test_distributed.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metagrad_env

import metagrad as mg
from metagrad.training import RunDir
from metagrad.training.distributed import share

FAST = ["--no-tensorboard", "--no-progress", "--log-every", "1", "--eval-tasks", "15"]


def torchrun_command(*args: str, script: Path | None = None) -> list[str]:
    """``torchrun --standalone --nproc-per-node 2 -m metagrad ARGS`` with this interpreter
    (``script ARGS`` instead of ``-m metagrad ARGS`` when given)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    target = [str(script)] if script is not None else ["-m", "metagrad"]
    return [*launcher, "--nproc-per-node", "2", *target, *args]


def torchrun(
    *args: str, env: dict[str, str] | None = None, script: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        torchrun_command(*args, script=script),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**metagrad_env(), **(env or {})},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


def wait_for_step(proc: subprocess.Popen[str], step: int, timeout: float = 120) -> str:
    """Read rank 0's log lines until it reports ``step``; returns what it read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None, "start the process with stderr=subprocess.PIPE"
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, f"the run ended before step {step}:\n{''.join(seen)}"
        seen.append(line)
        if line.startswith(f"step {step}/"):
            return "".join(seen)
    raise AssertionError(f"no step {step} within {timeout}s:\n{''.join(seen)}")


def reference(tmp_path: Path, name: str, flags: dict[str, object]) -> mg.TrainResult:
    """The same run in this process, without torch.distributed."""
    config = mg.preset(name).override(tensorboard=False, log_every=1, eval_tasks=15, **flags)
    return mg.train(config, tmp_path / "one", progress=False)


def params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["params"]


def assert_same_run(one: Path, two: Path) -> None:
    """Parameters, logged losses and the test evaluation agree to float32 round-off.

    One step's meta-gradient differs by about 5e-8 (relative) between one process and two ranks
    (the sum over the tasks is grouped differently); the training dynamics amplify that: iMAML's
    parameters after 8 steps move by about 2e-6 when the initialisation is perturbed by 1e-7 in
    a single process. Wrong weights of the ranks' shares would move them by about 1e-3.
    """
    a, b = params(one), params(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-5, msg=k)
    la, lb = (mg.load_run(r).step for r in (one, two))
    assert la == lb
    logs = [RunDir(r).metrics() for r in (one, two)]
    for key in ("query_loss", "test_loss", "test_loss_before"):  # the last test line: the end
        ma, mb = ([(m["step"], m[key]) for m in log if key in m] for log in logs)
        if key.startswith("test"):
            ma, mb = ma[-1:], mb[-1:]
        assert [s for s, _ in ma] == [s for s, _ in mb], key
        assert [v for _, v in mb] == pytest.approx([v for _, v in ma], rel=1e-4), key


def test_shares_are_contiguous_and_cover_the_batch():
    for world in range(1, 6):
        for n in range(0, 12):
            parts = [share(n, r, world) for r in range(world)]
            assert parts[0].start == 0 and parts[-1].stop == n
            assert all(p.stop == q.start for p, q in zip(parts, parts[1:], strict=False))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "meta_batch", "mode"),
    [
        ("sinusoid-maml", 5, "vmap"),  # 3 + 2 tasks
        ("sinusoid-imaml-gd", 3, "loop"),  # 2 + 1 tasks
        ("sinusoid-maml", 1, "vmap"),  # rank 1 has no task
    ],
)
def test_two_ranks_match_one_process(tmp_path, name, meta_batch, mode):
    flags = {"steps": 8, "meta_batch": meta_batch, "mode": mode, "checkpoint_every": 4}
    args = ["--preset", name, "--steps", "8", "--meta-batch", str(meta_batch), "--mode", mode]
    proc = torchrun("train", *args, *FAST, "--out", str(tmp_path / "two"))
    one = reference(tmp_path, name, flags)  # while the ranks start
    out, _ = finish(proc)
    assert out.count("run: ") == 1, out  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")) == [
        ".lock"
    ]
    assert_same_run(one.path, tmp_path / "two")


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_run_resumes_under_torchrun(tmp_path):
    flags = {"steps": 10, "meta_batch": 5, "checkpoint_every": 5}
    half = mg.preset("sinusoid-maml").override(
        tensorboard=False, log_every=1, eval_tasks=15, **{**flags, "steps": 5}
    )
    mg.train(half, tmp_path / "two", progress=False)
    proc = torchrun("train", "--resume", str(tmp_path / "two"), "--steps", "10", "--no-progress")
    one = reference(tmp_path, "sinusoid-maml", flags)
    finish(proc)
    assert_same_run(one.path, tmp_path / "two")
    steps = [m["step"] for m in RunDir(tmp_path / "two").metrics() if "query_loss" in m]
    assert steps == list(range(1, 11))


def child_with_rank(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker process of ``rank`` (read from its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


LONG = ["--preset", "sinusoid-maml", "--steps", "100000", "--meta-batch", "5"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers in /proc")
def test_killed_rank_stops_the_other_and_the_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    args = [*LONG, *FAST, "--checkpoint-every", "3", "--dist-timeout", "20"]
    proc = torchrun("train", *args, "--out", str(run))
    rank0, rank1 = child_with_rank(proc.pid, 0), child_with_rank(proc.pid, 1)
    wait_for_step(proc, 7)
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # a guard against a hang, not a measurement
    assert proc.returncode != 0, err
    assert not alive(rank0)
    lines = [ln for ln in err.splitlines() if ln.startswith("metagrad: error:")]
    assert lines and "rank 0 of 2" in lines[0] and "another rank ended" in lines[0], err
    step = mg.load_run(run).step
    assert step >= 6 and step % 3 == 0
    done = mg.resume(run, steps=step + 2, progress=False, eval_tasks=5)  # the checkpoint works
    assert done.step == step + 2


STALLING = """\
# torchrun's worker for the hung-rank test: `metagrad ARGS`, except that rank {rank} hangs in its
# {call}-th meta-gradient (the reducer's public method, patched here, not in metagrad).
import sys
import time

from metagrad import cli
from metagrad.training.distributed import AllReduce

calls = 0
meta_gradient = AllReduce.meta_gradient


def stalling(self, *args, **kwargs):
    global calls
    calls += 1
    if self.rank == {rank} and calls == {call}:
        while True:
            time.sleep(3600)
    return meta_gradient(self, *args, **kwargs)


AllReduce.meta_gradient = stalling
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_hung_rank_stops_the_other_within_the_timeout(tmp_path):
    args = [*LONG, *FAST, "--checkpoint-every", "2", "--dist-timeout", "4"]
    script = tmp_path / "stalling.py"
    script.write_text(STALLING.format(rank=1, call=4))
    proc = torchrun("train", *args, "--out", str(tmp_path / "run"), script=script)
    wait_for_step(proc, 3)
    _, err = proc.communicate(timeout=90)  # a guard against a hang, not a measurement
    assert proc.returncode != 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("metagrad: error:")]
    assert len(lines) == 1 and "no answer within --dist-timeout 4s" in lines[0], err
    assert "Traceback" not in err.split("metagrad: error:")[0]
    assert mg.load_run(tmp_path / "run").step == 2
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["optim"]["meta_batch"] == 5
