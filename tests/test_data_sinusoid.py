"""Sinusoid regression tasks: shapes, ranges, the closed form, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import metagrad as mg
from metagrad.data import Sinusoid


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_dtypes() -> None:
    task = Sinusoid(shots=10, queries=7).sample(25, gen(0))
    assert isinstance(task, mg.Task)
    assert task.support.x.shape == task.support.y.shape == (25, 10, 1)
    assert task.query.x.shape == task.query.y.shape == (25, 7, 1)
    assert all(t.dtype == torch.float32 for t in task.support + task.query)


def test_values_follow_the_true_curve_within_the_ranges() -> None:
    task, truth = Sinusoid().sample_with_params(500, gen(1))
    a, p = truth.amplitude.double(), truth.phase.double()
    for batch in (task.support, task.query):
        want = a.view(-1, 1, 1) * torch.sin(batch.x.double() - p.view(-1, 1, 1))
        torch.testing.assert_close(batch.y.double(), want, atol=1e-5, rtol=0)
        assert float(batch.x.min()) >= -5.0 and float(batch.x.max()) <= 5.0
    assert 0.1 <= float(a.min()) and float(a.max()) <= 5.0
    assert 0.0 <= float(p.min()) and float(p.max()) <= math.pi
    assert float(a.max()) > 4.5 and float(a.min()) < 0.6  # spans the range
    grid = torch.linspace(-5, 5, 50)
    assert truth.curve(grid).shape == (500, 50, 1)
    torch.testing.assert_close(truth.curve(task.query.x), task.query.y)


def test_deterministic_pure_function_of_the_generator() -> None:
    sampler = Sinusoid()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sampler.sample(4, gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    b = sampler.sample(4, gen(3))
    c = sampler.sample(4, gen(4))
    assert all(
        torch.equal(u, v) for u, v in zip(a.support + a.query, b.support + b.query, strict=True)
    )
    assert not torch.equal(a.support.y, c.support.y)
    task, _ = sampler.sample_with_params(4, gen(3))
    assert torch.equal(task.query.y, a.query.y)  # sample == sample_with_params' task


def test_custom_ranges() -> None:
    task, truth = Sinusoid(
        amplitude=(2.0, 2.0), phase=(0.0, 0.0), x_range=(0, 1)
    ).sample_with_params(3, gen(0))
    assert torch.all(truth.amplitude == 2.0) and torch.all(truth.phase == 0.0)
    torch.testing.assert_close(task.support.y, 2.0 * torch.sin(task.support.x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shots": 0}, "shots must be a positive integer"),
        ({"queries": -1}, "queries must be a positive integer"),
        ({"amplitude": (5.0, 0.1)}, "low <= high"),
        ({"x_range": (1.0, -1.0)}, "low <= high"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sinusoid(**kwargs)


def test_bad_n_tasks() -> None:
    with pytest.raises(ValueError, match="n_tasks must be a positive integer"):
        Sinusoid().sample(0, gen(0))
