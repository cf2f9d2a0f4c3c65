"""ResNet-12: its shape, a forward pass against a reference written from torch's functional ops,
exact derivatives (finite differences), and float64 loop == vmap for every registered algorithm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metagrad as mg
from metagrad import autodiff
from metagrad.models import MODELS, ResNet12

DT = torch.float64
GD = mg.GradientDescent(lr=0.2, steps=2)
HF = mg.NewtonCG(steps=2, cg_steps=3)
NARROW = (2, 2, 3, 3)

# The variants of tests/test_core_conformance.py, on a ResNet-12.
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
    "probabilistic-imaml": lambda loss: mg.build(
        "probabilistic-imaml", loss, GD, prior_std=0.5, samples=2, cg_steps=3
    ),
}
SLOW = {"imaml-hf", "imaml-damped", "maml-through-newton-cg"}  # Hessian-vector products


def rel(a: mg.Params, b: mg.Params) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return num / max(sum(float(b[k].pow(2).sum()) for k in b) ** 0.5, 1e-300)


def reference(params: mg.Params, x: torch.Tensor, pool: str = "flatten") -> torch.Tensor:
    """ResNet-12 from its description, in torch's functional ops (batch statistics)."""

    def bn(z, name):
        mean = z.mean((0, 2, 3), keepdim=True)
        var = z.var((0, 2, 3), keepdim=True, correction=0)
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        return (z - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    for i in range(4):
        p = f"blocks.{i}."
        h = F.leaky_relu(bn(F.conv2d(x, params[p + "conv1.weight"], padding=1), p + "bn1"), 0.1)
        h = F.leaky_relu(bn(F.conv2d(h, params[p + "conv2.weight"], padding=1), p + "bn2"), 0.1)
        h = bn(F.conv2d(h, params[p + "conv3.weight"], padding=1), p + "bn3")
        skip = bn(F.conv2d(x, params[p + "shortcut.weight"]), p + "bn_shortcut")
        x = F.max_pool2d(F.leaky_relu(h + skip, 0.1), 2)
    features = x.mean((2, 3)) if pool == "avg" else x.reshape(len(x), -1)
    return features @ params["head.weight"].t() + params["head.bias"]


def test_output_shapes_and_parameter_count():
    model = ResNet12(5)
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert model.head.in_features == 640 * 5 * 5
    assert ResNet12(7, image_size=32).head.in_features == 640 * 2 * 2
    assert ResNet12(5, pool="avg").head.in_features == 640
    narrow = ResNet12(3, image_size=32, channels=NARROW, pool="avg")
    assert narrow(torch.zeros(4, 3, 32, 32)).shape == (4, 3)
    widths = (3, 64, 160, 320, 640)
    convs = sum(
        9 * a * b + 18 * b * b + a * b for a, b in zip(widths[:-1], widths[1:], strict=True)
    )
    norms = sum(4 * 2 * b for b in widths[1:])
    assert sum(p.numel() for p in model.parameters()) == convs + norms + 16000 * 5 + 5
    assert not list(model.buffers())  # no running statistics
    built = MODELS.build("resnet12", in_channels=3, n_way=4, image_size=32)
    assert isinstance(built, ResNet12) and built.head.out_features == 4
    assert built.head.in_features == 640 * 2 * 2


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("pool", ["flatten", "avg"])
def test_forward_matches_the_reference(backend, pool):
    torch.manual_seed(0)
    model = ResNet12(4, channels=NARROW, image_size=32, pool=pool).to(DT)
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
    x = torch.randn(6, 3, 32, 32, dtype=DT)
    with autodiff.use(backend):
        out = functional_call(model, params, (x,))
    assert torch.allclose(out, reference(params, x, pool), rtol=1e-10, atol=1e-12)


def _loss_of_some_parameters():
    """The loss as a function of a few small parameter tensors (a convolution, batch norms, the
    head), so that finite differences stay cheap."""
    torch.manual_seed(1)
    model = ResNet12(3, channels=(2, 2, 2, 2), image_size=16).to(DT)
    names = ["blocks.0.bn1.weight", "blocks.1.shortcut.weight", "blocks.2.bn_shortcut.bias"]
    names += ["blocks.3.bn3.weight", "head.bias"]
    base = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])

    def loss(*chosen):
        params = base | dict(zip(names, chosen, strict=True))
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss, tuple(base[k].clone().requires_grad_() for k in names)


def test_gradients_against_finite_differences():
    assert torch.autograd.gradcheck(*_loss_of_some_parameters())


@pytest.mark.slow
def test_second_derivatives_against_finite_differences():
    assert torch.autograd.gradgradcheck(*_loss_of_some_parameters())


def test_functional_call_leaves_parameters_and_inputs_alone():
    model = ResNet12(3, channels=NARROW, image_size=16).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    before = {k: v.detach().clone() for k, v in theta.items()}
    x = torch.randn(6, 3, 16, 16, dtype=DT)
    x0 = x.clone()
    out = functional_call(model, theta, (x,)).sum()
    grads = torch.autograd.grad(out, list(theta.values()), create_graph=True)
    torch.autograd.grad(sum(g.sum() for g in grads), list(theta.values()), allow_unused=True)
    assert all(torch.equal(theta[k].detach(), before[k]) for k in theta) and torch.equal(x, x0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": (64, 160, 320)}, "give 4 positive integers"),
        ({"channels": (64, 0, 320, 640)}, "give 4 positive integers"),
        ({"pool": "max"}, "use 'flatten'"),
        ({"image_size": 15}, "image_size=15 is under 16"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNet12(5, **kwargs)


def test_every_registered_algorithm_is_covered():
    covered = {a for a in mg.ALGORITHMS for v in VARIANTS if v == a or v.startswith(a + "-")}
    assert covered == set(mg.ALGORITHMS)


def _task(n_tasks: int = 2, ways: int = 3, shots: int = 2):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet12(ways, channels=NARROW, image_size=16).to(DT)
    x = torch.randn(n_tasks, 2, ways * shots, 3, 16, 16, generator=g, dtype=DT)
    y = torch.arange(ways).repeat_interleave(shots).expand(n_tasks, 2, -1)
    tasks = mg.Task(mg.Batch(x[:, 0], y[:, 0]), mg.Batch(x[:, 1], y[:, 1]))
    return model, mg.loss_fn(model, "cross_entropy"), tasks


@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=[pytest.mark.slow] if v in SLOW else []) for v in sorted(VARIANTS)],
)
def test_loop_and_vmap_agree_in_float64(variant):
    model, loss, tasks = _task()
    est = VARIANTS[variant](loss)
    theta = {k: v.detach().clone() for k, v in est.init_meta(model).items()}
    loop, mloop = mg.meta_gradient(est, theta, tasks, mode="loop")
    vmap, mvmap = mg.meta_gradient(est, theta, tasks, mode="vmap")
    assert set(loop) == set(theta) and all(torch.isfinite(v).all() for v in loop.values())
    assert sum(float(v.abs().sum()) for v in loop.values()) > 0  # not trivially zero
    assert rel(vmap, loop) < 1e-10
    for k in mloop:
        assert torch.allclose(mloop[k], mvmap[k], rtol=1e-10, atol=1e-12)
