"""The calibration scores against closed forms and exactly calibrated synthetic predictions."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.training import calibration as cal


def test_gaussian_nll_closed_form():
    y = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mean = torch.tensor([0.0, 0.0], dtype=torch.float64)
    std = torch.tensor([2.0, 0.5], dtype=torch.float64)
    want = (
        sum(
            0.5 * math.log(2 * math.pi * s**2) + (a - m) ** 2 / (2 * s**2)
            for a, m, s in zip(y.tolist(), mean.tolist(), std.tolist(), strict=True)
        )
        / 2
    )
    assert float(cal.gaussian_nll(y, mean, std)) == pytest.approx(want, rel=1e-12)


def test_coverage_of_calibrated_and_overconfident_predictions():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    std = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    y = mean + std * torch.randn(n, generator=g, dtype=torch.float64)
    covered = cal.coverage(y, mean, std)
    # Binomial standard error at n = 200,000 is below 0.0012: 0.006 is 5 of them.
    assert covered.tolist() == pytest.approx(list(cal.LEVELS), abs=0.006)
    assert float(cal.calibration_error(covered)) < 0.006
    narrow = cal.coverage(y, mean, std / 2)  # overconfident: intervals half as wide
    assert all(c < p - 0.1 for c, p in zip(narrow.tolist(), cal.LEVELS, strict=True))
    assert float(cal.calibration_error(narrow)) > 0.1


def test_expected_calibration_error():
    # Two examples at confidence 0.9 (one right), two at 0.6 (both right): bins at 0.9 and 0.6.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    want = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert float(cal.expected_calibration_error(probs, labels)) == pytest.approx(want, rel=1e-12)
    # Exactly calibrated by construction: labels drawn from the predicted probabilities.
    g = torch.Generator().manual_seed(1)
    p = torch.rand(100_000, generator=g, dtype=torch.float64) * 0.5 + 0.5
    probs = torch.stack([p, 1 - p], -1)
    labels = (torch.rand(100_000, generator=g, dtype=torch.float64) > p).long()
    assert float(cal.expected_calibration_error(probs, labels)) < 0.01
