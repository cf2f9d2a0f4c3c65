"""The closed-form double backward of batch norm (``metagrad._bn``) against its own oracles.

Two independent truths, in float64: finite differences (``torch.autograd.gradcheck`` and
``gradgradcheck``, also through a first gradient so that the third derivative is checked), and a
batch norm written from ``torch.var_mean`` whose derivatives of every order autograd takes itself.
Each case runs on 2-d ``(N, C)``, 3-d, 4-d and channels-last 4-d inputs, with and without the ReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from metagrad._bn import batch_norm_relu

DT = torch.float64
EPS = 1e-5
SHAPES = {
    "2d": (7, 3),
    "3d": (4, 3, 5),
    "4d": (3, 2, 3, 4),
    "4d-channels-last": (3, 2, 3, 4),
}
CASES = [pytest.param(shape, relu, id=f"{shape}-relu{int(relu)}") for shape in SHAPES
         for relu in (False, True)]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread (a busy shared CPU makes a thread pool many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(shape: str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, w, b)`` in float64, leaves that require grad; ``w`` away from zero, ``b`` nonzero."""
    g = torch.Generator().manual_seed(seed)
    dims = SHAPES[shape]
    x = torch.randn(dims, generator=g, dtype=DT) * 2 + 0.5
    if shape == "4d-channels-last":
        x = x.to(memory_format=torch.channels_last)
        assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    c = dims[1]
    w = torch.rand(c, generator=g, dtype=DT) + 0.5
    b = torch.randn(c, generator=g, dtype=DT) * 0.5
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def reference(x: Tensor, w: Tensor, b: Tensor, relu: bool) -> Tensor:
    """Batch norm over every dim but 1, from ``var_mean`` (biased variance), then the ReLU."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    view = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + EPS) * w.view(view) + b.view(view)
    return y.relu() if relu else y


def under_test(x: Tensor, w: Tensor, b: Tensor, relu: bool) -> Tensor:
    return batch_norm_relu(x, w, b, EPS, relu)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def derivatives(
    f: Callable[[Tensor, Tensor, Tensor, bool], Tensor],
    x: Tensor,
    w: Tensor,
    b: Tensor,
    relu: bool,
    orders: int = 3,
    graph: bool = True,
    seed: int = 1,
) -> list:
    """``[y, d1, ..., d_orders]``: the value of ``f(x, w, b)`` and successive vector-Jacobian
    products, each of the previous one's outputs with random cotangents (the same for every
    ``f``); ``d_k`` holds the ``k``-th product's gradients with respect to ``(x, w, b)``. Every
    product but the last builds a graph; the last too when ``graph``."""
    g = torch.Generator().manual_seed(seed)
    current: list[Tensor] = [f(x, w, b, relu)]
    out: list = [current[0]]
    for k in range(orders):
        cot = [torch.randn(t.shape, generator=g, dtype=DT) for t in current]
        # An output without a graph is a constant: it adds nothing to the next product.
        live = [i for i, t in enumerate(current) if t.requires_grad]
        assert live, "nothing left to differentiate"
        current = list(
            torch.autograd.grad(
                [current[i] for i in live],
                (x, w, b),
                [cot[i] for i in live],
                create_graph=graph or k < orders - 1,
                allow_unused=True,  # the bias enters linearly: unused after the first order
                materialize_grads=True,
            )
        )
        out.append(tuple(current))
    return out


@pytest.mark.parametrize("shape,relu", CASES)
def test_gradcheck_and_gradgradcheck(shape, relu):
    x, w, b = inputs(shape)
    f = lambda x, w, b: under_test(x, w, b, relu)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape,relu", CASES)
def test_third_derivative_by_gradgradcheck_of_the_first_gradient(shape, relu):
    """``(x, w, b) -> VJP of the output with a fixed cotangent``: gradgradcheck of this map
    compares its second derivatives, the batch norm's third, with finite differences."""
    x, w, b = inputs(shape)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=DT)

    def first(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        y = under_test(x, w, b, relu)
        return torch.autograd.grad(y, (x, w, b), v, create_graph=True)

    assert torch.autograd.gradcheck(first, (x, w, b))
    assert torch.autograd.gradgradcheck(first, (x, w, b))


@pytest.mark.parametrize("shape,relu", CASES)
def test_value_and_three_derivatives_equal_the_var_mean_batch_norm(shape, relu):
    x, w, b = inputs(shape)
    ours = derivatives(under_test, x, w, b, relu)
    ref = derivatives(reference, x, w, b, relu)
    assert ours[0].shape == ref[0].shape
    assert rel(ours[0], ref[0]) < 1e-10, "value"
    for order in (1, 2, 3):
        for name, a, r in zip("xwb", ours[order], ref[order], strict=True):
            if r.norm() == 0:  # the bias enters linearly: its higher derivatives vanish
                assert float(a.detach().abs().max()) < 1e-12, f"derivative {order} in {name}"
            else:
                assert rel(a, r) < 1e-10, f"derivative {order} in {name}"
            if shape == "4d-channels-last" and name == "x":
                assert a.shape == x.shape


@pytest.mark.parametrize("shape,relu", CASES)
@pytest.mark.parametrize("orders", [1, 2])
def test_derivatives_without_a_graph(shape, relu, orders):
    """The last product without ``create_graph`` runs its backward with gradients off: the first
    derivative on the native kernel, the second with the forward kernel's statistics taken as
    constants (the other branch of the closed form)."""
    x, w, b = inputs(shape, seed=3)
    ours = derivatives(under_test, x, w, b, relu, orders, graph=False)
    ref = derivatives(reference, x, w, b, relu, orders, graph=False)
    for order in range(1, orders + 1):
        for name, a, r in zip("xwb", ours[order], ref[order], strict=True):
            assert not a.requires_grad or order < orders
            if r.norm() == 0:
                assert float(a.detach().abs().max()) < 1e-12, f"derivative {order} in {name}"
            else:
                assert rel(a, r) < 1e-10, f"derivative {order} in {name}"
