"""Small float64 models with odd sizes for the Laplace core tests.

Each factory takes a seed and returns ``(model, X, y)`` so tests get fresh random data
whose size does not divide evenly into the batch sizes they use.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64


def _labels(n: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen)


def mlp(
    seed: int = 0,
    n: int = 13,
    d_in: int = 5,
    widths=(7, 4),
    classes: int = 3,
    bias_last: bool = True,
):
    """Tanh MLP with odd widths; the last layer's bias is optional."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    layers: list[nn.Module] = []
    width = d_in
    for w in widths:
        layers += [nn.Linear(width, w), nn.Tanh()]
        width = w
    layers.append(nn.Linear(width, classes, bias=bias_last))
    model = nn.Sequential(*layers).to(DTYPE)
    X = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


def regression_mlp(seed: int = 0, n: int = 11, d_in: int = 4, width: int = 6, outputs: int = 2):
    """Tanh MLP with two outputs and real-valued targets."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, outputs)).to(DTYPE)
    X = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
    y = torch.randn(n, outputs, generator=gen, dtype=DTYPE)
    return model, X, y


def cnn(seed: int = 0, n: int = 7, classes: int = 3, dilated: bool = True):
    """Two convolutions with stride, padding, a non-square kernel and (optionally) dilation,
    which laplace-torch's ASDL backends refuse."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dilation = (2, 1) if dilated else (1, 1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, kernel_size=(2, 3), dilation=dilation, padding=(1, 0), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * (4 if dilated else 5) * 1, classes),
    ).to(DTYPE)
    X = torch.randn(n, 2, 7, 6, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


def regression_cnn(seed: int = 0, n: int = 6, outputs: int = 2):
    """A strided convolution with padding followed by a linear read-out, real targets."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 6, outputs),
    ).to(DTYPE)
    X = torch.randn(n, 1, 5, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(n, outputs, generator=gen, dtype=DTYPE)
    return model, X, y


class MixedNet(nn.Module):
    """Linear layers around LayerNorm, BatchNorm and a bare per-feature scale."""

    def __init__(self, d_in: int = 5, width: int = 6, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.scale = nn.Parameter(1.0 + 0.3 * torch.randn(width))
        self.bn = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inp(x))) * self.scale
        return self.out(self.bn(h))


def mixed(seed: int = 0, n: int = 9, classes: int = 3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = MixedNet(classes=classes).to(DTYPE)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for p in (model.norm.weight, model.norm.bias, model.bn.weight, model.bn.bias):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
        model.bn.running_mean.normal_(0.0, 0.5, generator=gen)
        model.bn.running_var.uniform_(0.5, 2.0, generator=gen)
    X = torch.randn(n, 5, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


class EmbeddingNet(nn.Module):
    """Token embedding, mean-pooled, into a Linear head; reads a dict batch."""

    def __init__(self, vocab: int = 11, dim: int = 4, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(batch["tokens"]).mean(-2)))


def embedding(seed: int = 0, n: int = 10, length: int = 3, vocab: int = 11, classes: int = 3):
    """Returns ``(model, tokens, y)``; batches are dicts ``{"tokens", "labels"}``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = EmbeddingNet(vocab, classes=classes).to(DTYPE)
    tokens = torch.randint(0, vocab, (n, length), generator=gen)
    return model, tokens, _labels(n, classes, gen)


def loader(X, y, batch_size: int):
    """A plain list of (x, y) batches (the last one smaller)."""
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def dict_loader(tokens, y, batch_size: int):
    return [
        {"tokens": tokens[i : i + batch_size], "labels": y[i : i + batch_size]}
        for i in range(0, len(y), batch_size)
    ]


class SequenceNet(nn.Module):
    """A Linear applied at every position of a (batch, length, features) input."""

    def __init__(self, d_in: int = 5, width: int = 4, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(d_in, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)).mean(-2))


def sequence(seed: int = 0, n: int = 9, length: int = 6, classes: int = 3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SequenceNet(classes=classes).to(DTYPE)
    X = torch.randn(n, length, 5, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


class SharedNet(nn.Module):
    """One Linear applied twice (tied weights) before a head."""

    def __init__(self, width: int = 5, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def shared(seed: int = 0, n: int = 9, classes: int = 3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SharedNet(classes=classes).to(DTYPE)
    X = torch.randn(n, 5, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)


def cnn_norm(seed: int = 0, n: int = 7, classes: int = 3):
    """Convolutions with BatchNorm2d (running statistics) and GroupNorm between them."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, classes),
    ).to(DTYPE)
    with torch.no_grad():
        model[1].running_mean.normal_(0.0, 0.5, generator=gen)
        model[1].running_var.uniform_(0.5, 2.0, generator=gen)
        for p in (model[1].weight, model[3].weight, model[3].bias):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    X = torch.randn(n, 2, 5, 6, generator=gen, dtype=DTYPE)
    return model, X, _labels(n, classes, gen)
