"""Small float64 problems and naive reference implementations for the core tests.

The references use plain ``torch.autograd`` (or closed forms) and never call metagrad's solvers,
so they are independent of the code under test.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import metagrad as mg

DT = torch.float64


def linear_regression(n_tasks: int = 1, n: int = 12, d: int = 4, seed: int = 0):
    """A linear model ``y = x w`` (no bias), MSE loss, and a batch of regression tasks."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=DT))
    xs = torch.randn(n_tasks, n, d, generator=g, dtype=DT)
    xq = torch.randn(n_tasks, n, d, generator=g, dtype=DT)
    w_true = torch.randn(n_tasks, d, 1, generator=g, dtype=DT)
    ys, yq = xs @ w_true, xq @ w_true
    tasks = mg.Task(mg.Batch(xs, ys), mg.Batch(xq, yq))
    return model, mg.loss_fn(model, "mse"), tasks


def small_mlp_task(n_tasks: int = 3, seed: int = 0, sizes=(1, 8, 8, 1)):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mg.models.MLP(sizes).to(DT)
    x = torch.rand(n_tasks, 2, 10, 1, generator=g, dtype=DT) * 10 - 5
    a = torch.rand(n_tasks, 1, 1, 1, generator=g, dtype=DT) * 4 + 1
    y = a * torch.sin(x + a)
    tasks = mg.Task(mg.Batch(x[:, 0], y[:, 0]), mg.Batch(x[:, 1], y[:, 1]))
    return model, mg.loss_fn(model, "mse"), tasks


def small_conv_task(n_tasks: int = 2, ways: int = 3, shots: int = 2, seed: int = 0, native=False):
    """A small Conv4 (or a net with the native batch-norm kernel) on random images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model: nn.Module
    if native:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.ReLU(),
            nn.Flatten(),
        )
        model.add_module("head", nn.Linear(4 * 4 * 4, ways))
        model = model.to(DT)
    else:
        model = mg.models.Conv4(1, ways, hidden=4, image_size=8).to(DT)
    x = torch.randn(n_tasks, 2, ways * shots, 1, 8, 8, generator=g, dtype=DT)
    y = torch.arange(ways).repeat(shots).expand(n_tasks, 2, -1)
    tasks = mg.Task(mg.Batch(x[:, 0], y[:, 0]), mg.Batch(x[:, 1], y[:, 1]))
    return model, mg.loss_fn(model, "cross_entropy"), tasks


def theta_of(model: nn.Module) -> mg.Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def naive_sgd_path(model, theta, batch, lr, steps, create_graph, loss_kind="mse"):
    """Gradient descent with ``torch.autograd.grad``: the path, losses and gradients."""
    crit = nn.functional.mse_loss if loss_kind == "mse" else nn.functional.cross_entropy
    phi = {k: v.detach().requires_grad_() for k, v in theta.items()}
    path, losses, grads = [phi], [], []
    for _ in range(steps):
        value = crit(functional_call(model, phi, (batch.x,)), batch.y)
        g = torch.autograd.grad(value, list(phi.values()), create_graph=create_graph)
        g = dict(zip(phi, g, strict=True))
        phi = {k: phi[k] - lr * g[k] for k in phi}
        if not create_graph:
            phi = {k: v.detach().requires_grad_() for k, v in phi.items()}
        path.append(phi)
        losses.append(value)
        grads.append(g)
    losses.append(crit(functional_call(model, phi, (batch.x,)), batch.y))
    return path, losses, grads


def naive_maml(model, theta, task, lr, steps, loss_kind="mse", head=None):
    """Second-order MAML with ``autograd.grad(create_graph=True)``."""
    crit = nn.functional.mse_loss if loss_kind == "mse" else nn.functional.cross_entropy
    th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    phi = dict(th)
    adapted = [k for k in th if head is None or k.startswith(head)]
    for _ in range(steps):
        value = crit(functional_call(model, phi, (task.support.x,)), task.support.y)
        g = torch.autograd.grad(value, [phi[k] for k in adapted], create_graph=True)
        phi.update({k: phi[k] - lr * gk for k, gk in zip(adapted, g, strict=True)})
    q = crit(functional_call(model, phi, (task.query.x,)), task.query.y)
    return dict(zip(th, torch.autograd.grad(q, list(th.values())), strict=True))


def rel(a: mg.Params, b: mg.Params) -> float:
    """``||a - b|| / ||b||`` over all entries."""
    num = sum(float(((a[k] - b[k]).detach() ** 2).sum()) for k in b)
    den = sum(float((b[k].detach() ** 2).sum()) for k in b)
    return (num / den) ** 0.5
