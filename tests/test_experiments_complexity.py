"""The complexity experiment: its closed forms, its counts, and the --quick run."""

from __future__ import annotations

import pytest
import torch

import metagrad as mg
from metagrad.experiments import Options, run_experiment
from metagrad.experiments import complexity as cx


def test_the_exact_meta_gradient_is_autograd_through_the_exact_solution():
    p = cx.problem(6, 20.0)
    h = p["a"] + cx.LAM * torch.eye(6, dtype=cx.DT)
    assert torch.allclose(torch.linalg.eigvalsh(h).max() / torch.linalg.eigvalsh(h).min(),
                          torch.tensor(20.0, dtype=cx.DT), rtol=1e-10)  # fmt: skip
    theta = p["theta"].clone().requires_grad_()
    phi = torch.linalg.solve(h, p["a"] @ p["c"] + cx.LAM * theta)
    query = 0.5 * (phi - p["cq"]) @ (p["b"] @ (phi - p["cq"]))
    (g,) = torch.autograd.grad(query, theta)
    assert torch.allclose(g, p["exact"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", cx.METHODS)
def test_every_method_converges_to_the_exact_meta_gradient(method):
    p = cx.problem(6, 10.0)
    assert cx.error(cx.estimate(method, p, 10.0, 5), p) > 1e-3
    assert cx.error(cx.estimate(method, p, 10.0, 600), p) < 1e-10


@pytest.mark.parametrize("m", [1, 4, 12])
def test_truncated_maml_tends_to_its_closed_form_floor(m):
    p = cx.problem(6, 10.0)
    floor = cx.truncation_floor(p, 10.0, m)
    assert floor > 1e-3
    measured = cx.error(cx.estimate("truncated", p, 10.0, 800, m), p)
    assert abs(measured - floor) < 1e-9 * max(1.0, floor)


def test_imaml_with_a_fixed_inner_solve_stops_at_that_solve():
    p = cx.problem(6, 10.0)
    five = [cx.error(cx.estimate("iMAML, fixed inner", p, 10.0, s, 5), p) for s in (30, 60)]
    assert abs(five[0] - five[1]) < 1e-10 and five[0] > 1e-3  # CG converged, the inner did not
    assert cx.error(cx.estimate("iMAML, fixed inner", p, 10.0, 60, 200), p) < 1e-10


def test_compute_counts_gradients_and_hessian_vector_products():
    """2 products with A or B per gradient or Hessian-vector product of a quadratic."""
    p = cx.problem(6, 10.0)
    s = 7
    assert cx.compute("MAML-GD", p, 10.0, s) == 2 * s + 1  # S gradients, S HVPs, 1 query
    assert cx.compute("MAML-Nesterov", p, 10.0, s) == 2 * s + 1
    assert cx.compute("checkpointed MAML-GD", p, 10.0, s) == 3 * s + 1  # + S recomputed
    assert cx.compute("truncated, m = S/2", p, 10.0, s) == s + 4 + 1  # m = 4 HVPs
    assert cx.compute("iMAML", p, 10.0, s) == s + 1 + s + 1  # inner, H at phi, CG, query


def test_memory_grows_with_the_path_only_where_the_table_says():
    p = cx.problem(40, 30.0)

    def per_step(method, m=0):
        a, b = (cx.peak_vectors(40, cx.estimate, method, p, 30.0, s, m) for s in (8, 24))
        return (b - a) / 16

    assert per_step("MAML-GD") > 3
    assert 0.9 < per_step("checkpointed MAML-GD") < 1.2  # one state (phi) per step
    assert per_step("iMAML") < 0.1
    assert per_step("truncated", 4) < 0.1
    assert 1.5 < per_step("truncated, m = S/2") < 2.5


def test_options_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--seeds does not apply"):
        run_experiment("complexity", Options(out=tmp_path, quick=True, seeds=2))
    assert "complexity" in mg.experiments.EXPERIMENTS


@pytest.mark.slow
def test_complexity_quick(tmp_path):
    report = run_experiment("complexity", Options(out=tmp_path, quick=True))
    names = [t.name for t in report.tables]
    assert names == ["complexity_table", "complexity_compute", "complexity_memory",
                     "complexity_error"]  # fmt: skip
    slopes = {row[0]: row[-1] for row in report.tables[1].rows}
    assert 0.8 < slopes["MAML-GD"] < 1.3 and 0.8 < slopes["checkpointed MAML-GD"] < 1.3
    assert 0.3 < slopes["MAML-Nesterov"] < 0.75 and 0.3 < slopes["iMAML"] < 0.75
    for name in ("complexity.md", "complexity.json", "complexity.png"):
        assert (tmp_path / name).is_file(), name
