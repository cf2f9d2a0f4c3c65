"""The benchmarks: each task family's name, builder and the data-config fields it reads.

``BENCHMARKS.build(name, **fields)`` returns a :class:`TaskSource`, the run's task distribution
for each split. An entry's ``options`` map the builder's keywords to the data-config fields
(``root``, ``split``, ``split_seed``, ``ways``, ``shots``, ``queries``, ``eval_shots``,
``rotations``, ``train_alphabets``); the config's ``--benchmark`` choices are the names here.

An entry's ``extra`` says what the model and the loss need, known without the data (so that a
run's network can be rebuilt from its config alone): ``loss`` (``"mse"`` or ``"cross_entropy"``;
a classifier has ``ways`` outputs), ``in_channels`` and ``image_size``; and what the application
layer reads: ``archs`` (the models that fit its tasks; a classification benchmark without it takes
every model that no regression benchmark claims), ``splits`` (the class-split protocols it
knows), ``root_env`` and ``root_help`` (the environment variable that names its data folder, and
what the folder holds).

A few-shot image benchmark registers through :func:`register_few_shot` with a function that
loads its class splits; the episodes and the split record come from :func:`few_shot_source`::

    def load(*, root: str, split: str, seed: int, rotations: bool | None) -> dict[str, ClassSet]:
        ...  # {"train": ClassSet, "val": ..., "test": ...}

    register_few_shot("mini-imagenet", load, help="...", in_channels=3, image_size=84,
                      splits=("ravi",), root_env="METAGRAD_MINI_IMAGENET")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metagrad._registry import Registry
from metagrad._types import Task, TaskSampler
from metagrad.data._splits import PROTOCOLS
from metagrad.data.alphabets import alphabet_tasks
from metagrad.data.cifar import cifar_fs_splits, fc100_splits
from metagrad.data.few_shot import ClassSet, FewShotSampler
from metagrad.data.imagenet import mini_imagenet_splits, tiered_imagenet_splits
from metagrad.data.omniglot import Omniglot
from metagrad.data.sinusoid import Sinusoid
from metagrad.tasks import count, select, stack

__all__ = [
    "BENCHMARKS",
    "SPLITS",
    "TaskSource",
    "few_shot_source",
    "register_few_shot",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class TaskSource:
    """A benchmark's tasks for each split.

    ``sample(split, n, generator)`` draws ``n`` tasks of ``split`` (``train``, ``val``,
    ``test``) from ``generator`` alone. A split with fixed tasks (``fixed(split)``, e.g. one per
    alphabet) draws ``n`` of them without replacement. ``split_info`` is what ``config.json``
    records of the split (class or alphabet names), ``None`` for an infinite distribution.
    """

    samplers: Mapping[str, TaskSampler]
    split_info: dict[str, Any] | None = None
    fixed_tasks: Mapping[str, Task] = field(default_factory=dict)

    def fixed(self, split: str) -> Task | None:
        """The split's fixed tasks, stacked, or ``None`` where tasks are sampled."""
        return self.fixed_tasks.get(split)

    def sample(self, split: str, n: int, generator: torch.Generator) -> Task:
        """``n`` tasks of ``split`` stacked on dim 0, a pure function of ``generator``'s state."""
        fixed = self.fixed_tasks.get(split)
        if fixed is None:
            if split not in self.samplers:
                raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
            return self.samplers[split].sample(n, generator)
        total = count(fixed)
        if n > total:
            raise ValueError(f"meta_batch {n} exceeds the {total} {split} alphabets; lower it")
        return select(fixed, torch.randperm(total, generator=generator)[:n])


def few_shot_source(
    splits: Mapping[str, ClassSet],
    *,
    ways: int,
    shots: int,
    queries: int,
    eval_shots: int | None = None,
    sampler: Callable[[ClassSet, int, int, int], TaskSampler] = FewShotSampler,
) -> TaskSource:
    """N-way K-shot episodes from class splits: a :class:`TaskSource` for any image data set.

    ``splits`` maps at least ``train``, ``val`` and ``test`` to their classes; each split gets
    ``sampler(classes, ways, shots, queries)`` (a :class:`FewShotSampler` by default), with
    ``eval_shots`` (default ``shots``) support examples on ``val`` and ``test``.
    ``split_info`` records every split's class names (``ClassSet.to_json``).
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"class splits {missing} are missing: give train, val and test")
    k = {s: shots if s == "train" else eval_shots or shots for s in SPLITS}
    return TaskSource(
        {s: sampler(splits[s], ways, k[s], queries) for s in SPLITS},
        split_info={name: classes.to_json() for name, classes in splits.items()},
    )


FEW_SHOT_OPTIONS = {
    k: k
    for k in ("root", "split", "split_seed", "rotations", "ways", "shots", "queries", "eval_shots")
}


def register_few_shot(
    name: str,
    load_splits: Callable[..., Mapping[str, ClassSet]],
    *,
    help: str,
    in_channels: int,
    image_size: int,
    splits: Sequence[str],
    root_env: str | None = None,
    root_help: str = "",
    archs: Sequence[str] | None = None,
) -> None:
    """Register an N-way K-shot image benchmark ``name`` in :data:`BENCHMARKS`.

    ``load_splits(root=, split=, seed=, rotations=)`` returns the class splits of protocol
    ``split`` (one of ``splits``) from the data folder ``root``; :func:`few_shot_source` makes
    the episodes, whose images must be ``(in_channels, image_size, image_size)``. ``root_env``
    names the environment variable that the application layer reads when no folder is given,
    ``root_help`` what the folder holds; ``archs`` the models that fit (default: every image
    classifier of ``metagrad.models.MODELS``).
    """

    def build(
        *,
        root: str | None,
        split: str,
        split_seed: int,
        rotations: bool | None,
        ways: int,
        shots: int,
        queries: int,
        eval_shots: int | None,
    ) -> TaskSource:
        if root is None:
            raise ValueError(f"{name} needs its data folder: pass root (--data)")
        classes = load_splits(root=root, split=split, seed=split_seed, rotations=rotations)
        source = few_shot_source(
            classes, ways=ways, shots=shots, queries=queries, eval_shots=eval_shots
        )
        got = tuple(source.sample("train", 1, torch.Generator()).support.x.shape[-3:])
        if got != shape:  # the network is built from the registered shape
            raise ValueError(f"{name}'s images are {got}, registered as {shape}: fix one")
        return source

    shape = (in_channels, image_size, image_size)
    extra: dict[str, Any] = {"splits": tuple(splits), "root_env": root_env, "root_help": root_help}
    if archs is not None:
        extra["archs"] = tuple(archs)
    BENCHMARKS.register(
        name,
        build,
        options=FEW_SHOT_OPTIONS,
        help=help,
        loss="cross_entropy",
        in_channels=in_channels,
        image_size=image_size,
        **extra,
    )


def _sinusoid(*, shots: int, queries: int, eval_shots: int | None) -> TaskSource:
    test = Sinusoid(shots=eval_shots or shots, queries=queries)
    train = Sinusoid(shots=shots, queries=queries)
    return TaskSource({"train": train, "val": test, "test": test})


def _omniglot_splits(
    *, root: str, split: str, seed: int, rotations: bool | None
) -> dict[str, ClassSet]:
    return Omniglot(root).split(split, seed=seed, rotations=rotations)


def _omniglot_alphabets(
    *, root: str | None, split_seed: int, ways: int, queries: int, train_alphabets: int
) -> TaskSource:
    """Leap's protocol: one ``ways``-way task per alphabet with at least ``ways`` characters.

    The alphabets are shuffled with ``split_seed``: 10 are held out for test, the next
    ``train_alphabets`` train and the rest validate (the test ones where none is left). Each
    character's first ``queries`` drawings are the query set, the others the support set.
    """
    if root is None:
        raise ValueError("omniglot-alphabets needs its data folder: pass root (--data)")
    tasks = alphabet_tasks(Omniglot(root), classes=ways, held_out=queries, seed=split_seed)
    names = list(tasks)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(split_seed))
    names = [names[i] for i in order]
    test, train = names[:10], names[10 : 10 + train_alphabets]
    info = {"train": train, "val": names[10 + train_alphabets :] or test, "test": test}
    fixed = {s: stack([tasks[a] for a in chosen]) for s, chosen in info.items()}
    return TaskSource({}, split_info=info, fixed_tasks=fixed)


BENCHMARKS: Registry[TaskSource] = Registry("benchmark")
"""Name -> ``build(**data fields) -> TaskSource``; the ``--benchmark`` choices."""

OMNIGLOT_ENV = "METAGRAD_OMNIGLOT"
OMNIGLOT_FILES = (
    "a folder holding images_background.zip and images_evaluation.zip, or their unzipped folders"
)

BENCHMARKS.register(
    "sinusoid",
    _sinusoid,
    options={"shots": "shots", "queries": "queries", "eval_shots": "eval_shots"},
    help="sine-wave regression (MAML's: amplitude U[0.1, 5], phase U[0, pi])",
    loss="mse",
    archs=("mlp",),
)
register_few_shot(
    "omniglot",
    _omniglot_splits,
    help="Omniglot N-way K-shot episodes, classes split by a published protocol",
    in_channels=1,
    image_size=28,
    splits=PROTOCOLS,
    root_env=OMNIGLOT_ENV,
    root_help=OMNIGLOT_FILES,
)
BENCHMARKS.register(
    "omniglot-alphabets",
    _omniglot_alphabets,
    options={k: k for k in ("root", "split_seed", "ways", "queries", "train_alphabets")},
    help="Leap's Omniglot: one many-way task per alphabet",
    loss="cross_entropy",
    in_channels=1,
    image_size=28,
    root_env=OMNIGLOT_ENV,
    root_help=OMNIGLOT_FILES,
)

# The colour benchmarks (issue 19). Each reads the files users already have; CIFAR-FS and FC100
# both read CIFAR-100's python version, so they share one variable.
IMAGE_ARCHS = ("conv4", "conv4-mini", "resnet12")
MINI_IMAGENET_FILES = (
    "a folder holding mini-imagenet-cache-{train,val,test}.pkl, or train.csv, val.csv, test.csv "
    "(filename,label) with the images in images/"
)
TIERED_IMAGENET_FILES = (
    "a folder holding {train,val,test}_labels.pkl with {train,val,test}_images_png.pkl "
    "or {train,val,test}_images.npz"
)
CIFAR100_ENV = "METAGRAD_CIFAR100"
CIFAR100_FILES = "a folder holding cifar-100-python/ (train, test, meta) or cifar-100-python.tar.gz"

register_few_shot(
    "mini-imagenet",
    mini_imagenet_splits,
    help="mini-ImageNet N-way K-shot episodes (84x84 colour), Ravi & Larochelle's 64/16/20 split",
    in_channels=3,
    image_size=84,
    splits=("ravi",),
    root_env="METAGRAD_MINI_IMAGENET",
    root_help=MINI_IMAGENET_FILES,
    archs=IMAGE_ARCHS,
)
register_few_shot(
    "tiered-imagenet",
    tiered_imagenet_splits,
    help="tiered-ImageNet N-way K-shot episodes (84x84 colour), Ren et al.'s 351/97/160 split",
    in_channels=3,
    image_size=84,
    splits=("ren",),
    root_env="METAGRAD_TIERED_IMAGENET",
    root_help=TIERED_IMAGENET_FILES,
    archs=IMAGE_ARCHS,
)
register_few_shot(
    "cifar-fs",
    cifar_fs_splits,
    help="CIFAR-FS N-way K-shot episodes (32x32 colour), Bertinetto et al.'s 64/16/20 classes",
    in_channels=3,
    image_size=32,
    splits=("bertinetto",),
    root_env=CIFAR100_ENV,
    root_help=CIFAR100_FILES,
    archs=IMAGE_ARCHS,
)
register_few_shot(
    "fc100",
    fc100_splits,
    help="FC100 N-way K-shot episodes (32x32 colour), Oreshkin et al.'s 12/4/4 superclasses",
    in_channels=3,
    image_size=32,
    splits=("oreshkin",),
    root_env=CIFAR100_ENV,
    root_help=CIFAR100_FILES,
    archs=IMAGE_ARCHS,
)
