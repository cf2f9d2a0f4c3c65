"""The estimators, their registry, and batching over a batch of tasks.

One module per estimator (``maml``, ``reptile``, ``leap``, ``imaml``, ``probabilistic``), what
they share (``_base``), the registry of names (``registry``) and the mean over a batch of tasks
(``batching``).
"""

from metagrad.algorithms._base import EstimatorBase
from metagrad.algorithms.batching import MODES, meta_gradient
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.leap import Leap
from metagrad.algorithms.maml import ANIL, MAML
from metagrad.algorithms.probabilistic import Posterior, Predictive, ProbabilisticIMAML, predictive
from metagrad.algorithms.registry import ALGORITHMS, build
from metagrad.algorithms.reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "IMAML",
    "MAML",
    "MODES",
    "Posterior",
    "Predictive",
    "ProbabilisticIMAML",
    "EstimatorBase",
    "Leap",
    "Reptile",
    "build",
    "meta_gradient",
    "predictive",
]
