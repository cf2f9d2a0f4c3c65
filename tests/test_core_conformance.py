"""One suite over every registered algorithm: shapes, purity, determinism, loop == vmap."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from _core_helpers import rel, small_conv_task, small_mlp_task, theta_of

import metagrad as mg

GD = mg.GradientDescent(lr=0.2, steps=2)
HF = mg.NewtonCG(steps=2, cg_steps=3)

VARIANTS = {
    "maml": lambda loss: mg.build("maml", loss, GD),
    "fomaml": lambda loss: mg.build("fomaml", loss, GD),
    "anil": lambda loss: mg.build("anil", loss, GD, head=("head.",)),
    "reptile": lambda loss: mg.build("reptile", loss, GD),
    "leap-energy": lambda loss: mg.build("leap", loss, GD),
    "leap-length": lambda loss: mg.build("leap", loss, GD, metric="length"),
    "imaml-gd": lambda loss: mg.build("imaml", loss, GD, lam=2.0, cg_steps=3),
    "imaml-hf": lambda loss: mg.build("imaml", loss, HF, lam=2.0, cg_steps=3),
    "imaml-damped": lambda loss: mg.IMAML(loss, GD, lam=2.0, cg_damping=1.0, lam_damping=10.0),
    "maml-through-newton-cg": lambda loss: mg.MAML(loss, mg.NewtonCG(steps=1, cg_steps=2)),
    "maml-learn-lr-parameter": lambda loss: mg.MAML(loss, GD, learn_lr="parameter"),
    "anil-learn-lr-layer-step": lambda loss: mg.ANIL(loss, GD, learn_lr="layer-step"),
    "probabilistic-imaml": lambda loss: mg.build(
        "probabilistic-imaml", loss, GD, prior_std=0.5, samples=2, cg_steps=3
    ),
    # The other registered solvers, and MAML's truncate and checkpoint options.
    "maml-momentum": lambda loss: mg.build("maml", loss, SOLVERS["momentum"]),
    "maml-nesterov-checkpoint": lambda loss: mg.MAML(loss, SOLVERS["nesterov"], checkpoint=True),
    "maml-adam-truncate": lambda loss: mg.MAML(loss, SOLVERS["adam"], truncate=1),
    "fomaml-nesterov": lambda loss: mg.build("fomaml", loss, SOLVERS["nesterov"]),
    "reptile-adam": lambda loss: mg.build("reptile", loss, SOLVERS["adam"]),
    "leap-momentum": lambda loss: mg.build("leap", loss, SOLVERS["momentum"]),
    "imaml-nesterov": lambda loss: mg.IMAML(loss, SOLVERS["nesterov"], lam=2.0, cg_steps=3),
}
SOLVERS = {  # one of each registered inner solver, mini-batches (of 4) included
    "gd": GD,
    "newton-cg": HF,
    "momentum": mg.Momentum(lr=0.1, steps=2, momentum=0.5),
    "nesterov": mg.Momentum(lr=0.1, steps=2, momentum=0.5, nesterov=True, batch_size=4),
    # Adam divides by |g| + eps: the conv biases before batch norm have zero gradient up to
    # rounding (~1e-10), and with eps=1e-8 that noise alone moves them by ~lr/100, so two
    # summation orders (threads) disagree at 1e-9. eps=1e-3 keeps the step well-conditioned.
    "adam": mg.Adam(lr=0.01, steps=2, eps=1e-3, batch_size=4),
}

PROBLEMS = {"mlp": small_mlp_task, "conv4": small_conv_task}
HEAVY = {"imaml-hf", "imaml-damped", "maml-through-newton-cg"}  # Hessian-vector products: slow


def _cases(*axes):
    """Parameter grid (a list: pytest takes collections); the Hessian-vector-product variants on
    conv nets are marked slow."""
    cases = []
    for combo in itertools.product(*axes):
        heavy = combo[0] in HEAVY and combo[1] in ("conv4", False, True)
        cases.append(pytest.param(*combo, marks=[pytest.mark.slow] if heavy else []))
    return cases


def test_every_registered_algorithm_is_covered():
    covered = {a for a in mg.ALGORITHMS for v in VARIANTS if v == a or v.startswith(a + "-")}
    assert covered == set(mg.ALGORITHMS)


def test_every_registered_solver_is_covered():
    assert set(SOLVERS) == set(mg.INNER_SOLVERS)
    for name, solver in SOLVERS.items():
        assert type(solver) is type(mg.INNER_SOLVERS.build(name, steps=2)), name
    loss = small_mlp_task()[1]
    used = {id(build(loss).inner) for build in VARIANTS.values()}
    assert {id(s) for s in SOLVERS.values()} <= used


@pytest.mark.parametrize("variant,problem", _cases(sorted(VARIANTS), sorted(PROBLEMS)))
def test_conformance(variant, problem):
    model, loss, tasks = PROBLEMS[problem]()
    est = VARIANTS[variant](loss)
    theta = est.init_meta(model)
    before_theta = copy.deepcopy({k: v.detach().clone() for k, v in theta.items()})
    before_tasks = [t.clone() for b in tasks for t in b]

    grad, metrics = est(theta, mg.task_at(tasks, 0))
    assert list(grad) == list(theta)
    for k in theta:
        assert grad[k].shape == theta[k].shape and grad[k].dtype == theta[k].dtype
        assert torch.isfinite(grad[k]).all()
        assert not grad[k].requires_grad
    assert all(torch.isfinite(v).all() for v in metrics.values())

    batch_grad, batch_metrics = mg.meta_gradient(est, theta, tasks, mode="loop")
    again, _ = mg.meta_gradient(est, theta, tasks, mode="loop")
    assert all(torch.equal(batch_grad[k], again[k]) for k in theta), "not deterministic"
    assert batch_metrics["query_loss"].dim() == 0

    # Inputs untouched; no .grad written.
    assert all(torch.equal(theta[k].detach(), before_theta[k]) for k in theta)
    assert all(p.grad is None for p in model.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip((t for b in tasks for t in b), before_tasks, strict=True)
    )

    # The mean over tasks equals the mean of the single-task calls.
    singles = [est(theta, mg.task_at(tasks, i))[0] for i in range(tasks.support.x.shape[0])]
    assert rel(batch_grad, mg.tree.mean(singles)) < 1e-12

    # Adapted parameters, or a posterior over them (mean and std), keyed like the model's.
    adapted = est.adapt(theta, mg.task_at(tasks, 0).support)
    for phi in adapted if isinstance(adapted, mg.Posterior) else [adapted]:
        assert list(phi) == list(mg.params_of(model))
        assert not any(v.requires_grad for v in phi.values())


@pytest.mark.parametrize("variant,native_batch_norm", _cases(sorted(VARIANTS), [False, True]))
def test_loop_and_vmap_agree_in_float64_with_batch_norm(variant, native_batch_norm):
    if variant == "maml-through-newton-cg" and native_batch_norm:
        pytest.skip("the native batch-norm kernel's third derivative is wrong (see README)")
    model, loss, tasks = small_conv_task(n_tasks=3, native=native_batch_norm)
    est = VARIANTS[variant](loss)
    theta = {k: v.detach().clone() for k, v in est.init_meta(model).items()}
    loop, mloop = mg.meta_gradient(est, theta, tasks, mode="loop")
    vmap, mvmap = mg.meta_gradient(est, theta, tasks, mode="vmap")
    assert rel(vmap, loop) < 1e-10
    for k in mloop:
        assert torch.allclose(mloop[k], mvmap[k], rtol=1e-10, atol=1e-12)
    chunked, _ = mg.meta_gradient(est, theta, tasks, mode="vmap", chunk=2)
    assert rel(chunked, loop) < 1e-10


def test_metrics_report_accuracy_for_classification_and_cg_residual_for_imaml():
    model, loss, tasks = small_conv_task()
    _, metrics = mg.meta_gradient(VARIANTS["imaml-gd"](loss), theta_of(model), tasks)
    assert {"query_loss", "query_accuracy", "cg_residual", "inner_losses"} <= set(metrics)
    assert 0 <= float(metrics["query_accuracy"]) <= 1
    assert metrics["inner_losses"].shape == (GD.steps,)


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - HEAVY))
def test_worker_threads_give_the_single_thread_result(variant):
    """Tasks spread over threads: per-task results in task order, sums equal to round-off."""
    model, loss, tasks = small_conv_task(n_tasks=5)
    est = VARIANTS[variant](loss)
    theta = {k: v.detach().clone() for k, v in est.init_meta(model).items()}
    threads = torch.get_num_threads()
    one, m1 = mg.meta_gradient(est, theta, tasks, workers=1)
    for workers in (2, 3, 8):  # 8 > 5 tasks: one task per thread
        many, mk = mg.meta_gradient(est, theta, tasks, workers=workers)
        assert rel(many, one) < 1e-12
        for k in m1:
            assert torch.allclose(mk[k], m1[k], rtol=1e-12, atol=0)
        assert torch.get_num_threads() == threads  # restored after the threads ran
    singles = [est(theta, mg.task_at(tasks, i))[0] for i in range(5)]
    assert rel(one, mg.tree.mean(singles)) < 1e-12


def test_worker_threads_name_the_failing_task_and_refuse_an_opaque_loss():
    model, loss, tasks = small_conv_task(n_tasks=4)
    s, q = tasks
    x = s.x.clone()
    x[3, 0, 0, 0, 0] = float("nan")
    est = mg.MAML(loss, mg.GradientDescent(lr=0.1, steps=2))
    with pytest.raises(ValueError, match=r"task 3, inner step 0"):
        mg.meta_gradient(est, theta_of(model), mg.Task(mg.Batch(x, s.y), q), workers=2)
    opaque = mg.MAML(lambda p, b: loss(p, b), mg.GradientDescent(lr=0.1, steps=1))
    with pytest.raises(ValueError, match=r"pass workers=1"):
        mg.meta_gradient(opaque, theta_of(model), tasks, workers=2)
    grad, _ = mg.meta_gradient(opaque, theta_of(model), tasks)  # automatic: one thread
    ref, _ = mg.meta_gradient(mg.MAML(loss, opaque.inner), theta_of(model), tasks, workers=1)
    assert rel(grad, ref) < 1e-12
    with pytest.raises(ValueError, match=r"workers=0"):
        mg.meta_gradient(est, theta_of(model), tasks, workers=0)
