"""metagrad: gradient-based meta-learning on PyTorch."""

from metagrad._types import Adapted, Batch, Params, Task

__all__ = ["Adapted", "Batch", "Params", "Task"]
