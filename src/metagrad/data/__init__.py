"""Task distributions: Omniglot episodes, sinusoid regression and Lake's one-shot runs.

Every sampler has ``sample(n_tasks, generator) -> Task``, a pure function of the
``torch.Generator`` passed in (never the global random state).
"""

from metagrad.data.alphabets import alphabet_tasks
from metagrad.data.few_shot import ClassSet, FewShotSampler
from metagrad.data.lake_runs import LakeRuns, make_lake_runs
from metagrad.data.omniglot import Character, Omniglot
from metagrad.data.sinusoid import SineParams, Sinusoid

__all__ = [
    "Character",
    "ClassSet",
    "FewShotSampler",
    "LakeRuns",
    "Omniglot",
    "SineParams",
    "Sinusoid",
    "alphabet_tasks",
    "make_lake_runs",
]
