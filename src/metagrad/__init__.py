"""metagrad: gradient-based meta-learning on PyTorch.

Every algorithm answers one question: given meta-parameters ``theta`` and a task (a support set to
adapt on, a query set to score on), what is the meta-gradient?

>>> import metagrad as mg
>>> model = mg.models.MLP()
>>> loss = mg.loss_fn(model, "mse")
>>> maml = mg.MAML(loss, mg.GradientDescent(lr=0.01, steps=1))
"""

from metagrad import data, linalg, models, tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms import (
    ALGORITHMS,
    ANIL,
    IMAML,
    MAML,
    Estimator,
    Leap,
    Reptile,
    build,
    meta_gradient,
    task_at,
)
from metagrad.inner import GradientDescent, NewtonCG
from metagrad.models import Loss, loss_fn, params_of

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "Adapted",
    "Batch",
    "Estimator",
    "GradientDescent",
    "IMAML",
    "InnerSolver",
    "Leap",
    "Loss",
    "LossFn",
    "MAML",
    "Metrics",
    "NewtonCG",
    "Params",
    "Reptile",
    "Task",
    "build",
    "data",
    "linalg",
    "loss_fn",
    "meta_gradient",
    "models",
    "params_of",
    "task_at",
    "tree",
]
