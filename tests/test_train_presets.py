"""Every preset trains end to end (a few steps), Omniglot ones on the shared data set."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import shared_root

import metagrad as mg
from metagrad.training import PRESETS, evaluate_run, preset, train

SHORT = dict(steps=2, meta_batch=2, eval_tasks=10, val_tasks=10, log_every=1, tensorboard=False)
SHORT["threads"] = 1  # on 2 busy cores one thread is several times faster than two


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].config.model.arch == "mlp"])
def test_sinusoid_presets_train(tmp_path, name):
    result = train(preset(name).override(**SHORT), tmp_path / "run", progress=False)
    assert result.step == 2 and result.evaluation.loss > 0
    assert all(v.isfinite().all() for v in result.params.values())


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_the_released_imaml_loop_trains_from_its_flags(tmp_path, mode):
    # --pullback and --adam-eps reach the estimator and the outer Adam (the Omniglot preset's
    # two changes, on the sinusoid preset that needs no data)
    config = preset("sinusoid-imaml-gd").override(pullback=0.005, adam_eps=1e-3, mode=mode)
    result = train(config.override(**SHORT), tmp_path / "run", progress=False)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.evaluation.loss))
    estimator = mg.training.build.build_estimator(config, mg.training.build.build_model(config))
    assert estimator.pullback == 0.005
    released = preset("omniglot-5w1s-imaml-gd-released")
    assert (released.algo.pullback, released.optim.adam_eps) == (0.1, 1e-3)
    paper = preset("omniglot-5w1s-imaml-gd")
    assert (paper.algo.pullback, paper.optim.adam_eps) == (None, 1e-8)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("omniglot-5w1s-maml", {"eval_every": 2}),
        ("omniglot-5w5s-imaml-hf", {"inner_steps": 1}),
        ("omniglot-20w1s-reptile", {"inner_steps": 2, "eval_inner_steps": 2}),
        ("leap-omniglot", {"inner_steps": 2, "eval_inner_steps": 2}),
    ],
)
def test_omniglot_presets_train(tmp_path, name, changes):
    config = preset(name).override(root=str(shared_root()), **{**SHORT, **changes})
    result = train(config, tmp_path / "run", progress=False)
    ev = result.evaluation
    assert result.step == 2 and 0 <= ev.accuracy <= 1 and ev.accuracy_ci >= 0
    record = json.loads((tmp_path / "run/config.json").read_text())
    split = record["data_split"]
    if name == "leap-omniglot":
        assert len(split["test"]) == 10 and len(split["train"]) == 25
        assert not set(split["test"]) & set(split["train"]) and ev.tasks == 10
    else:
        assert {k: len(v) for k, v in split.items() if k != "trainval"} == {
            "train": 4400,
            "val": 100,
            "test": 423,
        }
    lines = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").open()]
    assert all(0 <= m["query_accuracy"] <= 1 for m in lines if "query_accuracy" in m)


@pytest.mark.slow
def test_lake_runs_error_rate(tmp_path):
    root = shared_root()
    config = preset("omniglot-20w1s-maml").override(root=str(root), **SHORT)
    train(config, tmp_path / "run", progress=False)
    runs = mg.data.make_lake_runs(mg.data.Omniglot(root), tmp_path / "runs")
    ev, path = evaluate_run(tmp_path / "run", lake_runs=runs)
    assert ev.split == "lake" and ev.tasks == 20 and 0 <= ev.accuracy <= 1
    assert json.loads(path.read_text())["accuracy"] == ev.accuracy
    assert "error rate" in ev.summary()
    # Same parameters, same runs: the same number (the evaluation is deterministic).
    again, _ = evaluate_run(tmp_path / "run", lake_runs=runs)
    assert again == ev and torch.get_num_threads() >= 1
