"""MAML's ``truncate`` and ``checkpoint`` options against naive loops, FOMAML and MAML, and the
memory the checkpointed form keeps (bytes saved for backward, counted, not timed)."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import rel, small_conv_task, small_mlp_task, theta_of
from torch import nn
from torch.func import functional_call

import metagrad as mg

SOLVERS = {
    "gd": mg.GradientDescent(lr=0.05, steps=4),
    "momentum": mg.Momentum(lr=0.05, steps=4, momentum=0.6),
    "nesterov": mg.Momentum(lr=0.05, steps=4, momentum=0.6, nesterov=True),
    "adam-minibatch": mg.Adam(lr=0.01, steps=4, batch_size=4),
}


def naive_truncated(model, theta, task, lr, steps, m, mu=0.0, head=None):
    """Heavy-ball MAML (``mu = 0``: gradient descent) with the path detached before the last m
    steps: the gradient with respect to ``phi_{S-m}`` (and, for the head's body, through the
    last m steps and the query) is the meta-gradient."""
    crit = nn.functional.mse_loss
    adapted = [k for k in theta if head is None or k.startswith(head)]
    phi = {k: v.detach().clone() for k, v in theta.items()}
    v = {k: torch.zeros_like(phi[k]) for k in adapted}

    def step(phi, v, create_graph):
        value = crit(functional_call(model, phi, (task.support.x,)), task.support.y)
        g = torch.autograd.grad(value, [phi[k] for k in adapted], create_graph=create_graph)
        v = {k: mu * v[k] - lr * gk for k, gk in zip(adapted, g, strict=True)}
        return {**phi, **{k: phi[k] + v[k] for k in adapted}}, v

    for _ in range(steps - m):
        phi = {k: t.detach().requires_grad_(k in adapted) for k, t in phi.items()}
        phi, v = step(phi, v, create_graph=False)
        v = {k: t.detach() for k, t in v.items()}
    leaves = {k: t.detach().requires_grad_() for k, t in phi.items()}
    phi = dict(leaves)
    for _ in range(m):
        phi, v = step(phi, v, create_graph=True)
    q = crit(functional_call(model, phi, (task.query.x,)), task.query.y)
    return dict(zip(leaves, torch.autograd.grad(q, list(leaves.values())), strict=True))


@pytest.mark.parametrize("mu", [0.0, 0.6], ids=["gd", "momentum"])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("head", [None, "head."], ids=["maml", "anil"])
def test_truncated_maml_equals_a_naive_loop_detached_before_the_last_m_steps(mu, m, head):
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    inner = mg.Momentum(lr=0.05, steps=4, momentum=mu) if mu else mg.GradientDescent(0.05, 4)
    est = mg.MAML(loss, inner, truncate=m, head=None if head is None else (head,))
    for i in range(2):
        task = mg.task_at(tasks, i)
        grad, _ = est(theta, task)
        assert rel(grad, naive_truncated(model, theta, task, 0.05, 4, m, mu, head)) < 1e-10
    full, _ = mg.MAML(loss, inner, head=est.head)(theta, task)
    assert rel(grad, full) > 1e-4, "truncation changes the gradient"


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_truncate_zero_is_fomaml_and_truncate_steps_is_maml(name):
    model, loss, tasks = small_conv_task()
    theta = theta_of(model)
    inner = SOLVERS[name]
    for i in range(1):
        task = mg.task_at(tasks, i)
        fomaml, _ = mg.MAML(loss, inner, first_order=True)(theta, task)
        maml, _ = mg.MAML(loss, inner)(theta, task)
        assert rel(mg.MAML(loss, inner, truncate=0)(theta, task)[0], fomaml) < 1e-12
        assert rel(mg.MAML(loss, inner, truncate=inner.steps)(theta, task)[0], maml) < 1e-12
        assert (
            rel(mg.MAML(loss, inner, truncate=0, checkpoint=True)(theta, task)[0], fomaml) < 1e-12
        )


@pytest.mark.parametrize(
    "name,problem",
    [
        pytest.param(n, p, marks=[pytest.mark.slow] if (n, p) == ("newton-cg", "conv4") else [])
        for n in [*sorted(SOLVERS), "newton-cg"]
        for p in ("mlp", "conv4")
    ],
)
def test_checkpointed_maml_equals_maml(name, problem):
    model, loss, tasks = (small_mlp_task if problem == "mlp" else small_conv_task)()
    theta = theta_of(model)
    inner = mg.NewtonCG(steps=2, cg_steps=2) if name == "newton-cg" else SOLVERS[name]
    for head in (None, ("head.",)):
        for i in range(2 if problem == "mlp" else 1):
            task = mg.task_at(tasks, i)
            maml, m1 = mg.MAML(loss, inner, head=head)(theta, task)
            ckpt, m2 = mg.MAML(loss, inner, head=head, checkpoint=True)(theta, task)
            assert rel(ckpt, maml) < 1e-12
            assert all(torch.allclose(m1[k], m2[k], rtol=1e-12, atol=0) for k in m1)


@pytest.mark.parametrize("m", [1, 3])
def test_checkpointed_truncated_maml_equals_truncated_maml(m):
    model, loss, tasks = small_mlp_task()
    theta = theta_of(model)
    task = mg.task_at(tasks, 0)
    for inner in SOLVERS.values():
        plain, _ = mg.MAML(loss, inner, truncate=m)(theta, task)
        ckpt, _ = mg.MAML(loss, inner, truncate=m, checkpoint=True)(theta, task)
        assert rel(ckpt, plain) < 1e-12


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """The bytes of the tensors autograd holds for backward: the peak while the block runs."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        meter = self

        class Held:
            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.n = t, t.numel() * t.element_size()
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self) -> None:
                meter.live -= self.n

        super().__init__(Held, lambda held: held.t)


def _peak_saved(est, theta, task) -> int:
    meter = _SavedBytes()
    with meter:
        est(theta, task)
    return meter.peak


def test_checkpointed_maml_keeps_one_steps_graph_at_a_time():
    model, loss, tasks = small_conv_task()
    theta, task = theta_of(model), mg.task_at(tasks, 0)
    peaks = {}
    for steps in (2, 6):
        inner = mg.GradientDescent(lr=0.1, steps=steps)
        peaks["maml", steps] = _peak_saved(mg.MAML(loss, inner), theta, task)
        peaks["checkpoint", steps] = _peak_saved(mg.MAML(loss, inner, checkpoint=True), theta, task)
        peaks["truncate", steps] = _peak_saved(mg.MAML(loss, inner, truncate=1), theta, task)
    assert peaks["maml", 6] > 2 * peaks["maml", 2], "MAML keeps every step's graph"
    assert peaks["checkpoint", 6] == peaks["checkpoint", 2], "one step's graph, whatever S"
    assert peaks["truncate", 6] == peaks["truncate", 2], "the graph of the last m steps"
    assert peaks["checkpoint", 6] < peaks["maml", 6] / 3


def test_checkpoint_and_truncate_agree_between_loop_and_vmap_with_native_batch_norm():
    model, loss, tasks = small_conv_task(n_tasks=3, native=True)
    theta = theta_of(model)
    for est in (
        mg.MAML(loss, SOLVERS["adam-minibatch"], checkpoint=True),
        mg.MAML(loss, SOLVERS["nesterov"], truncate=2),
    ):
        loop, _ = mg.meta_gradient(est, theta, tasks, mode="loop")
        vmap, _ = mg.meta_gradient(est, theta, tasks, mode="vmap")
        assert rel(vmap, loop) < 1e-10
        ref, _ = mg.meta_gradient(
            mg.MAML(loss, est.inner, truncate=est.truncate), theta, tasks, mode="loop"
        )
        assert rel(loop, ref) < 1e-12


class _Opaque:
    """A solver that is only a callable (no init / step)."""

    steps = 2

    def __call__(self, loss, init, batch, *, keys=None, record=False):
        return mg.GradientDescent(lr=0.1, steps=2)(loss, init, batch, keys=keys, record=record)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"truncate": -1}, r"truncate=-1: give a number of steps in \[0, 4\]"),
        ({"truncate": 5}, r"truncate=5: .* 0 is first-order MAML, 4 is MAML"),
        ({"truncate": 1.5}, r"truncate=1.5"),
        ({"truncate": 2, "first_order": True}, r"first-order MAML is truncate=0"),
        ({"checkpoint": True, "first_order": True}, r"checkpoint=True with first_order=True"),
    ],
)
def test_bad_maml_options_raise_naming_the_value_and_the_fix(options, match):
    model, loss, _ = small_mlp_task()
    with pytest.raises(ValueError, match=match):
        mg.MAML(loss, mg.GradientDescent(lr=0.1, steps=4), **options)


def test_truncate_and_checkpoint_need_a_solver_written_as_steps():
    model, loss, tasks = small_mlp_task()
    for options in ({"truncate": 1}, {"checkpoint": True}):
        with pytest.raises(ValueError, match=r"need an inner solver written as steps.*_Opaque"):
            mg.MAML(loss, _Opaque(), **options)
    grad, _ = mg.MAML(loss, _Opaque())(theta_of(model), mg.task_at(tasks, 0))  # plain MAML: fine
    assert set(grad) == set(theta_of(model))
