"""The hypergradients experiment: its exact hypergradient against an independent dense formula,
the solvers' accuracy curve, the Omniglot split, and the --quick run (with the shared Omniglot)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import shared_root

import metagrad as mg
from metagrad import linalg
from metagrad.experiments import EXPERIMENTS, Options, _learned, run_experiment
from metagrad.experiments import hypergradients as hg


@pytest.mark.slow
def test_exact_hypergradient_equals_the_dense_implicit_function_formula():
    """dL_V/ds = -diag(exp(s) w*) H^{-1} grad L_V(w*), with H from torch.autograd.functional."""
    loss, w, hyper, train, val = hg.logistic_problem(seed=3)
    grads, _ = hg.hypergradient(loss, w, hyper, train, val, linalg.exact)
    shapes = {k: v.shape for k, v in w.items()}
    sizes = [v.numel() for v in w.values()]
    s = torch.cat([hyper[f"log_decay/{k}"].flatten() for k in w])

    def unflat(flat):
        weight, bias = flat.split(sizes)
        return weight.view(shapes["weight"]), bias.view(shapes["bias"])

    def training(flat):
        weight, bias = unflat(flat)
        return F.cross_entropy(train.x @ weight.T + bias, train.y) + 0.5 * (s.exp() * flat**2).sum()

    def validation(flat):
        weight, bias = unflat(flat)
        return F.cross_entropy(val.x @ weight.T + bias, val.y)

    flat = torch.cat([v.flatten() for v in w.values()])
    h = torch.autograd.functional.hessian(training, flat)
    g = torch.autograd.functional.jacobian(validation, flat)
    expected = -(s.exp() * flat) * torch.linalg.solve(h, g)
    got = torch.cat([grads[f"log_decay/{k}"].flatten() for k in w])
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-14)


@pytest.mark.slow
def test_the_accuracy_curves_reach_the_exact_hypergradient():
    n = 4 * 20 + 4  # unknowns of the logistic regression
    errors, inner = hg.accuracy(problems=1, products=(0, 2, n, 300))
    assert inner < 1e-9
    assert set(errors) == {*hg.METHODS, "identity"}
    cg = errors["CG"]
    assert cg[0] == [1.0, 0.0]  # no product: a zero estimate
    assert cg[n][0] < 1e-6 and cg[n][1] > 1 - 1e-9  # n steps of CG: exact up to round-off
    fast = errors["Neumann, alpha = 1.9/||H||"]
    assert fast[300][0] < 1e-3 < fast[2][0] < fast[0][0]
    # Neumann at k = 0 is alpha times the identity approximation: the same direction.
    assert errors["Neumann, alpha = 1/||H||"][0][1] == pytest.approx(errors["identity"][0][1])


def test_drawings_split_each_character_disjointly():
    ds = mg.data.Omniglot(shared_root())
    train, val, test = hg.drawings(ds, "Latin", "cpu")
    chars = len(ds.characters("Latin"))
    for batch, per in zip((train, val, test), hg.SPLIT, strict=True):
        assert batch.x.shape == (chars * per, 14 * 14) and batch.x.dtype == torch.float64
        assert torch.equal(batch.y.bincount(), torch.full((chars,), per))
    rows = torch.cat([train.x, val.x, test.x])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0], "a drawing is in two splits"


def test_options_that_do_not_apply_and_missing_data_are_refused(tmp_path, monkeypatch):
    assert EXPERIMENTS["hypergradients"] == "metagrad.experiments.hypergradients"
    with pytest.raises(ValueError, match=r"--seeds does not apply"):
        hg.run(Options(out=tmp_path, quick=True, seeds=2))
    monkeypatch.delenv("METAGRAD_OMNIGLOT", raising=False)
    with pytest.raises(ValueError, match=r"--data PATH.*METAGRAD_OMNIGLOT"):
        hg.run(Options(out=tmp_path, quick=True))


@pytest.mark.slow
def test_quick_run_writes_the_tables_and_figures(tmp_path):
    report = run_experiment("hypergradients", Options(out=tmp_path, quick=True, data=shared_root()))
    accuracy, decay, learned = report.tables
    assert [row[0] for row in learned.rows] == list(_learned.MODELS)
    assert all(row[1] is not None for row in learned.rows), "every sinusoid cell finished"
    assert [row[0] for row in accuracy.rows] == list(hg.QUICK["products"])
    assert len(decay.rows) == 3 * len(hg.QUICK["alphabets"])
    grid, single, per = decay.rows
    assert any(math.isclose(float(grid[2]), d, rel_tol=1e-2) for d in hg.QUICK["grid"])
    assert per[3] < grid[3], "learning the decays lowers the validation loss they are fitted to"
    info = report.info["weight_decay"][0]
    assert info["single"]["curve"][-1]["val_loss"] < info["single"]["curve"][0]["val_loss"]
    assert max(info["per_parameter"]["cg_residual"]) < 1e-3
    assert len(info["per_parameter"]["log10_decay_map"]) == 14 * 14
    for path in report.figures:
        assert path.is_file() and path.stat().st_size > 0
    saved = json.loads((tmp_path / "hypergradients.json").read_text())
    assert [t["name"] for t in saved["tables"]] == [t.name for t in report.tables]
