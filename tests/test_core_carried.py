"""Reptile with the inner Adam's state carried from task to task (``carry_state=True``), against
one ``torch.optim.Adam`` kept across tasks, as the Reptile paper's released code runs it."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import DT, small_mlp_task, theta_of
from torch import nn
from torch.func import functional_call

import metagrad as mg
from metagrad.algorithms.reptile import STATE
from metagrad.tasks import select
from metagrad.training import preset, resume, train
from metagrad.training.loop import check_config

BETAS = (0.0, 0.999)


def _torch_adam_reptile(model, theta, tasks, order, lr, steps, outer_lr):
    """Reptile, one task per meta-step, its inner loop one ``torch.optim.Adam`` for all tasks:
    each task resets the weights to theta and keeps the optimiser's state (step and moments)."""
    w = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.Adam(list(w.values()), lr=lr, betas=BETAS, eps=1e-8)
    th = {k: v.detach().clone() for k, v in theta.items()}
    for i in order:
        task = mg.task_at(tasks, i)
        with torch.no_grad():
            for k in w:
                w[k].copy_(th[k])
        for _ in range(steps):
            opt.zero_grad()
            y = functional_call(model, w, (task.support.x,))
            nn.functional.mse_loss(y, task.support.y).backward()
            opt.step()
        th = {k: th[k] + outer_lr * (w[k].detach() - th[k]) for k in th}
    state = {k: opt.state[w[k]] for k in w}
    return th, state


def test_carried_adam_over_tasks_one_after_another_equals_one_torch_adam():
    model, loss, tasks = small_mlp_task(n_tasks=3)
    theta = theta_of(model)
    adam = mg.Adam(lr=0.01, steps=4, betas=BETAS)
    est = mg.Reptile(loss, adam, carry_state=True)
    meta = {**theta, **{k: v for k, v in est.init_meta(model).items() if k.startswith(STATE)}}
    order, outer = [0, 1, 2, 1, 0], 0.5
    for i in order:  # meta-batches of one task: carry is then exact
        one = select(tasks, [i])
        grads, _ = mg.meta_gradient(est, meta, one)
        new = {k: meta[k] - outer * grads[k] for k in theta}
        meta = {**new, **est.carry(meta, grads, 1)}
    want, state = _torch_adam_reptile(model, theta, tasks, order, 0.01, 4, outer)
    for k in theta:
        assert torch.allclose(meta[k], want[k], rtol=1e-12, atol=1e-14), k
        assert torch.allclose(meta[f"{STATE}v.{k}"], state[k]["exp_avg_sq"], rtol=1e-12, atol=0)
    assert float(meta[f"{STATE}count.t"]) == float(state["body.0.weight"]["step"]) == 20
    # At test time each task starts from the carried state, and the state does not change.
    support = mg.task_at(tasks, 2).support
    a, b = est.adapt(meta, support), est.adapt(meta, support)
    reset = mg.Reptile(loss, adam).adapt({k: meta[k] for k in theta}, support)
    assert all(torch.equal(a[k], b[k]) for k in theta)
    assert max(float((a[k] - reset[k]).abs().max()) for k in theta) > 1e-4


def test_carried_state_of_a_meta_batch_is_bounded_by_tasks_run_one_after_another():
    """With one inner step the tasks' gradients do not depend on the state, so the sequential v
    is known in closed form: b^n s + (1 - b) sum_i b^(n-1-i) g_i^2; the carried one is documented
    to leave the b^(n-1-i) out, so b^(n-1) carried <= sequential <= carried."""
    model, loss, tasks = small_mlp_task(n_tasks=4)
    theta = theta_of(model)
    b2 = 0.9  # far from 1, so the bound is tight enough to fail if the decays were wrong
    est = mg.Reptile(loss, mg.Adam(lr=0.01, steps=1, betas=(0.0, b2)), carry_state=True)
    meta = est.init_meta(model)
    s = {k: torch.rand_like(v) for k, v in theta.items()}
    meta = {**theta, **{k: v for k, v in meta.items() if k.startswith(STATE)}}
    meta.update({f"{STATE}v.{k}": s[k] for k in theta})
    meta[f"{STATE}count.t"] = torch.tensor(7.0, dtype=DT)
    for mode in ("loop", "vmap"):
        grads, _ = mg.meta_gradient(est, meta, tasks, mode=mode)
        carried = est.carry(meta, grads, 4)
        assert float(carried[f"{STATE}count.t"]) == 11.0
        for k in theta:
            g2 = [_grad(model, theta, mg.task_at(tasks, i).support, k) ** 2 for i in range(4)]
            seq = b2**4 * s[k] + (1 - b2) * sum(b2 ** (3 - i) * g2[i] for i in range(4))
            c = carried[f"{STATE}v.{k}"]
            # What the docs promise: the decays of four tasks, each task's addition undecayed.
            promised = b2**4 * s[k] + (1 - b2) * sum(g2)
            assert torch.allclose(c, promised, rtol=1e-12, atol=1e-15), (mode, k)
            assert torch.all(b2**3 * c <= seq * (1 + 1e-12)), (mode, k)
            assert torch.all(seq <= c * (1 + 1e-12) + 1e-300), (mode, k)
            assert not torch.allclose(c, seq), "the bound must be able to tell them apart"


def _grad(model, theta, batch, key):
    w = {k: v.detach().clone().requires_grad_(k == key) for k, v in theta.items()}
    y = functional_call(model, w, (batch.x,))
    (g,) = torch.autograd.grad(nn.functional.mse_loss(y, batch.y), [w[key]])
    return g


def test_carry_state_needs_a_solver_with_state():
    model, loss, _ = small_mlp_task()
    with pytest.raises(ValueError, match="--inner adam"):
        mg.Reptile(loss, mg.GradientDescent(lr=0.1, steps=2), carry_state=True)
    with pytest.raises(ValueError, match="read by reptile only"):
        check_config(preset("quickstart").override(inner_carry=True))
    with pytest.raises(ValueError, match="--inner adam"):
        check_config(preset("sinusoid-reptile").override(inner="gd", inner_carry=True))


TINY = dict(steps=10, meta_batch=2, log_every=5, checkpoint_every=4, eval_tasks=10)
"""The paper's linear annealing depends on the run's length: a constant meta step here, so that
a run of 6 steps resumed to 10 is the run of 10."""


def _carried(**changes):
    config = preset("sinusoid-reptile").override(
        inner="adam",
        inner_betas=BETAS,
        inner_lr=0.01,
        inner_carry=True,
        tensorboard=False,
        schedule="constant",
    )
    return config.override(**{**TINY, **changes})


def test_training_carries_the_state_and_resumes_it_bit_for_bit(tmp_path):
    whole = train(_carried(), tmp_path / "whole", progress=False)
    v = [whole.params[k] for k in whole.params if k.startswith(f"{STATE}v.")]
    assert v and all(float(t.abs().sum()) > 0 for t in v), "the carried moments moved"
    assert float(whole.params[f"{STATE}count.t"]) == 10 * 2 * _carried().algo.inner_steps
    train(_carried(steps=6), tmp_path / "part", progress=False)
    resumed = resume(tmp_path / "part", progress=False, steps=10)
    for k, t in whole.params.items():
        assert torch.equal(t.detach(), resumed.params[k].detach()), k
    assert whole.evaluation == resumed.evaluation
    plain = train(_carried(inner_carry=False), tmp_path / "plain", progress=False)
    assert not any(k.startswith(STATE) for k in plain.params)
    assert plain.evaluation != whole.evaluation
