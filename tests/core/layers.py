"""Small float64 models with Conv1d, grouped/depthwise convolutions and multi-head attention,
and a naive per-sample, per-position KFAC reference for them (independent of the core).

The reference slices input patches out of the padded input by hand (per group: the group's
input channels only), takes output gradients per sample and per square-root column by
autograd, and for attention uses :class:`ExplicitAttention` — the same attention written
with four ``nn.Linear`` layers and a hand-written softmax — instead of PyTorch's fused one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dense import output_hessian_roots

DTYPE = torch.float64


def _labels(n: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen)


def conv1d(seed: int = 0, n: int = 6, classes: int = 3):
    """Strided, dilated, padded Conv1d, then a grouped Conv1d with reflect 'same' padding."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
        nn.Tanh(),
        nn.Conv1d(4, 6, 3, groups=2, padding="same", padding_mode="reflect"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4, classes),
    ).to(DTYPE)
    X = torch.randn(n, 2, 7, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


def grouped(seed: int = 0, n: int = 5, classes: int = 3):
    """A grouped Conv2d (2 groups, stride, padding) and a depthwise one (dilation, no bias)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2, stride=(2, 1), padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, (2, 3), groups=6, dilation=(1, 2), padding=(0, 1), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 1 * 3, classes),
    ).to(DTYPE)
    X = torch.randn(n, 4, 3, 5, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


class SelfAttentionNet(nn.Module):
    """Causal self-attention (packed in_proj, batch_first) into a Linear head."""

    def __init__(self, embed: int = 4, heads: int = 2, length: int = 3, classes: int = 3):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, classes)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, attn_mask=self.mask)
        return self.head(torch.tanh(h).mean(1))


class CrossAttentionNet(nn.Module):
    """Cross-attention with kdim/vdim ≠ embed (separate q/k/v weights), bias_k/bias_v,
    sequence-first; query, key and value are column slices of one input."""

    def __init__(self, embed: int = 4, kdim: int = 3, vdim: int = 5, classes: int = 3):
        super().__init__()
        self.embed, self.kdim = embed, kdim
        self.attn = nn.MultiheadAttention(embed, 2, kdim=kdim, vdim=vdim, add_bias_kv=True)
        self.head = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)  # (length, batch, features)
        e, k = self.embed, self.kdim
        h, _ = self.attn(x[..., :e], x[..., e : e + k], x[..., e + k :])
        return self.head(torch.tanh(h).mean(0))


def self_attention(seed: int = 0, n: int = 5, classes: int = 3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SelfAttentionNet(classes=classes).to(DTYPE)
    X = torch.randn(n, 3, 4, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


def cross_attention(seed: int = 0, n: int = 5, classes: int = 3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = CrossAttentionNet(classes=classes).to(DTYPE)
    with torch.no_grad():  # PyTorch initialises the in_proj bias to zero
        model.attn.in_proj_bias.normal_(0.0, 0.5, generator=gen)
    X = torch.randn(n, 3, 12, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


class ExplicitAttention(nn.Module):
    """``mha``'s computation with four nn.Linear layers and a hand-written softmax."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, kw = mha.embed_dim, {"dtype": mha.in_proj_bias.dtype}
        self.heads = mha.num_heads
        self.q, self.k = nn.Linear(e, e, **kw), nn.Linear(mha.kdim, e, **kw)
        self.v, self.o = nn.Linear(mha.vdim, e, **kw), nn.Linear(e, e, **kw)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = [
                w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            ]
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), weights, mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.o.weight.copy_(mha.out_proj.weight)
            self.o.bias.copy_(mha.out_proj.bias)
        self.bias_k = None if mha.bias_k is None else mha.bias_k.detach().clone()
        self.bias_v = None if mha.bias_v is None else mha.bias_v.detach().clone()

    def forward(self, query, key, value, mask=None):
        """Batch-first (B, L, ·) inputs; ``mask`` (L, S) True = not attended."""
        q, k, v = self.q(query), self.k(key), self.v(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(k.shape[0], 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], 1, -1)], 1)
        b, length, e = q.shape
        d = e // self.heads

        def split(t):
            return t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        ctx = (weights / weights.sum(-1, keepdim=True)) @ split(v)
        return self.o(ctx.transpose(1, 2).reshape(b, length, e))


class ExplicitSelfAttentionNet(nn.Module):
    def __init__(self, net: SelfAttentionNet):
        super().__init__()
        self.attn = ExplicitAttention(net.attn)
        self.head = net.head
        self.mask = net.mask

    def forward(self, x):
        return self.head(torch.tanh(self.attn(x, x, x, self.mask)).mean(1))


class ExplicitCrossAttentionNet(nn.Module):
    def __init__(self, net: CrossAttentionNet):
        super().__init__()
        self.attn = ExplicitAttention(net.attn)
        self.head = net.head
        self.embed, self.kdim = net.embed, net.kdim

    def forward(self, x):
        e, k = self.embed, self.kdim
        return self.head(
            torch.tanh(self.attn(x[..., :e], x[..., e : e + k], x[..., e + k :])).mean(1)
        )


def _padded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One sample's input padded as the layer pads it."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x.unsqueeze(0), conv._reversed_padding_repeated_twice, mode=mode)[0]
    pads = [p for p in reversed(conv.padding) for _ in range(2)]
    return F.pad(x, pads)


def _windows(conv: nn.Module, xp: torch.Tensor) -> list[torch.Tensor]:
    """Per output position (row-major), the (c, k…) window of a padded sample."""
    spatial = xp.shape[1:]
    ranges = []
    for size, k, s, d in zip(spatial, conv.kernel_size, conv.stride, conv.dilation):
        ranges.append(range(0, size - d * (k - 1), s))
    out = []
    for corner in torch.cartesian_prod(*[torch.tensor(list(r)) for r in ranges]).reshape(
        -1, len(spatial)
    ):
        index = tuple(
            slice(int(c), int(c) + d * (k - 1) + 1, d)
            for c, k, d in zip(corner, conv.kernel_size, conv.dilation)
        )
        out.append(xp[(slice(None), *index)])
    return out


def _input_rows(module: nn.Module, a: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per group, the input vectors of one sample (one per weight-sharing position)."""
    if isinstance(module, nn.Linear):
        return [list(a.reshape(-1, a.shape[-1]))]
    windows = _windows(module, _padded(module, a))
    c = a.shape[0] // module.groups
    return [[w[j * c : (j + 1) * c].reshape(-1) for w in windows] for j in range(module.groups)]


def _output_rows(module: nn.Module, g: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per group, the output-gradient vectors of one sample (one per position)."""
    if isinstance(module, nn.Linear):
        return [list(g.reshape(-1, g.shape[-1]))]
    cols = list(g.reshape(g.shape[0], -1).T)
    r = g.shape[0] // module.groups
    return [[v[j * r : (j + 1) * r] for v in cols] for j in range(module.groups)]


def naive_factors(model: nn.Module, x, y, curvature: str = "ggn") -> dict[str, tuple]:
    """Per Linear/conv module name: (list of G_j, list of A_j) over its groups, with
    A_j = Σ_n Σ_s a aᵀ / S / N and G_j = Σ_n Σ_k Σ_s g gᵀ — loops over samples, square-root
    columns and positions."""
    model.eval()
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]
    G: dict = {}
    A: dict = {}
    for i in range(len(y)):
        seen: dict = {}
        handles = [
            m.register_forward_hook(
                lambda mod, inp, out, n=n, seen=seen: seen.__setitem__(n, (inp[0], out))
            )
            for n, m in layers
        ]
        f = model(x[i : i + 1])
        for h in handles:
            h.remove()
        L = output_hessian_roots("classification", curvature, f.detach(), y[i : i + 1])[0]
        for k in range(L.shape[1]):
            outs = [seen[n][1] for n, _ in layers]
            grads = torch.autograd.grad((f[0] * L[:, k]).sum(), outs, retain_graph=True)
            for (n, m), g in zip(layers, grads):
                for j, rows in enumerate(_output_rows(m, g[0])):
                    G.setdefault(n, {}).setdefault(j, 0.0)
                    G[n][j] = G[n][j] + sum(torch.outer(v, v) for v in rows)
        for n, m in layers:
            for j, rows in enumerate(_input_rows(m, seen[n][0].detach()[0])):
                A.setdefault(n, {}).setdefault(j, 0.0)
                A[n][j] = A[n][j] + sum(torch.outer(v, v) for v in rows) / len(rows)
    return {
        n: ([G[n][j] for j in sorted(G[n])], [A[n][j] / len(y) for j in sorted(A[n])])
        for n, _ in layers
    }
