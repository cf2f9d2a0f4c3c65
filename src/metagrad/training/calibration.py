"""How well a predictive distribution fits what it predicts: NLL, interval coverage, ECE.

Regression predictions are Gaussians (a mean and a standard deviation per output; a mixture of
sampled networks is summarised by its mean and variance, moment matching). Their scores per task:

- the negative log-likelihood ``0.5 log(2 pi sigma^2) + (y - mu)^2 / (2 sigma^2)``, a mean over
  the task's query points;
- the coverage of the central ``p`` intervals ``|y - mu| <= z_{(1+p)/2} sigma`` for each level in
  :data:`LEVELS`, and the calibration error, the mean over the levels of ``|coverage - p|``.

Classification scores the expected calibration error (ECE): the query predictions binned by their
confidence (the largest class probability) into :data:`BINS` equal-width bins, and the mean over
the bins of ``|accuracy - confidence|`` weighted by the bins' shares.

>>> import torch
>>> y, mu, sd = torch.zeros(4), torch.zeros(4), torch.ones(4)
>>> round(float(gaussian_nll(y, mu, sd)), 4)
0.9189
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

LEVELS = (0.5, 0.9, 0.95)
"""The central predictive intervals whose coverage is reported."""

BINS = 15
"""Confidence bins of the expected calibration error."""


def gaussian_nll(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The mean Gaussian negative log-likelihood of ``y`` under ``N(mean, std^2)``."""
    var = std**2
    return (0.5 * torch.log(2 * math.pi * var) + (y - mean) ** 2 / (2 * var)).mean()


def coverage(y: Tensor, mean: Tensor, std: Tensor, levels: tuple[float, ...] = LEVELS) -> Tensor:
    """The fraction of ``y`` inside each central interval of ``N(mean, std^2)`` (one per level)."""
    z = torch.tensor([NormalDist().inv_cdf((1 + p) / 2) for p in levels], dtype=mean.dtype)
    inside = (y - mean).abs().reshape(1, -1) <= z.reshape(-1, 1) * std.reshape(1, -1)
    return inside.to(mean.dtype).mean(1)


def calibration_error(covered: Tensor, levels: tuple[float, ...] = LEVELS) -> Tensor:
    """The mean over the levels of ``|coverage - level|``."""
    return (covered - torch.tensor(levels, dtype=covered.dtype)).abs().mean()


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> Tensor:
    """ECE of class probabilities ``probs`` (examples x classes) against integer ``labels``."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).to(probs.dtype)
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    total = torch.zeros((), dtype=probs.dtype)
    for b in range(bins):
        members = index == b
        share = members.to(probs.dtype).mean()
        if bool(members.any()):
            gap = (correct[members].mean() - confidence[members].mean()).abs()
            total = total + share * gap
    return total
