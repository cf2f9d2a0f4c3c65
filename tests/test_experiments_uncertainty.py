"""``metagrad experiment uncertainty``: the fitted noise against its closed forms, the per-curve
scores against hand-computed ones, the true curve recovered from its points, and the quick run."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from data_fixtures import shared_root

import metagrad as mg
from metagrad.experiments import Options, run_experiment
from metagrad.experiments import uncertainty as un
from metagrad.training import preset


def _residuals(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(20, 30, generator=g, dtype=torch.float64)
    y = mean + 0.7 * torch.randn(20, 30, generator=g, dtype=torch.float64)
    return mean, y


def test_without_spread_the_fitted_noise_is_the_root_mean_squared_error():
    mean, y = _residuals()
    rmse = math.sqrt(sum(float(r) ** 2 for r in (y - mean).reshape(-1)) / y.numel())
    assert un.fit_noise(mean, torch.zeros_like(mean), y) == pytest.approx(rmse, rel=1e-12)


def test_with_a_constant_spread_the_fitted_noise_is_the_closed_form_to_the_grid():
    mean, y = _residuals(1)
    spread = torch.full_like(mean, 0.2)  # the pooled likelihood is best at noise^2 = mse - 0.2
    best = math.sqrt(float(((y - mean) ** 2).mean()) - 0.2)
    step = float(un.NOISE_GRID[1] / un.NOISE_GRID[0])  # the grid's ratio between neighbours
    assert un.fit_noise(mean, spread, y) == pytest.approx(best, rel=step - 1)


def test_scores_are_the_hand_computed_ones():
    mean = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, 1.0, 0.0, 3.1]], dtype=torch.float64)
    var = torch.tensor([[1.0, 0.25, 1.0, 4.0]], dtype=torch.float64)
    out = un.scores(mean, var, y)
    r, v = (y - mean)[0].tolist(), var[0].tolist()
    nll = (
        sum(0.5 * math.log(2 * math.pi * s) + e * e / (2 * s) for e, s in zip(r, v, strict=True))
        / 4
    )
    assert out["mse"][0] == pytest.approx(sum(e * e for e in r) / 4)
    assert out["nll"][0] == pytest.approx(nll)
    levels = (0.5, 0.9, 0.95)
    hand = [
        sum(
            abs(e) <= NormalDist().inv_cdf((1 + p) / 2) * math.sqrt(s)
            for e, s in zip(r, v, strict=True)
        )
        / 4
        for p in levels
    ]
    assert out["coverage"] == pytest.approx(hand)
    assert out["calibration"][0] == pytest.approx(
        sum(abs(c - p) for c, p in zip(hand, levels, strict=True)) / 3
    )


def test_pooled_ece_is_the_hand_computed_one_over_all_tasks():
    # two tasks of two predictions; confidences 0.9, 0.6 (task 0) and 0.9, 0.7 (task 1)
    probs = [
        torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64),
        torch.tensor([[0.1, 0.9], [0.7, 0.3]], dtype=torch.float64),
    ]
    labels = [torch.tensor([0, 0]), torch.tensor([1, 1])]
    # bins of width 1/15: 0.9 -> bin 13 (both right), 0.6 -> bin 9 (wrong), 0.7 -> bin 10 (wrong)
    hand = 0.5 * abs(1.0 - 0.9) + 0.25 * abs(0.0 - 0.6) + 0.25 * abs(0.0 - 0.7)
    value, half_width = un.pooled_ece(probs, labels, resamples=50)
    assert value == pytest.approx(hand, abs=1e-12)
    assert half_width > 0  # the tasks differ, so resampling them moves the ECE
    same, zero = un.pooled_ece([probs[0]] * 4, [labels[0]] * 4, resamples=50)
    assert zero == 0.0 and same == pytest.approx(0.5 * 0.1 + 0.5 * 0.6, abs=1e-12)


def test_the_true_curve_is_recovered_from_the_query_points():
    tasks = mg.data.Sinusoid(shots=5, queries=12).sample(3, torch.Generator().manual_seed(4))
    for i in range(3):
        task = mg.task_at(tasks, i)
        assert torch.allclose(un._truth(task, task.support.x), task.support.y, atol=1e-5)


def test_options_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--seeds does not apply"):
        run_experiment("uncertainty", Options(out=tmp_path, quick=True, seeds=2))


@pytest.mark.slow
def test_uncertainty_quick_scores_every_model_then_reuses_its_cells(tmp_path):
    options = Options(out=tmp_path, quick=True, data=shared_root())
    report = run_experiment("uncertainty", options)
    sinusoid, omniglot = report.tables
    assert [r[0] for r in sinusoid.rows].count("probabilistic iMAML") == 2 * len(un.SHOTS)
    assert all(None not in row for row in sinusoid.rows)
    assert [r[0] for r in omniglot.rows] == list(un.OMNIGLOT) and None not in omniglot.rows[2]
    for name in ("uncertainty.md", "uncertainty.json", "uncertainty_bands.png"):
        assert (tmp_path / name).is_file(), name
    k5 = report.info["sinusoid"]["probabilistic iMAML"]["K5"]
    assert k5["own"]["noise"] == preset(un.SINUSOID["probabilistic iMAML"]).algo.noise_std
    assert 0 < k5["fitted"]["noise"] and all(0 <= c <= 1 for c in k5["fitted"]["coverage"])
    checkpoint = tmp_path / "cells" / "sinusoid" / un.SINUSOID["MAML"] / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    again = run_experiment("uncertainty", options)
    assert checkpoint.stat().st_mtime_ns == before, "a finished cell is reused, not retrained"
    assert again.tables[0].rows == sinusoid.rows
