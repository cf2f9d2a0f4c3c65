"""Experiments 4-6 (omniglot-table, leap-omniglot, lake-runs): the budget plan, the held-out SGD
protocol against a naive loop, the published numbers, and each experiment's --quick run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import shared_root

import metagrad as mg
from metagrad.experiments import MISSING, Options, run_experiment
from metagrad.experiments import lake_runs as lr
from metagrad.experiments import leap_omniglot as lo
from metagrad.experiments import omniglot_table as ot
from metagrad.training import RunDir, preset


def test_train_seconds_adds_the_log_windows(tmp_path):
    lines = [
        {"step": 10, "steps_per_s": 5.0, "query_loss": 1.0},
        {"step": 10, "test_loss": 0.5},  # an evaluation line: no time
        {"step": 15, "steps_per_s": 2.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert ot.train_seconds(tmp_path) == pytest.approx(10 / 5.0 + 5 / 2.5)


def test_planned_steps_come_from_the_flag_the_run_or_the_measured_step_time(tmp_path, monkeypatch):
    config = ot.cell_config("MAML", 5, 1)
    monkeypatch.setattr(ot, "step_seconds", lambda c: 2.0)
    one_minute = ot.planned(config, tmp_path / "new", 1.0, None)
    assert one_minute.optim.steps == 30
    assert one_minute.run.log_every == 1 and one_minute.run.checkpoint_every == 6
    assert ot.planned(config, tmp_path / "new", 1.0, 7).optim.steps == 7
    assert ot.planned(config, tmp_path / "new", None, None).optim.steps == 60_000
    RunDir.create(tmp_path / "run", config.override(steps=12), None).close()
    monkeypatch.setattr(ot, "step_seconds", lambda c: pytest.fail("a plan is made once"))
    assert ot.planned(config, tmp_path / "run", 1.0, None).optim.steps == 12
    assert ot.planned(config, tmp_path / "run", 1.0, 20).optim.steps == 20, "--steps continues"


def test_a_new_cell_trains_in_the_batching_mode_its_plan_timed_faster(tmp_path, monkeypatch):
    config = ot.cell_config("MAML", 5, 5)
    assert config.algo.mode == "loop" and ot.modes("MAML", "cpu") == ("loop", "vmap")
    assert ot.modes("Reptile", "cpu") == ("loop",) and ot.modes("MAML", "cuda") == ("loop",)
    for faster, times in (
        ("vmap", {"loop": 0.3, "vmap": 0.2}),
        ("loop", {"loop": 0.3, "vmap": 1.8}),
    ):
        monkeypatch.setattr(ot, "mode_seconds", lambda c, modes, t=times: {m: t[m] for m in modes})
        cell = tmp_path / faster
        ot.record_plan(config, cell, ot.modes("MAML", "cpu"))
        plan = json.loads(ot.plan_path(cell).read_text())
        assert plan["mode"] == faster and plan["step_seconds"] == times[faster]
        assert plan["mode_step_seconds"] == times
        assert ot.plan_mode(cell, "MAML", "cpu") == faster
    old = tmp_path / "before"  # a plan saved before plans chose: vmap where VMAP names the cell
    ot.plan_path(old).write_text(json.dumps({"step_seconds": 0.35}))
    assert (
        ot.plan_mode(old, "MAML", "cpu") == "vmap" and ot.plan_mode(old, "Reptile", "cpu") == "loop"
    )
    assert ot.plan_mode(tmp_path / "none", "Leap", "cpu") == "loop"


def test_mode_seconds_interleaves_the_modes_and_drops_the_warm_up_round(monkeypatch):
    """Every round samples a meta-batch and times each mode once, the first mode rotating; the
    warm-up round is not counted; the median of the rest is each mode's step time."""
    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(ot, "meta_gradient", lambda est, theta, batch, mode: calls.append(mode))
    monkeypatch.setattr(ot.time, "perf_counter", lambda: float(next(clock)))
    sampled: list[int] = []
    source = type("Source", (), {"sample": lambda self, split, n, g: sampled.append(n)})()
    monkeypatch.setattr(ot, "_source", lambda data: source)  # no images: nothing is computed
    monkeypatch.setattr(ot, "to_device", lambda batch, device: batch)
    config = ot.cell_config("MAML", 5, 1).override(root="unused", meta_batch=2)
    seconds = ot.mode_seconds(config, ("loop", "vmap"), repeats=3)
    assert calls == ["loop", "vmap", "vmap", "loop", "loop", "vmap", "vmap", "loop"]
    assert seconds == {"loop": 1.0, "vmap": 1.0}  # each call takes one tick of the fake clock
    assert sampled == [2] * 8, "a new meta-batch for every timed call"
    calls.clear()
    assert ot.step_seconds(config.override(mode="vmap"), repeats=2) == 1.0 and calls == ["vmap"] * 3


def test_a_new_cell_records_its_step_time_once_and_its_curve_comes_from_validation(
    tmp_path, monkeypatch
):
    config = ot.cell_config("MAML", 5, 1)
    monkeypatch.setattr(ot, "mode_seconds", lambda c, modes: {"loop": 0.25})
    ot.record_plan(config, tmp_path / "cell")
    plan = json.loads(ot.plan_path(tmp_path / "cell").read_text())
    assert plan["step_seconds"] == 0.25 and len(plan["load_average_before"]) == 3
    monkeypatch.setattr(ot, "mode_seconds", lambda c, modes: pytest.fail("measured once"))
    ot.record_plan(config, tmp_path / "cell")
    ten = ot.planned(config, tmp_path / "cell", 1.0, None)
    assert ten.optim.steps == 240 and ten.run.eval_every == 24, "the plan's time; 10 validations"
    lines = [
        {"step": 24, "query_loss": 1.0, "steps_per_s": 4.0},
        {"step": 24, "val_loss": 0.9, "val_accuracy": 0.5},
        {"step": 48, "val_loss": 0.5, "val_accuracy": 0.75},
    ]
    RunDir.create(tmp_path / "cell", ten, None).close()
    (tmp_path / "cell" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert ot.curve(tmp_path / "cell") == [(24, 50.0), (48, 75.0)]


@pytest.mark.parametrize(("ways", "shots"), ot.SETTINGS)
def test_every_cell_has_a_config_and_leap_walks_maml_test_steps(ways, shots):
    for name in ot.ALGORITHMS:
        config = ot.cell_config(name, ways, shots)
        assert (config.data.ways, config.data.eval_shots or config.data.shots) == (ways, shots)
        assert config.run.threads == 0 and config.run.eval_tasks == 600, "every core"
    maml, leap = preset(f"omniglot-{ways}w{shots}s-maml"), ot.cell_config("Leap", ways, shots)
    assert leap.algo.algorithm == "leap"
    assert leap.algo.inner_steps == leap.algo.eval_inner_steps == maml.algo.eval_inner_steps


def test_published_numbers_are_the_quoted_ones_with_their_sources():
    assert set(ot.PUBLISHED) <= set(ot.ALGORITHMS) and "Leap" not in ot.PUBLISHED
    numbers = {name: values for name, (values, _, _) in ot.PUBLISHED.items()}
    assert numbers["MAML"] == {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}
    assert numbers["iMAML-HF"][(20, 1)] == 96.18 and numbers["iMAML-GD"] == {
        (5, 1): 99.16,
        (20, 1): 94.46,
    }
    assert all(src for _, src, _ in ot.PUBLISHED.values())
    assert not ot.PUBLISHED["ANIL"][2], "from memory: marked uncertain"
    assert numbers["Meta-SGD"] == {(5, 1): 99.53, (5, 5): 99.93, (20, 1): 95.93, (20, 5): 98.97}
    assert not ot.PUBLISHED["Meta-SGD"][2] and ot._paper("Meta-SGD", (5, 1)) == "99.53 (?)"
    assert list(ot.ALGORITHMS)[:7] == [
        "MAML", "FOMAML", "Reptile", "iMAML-GD", "iMAML-HF", "ANIL", "Leap"
    ], "the finished cells' order"  # fmt: skip
    assert ot.cell_config("Meta-SGD", 20, 1).algo.learn_lr == "parameter"
    assert ot._paper("ANIL", (20, 1)).endswith("(?)") and ot._paper("Leap", (5, 1)) == (
        "not reported"
    )


def _naive_sgd(loss, theta, tasks, steps, seed):
    """One task at a time, one step at a time: the held-out protocol written out."""
    n_tasks, n = tasks.support.y.shape
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * lo.SGD_BATCH // n)
    orders = [
        torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)]) for _ in range(n_tasks)
    ]
    curves, errors = [], []
    for t in range(n_tasks):
        params, curve = dict(theta), []
        for s in range(steps):
            idx = orders[t][s * lo.SGD_BATCH : (s + 1) * lo.SGD_BATCH]
            batch = mg.Batch(tasks.support.x[t, idx], tasks.support.y[t, idx])
            value = loss(params, batch)
            grads = torch.autograd.grad(value, list(params.values()))
            params = {
                k: p - lo.SGD_LR * gk for (k, p), gk in zip(params.items(), grads, strict=True)
            }
            curve.append(float(value.detach()))
        query = mg.Batch(tasks.query.x[t], tasks.query.y[t])
        errors.append(1 - float(loss.accuracy(params, query)))
        curves.append(curve)
    return np.array(curves).T, np.array(errors)


def test_held_out_sgd_matches_a_naive_loop_and_its_auc_is_the_trapezoid():
    torch.manual_seed(0)
    model = mg.models.Conv4(1, 3, hidden=8).double()
    loss = mg.loss_fn(model, "cross_entropy")
    theta = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 30, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(10).expand(2, 30)
    tasks = mg.Task(mg.Batch(x, y), mg.Batch(x[:, :9], y[:, :9]))
    got = lo.sgd_curves(loss, theta, tasks, steps=4, seed=3)  # 4 batches of 20 from 30: 2 epochs
    curve, error = _naive_sgd(loss, {k: v.requires_grad_() for k, v in theta.items()}, tasks, 4, 3)
    np.testing.assert_allclose(got["curve"], curve, rtol=1e-10)
    np.testing.assert_allclose(got["error"], error)
    np.testing.assert_allclose(got["auc"], np.trapezoid(curve, axis=0) / 4, rtol=1e-10)


def test_options_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--lake-runs does not apply"):
        run_experiment("omniglot-table", Options(out=tmp_path, lake_runs=tmp_path))
    with pytest.raises(ValueError, match="--lake-runs does not apply"):
        run_experiment("leap-omniglot", Options(out=tmp_path, lake_runs=tmp_path))
    for name in ("lake-runs", "sinusoid", "uncertainty", "complexity"):
        with pytest.raises(ValueError, match="--cells does not apply"):
            run_experiment(name, Options(out=tmp_path, cells=("MAML",)))


def test_every_finished_cell_is_listed_with_its_preset_planned_budget_and_load(tmp_path):
    cell = {"accuracy": 97.0, "ci": 0.59, "tasks": 600, "preset": "omniglot-5w1s-maml"}
    cell |= {"mode": "vmap", "seed": 0, "steps": 8533, "train_seconds": 2746.2}
    cell |= {"step_seconds": 0.3516, "load_average": [1.14, 1.5, 1.58], "curve": [(853, 95.1)]}
    reptile = cell | {"preset": "omniglot-20w1s-reptile", "mode": "loop", "load_average": None}
    results = {"5w1s": {"MAML": [cell]}, "20w1s": {"Reptile": [reptile]}}
    info = {"budget": "b", "protocol": "p"}
    _, _, each = ot.report(Options(out=tmp_path), results, info).tables
    assert each.rows == [
        ["5w1s", "MAML", 0, "omniglot-5w1s-maml", "vmap", 8533, "0.352", "50", "2746", "1.14",
         "97.00 ± 0.59", "98.70"],
        ["20w1s", "Reptile", 0, "omniglot-20w1s-reptile", "loop", 8533, "0.352", "50", "2746", None,
         "97.00 ± 0.59", "89.43"],
    ]  # fmt: skip


def test_cells_name_a_cell_a_setting_or_an_algorithm():
    every = ot.selected(None)
    assert len(every) == len(ot.SETTINGS) * len(ot.ALGORITHMS)
    assert ot.selected(("5w1s/imaml-hf",)) == {("5w1s", "iMAML-HF")}
    assert ot.selected(("20w1s",)) == {("20w1s", n) for n in ot.ALGORITHMS}
    assert ot.selected(("MAML",)) == {(k, "MAML") for k in ("5w1s", "5w5s", "20w1s", "20w5s")}
    both = ot.selected(("5w5s/Reptile", "20w5s/Meta-SGD", "5w5s/reptile"))
    assert both == {("5w5s", "Reptile"), ("20w5s", "Meta-SGD")}
    for wrong in (("5w2s/MAML",), ("MAMLL",), ("10w1s",)):
        with pytest.raises(ValueError, match="no cell .* settings 5w1s, 5w5s, 20w1s, 20w5s"):
            ot.selected(wrong)
    with pytest.raises(ValueError, match="--cells is empty"):
        ot.selected(())


def test_only_the_chosen_cells_train_and_finished_others_are_reused(tmp_path, monkeypatch):
    """``--cells 5w1s/Reptile``: Reptile 5-way 1-shot trains; MAML's finished cell is reused
    (run_cell reuses it without training); every other cell is left alone, not even planned."""
    reused = tmp_path / "cells" / "omniglot-table" / "5w1s" / "MAML-seed0"
    ran, planned = [], []
    monkeypatch.setattr(ot, "finished", lambda path: path == reused)
    monkeypatch.setattr(ot, "record_plan", lambda config, path, modes: planned.append(path))
    monkeypatch.setattr(ot, "run_cell", lambda config, path: ran.append(path) or False)
    options = Options(out=tmp_path, data=shared_root(), steps=3, cells=("5w1s/Reptile",))
    ot.run(options)
    assert [p.relative_to(tmp_path / "cells" / "omniglot-table") for p in ran] == [
        reused.relative_to(tmp_path / "cells" / "omniglot-table"),
        ot.Path("5w1s/Reptile-seed0"),
    ]
    assert planned == ran


def test_lake_table_says_whose_runs_it_scored():
    result = {"lake_error": 50.0, "lake_ci": 5.0, "across_error": 40.0, "across_ci": 1.0}
    result |= {"steps": 3, "train_seconds": 9.0}
    ours = lr._table([result], False, 1.0, None, lr.FULL)
    assert "NOT the official" in ours.columns[1] and "50.0 ± 5.0" in ours.rows[0]
    assert any("not the same test" in n for n in ours.notes)
    official = lr._table([], True, None, 10, lr.FULL)
    assert "official 20 runs" in official.columns[1] and official.rows[0][1] is None
    assert [r[1] for r in official.rows[1:]] == ["4.5", "3.3"]


@pytest.mark.slow
def test_omniglot_table_quick_fills_5w1s_then_reuses_its_cells(tmp_path):
    options = Options(out=tmp_path, quick=True, data=shared_root())
    report = run_experiment("omniglot-table", options)
    acc, cost, each = report.tables
    assert [r[0] for r in acc.rows] == list(ot.ALGORITHMS)
    assert all(r[1] is not None and r[3] is None for r in acc.rows), "5w1s only, rest missing"
    assert all(r[1] is not None for r in cost.rows) and MISSING in report.to_markdown()
    assert [(r[0], r[1]) for r in each.rows] == [("5w1s", n) for n in ot.ALGORITHMS]
    assert each.rows[0][3] == "omniglot-5w1s-maml" and each.rows[0][4] in ("loop", "vmap")
    for name in ("omniglot-table.md", "omniglot-table.json", "omniglot_table.png"):
        assert (tmp_path / name).is_file(), name
    result = report.info["results"]["5w1s"]["MAML"][0]
    assert 0 <= result["accuracy"] <= 100 and result["tasks"] == ot.QUICK["tasks"]
    checkpoint = tmp_path / "cells" / "omniglot-table" / "5w1s" / "MAML-seed0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    again = run_experiment("omniglot-table", options)
    assert checkpoint.stat().st_mtime_ns == before, "a finished cell is reused, not retrained"
    assert again.tables[0].rows == acc.rows


@pytest.mark.slow
def test_leap_omniglot_quick(tmp_path):
    report = run_experiment("leap-omniglot", Options(out=tmp_path, quick=True, data=shared_root()))
    auc, error, paired, cost = report.tables
    assert [r[0] for r in auc.rows] == [*lo.ALGORITHMS, lo.BASELINE]
    assert all(c is not None for r in auc.rows + error.rows + paired.rows for c in r)
    scores = report.info["scores"]
    base = scores[lo.BASELINE][0][0]["auc"]
    for row in paired.rows:  # a paired mean is the difference of the two means
        for n, cell in zip(lo.QUICK["alphabets"], row[1:], strict=True):
            mine = scores[row[0]][n][0]["auc"]
            want = sum(mine) / len(mine) - sum(base) / len(base)
            assert float(cell.split(" ± ")[0]) == pytest.approx(want, abs=6e-4), (row[0], n)
    assert len(set(auc.rows[-1][1:])) == 1, "no meta-training: one number for every column"
    assert all(c.startswith("1 / ") for r in cost.rows for c in r[1:])
    assert (tmp_path / "leap_omniglot.png").is_file()
    cell = tmp_path / "cells" / "leap-omniglot" / "Leap-3-alphabets-seed0"
    held = json.loads((cell / "held_out.json").read_text())
    assert len(held["auc"]) == len(held["test_alphabets"]) == 10
    assert len(held["curve"]) == lo.QUICK["sgd_steps"]


def test_lake_and_leap_runs_train_on_every_core_as_the_table_cells():
    assert lr.cell_config().run.threads == 0 and lr.cell_config().data.split == "lake"
    for name in lo.ALGORITHMS:
        assert lo.cell_config(name, 5).run.threads == 0, name


def test_leap_cells_name_a_run_an_alphabet_count_or_an_algorithm():
    every = lo.selected(None)
    assert len(every) == len(lo.ALPHABETS) * len(lo.ALGORITHMS)
    assert lo.selected(("5/leap",)) == {("5", "Leap")}
    assert lo.selected(("25",)) == {("25", n) for n in lo.ALGORITHMS}
    assert lo.selected(("Leap",)) == {(str(n), "Leap") for n in lo.ALPHABETS}
    assert lo.selected(("1/MAML", "3/reptile")) == {("1", "MAML"), ("3", "Reptile")}
    for wrong in (("2/Leap",), ("Leapp",), ("Leap/5",), ("30",)):
        with pytest.raises(ValueError, match="no cell .* alphabet counts 1, 3, 5, 10, 15, 20, 25"):
            lo.selected(wrong)
    with pytest.raises(ValueError, match="--cells is empty"):
        lo.selected(())


@pytest.mark.slow
def test_leap_cells_train_only_the_named_runs(tmp_path):
    """``--cells 3/Leap`` on the quick sweep: Leap on 3 alphabets trains and is scored beside the
    no-meta-training baseline; no other run is made and their cells stay missing."""
    options = Options(out=tmp_path, quick=True, data=shared_root(), cells=("3/Leap",))
    auc, _, paired, _ = run_experiment("leap-omniglot", options).tables
    made = sorted(p.name for p in (tmp_path / "cells" / "leap-omniglot").iterdir() if p.is_dir())
    assert made == ["Leap-3-alphabets-seed0"]
    rows = {r[0]: r[1:] for r in auc.rows}
    assert rows["Leap"][0] is None and rows["Leap"][1] is not None  # columns 1, 3
    assert all(c is None for name in ("Reptile", "FOMAML", "MAML") for c in rows[name])
    assert all(c is not None for c in rows[lo.BASELINE])
    assert {r[0]: r[1:] for r in paired.rows}["Leap"][1] is not None


@pytest.mark.slow
def test_lake_runs_quick_builds_and_says_our_runs(tmp_path):
    report = run_experiment("lake-runs", Options(out=tmp_path, quick=True, data=shared_root()))
    assert not report.info["official_runs"]
    assert "NOT the official" in report.tables[0].columns[1]
    runs = tmp_path / "cells" / "lake-runs" / "our_runs"
    assert len(list(runs.glob("run*/class_labels.txt"))) == 20
    errors = report.info["results"][0]["lake_errors"]
    assert len(errors) == 20 and all(abs(e / 5 - round(e / 5)) < 1e-6 for e in errors)
    assert (tmp_path / "lake_runs.png").is_file()
