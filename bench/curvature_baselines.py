"""Baselines of the curvature benchmarks: the full-size benchmark models and a plain-torch KFAC.

``plain_exact_ggn_kfac`` is the "what plain torch reaches" reference: forward
hooks keep each layer's input (A) and output, the C columns of the loss-Hessian square root
L = diag(√p) − p√pᵀ go back in one batched ``autograd.grad(..., is_grads_batched=True)``,
and G is one product over the C·B(·S) pseudo-gradient rows. Same layout and scaling as
laplace-torch (A/N, G summed, conv A divided by the S output positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(width: int = 1024) -> nn.Module:
    """784-1024-1024-10 (1.86 M parameters)."""
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )  # fmt: skip


def cnn(channels: tuple[int, int, int] = (64, 128, 128)) -> nn.Module:
    """3 convs (64/128/128) + linear, 225 k parameters, for 3×32×32 inputs."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c3, 10),
    )  # fmt: skip


def plain_exact_ggn_kfac(model: nn.Module, batches) -> list[list[torch.Tensor]]:
    """Per parameter tensor [G, A] (weight) or [G] (bias), summed over every batch."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    inputs, outputs, factors, n = {}, {}, {}, 0

    def hook(module, args, out):
        inputs[module], outputs[module] = args[0].detach(), out

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for x, _ in batches:
            logits = model(x)
            p = logits.detach().softmax(-1)  # (B, C)
            sqrt_p = p.sqrt()
            L = torch.diag_embed(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]  # (B, C, C)
            outs = [outputs[m] for m in layers]
            grads = torch.autograd.grad(
                logits, outs, L.permute(2, 0, 1), is_grads_batched=True
            )  # each (C, B, out, ...)
            for m, g in zip(layers, grads):
                a = inputs[m]
                if isinstance(m, nn.Conv2d):
                    rows_g = g.movedim(2, -1).reshape(-1, g.shape[2])
                    u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
                    rows_a = (
                        u.transpose(1, 2).reshape(-1, u.shape[1]) / (g.shape[3] * g.shape[4]) ** 0.5
                    )
                else:
                    rows_g, rows_a = g.reshape(-1, g.shape[-1]), a
                G, A = rows_g.T @ rows_g, rows_a.T @ rows_a
                old = factors.get(m)
                factors[m] = [G, A] if old is None else [old[0] + G, old[1] + A]
            n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    result = []
    for m in layers:
        G, A = factors[m]
        result.append([G, A / n])
        if m.bias is not None:
            result.append([G])
    return result


def sweep(model: nn.Module, batches) -> None:
    """Forward + backward of the summed loss over every batch: the floor of any pass."""
    for x, y in batches:
        F.cross_entropy(model(x), y, reduction="sum").backward()
