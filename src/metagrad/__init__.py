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
from metagrad.config import PRESETS, Config, preset
from metagrad.evaluate import Evaluation, evaluate, evaluate_run
from metagrad.inner import GradientDescent, NewtonCG
from metagrad.models import Loss, loss_fn, params_of
from metagrad.run import Run, load_run
from metagrad.train import TrainingError, TrainResult, resume, train

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "Adapted",
    "Batch",
    "Config",
    "Estimator",
    "Evaluation",
    "GradientDescent",
    "IMAML",
    "InnerSolver",
    "Leap",
    "Loss",
    "LossFn",
    "MAML",
    "Metrics",
    "NewtonCG",
    "PRESETS",
    "Params",
    "Reptile",
    "Run",
    "Task",
    "TrainResult",
    "TrainingError",
    "build",
    "data",
    "evaluate",
    "evaluate_run",
    "linalg",
    "load_run",
    "loss_fn",
    "meta_gradient",
    "models",
    "params_of",
    "preset",
    "resume",
    "task_at",
    "train",
    "tree",
]
