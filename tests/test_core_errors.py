"""Bad input raises ValueError whose message names the bad value and the fix."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import linear_regression, small_mlp_task, theta_of
from torch import nn

import metagrad as mg


def test_lam_must_be_positive():
    _, loss, _ = linear_regression()
    for lam in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"lam={lam}.*> 0"):
            mg.IMAML(loss, mg.GradientDescent(), lam=lam)


def test_negative_steps():
    with pytest.raises(ValueError, match=r"steps=-1.*>= 0"):
        mg.GradientDescent(lr=0.1, steps=-1)
    with pytest.raises(ValueError, match=r"steps=-2"):
        mg.NewtonCG(steps=-2)
    _, loss, _ = linear_regression()
    with pytest.raises(ValueError, match=r"cg_steps=-1"):
        mg.IMAML(loss, mg.GradientDescent(), cg_steps=-1)
    with pytest.raises(ValueError, match=r"lr=0"):
        mg.GradientDescent(lr=0, steps=1)


def test_head_prefix_matching_no_parameter():
    model, loss, tasks = small_mlp_task()
    anil = mg.ANIL(loss, mg.GradientDescent(lr=0.1, steps=1), head=["classifier."])
    with pytest.raises(ValueError, match=r"classifier\..*matches no parameter.*head\.weight"):
        anil(theta_of(model), mg.task_at(tasks, 0))
    with pytest.raises(ValueError, match=r"head="):
        mg.ANIL(loss, mg.GradientDescent(), head=[])


def test_mismatched_support_and_query_shapes():
    model, loss, tasks = small_mlp_task()
    maml = mg.MAML(loss, mg.GradientDescent(lr=0.1, steps=1))
    s, q = tasks
    bad_y = mg.Task(mg.Batch(s.x, s.y[:, :-1]), q)
    with pytest.raises(ValueError, match=r"support\.x has shape .* support\.y"):
        mg.meta_gradient(maml, theta_of(model), bad_y)
    bad_features = mg.Task(s, mg.Batch(torch.cat([q.x, q.x], -1), q.y))
    with pytest.raises(ValueError, match=r"same number of tasks and examples of the same shape"):
        mg.meta_gradient(maml, theta_of(model), bad_features)
    bad_tasks = mg.Task(s, mg.Batch(q.x[:2], q.y[:2]))
    with pytest.raises(ValueError, match=r"same number of tasks"):
        mg.meta_gradient(maml, theta_of(model), bad_tasks)
    with pytest.raises(ValueError, match=r"first 1 dims"):
        maml(theta_of(model), mg.Task(mg.Batch(s.x[0], s.y[0, :3]), mg.task_at(tasks, 0).query))


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "leap", "imaml"])
def test_non_finite_loss_during_adaptation_names_the_inner_step(algo):
    model, loss, tasks = linear_regression(n_tasks=2)
    est = mg.build(algo, loss, mg.GradientDescent(lr=1e160, steps=3))
    with pytest.raises(ValueError, match=r"non-finite support loss .* at task 0, inner step 1"):
        mg.meta_gradient(est, theta_of(model), tasks)
    with pytest.raises(ValueError, match=r"at inner step 1: lower the inner learning rate"):
        est(theta_of(model), mg.task_at(tasks, 1))


def test_non_finite_data_is_reported_at_step_zero():
    model, loss, tasks = linear_regression(n_tasks=2)
    s, q = tasks
    x = s.x.clone()
    x[1, 0, 0] = float("nan")
    est = mg.MAML(loss, mg.GradientDescent(lr=0.1, steps=2))
    with pytest.raises(ValueError, match=r"task 1, inner step 0"):
        mg.meta_gradient(est, theta_of(model), mg.Task(mg.Batch(x, s.y), q))


def test_other_bad_settings():
    model, loss, tasks = small_mlp_task()
    with pytest.raises(ValueError, match=r"mode='fast'.*'loop' or 'vmap'"):
        mg.meta_gradient(mg.MAML(loss, mg.GradientDescent()), theta_of(model), tasks, mode="fast")
    with pytest.raises(ValueError, match=r"unknown algorithm 'mamll'"):
        mg.build("mamll", loss, mg.GradientDescent())
    with pytest.raises(ValueError, match=r"metric='area'"):
        mg.Leap(loss, mg.GradientDescent(), metric="area")
    with pytest.raises(ValueError, match=r"loss kind 'hinge'"):
        mg.loss_fn(model, "hinge")
    with pytest.raises(ValueError, match=r"track_running_stats=False"):
        mg.loss_fn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "mse")
    with pytest.raises(ValueError, match=r"accuracy needs a classification loss"):
        loss.accuracy(theta_of(model), mg.task_at(tasks, 0).query)
