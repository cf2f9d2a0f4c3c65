"""The training loop in one process: run folder, load_run, resume, checkpoints, divergence."""

from __future__ import annotations

import json
import os

import pytest
import torch

import metagrad.training.checkpoint as ckpt
from metagrad.training import Config, TrainingError, load_run, preset, resume, task_seed, train

TINY = dict(steps=12, meta_batch=3, log_every=4, checkpoint_every=5, eval_tasks=20)


def tiny(**changes):
    return preset("quickstart").override(**{**TINY, "tensorboard": False, **changes})


def test_run_folder_holds_everything(tmp_path):
    config = tiny(tensorboard=True, eval_every=6, val_tasks=10)
    result = train(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "curves.png", "adapted.png"} <= names
    assert "eval_test.json" in names and any((run / "tensorboard").iterdir())
    record = json.loads((run / "config.json").read_text())
    assert Config.from_dict(record["config"]) == config and record["data_split"] is None
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "query_loss" in m] == [4, 8, 12]
    assert [m["step"] for m in lines if "val_loss" in m] == [6, 12]
    assert all(m["query_loss"] > 0 for m in lines if "query_loss" in m)
    loaded = load_run(run)
    assert loaded.step == 12 and loaded.config == config
    assert all(torch.equal(loaded.params[k], result.params[k].detach()) for k in loaded.params)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state["rng"]) >= {"generators", "torch", "numpy", "python"}
    assert state["optimizer"]["state"], "the optimiser state is saved"
    ev = result.evaluation
    assert ev.tasks == 20 and ev.steps == 10 and ev.loss > 0 and ev.loss_before > 0


def _params(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_resume_continues_bit_for_bit(tmp_path):
    whole = train(tiny(steps=16), tmp_path / "whole", progress=False)
    train(tiny(steps=7), tmp_path / "part", progress=False)
    resumed = resume(tmp_path / "part", progress=False, steps=16)
    assert resumed.step == 16
    a, b = _params(tmp_path / "whole"), _params(tmp_path / "part")
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][n]) for n, v in s.items())
    assert whole.evaluation == resumed.evaluation
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part/metrics.jsonl").open()]
    assert steps == sorted(steps), "log lines past the checkpoint are dropped on resume"


def test_training_restores_global_torch_settings(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train(tiny(steps=2, threads=1), tmp_path / "run", progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)


def test_bf16_precision_trains_in_bfloat16_and_keeps_fp32_state(tmp_path):
    fp32 = train(tiny(steps=40), tmp_path / "fp32", progress=False)
    bf16 = train(tiny(steps=40, precision="bf16"), tmp_path / "bf16", progress=False)
    assert not torch.is_autocast_enabled("cpu")  # restored after the run
    state = _params(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in state["params"].values())
    # bfloat16 arithmetic changes the trajectory (it ran), and the result is fp32's within the CI.
    assert any(not torch.equal(fp32.params[k], bf16.params[k]) for k in fp32.params)
    a, b = fp32.evaluation, bf16.evaluation
    assert abs(a.loss - b.loss) < a.loss_ci and abs(a.loss_before - b.loss_before) < a.loss_ci


def test_a_non_finite_meta_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny(optimizer="sgd", outer_lr=3.0, steps=50, checkpoint_every=1)
    with pytest.raises(TrainingError) as info:
        train(config, tmp_path / "run", progress=False)
    message = str(info.value)
    state = _params(tmp_path / "run")
    step = state["step"]
    assert f"at step {step}," in message and f"manual_seed({task_seed(0, step)})" in message
    assert "last good checkpoint" in message
    assert 0 < step < 50 and all(v.isfinite().all() for v in state["params"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt.save_atomic({"step": 1, "x": torch.ones(3)}, tmp_path / "checkpoint.pt")

    def torn(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn)
    with pytest.raises(OSError):
        ckpt.save_atomic({"step": 2}, tmp_path / "checkpoint.pt")
    assert ckpt.load_checkpoint(tmp_path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"], "no temporary file is left behind"


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"step": 1, "evil": Evil()}, tmp_path / "checkpoint.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        ckpt.load_checkpoint(tmp_path)


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(tmp_path, capsys):
    train(tiny(steps=4, log_every=2), tmp_path / "a", progress=False)
    err = capsys.readouterr().err
    assert "step 2/4" in err and "steps/s" in err and "ETA" in err
    train(tiny(steps=4, log_every=2), tmp_path / "b", progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "step/s" in err and "loss=" in err


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_the_outer_adam_takes_adam_eps(eps):
    # Adam's first step, bias-corrected, is lr g / (|g| + eps): the closed form, not torch's code.
    from metagrad.training.loop import _optimizer

    config = preset("quickstart").override(outer_lr=0.1, adam_eps=eps)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1e-3, -2e-4, 5.0], dtype=torch.float64)
    optimizer = _optimizer(config, [w])
    w.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(w.detach(), -0.1 * g / (g.abs() + eps))
