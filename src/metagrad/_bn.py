r"""Batch norm (and ReLU) on batch statistics: native kernels, exact derivatives of every order.

The forward pass and the first backward pass call PyTorch's native kernels; the backward pass is
itself an autograd function whose derivative (the double backward, which MAML's outer gradient
runs through) is written below in closed form from differentiable operations, so third and higher
derivatives are exact too (autograd differentiates the closed form). The native double backward
is not used: its own derivative is wrong (relative error about 1 in torch 2.13).

For one channel with :math:`N` rows, :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 +
\epsilon)^{-1/2}`, :math:`y = \mathrm{relu}(w \hat x + b)` and the ReLU mask :math:`m`, the
backward pass of :math:`g_z = m \odot g_y` is

.. math::  g_b = \textstyle\sum g_z, \quad g_w = \sum g_z \hat x, \quad
           g_x = w r \,(g_z - \bar g_z - \hat x\, c), \quad c = \overline{g_z \hat x}.

Its vector-Jacobian product with :math:`(A, \alpha, \beta)` (for :math:`g_x, g_w, g_b`), with
:math:`P = \sum A \hat x` and :math:`S = \sum A (g_z - \bar g_z)`, is

.. math::  \partial g_z = w r (A - \bar A - \hat x P / N) + \alpha \hat x + \beta, \quad
           \partial w = r (S - c P),
.. math::  \partial x = r \left[(\alpha - w r P / N)(g_z - \bar g_z) - w r c (A - \bar A)
           + \hat x \left(w r (3 c P - S) / N - \alpha c\right)\right].

Its speed against the batch norm written from ``var_mean`` is measured in ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_aten = torch.ops.aten


def _rows(t: Tensor) -> Tensor:
    """``(N, C, ...)`` as ``(rows, C)``: a view for channels-last and 2-d tensors."""
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


def _unrows(rows: Tensor, like: Tensor) -> Tensor:
    return rows if like.dim() == 2 else rows.view(like.movedim(1, -1).shape).movedim(-1, 1)


def _native_backward(gy, x, w, y, mean, rstd, eps):  # type: ignore[no-untyped-def]
    gz = gy if y is None else _aten.threshold_backward(gy, y, 0)
    mask = [True, True, True]
    return _aten.native_batch_norm_backward(gz, x, w, None, None, mean, rstd, True, eps, mask)


def _normalised(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(x_hat, r)`` of a ``(rows, channels)`` matrix, from differentiable operations."""
    var, mean = torch.var_mean(x, 0, correction=0)
    r = torch.rsqrt(var + eps)
    return (x - mean) * r, r


class _Backward(torch.autograd.Function):
    """``(g_y, x, w) -> (g_x, g_w, g_b)``: native kernel forward, closed-form derivative."""

    @staticmethod
    def forward(gy, x, w, y, mean, rstd, eps):  # type: ignore[override]
        return _native_backward(gy, x, w, y, mean, rstd, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        gy, x, w, y, mean, rstd, eps = inputs
        ctx.save_for_backward(gy, x, w, y, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, a, alpha, beta):  # type: ignore[override]
        gy, x4, w, y, mean, rstd = ctx.saved_tensors
        x = _rows(x4)
        n = x.shape[0]
        gz = _rows(gy if y is None else _aten.threshold_backward(gy, y, 0))  # the ReLU's mask
        if torch.is_grad_enabled():  # a third derivative follows: statistics differentiable in x
            xh, r = _normalised(x, ctx.eps)
        else:  # the forward kernel's statistics, constants here
            xh, r = (x - mean) * rstd, rstd
        a = torch.zeros_like(x) if a is None else _rows(a)
        alpha = torch.zeros_like(w) if alpha is None else alpha
        beta = torch.zeros_like(w) if beta is None else beta
        # Per-channel sums, then each full-size result as one affine map of (a, g_z, x_hat) with
        # per-channel coefficients (the formulas above, expanded): 17 full-size passes, not 30.
        gz_mean, a_mean = gz.mean(0), a.mean(0)
        c = (gz * xh).mean(0)
        p = (a * xh).sum(0)
        s = (a * gz).sum(0) - n * gz_mean * a_mean
        wr = w * r
        k_gz = alpha - wr * p / n  # the coefficient of x_hat in g_gz; over r, of g_z in g_x
        g_gz = torch.addcmul(torch.addcmul(beta - wr * a_mean, a, wr), xh, k_gz)
        g_w = r * (s - c * p)
        k_gz, k_a, k_xh = r * k_gz, -r * wr * c, r * (wr * (3 * c * p - s) / n - alpha * c)
        shift = -(k_gz * gz_mean + k_a * a_mean)
        g_x = torch.addcmul(torch.addcmul(torch.addcmul(shift, gz, k_gz), a, k_a), xh, k_xh)
        g_gy = _unrows(g_gz, x4)
        if y is not None:
            g_gy = _aten.threshold_backward(g_gy, y, 0)
        return g_gy, _unrows(g_x, x4), g_w, None, None, None, None


class _BatchNormReLU(torch.autograd.Function):
    """``relu(w x_hat + b)`` (or without the ReLU), normalised over every dim but 1."""

    @staticmethod
    def vmap(info, in_dims, *args):  # type: ignore[no-untyped-def, override]
        raise RuntimeError(
            "metagrad.models.BatchNorm ran its autograd kernel under torch.func.vmap: run the "
            "transform inside metagrad.autodiff.use('func') (meta_gradient(mode='vmap') does)"
        )

    @staticmethod
    def forward(x, w, b, eps, relu):  # type: ignore[override]
        y, mean, rstd = _aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        return (y.relu_() if relu else y), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, w, _, eps, relu = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, y if relu else None, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy, _mean, _rstd):  # type: ignore[override]
        x, w, y, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward must be differentiable
            gx, gw, gb = _Backward.apply(gy, x, w, y, mean, rstd, ctx.eps)
        else:
            gx, gw, gb = _native_backward(gy, x, w, y, mean, rstd, ctx.eps)
        return gx, gw, gb, None, None


def batch_norm_relu(x: Tensor, w: Tensor, b: Tensor, eps: float, relu: bool) -> Tensor:
    """Batch norm of ``x`` (``(N, C, ...)``) over every dim but 1, then a ReLU when ``relu``."""
    return _BatchNormReLU.apply(x, w, b, eps, relu)[0]
