"""What every estimator shares: input checks, the finiteness check, metrics, ``__call__``,
``adapt`` and ``init_meta``."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from metagrad import tree
from metagrad._types import Adapted, Batch, LossFn, Metrics, Params, Task


def module_of(key: str) -> str:
    """The module that holds parameter ``key``: ``"body.0"`` for ``"body.0.weight"``."""
    return key.rsplit(".", 1)[0] if "." in key else key


def check_batch(batch: Batch, name: str, task_dims: int) -> None:
    """Raise ``ValueError`` unless ``x`` and ``y`` agree on their leading (task, example) dims."""
    x, y = batch
    lead = task_dims + 1
    if x.dim() < lead or y.dim() < lead or x.shape[:lead] != y.shape[:lead]:
        raise ValueError(
            f"{name}.x has shape {tuple(x.shape)} and {name}.y {tuple(y.shape)}: their first "
            f"{lead} dims ({'tasks, ' if task_dims else ''}examples) must match; stack tasks on "
            "dim 0 and examples on the next dim"
        )


def check_task(task: Task, batched: bool) -> None:
    """Raise ``ValueError`` for a malformed task (or batch of tasks when ``batched``)."""
    if not isinstance(task, Task):
        raise ValueError(
            f"expected metagrad.Task(support=Batch(x, y), query=Batch(x, y)), got {type(task)}"
        )
    d = int(batched)
    check_batch(task.support, "support", d)
    check_batch(task.query, "query", d)
    s, q = task.support.x, task.query.x
    if s.shape[d + 1 :] != q.shape[d + 1 :] or (batched and s.shape[0] != q.shape[0]):
        raise ValueError(
            f"support.x has shape {tuple(s.shape)} and query.x {tuple(q.shape)}: support and "
            "query must hold the same number of tasks and examples of the same shape"
        )


def check_finite(metrics: Metrics) -> None:
    """Raise ``ValueError`` naming the first non-finite inner loss (task, step) or query loss.

    ``metrics["inner_losses"]`` is ``(steps,)`` for one task or ``(tasks, steps)`` for a batch.
    One read back to the host per call, none inside the inner loop.
    """
    inner = metrics["inner_losses"]
    bad = ~inner.isfinite()
    if bool(bad.any()):
        index = bad.nonzero()[0].tolist()
        where = (
            f"task {index[0]}, inner step {index[1]}"
            if inner.dim() == 2
            else f"inner step {index[0]}"
        )
        raise ValueError(
            f"non-finite support loss ({inner[tuple(index)].item()}) at {where}: lower the inner "
            "learning rate or the number of inner steps, or check the task's inputs"
        )
    query = metrics["query_loss"]
    if not bool(query.isfinite().all()):
        raise ValueError(
            "non-finite query loss after adaptation: lower the inner learning rate or the number "
            "of inner steps, or check the task's inputs"
        )


def scored(loss: LossFn) -> Callable[[Params, Batch], tuple[Tensor, Tensor | None]]:
    """``(params, batch) -> (loss, accuracy or None)``, from one forward pass where the loss can.

    A :class:`metagrad.Loss` gives its accuracy (classification) from the forward pass that gives
    the value; any other loss gives ``None`` and :func:`task_metrics` scores the accuracy itself.
    """
    both = getattr(loss, "value_and_accuracy", None)
    if both is not None:
        return both  # type: ignore[no-any-return]
    return lambda params, batch: (loss(params, batch), None)


def task_metrics(
    loss: LossFn,
    adapted: Adapted,
    query: Batch,
    query_loss: Tensor,
    accuracy: Tensor | None = None,
) -> Metrics:
    """The metrics every estimator reports for one task (the accuracy for classification)."""
    metrics = {"query_loss": query_loss.detach(), "inner_losses": adapted.losses.detach()}
    if accuracy is not None:
        metrics["query_accuracy"] = accuracy.detach()
    elif getattr(loss, "is_classification", False):
        metrics["query_accuracy"] = loss.accuracy(tree.detach(adapted.params), query)  # type: ignore[attr-defined]
    return metrics


class EstimatorBase:
    """Base of the estimators: ``__call__`` checks the task, runs ``meta_grad``, checks the result.

    Subclasses are frozen dataclasses with ``loss`` and ``inner`` fields and a pure, ``vmap``-able
    ``meta_grad(theta, task) -> (grad, metrics)`` for one task.
    """

    loss: LossFn
    inner: object
    hyper_prefixes: ClassVar[tuple[str, ...]] = ()
    """Key prefixes of the meta-parameters that are not the model's (learned ``lam``, ...)."""
    carried_prefixes: ClassVar[tuple[str, ...]] = ()
    """Key prefixes of the meta-parameters that are carried state, not learned (Reptile's inner
    Adam moments): no optimiser steps them; after each meta-batch the loop sets them to
    :meth:`carry` of the mean meta-gradient's entries under these prefixes."""

    def model_params(self, meta: Params) -> Params:
        """The entries of ``meta`` that the model takes: the initialisation ``theta``."""
        return {k: v for k, v in meta.items() if not k.startswith(self.hyper_prefixes)}

    def init_meta(self, model: nn.Module) -> Params:
        """The meta-parameters to learn, as one flat dict: here the initialisation ``theta``.

        The live parameters of ``model`` (ready for a ``torch.optim`` optimiser); an estimator
        that learns more (step sizes, ``lam``) adds entries under its own prefixes.
        """
        return dict(model.named_parameters())

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        raise NotImplementedError

    def carry(self, meta: Params, mean: Params, tasks: int) -> Params:
        """The new values of the carried entries after a meta-batch of ``tasks`` tasks, from
        ``mean``, the mean meta-gradient (none here: nothing is carried)."""
        return {}

    def __call__(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        """The meta-gradient for one task: keys, shapes and dtypes of ``theta``."""
        check_task(task, batched=False)
        grad, metrics = self.meta_grad(tree.detach(theta), task)
        check_finite(metrics)
        return grad, metrics

    def adapt(self, theta: Params, support: Batch) -> Params:
        """The adapted parameters ``phi`` for one task's support set (no graph kept)."""
        check_batch(support, "support", 0)
        return tree.detach(self._adapt(tree.detach(theta), support).params)

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        return self.inner(self.loss, theta, support)  # type: ignore[operator]
