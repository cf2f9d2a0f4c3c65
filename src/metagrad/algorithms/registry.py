"""The algorithm registry: each estimator's name, builder and the config fields it reads.

``ALGORITHMS.build(name, loss, inner, **options)`` builds an estimator; ``options`` maps each
builder keyword to the config field that supplies it (``metagrad.training`` reads them from the
config, the command line makes one flag per field). An entry's ``presets`` are the papers'
settings for that algorithm (flat config overrides with their source); ``solvers``, where given,
restricts the inner solvers it accepts (by default every registered one).
"""

from __future__ import annotations

from typing import Any

from metagrad._registry import Registry
from metagrad._types import Estimator, InnerSolver, LossFn
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.leap import Leap
from metagrad.algorithms.maml import ANIL, MAML
from metagrad.algorithms.probabilistic import ProbabilisticIMAML
from metagrad.algorithms.reptile import Reptile

ALGORITHMS: Registry[Estimator] = Registry("algorithm")

MAML_OPTIONS = {"truncate": "truncate", "checkpoint": "checkpoint_inner", "learn_lr": "learn_lr"}

ALGORITHMS.register(
    "maml",
    MAML,
    options=MAML_OPTIONS,
    help="MAML, second order through the unrolled inner loop",
)
ALGORITHMS.register(
    "fomaml",
    lambda loss, inner: MAML(loss, inner, first_order=True),
    help="first-order MAML: the query gradient at the adapted parameters",
)
ALGORITHMS.register(
    "anil",
    ANIL,
    options={"head": "head", **MAML_OPTIONS},
    help="MAML adapting only the head's parameters",
)
ALGORITHMS.register(
    "reptile", Reptile, options={"carry_state": "inner_carry"}, help="Reptile: theta - phi"
)
ALGORITHMS.register(
    "leap",
    Leap,
    options={"metric": "leap_metric", "loss_term": "loss_term", "stabilizer": "stabilizer"},
    help="Leap: the gradient of the learning path's length or energy",
)
ALGORITHMS.register(
    "imaml",
    IMAML,
    options={
        "lam": "lam",
        "cg_steps": "cg_steps",
        "cg_damping": "cg_damping",
        "lam_damping": "lam_damping",
        "learn_lam": "learn_lam",
        "pullback": "pullback",
    },
    help="iMAML: implicit meta-gradient of the proximal inner problem, by CG",
)


def _probabilistic(
    loss: LossFn, inner: InnerSolver, learn_prior_std: str | None = "global", **options: Any
) -> ProbabilisticIMAML:
    """From the config: ``learn_prior_std=None`` keeps the prior's std fixed."""
    return ProbabilisticIMAML(loss, inner, learn_prior_std=learn_prior_std or False, **options)  # type: ignore[arg-type]


ALGORITHMS.register(
    "probabilistic-imaml",
    _probabilistic,
    options={
        "prior_std": "prior_std",
        "learn_prior_std": "learn_prior_std",
        "samples": "posterior_samples",
        "noise_std": "noise_std",
        "nll_scale": "nll_scale",
        "cg_steps": "cg_steps",
        "cg_damping": "cg_damping",
    },
    help="probabilistic iMAML: a Gaussian posterior per task, a learned Gaussian prior",
)


def build(name: str, loss: LossFn, inner: InnerSolver, **options: Any) -> Estimator:
    """The estimator registered as ``name`` (see :data:`ALGORITHMS`)."""
    return ALGORITHMS.build(name, loss, inner, **options)
