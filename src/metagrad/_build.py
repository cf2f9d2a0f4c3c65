"""The objects a config describes: the network, the estimator, the task distributions."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from metagrad import models
from metagrad._types import Batch, Task
from metagrad.algorithms import build
from metagrad.config import Config
from metagrad.evaluate import join_tasks
from metagrad.inner import GradientDescent, NewtonCG


def build_model(config: Config) -> nn.Module:
    """The network: MAML's 1-40-40-1 MLP, or Conv4 with ``ways`` outputs."""
    if config.model.arch == "mlp":
        return models.MLP()
    return models.Conv4(in_channels=1, n_way=config.data.ways)


def build_estimator(config: Config, model: nn.Module, *, evaluation: bool = False) -> Any:
    """The estimator of ``config.algo``; ``evaluation=True``: with the test-time steps."""
    a = config.algo
    steps = a.inner_steps
    if evaluation and a.eval_inner_steps is not None:
        steps = a.eval_inner_steps
    if a.inner == "newton-cg":
        inner: Any = NewtonCG(steps=steps, cg_steps=a.newton_cg_steps)
    else:
        inner = GradientDescent(lr=a.inner_lr, steps=steps)
    loss = models.loss_fn(model, "mse" if config.data.benchmark == "sinusoid" else "cross_entropy")
    per_algorithm: dict[str, dict[str, Any]] = {
        "anil": {"head": a.head},
        "leap": {"metric": a.leap_metric, "loss_term": a.loss_term, "stabilizer": a.stabilizer},
        "imaml": {
            "lam": a.lam,
            "cg_steps": a.cg_steps,
            "cg_damping": a.cg_damping,
            "lam_damping": a.lam_damping,
        },
    }
    return build(a.algorithm, loss, inner, **per_algorithm.get(a.algorithm, {}))


def data_root(config: Config) -> Config:
    """``config`` with the Omniglot folder resolved (``--data``, else ``$METAGRAD_OMNIGLOT``)."""
    if config.data.benchmark == "sinusoid" or config.data.root is not None:
        return config
    root = os.environ.get("METAGRAD_OMNIGLOT")
    if not root:
        raise ValueError(
            "Omniglot needs its data: pass --data PATH (a folder holding images_background.zip "
            "and images_evaluation.zip, or their unzipped folders) or set METAGRAD_OMNIGLOT"
        )
    return config.override(root=root)


class TaskSource:
    """The run's task distributions: ``sample(split, n, generator) -> Task`` for each split.

    ``split_info`` is what ``config.json`` records of the data split (class or alphabet names).
    For Leap's alphabets, ``fixed(split)`` is the split's tasks, one per alphabet: alphabets with
    20 or more characters are shuffled with ``split_seed``; 10 are held out for test, the next
    ``train_alphabets`` train and the rest validate.
    """

    def __init__(self, config: Config) -> None:
        from metagrad import data

        d = config.data
        eval_shots = d.eval_shots or d.shots
        self.split_info: dict[str, Any] | None = None
        self._fixed: dict[str, Any] = {}
        self.samplers: dict[str, Any] = {}
        if d.benchmark == "sinusoid":
            test = data.Sinusoid(shots=eval_shots, queries=d.queries)
            train = data.Sinusoid(shots=d.shots, queries=d.queries)
            self.samplers.update(train=train, val=test, test=test)
            return
        ds = data.Omniglot(data_root(config).data.root)  # type: ignore[arg-type]
        if d.benchmark == "omniglot-alphabets":
            self._alphabets(ds, config)
            return
        splits = ds.split(d.split, seed=d.split_seed, rotations=d.rotations)
        self.split_info = {name: classes.to_json() for name, classes in splits.items()}
        self.samplers = {
            name: data.FewShotSampler(
                splits[name], d.ways, d.shots if name == "train" else eval_shots, d.queries
            )
            for name in ("train", "val", "test")
        }

    def _alphabets(self, ds: Any, config: Config) -> None:
        from metagrad import data

        d = config.data
        tasks = data.alphabet_tasks(ds, classes=d.ways, held_out=d.queries, seed=d.split_seed)
        names = list(tasks)
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(d.split_seed))
        names = [names[i] for i in order]
        test, train = names[:10], names[10 : 10 + d.train_alphabets]
        val = names[10 + d.train_alphabets :] or test
        self.split_info = {"train": train, "val": val, "test": test}
        for split, chosen in self.split_info.items():
            one = [Task(*(Batch(*(t.unsqueeze(0) for t in b)) for b in tasks[a])) for a in chosen]
            self._fixed[split] = join_tasks(one)

    def fixed(self, split: str) -> Any:
        """The split's fixed tasks, stacked (Leap's alphabets), or None for sampled ones."""
        return self._fixed.get(split)

    def sample(self, split: str, n: int, generator: torch.Generator) -> Any:
        """``n`` tasks of ``split`` (``train``, ``val`` or ``test``) from ``generator``."""
        fixed = self._fixed.get(split)
        if fixed is None:
            return self.samplers[split].sample(n, generator)
        count = fixed.support.x.shape[0]
        if n > count:
            raise ValueError(f"meta_batch {n} exceeds the {count} {split} alphabets; lower it")
        pick = torch.randperm(count, generator=generator)[:n]
        return Task(*(Batch(*(t[pick] for t in b)) for b in fixed))
