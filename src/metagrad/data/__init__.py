"""Task distributions: Omniglot, mini/tiered-ImageNet, CIFAR-FS and FC100 episodes, sinusoid
regression and Lake's one-shot runs.

Every sampler has ``sample(n_tasks, generator) -> Task``, a pure function of the
``torch.Generator`` passed in (never the global random state).
"""

from metagrad.data.alphabets import alphabet_tasks
from metagrad.data.cifar import CIFARFS, FC100, cifar_fs_splits, fc100_splits
from metagrad.data.few_shot import ClassSet, FewShotSampler
from metagrad.data.imagenet import (
    MiniImageNet,
    TieredImageNet,
    mini_imagenet_splits,
    tiered_imagenet_splits,
)
from metagrad.data.lake_runs import LakeRuns, make_lake_runs
from metagrad.data.omniglot import Character, Omniglot
from metagrad.data.registry import BENCHMARKS, TaskSource, few_shot_source, register_few_shot
from metagrad.data.sinusoid import SineParams, Sinusoid

__all__ = [
    "BENCHMARKS",
    "CIFARFS",
    "FC100",
    "Character",
    "ClassSet",
    "FewShotSampler",
    "LakeRuns",
    "MiniImageNet",
    "Omniglot",
    "SineParams",
    "Sinusoid",
    "TaskSource",
    "TieredImageNet",
    "alphabet_tasks",
    "cifar_fs_splits",
    "fc100_splits",
    "few_shot_source",
    "make_lake_runs",
    "mini_imagenet_splits",
    "register_few_shot",
    "tiered_imagenet_splits",
]
