"""metagrad: gradient-based meta-learning on PyTorch.

Every algorithm answers one question: given meta-parameters ``theta`` and a task (a support set to
adapt on, a query set to score on), what is the meta-gradient?

>>> import metagrad as mg
>>> model = mg.models.MLP()
>>> loss = mg.loss_fn(model, "mse")
>>> maml = mg.MAML(loss, mg.GradientDescent(lr=0.01, steps=1))

This package is the algorithm layer. The application layer (configs and presets, the training
loop, run folders, evaluation, distribution) is the subpackage :mod:`metagrad.training`; the
published experiments are :mod:`metagrad.experiments`.
"""

from typing import Any

from metagrad import autodiff, data, implicit, linalg, models, tasks, tree
from metagrad._types import (
    Adapted,
    Batch,
    Estimator,
    InnerSolver,
    LossFn,
    Metrics,
    Params,
    Task,
    TaskSampler,
)
from metagrad.algorithms import (
    ALGORITHMS,
    ANIL,
    IMAML,
    MAML,
    EstimatorBase,
    Leap,
    Posterior,
    Predictive,
    ProbabilisticIMAML,
    Reptile,
    build,
    meta_gradient,
    predictive,
)
from metagrad.inner import INNER_SOLVERS, Adam, GradientDescent, Momentum, NewtonCG
from metagrad.models import MODELS, Loss, loss_fn, params_of
from metagrad.tasks import task_at

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "Adam",
    "Adapted",
    "Batch",
    "Estimator",
    "EstimatorBase",
    "GradientDescent",
    "IMAML",
    "INNER_SOLVERS",
    "InnerSolver",
    "Leap",
    "Loss",
    "LossFn",
    "MAML",
    "MODELS",
    "Metrics",
    "Momentum",
    "NewtonCG",
    "Params",
    "Posterior",
    "Predictive",
    "ProbabilisticIMAML",
    "Reptile",
    "Task",
    "TaskSampler",
    "autodiff",
    "build",
    "data",
    "implicit",
    "linalg",
    "loss_fn",
    "meta_gradient",
    "models",
    "params_of",
    "predictive",
    "task_at",
    "tasks",
    "tree",
]

# The application layer's names, reachable here too for code written against the first version
# (``mg.train``, ``mg.load_run``, ...); imported on first use, so ``import metagrad`` stays light.
_TRAINING = {
    name: "metagrad.training"
    for name in (
        "PRESETS",
        "Config",
        "preset",
        "Evaluation",
        "evaluate",
        "evaluate_run",
        "Run",
        "load_run",
        "TrainingError",
        "TrainResult",
        "resume",
        "train",
    )
}


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(_TRAINING[name]), name)
    if name in ("training", "experiments"):
        import importlib

        return importlib.import_module(f"metagrad.{name}")
    raise AttributeError(f"module 'metagrad' has no attribute {name!r}")
