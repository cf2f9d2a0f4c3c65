"""The application layer: configs and presets, the outer loop, run folders, evaluation.

>>> from metagrad import training
>>> config = training.preset("sinusoid-maml").override(steps=500)
>>> result = training.train(config, "runs/z")                      # doctest: +SKIP
>>> training.evaluate_run("runs/z", tasks=600)[0].summary()        # doctest: +SKIP

Modules, bottom to top: ``config`` (the dataclasses, choices from the registries), ``presets``
(the papers' settings), ``build`` (task source, network, solver and estimator from a config),
``checkpoint``, ``run`` (the run folder, :func:`load_run`), ``reduce`` (the :class:`Reducer`
seam, :class:`Local`), ``evaluate``, ``plots``, ``progress``, ``loop`` (:func:`train`,
:func:`resume`) and ``distributed`` (the all-reduce reducer under ``torchrun``).
"""

from metagrad.training.build import build_estimator, build_model, data_root, task_source
from metagrad.training.config import SECTIONS, Config, field_section
from metagrad.training.evaluate import Evaluation, evaluate, evaluate_run, evaluate_tasks, mean_ci
from metagrad.training.loop import RESUMABLE, TrainingError, TrainResult, resume, task_seed, train
from metagrad.training.presets import DEFAULT_PRESET, PRESETS, Preset, preset
from metagrad.training.reduce import Local, Reducer
from metagrad.training.run import Run, RunDir, load_run, torch_settings

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "RESUMABLE",
    "SECTIONS",
    "Config",
    "Evaluation",
    "Local",
    "Preset",
    "Reducer",
    "Run",
    "RunDir",
    "TrainResult",
    "TrainingError",
    "build_estimator",
    "build_model",
    "data_root",
    "evaluate",
    "evaluate_run",
    "evaluate_tasks",
    "field_section",
    "load_run",
    "mean_ci",
    "preset",
    "resume",
    "task_seed",
    "task_source",
    "torch_settings",
    "train",
]
