"""Estimators written outside the package, as a user writes them, on the one execution path.

Three ways to write one: (a) a subclass of ``mg.MAML`` that adds a field and overrides
``meta_grad``; (b) a fresh frozen dataclass on ``mg.EstimatorBase`` whose ``meta_grad`` is
second-order MAML with the gradient-descent steps written by hand; (c) a duck-typed frozen
dataclass that subclasses nothing. ``mg.meta_gradient`` runs each in every batching mode it
supports, in float64, with the built-in ``mg.MAML``'s result (itself checked against a naive
``torch.autograd`` loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _core_helpers import naive_maml, rel, small_conv_task, small_mlp_task, theta_of
from torch import Tensor, nn

import metagrad as mg

LR, STEPS = 0.1, 2
GD = mg.GradientDescent(lr=LR, steps=STEPS)
PROBLEMS: dict[str, tuple[Callable[..., Any], str]] = {
    "mlp": (small_mlp_task, "mse"),
    "conv4": (small_conv_task, "cross_entropy"),  # mg.models.Conv4: metagrad's batch norm
}
MODES = [("loop", 1), ("loop", 2), ("vmap", None)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread (a busy shared CPU makes a pool many times slower);
    ``workers=2`` still runs two worker threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True, eq=False)
class ScaledMAML(mg.MAML):
    """(a) MAML with its meta-gradient scaled, noting every call of its ``meta_grad``."""

    scale: float = 1.0
    calls: list[str] = field(default_factory=list)

    def meta_grad(self, theta: mg.Params, task: mg.Task) -> tuple[mg.Params, mg.Metrics]:
        self.calls.append("meta_grad")
        grad, metrics = super().meta_grad(theta, task)
        return {k: self.scale * g for k, g in grad.items()}, metrics


@dataclass(frozen=True, eq=False)
class HandMAML(mg.EstimatorBase):
    """(b) Second-order MAML: ``phi = theta - lr grad L_s(theta)``, ``steps`` times, and the
    gradient of ``L_q(phi(theta))`` with respect to ``theta``, through the steps."""

    loss: mg.LossFn
    inner: mg.GradientDescent

    def meta_grad(self, theta: mg.Params, task: mg.Task) -> tuple[mg.Params, mg.Metrics]:
        def support_loss(p: mg.Params) -> Tensor:
            return self.loss(p, task.support)

        def query_loss(th: mg.Params) -> tuple[Tensor, Tensor]:
            phi, losses = th, []
            for _ in range(self.inner.steps):
                g, value = mg.autodiff.grad_and_value(support_loss)(phi)
                phi = {k: phi[k] - self.inner.lr * g[k] for k in phi}
                losses.append(value)
            return self.loss(phi, task.query), torch.stack(losses)

        grad, (value, losses) = mg.autodiff.grad_and_value(query_loss, has_aux=True)(theta)
        return grad, {"query_loss": value.detach(), "inner_losses": losses.detach()}


@dataclass(frozen=True, eq=False)
class DuckMAML:
    """(c) Second-order MAML through the package's inner solver, on no base class."""

    loss: mg.LossFn
    inner: mg.InnerSolver

    def meta_grad(self, theta: mg.Params, task: mg.Task) -> tuple[mg.Params, mg.Metrics]:
        def query_loss(th: mg.Params) -> tuple[Tensor, Tensor]:
            adapted = self.inner(self.loss, th, task.support)
            return self.loss(adapted.params, task.query), adapted.losses

        grad, (value, losses) = mg.autodiff.grad_and_value(query_loss, has_aux=True)(theta)
        return grad, {"query_loss": value.detach(), "inner_losses": losses.detach()}

    def init_meta(self, model: nn.Module) -> mg.Params:
        return dict(model.named_parameters())

    def adapt(self, theta: mg.Params, support: mg.Batch) -> mg.Params:
        return mg.tree.detach(self.inner(self.loss, mg.tree.detach(theta), support).params)

    def __call__(self, theta: mg.Params, task: mg.Task) -> tuple[mg.Params, mg.Metrics]:
        return self.meta_grad(mg.tree.detach(theta), task)


def _problem(name: str):
    make, kind = PROBLEMS[name]
    model, loss, tasks = make(n_tasks=3)
    return model, loss, tasks, kind


def _reference(model, loss, tasks, kind):
    """The built-in MAML's mean meta-gradient and metrics (loop, one thread), after checking it
    against a naive ``autograd.grad(create_graph=True)`` loop."""
    theta = theta_of(model)
    grad, metrics = mg.meta_gradient(mg.MAML(loss, GD), theta, tasks, mode="loop", workers=1)
    n = tasks.support.x.shape[0]
    naive = [naive_maml(model, theta, mg.task_at(tasks, i), LR, STEPS, kind) for i in range(n)]
    assert rel(grad, mg.tree.mean(naive)) < 1e-10
    return theta, grad, metrics


def _same_metrics(metrics: mg.Metrics, ref: mg.Metrics) -> None:
    for key in ("query_loss", "inner_losses"):
        assert metrics[key].shape == ref[key].shape, key
        torch.testing.assert_close(metrics[key], ref[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("mode,workers", MODES, ids=["loop-1", "loop-2", "vmap"])
def test_subclass_of_maml_with_a_field_and_an_override(problem, mode, workers):
    model, loss, tasks, kind = _problem(problem)
    theta, ref, ref_metrics = _reference(model, loss, tasks, kind)
    est = ScaledMAML(loss, GD, scale=0.5)
    grad, metrics = mg.meta_gradient(est, theta, tasks, mode=mode, workers=workers)
    assert list(grad) == list(theta)
    assert rel(grad, mg.tree.scale(ref, 0.5)) < 1e-10
    _same_metrics(metrics, ref_metrics)
    # The override is what ran: once per task in the loop, once per traced batch under vmap.
    assert len(est.calls) == (3 if mode == "loop" else 1)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("mode,workers", MODES, ids=["loop-1", "loop-2", "vmap"])
def test_fresh_estimator_base_subclass_with_hand_written_steps(problem, mode, workers):
    model, loss, tasks, kind = _problem(problem)
    theta, ref, ref_metrics = _reference(model, loss, tasks, kind)
    est = HandMAML(loss, GD)
    grad, metrics = mg.meta_gradient(est, theta, tasks, mode=mode, workers=workers)
    assert list(grad) == list(theta)
    assert rel(grad, ref) < 1e-10
    _same_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_fresh_estimator_base_subclass_gets_call_adapt_and_init_meta(problem):
    model, loss, tasks, _ = _problem(problem)
    theta = theta_of(model)
    est, builtin = HandMAML(loss, GD), mg.MAML(loss, GD)
    task = mg.task_at(tasks, 0)
    grad, metrics = est(theta, task)  # EstimatorBase.__call__: checks, then meta_grad
    assert rel(grad, builtin(theta, task)[0]) < 1e-10
    assert not any(g.requires_grad for g in grad.values())
    assert rel(est.adapt(theta, task.support), builtin.adapt(theta, task.support)) < 1e-12
    assert list(est.init_meta(model)) == list(theta)
    with pytest.raises(ValueError, match="must match"):
        est(theta, mg.Task(task.support, mg.Batch(task.query.x, task.query.y[:1])))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_duck_typed_estimator_runs_in_the_loop(problem):
    model, loss, tasks, kind = _problem(problem)
    theta, ref, ref_metrics = _reference(model, loss, tasks, kind)
    est = DuckMAML(loss, GD)
    grad, metrics = mg.meta_gradient(est, theta, tasks, mode="loop", workers=1)
    assert list(grad) == list(theta)
    assert rel(grad, ref) < 1e-10
    _same_metrics(metrics, ref_metrics)
    task = mg.task_at(tasks, 0)
    builtin = mg.MAML(loss, GD)
    assert rel(est.adapt(theta, task.support), builtin.adapt(theta, task.support)) < 1e-12
    assert list(est.init_meta(model)) == list(theta)
