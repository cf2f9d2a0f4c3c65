"""Models and losses. A model is any ``nn.Module``, used as a skeleton through ``functional_call``.

The networks of the papers: :class:`Conv4` (Omniglot; with ``hidden=32, pool="max"`` the
Mini-ImageNet variant) and :class:`MLP` (sinusoid regression). Both name their last layer ``head``,
so ``ANIL(..., head=("head.",))`` adapts the head only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metagrad import autodiff
from metagrad._bn import batch_norm_relu
from metagrad._registry import Registry
from metagrad._types import Batch, Params

__all__ = [
    "MODELS",
    "BatchNorm",
    "Conv4",
    "Loss",
    "MLP",
    "ResNet12",
    "conv4_mini_imagenet",
    "loss_fn",
    "params_of",
]


class BatchNorm(nn.Module):
    """Batch normalisation on batch statistics only (no running statistics), over every dim but 1.

    ``y = w * (x - mean) / sqrt(var + eps) + b`` with every order of derivative exact, under
    ``vmap`` too (the native kernel's third derivative is not, nor its second derivative under an
    outer ``vmap``). On the ``"autograd"`` backend (:func:`metagrad.autodiff.backend`) it runs the
    native kernels forward and backward with a closed-form double backward (:mod:`metagrad._bn`);
    on ``"func"`` (what ``torch.func`` transforms need) it is written from ``var_mean`` and
    ``addcmul``. A channels-last input is normalised as a
    ``(rows, channels)`` matrix, a free view.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """The normalised ``x``; with ``relu=True``, ``relu`` of it in the same pass."""
        if autodiff.backend() == "autograd":
            return batch_norm_relu(x, self.weight, self.bias, self.eps, relu)
        if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1:  # channels last: a free view
            n, c, h, w = x.shape
            rows = self._rows(x.permute(0, 2, 3, 1).reshape(-1, c), relu)
            return rows.view(n, h, w, c).permute(0, 3, 1, 2)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [d for d in range(x.dim()) if d != 1]
        y = _affine_norm(x, dims, self.weight.view(shape), self.bias.view(shape), self.eps)
        return torch.relu(y) if relu else y

    def _rows(self, x: Tensor, relu: bool) -> Tensor:
        y = _affine_norm(x, 0, self.weight, self.bias, self.eps)
        return torch.relu(y) if relu else y


def _affine_norm(x: Tensor, dims: int | list[int], w: Tensor, b: Tensor, eps: float) -> Tensor:
    """``w (x - mean) / sqrt(var + eps) + b`` as ``x * scale + shift``: two full-size ops."""
    var, mean = torch.var_mean(x, dim=dims, keepdim=not isinstance(dims, int), correction=0)
    scale = w * torch.rsqrt(var + eps)
    return torch.addcmul(b - mean * scale, x, scale)


class _PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed as one matrix product over the input's patches (im2col).

    For a first layer on few input channels the convolution kernel is slow on a CPU (a 9-long
    inner dimension); the product over ``unfold``'s patches is faster there with second
    derivatives (Omniglot and Mini-ImageNet first layers; docs/PERFORMANCE.md), and its output
    comes out in the channels-last layout the next layers prefer.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return super().forward(x)  # measured on a CPU only; elsewhere the library kernel
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = cast(tuple[int, int], self.padding)  # not a string: checked above
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw)).transpose(1, 2)
        out = cols @ self.weight.reshape(self.out_channels, -1).t()
        if self.bias is not None:
            out = out + self.bias
        return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)


def _channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last layout, where CPU convolutions run faster (docs/PERFORMANCE.md)."""
    try:
        return x.contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # inside torch.func.vmap, which cannot query memory formats yet
        return x


class Conv4(nn.Module):
    """The four-block convolutional network of the MAML papers.

    Each block: 3x3 convolution with bias (``hidden`` channels), batch norm on batch statistics,
    ReLU. ``pool="stride"`` (Omniglot: stride 2, padding 1; 28x28 input gives 64 x 2 x 2 = 256
    features) or ``pool="max"`` (Mini-ImageNet: stride 1, then 2x2 max-pool). Then a linear
    ``head``.

    >>> Conv4(1, 5)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_way: int = 5,
        hidden: int = 64,
        pool: Literal["stride", "max"] = "stride",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool={pool!r}: use 'stride' (Omniglot) or 'max' (Mini-ImageNet)")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i in range(4):
            stride = 2 if pool == "stride" else 1
            conv = _PatchConv2d if i == 0 and channels <= 4 else nn.Conv2d
            layers += [conv(channels, hidden, 3, stride=stride, padding=1), BatchNorm(hidden)]
            layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if pool == "max" else [])
            channels, size = hidden, (size + 1) // 2 if pool == "stride" else size // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * size * size, n_way)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = _channels_last(x)
        for layer in self.body:
            if isinstance(layer, BatchNorm):
                x = layer(x, relu=True)  # each batch norm is followed by a ReLU: one pass for both
            elif not isinstance(layer, nn.ReLU):
                x = layer(x)
        return self.head(x)


def conv4_mini_imagenet(n_way: int = 5) -> Conv4:
    """The Mini-ImageNet variant: 32 channels, 2x2 max-pool, 84x84x3 input (800 features)."""
    return Conv4(3, n_way, hidden=32, pool="max", image_size=84)


class MLP(nn.Module):
    """A ReLU multilayer perceptron; the default 1-40-40-1 is the sinusoid network of MAML."""

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes={sizes}: give at least input and output sizes, e.g. (1, 1)")
        body: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def params_of(model: nn.Module) -> Params:
    """The model's parameters as a dict keyed like ``named_parameters()``.

    The values are the live ``nn.Parameter`` objects, ready for a ``torch.optim`` optimiser; the
    estimators never modify them and never touch ``.grad``.
    """
    return dict(model.named_parameters())


_Kind = Literal["cross_entropy", "mse"]


@dataclass(frozen=True, eq=False)
class Loss:
    """``loss(params, batch) -> scalar``: the model applied with ``params``, then a mean loss."""

    model: nn.Module
    kind: _Kind | Callable[[Tensor, Tensor], Tensor]

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's output on ``x`` with ``params`` (buffers taken from the skeleton)."""
        return functional_call(self.model, (params, dict(self.model.named_buffers())), (x,))

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        return self._value(self.predict(params, batch.x), batch.y)

    def value_and_accuracy(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The loss and, for classification, the (detached) accuracy, from one forward pass."""
        out = self.predict(params, batch.x)
        if not self.is_classification:
            return self._value(out, batch.y), None
        accuracy = (out.detach().argmax(-1) == batch.y).to(batch.x.dtype).mean()
        return self._value(out, batch.y), accuracy

    def _value(self, out: Tensor, y: Tensor) -> Tensor:
        if self.kind == "cross_entropy":
            return F.cross_entropy(out, y)
        if self.kind == "mse":
            # Written out: F.mse_loss's forward-over-reverse derivative (the Hessian-vector products
            # of iMAML and Newton-CG) fails in torch 2.13 ("ZeroTensors are immutable").
            return ((out - y) ** 2).mean()
        return self.kind(out, y)  # type: ignore[operator]

    @property
    def is_classification(self) -> bool:
        return self.kind == "cross_entropy"

    def accuracy(self, params: Params, batch: Batch) -> Tensor:
        """The fraction of ``batch`` whose arg-max prediction equals the label."""
        if not self.is_classification:
            raise ValueError(f"accuracy needs a classification loss; this loss is {self.kind!r}")
        return (self.predict(params, batch.x).argmax(-1) == batch.y).to(batch.x.dtype).mean()


def loss_fn(model: nn.Module, kind: _Kind | Callable[[Tensor, Tensor], Tensor]) -> Loss:
    """A loss on ``(params, Batch)`` for ``model``: ``"cross_entropy"``, ``"mse"`` or a callable.

    A callable receives ``(output, target)`` and returns the scalar mean loss.
    """
    if not callable(kind) and kind not in ("cross_entropy", "mse"):
        raise ValueError(
            f"loss kind {kind!r} is unknown: use 'cross_entropy', 'mse' or a callable (out, y)"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(
                f"module {name!r} keeps running statistics, which meta-learning must not use or "
                "update: build it with track_running_stats=False, or use metagrad.models.BatchNorm"
            )
    return Loss(model, kind)


class _ResidualBlock(nn.Module):
    """Three 3x3 convolutions with batch norm, a 1x1 convolution shortcut, leaky ReLU, max-pool."""

    def __init__(self, cin: int, cout: int, slope: float) -> None:
        super().__init__()
        self.slope = slope
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), BatchNorm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), BatchNorm(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), BatchNorm(cout)
        self.shortcut, self.bn_shortcut = nn.Conv2d(cin, cout, 1, bias=False), BatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        # BatchNorm fuses only a plain ReLU, so the leaky ReLU is a separate (out-of-place) op.
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out)) + self.bn_shortcut(self.shortcut(x))
        return F.max_pool2d(F.leaky_relu(out, self.slope), 2)


class ResNet12(nn.Module):
    """The ResNet-12 of TADAM (Oreshkin et al., 2018) and MetaOptNet (Lee et al., 2019).

    Four residual blocks of ``channels`` (64-160-320-640) output channels. Each block:
    ``z = bn(conv3(a(bn(conv2(a(bn(conv1(x))))))))``, ``y = maxpool2x2(a(z + bn(conv1x1(x))))``
    with ``a`` the leaky ReLU of slope 0.1, 3x3 convolutions without bias (padding 1) and batch
    norm on batch statistics (:class:`BatchNorm`). Then the features, flattened
    (``pool="flatten"``: 640 x 5 x 5 = 16000 for 84x84 inputs, as in MetaOptNet; 640 x 2 x 2 for
    32x32) or averaged over space (``pool="avg"``: 640), and a linear ``head``, so
    ``ANIL(..., head=("head.",))`` adapts the head only. MetaOptNet's DropBlock and dropout are
    left out: they would make the meta-gradient random. Pure under ``functional_call``: no
    in-place operation touches a parameter or an activation.

    >>> ResNet12(5, channels=(2, 2, 3, 3), image_size=16)(torch.zeros(4, 3, 16, 16)).shape
    torch.Size([4, 5])
    """

    def __init__(
        self,
        n_way: int = 5,
        in_channels: int = 3,
        image_size: int = 84,
        channels: tuple[int, int, int, int] = (64, 160, 320, 640),
        pool: Literal["flatten", "avg"] = "flatten",
        slope: float = 0.1,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(
                f"channels={channels}: give 4 positive integers, e.g. (64, 160, 320, 640)"
            )
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool={pool!r}: use 'flatten' (MetaOptNet) or 'avg'")
        size = image_size // 16  # four 2x2 max-pools, each rounding down
        if size < 1:
            raise ValueError(f"image_size={image_size} is under 16, too small for 4 max-pools")
        widths = (in_channels, *channels)
        self.pool = pool
        self.blocks = nn.Sequential(
            *(_ResidualBlock(a, b, slope) for a, b in zip(widths[:-1], widths[1:], strict=True))
        )
        self.head = nn.Linear(channels[-1] * (size * size if pool == "flatten" else 1), n_way)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return self.head(x.mean((-2, -1)) if self.pool == "avg" else x.flatten(1))


MODELS: Registry[nn.Module] = Registry("architecture")
"""Name -> ``build(in_channels=, n_way=, image_size=) -> nn.Module``; the ``--arch`` choices."""
MODELS.register(
    "mlp",
    lambda **shape: MLP(),
    help="1-40-40-1 ReLU MLP (sinusoid regression)",
)
MODELS.register(
    "conv4",
    lambda in_channels=1, n_way=5, image_size=28: Conv4(in_channels, n_way, image_size=image_size),
    help="Conv4 of the MAML papers: 64 channels, stride 2 (Omniglot)",
)
MODELS.register(
    "conv4-mini",
    lambda in_channels=3, n_way=5, image_size=84: Conv4(
        in_channels, n_way, hidden=32, pool="max", image_size=image_size
    ),
    help="Conv4 of the Mini-ImageNet experiments: 32 channels, 2x2 max-pool",
)
MODELS.register(
    "resnet12",
    lambda in_channels=3, n_way=5, image_size=84: ResNet12(n_way, in_channels, image_size),
    help="ResNet-12 of TADAM / MetaOptNet: 64-160-320-640 channels, leaky ReLU, batch statistics",
)
