"""Experiments 1-3 (sinusoid, metagrad-accuracy, compute-memory): --quick runs, resumable cells,
the budget, the closed form, and the `metagrad experiment` command line."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import metagrad as mg
from metagrad import cli
from metagrad.experiments import MISSING, Options, run_experiment
from metagrad.experiments import metagrad_accuracy as acc


def _cells(report, table=0):
    return [cell for row in report.tables[table].rows for cell in row[1:]]


@pytest.mark.slow
def test_sinusoid_quick_then_reuses_its_cells(tmp_path):
    report = run_experiment("sinusoid", Options(out=tmp_path, quick=True))
    assert [t.name for t in report.tables] == ["sinusoid_k10", "sinusoid_grid"]
    assert all(c is not None for t in range(2) for c in _cells(report, t))
    assert len(report.tables[1].rows) == 7 * 3
    for name in ("sinusoid.md", "sinusoid.json", "sinusoid_mse.png", "sinusoid_adapted.png"):
        assert (tmp_path / name).is_file(), name
    maml = report.info["results"]["MAML"][0]
    assert maml["K10-s0"]["mse"] > 0 and maml["K10-s10"]["lr"] == 0.01
    assert report.info["results"]["pre-trained"][0]["K10-s10"]["lr"] in (0.001, 0.003, 0.01,
                                                                        0.03, 0.1)  # fmt: skip
    checkpoint = tmp_path / "cells" / "sinusoid" / "MAML-seed0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    again = run_experiment("sinusoid", Options(out=tmp_path, quick=True))
    assert checkpoint.stat().st_mtime_ns == before, "a finished cell is reused, not retrained"
    assert again.tables[0].rows == report.tables[0].rows


def test_sinusoid_cells_not_started_after_the_budget_are_missing(tmp_path):
    report = run_experiment("sinusoid", Options(out=tmp_path, quick=True, budget_minutes=1e-9))
    assert set(_cells(report)) <= {None, "not reported", "0.67 / 0.38 / 0.35", "2.41 / 2.23 / 2.19"}
    assert MISSING in report.to_markdown() and report.figures == []


def test_a_diverged_sinusoid_model_is_missing_with_its_reason(tmp_path, monkeypatch):
    from metagrad.experiments import sinusoid

    bad, fine = ("sinusoid-maml", {"inner_lr": 1e30}), ("sinusoid-fomaml", {"inner_steps": 0})
    rows = {"MAML": bad, "pre-trained": fine}
    monkeypatch.setattr(sinusoid, "ALGORITHMS", rows)
    report = run_experiment("sinusoid", Options(out=tmp_path, quick=True, steps=2))
    maml, pretrained = report.tables[0].rows
    assert maml[1:5] == [None] * 4 and all(c is not None for c in pretrained[1:5])
    assert "MAML-seed0: non-finite" in report.info["failed"][0]
    assert "Diverged (missing): MAML-seed0" in report.to_markdown()


def test_a_cell_of_other_settings_is_not_reused(tmp_path):
    run_experiment("sinusoid", Options(out=tmp_path, quick=True, budget_minutes=1e-9))
    from metagrad.experiments._cells import run_cell
    from metagrad.experiments.sinusoid import cell_config

    path = tmp_path / "cell"
    assert run_cell(cell_config("FOMAML", 2, 0, "cpu", 5), path)
    assert run_cell(cell_config("FOMAML", 2, 0, "cpu", 5), path), "finished: reused"
    assert run_cell(cell_config("FOMAML", 3, 0, "cpu", 5), path), "longer: resumed"
    with pytest.raises(ValueError, match="other settings"):
        run_cell(cell_config("MAML", 3, 0, "cpu", 5), path)


def test_a_cell_whose_data_folder_moved_is_reused_then_resumed(tmp_path):
    from metagrad.experiments._cells import run_cell
    from metagrad.experiments.sinusoid import cell_config
    from metagrad.training.run import RunDir

    path, moved = tmp_path / "cell", str(tmp_path / "moved")
    config = cell_config("FOMAML", 2, 0, "cpu", 5)
    assert run_cell(config, path)
    before = (path / "metrics.jsonl").read_text()
    assert run_cell(config.override(root=moved), path), "finished: reused where it lies"
    assert (path / "metrics.jsonl").read_text() == before, "reused, not trained again"
    assert run_cell(config.override(root=moved, steps=3), path), "longer: resumed"
    assert (path / "metrics.jsonl").read_text() != before
    assert RunDir(path).config().optim.steps == 3


def test_closed_form_meta_gradient_matches_autograd_through_the_solve():
    """g* = (I + H/lam)^{-1} grad L_q(phi*), against autograd through phi*'s linear solve."""
    tasks, theta = acc.make_tasks(2, torch.Generator().manual_seed(1))
    task = mg.task_at(tasks, 0)
    (xs, ys), (xq, yq) = task

    def query_loss(th):
        h = 2 * xs.T @ xs / len(xs)
        c = 2 * xs.T @ ys[:, 0] / len(xs)
        phi = torch.linalg.solve(h + acc.LAM * torch.eye(acc.DIM, dtype=th.dtype), c + acc.LAM * th)
        return ((xq @ phi - yq[:, 0]) ** 2).mean()

    truth, _ = acc.exact(task, theta)
    torch.testing.assert_close(torch.func.grad(query_loss)(theta[0]), truth)


@pytest.mark.slow
def test_metagrad_accuracy_quick(tmp_path):
    report = run_experiment("metagrad-accuracy", Options(out=tmp_path, quick=True))
    errors = report.info["errors"]
    ks = sorted(errors["MAML"])
    first, last = ks[0], ks[-1]
    for name in ("MAML", "iMAML, c = K"):
        assert errors[name][last] < 0.1 * errors[name][first], name
    assert errors["FOMAML"][last] > 10 * errors["MAML"][last], "FOMAML is biased"
    assert errors["FOMAML, K = inf"]["0"] > 0.1
    assert errors["iMAML, exact inner"][last] < 1e-8, "CG to convergence is exact"
    assert (tmp_path / "metagrad_accuracy.png").is_file()


@pytest.mark.slow
def test_compute_memory_quick(tmp_path):
    report = run_experiment("compute-memory", Options(out=tmp_path, quick=True))
    seconds, memory = report.tables
    # Times are measurements: here only that each is recorded, finite and non-negative (a point
    # may round to 0.00 s on a fast machine); speed claims belong in benchmarks/.
    assert all(c is not None and math.isfinite(c) and c >= 0 for c in _cells(report, 0))
    for points in report.info["points"].values():
        for point in points.values():
            assert all(math.isfinite(t) and t >= 0 for t in point["times"])
            assert point["seconds"] == statistics.median(point["times"][1:])
    assert all(c is not None and c >= 0 for c in _cells(report, 1))
    maml = report.info["points"]["MAML"]
    assert maml["5"]["peak_mb"] > 1.3 * maml["1"]["peak_mb"], "MAML keeps every step's graph"
    cell = tmp_path / "cells" / "compute-memory" / "MAML-S1.json"
    saved = json.loads(cell.read_text())
    assert saved["spec"]["config"]["algo"]["inner_steps"] == 1
    assert (tmp_path / "compute_memory.png").is_file()
    before = cell.stat().st_mtime_ns
    again = run_experiment("compute-memory", Options(out=tmp_path, quick=True))
    assert cell.stat().st_mtime_ns == before, "a measured point is reused"
    assert again.tables[1].rows == memory.rows


def test_compute_memory_points_past_the_budget_are_missing(tmp_path):
    report = run_experiment("compute-memory", Options(out=tmp_path, budget_minutes=1e-9))
    assert all(c is None for c in _cells(report, 0) + _cells(report, 1))
    assert "larger --budget-minutes" in report.to_markdown()


def test_experiment_list_and_mistakes(capsys, tmp_path):
    assert cli.main(["experiment", "list"]) == 0
    listed = capsys.readouterr().out
    assert "sinusoid" in listed and "compute-memory" in listed and "metagrad-accuracy" in listed
    cases = [
        (["experiment", "nope"], "unknown experiment 'nope'"),
        (["experiment", "sinusoid", "--seeds", "0"], "expected a positive number"),
        (["experiment", "metagrad-accuracy", "--steps", "3"], "--steps does not apply"),
        (["experiment", "sinusoid", "--lake-runs", "x"], "--lake-runs does not apply"),
        (["experiment", "sinusoid", "--cells", "MAML"], "--cells does not apply"),
        (["experiment", "omniglot-table", "--cells", "5w2s/MAML"], "--cells: no cell '5w2s/MAML'"),
        (["experiment", "omniglot-table", "--cells", ","], "--cells is empty"),
    ]
    for argv, message in cases:
        assert cli.main([*argv, "--out", str(tmp_path / "x")]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
