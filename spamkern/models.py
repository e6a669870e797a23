"""The networks of the main job: CancerNet, small LeNet-style CNNs, a CIFAR-style ResNet
and a small pre-norm transformer.

CancerNet and the CNN are plain residual-free :class:`torch.nn.Sequential` stacks, which
:func:`spamkern.pruning.compress` shrinks without tracing. The ResNet and the transformer
have residual additions, normalisation layers and attention heads: their units are found
as coupled channel groups by tracing (pass ``example_inputs`` to ``prune``/``compress``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "SelfAttention",
    "build_model",
    "cancer_net",
    "lenet",
    "lenet5",
    "model_by_name",
    "resnet",
    "vit",
]


def cancer_net(n_in: int = 30, n_hidden: int = 100, n_classes: int = 2) -> nn.Sequential:
    """The paper's CancerNet MLP, ``n_in``-100-100-``n_classes`` with ReLU."""
    return nn.Sequential(
        nn.Linear(n_in, n_hidden),
        nn.ReLU(),
        nn.Linear(n_hidden, n_hidden),
        nn.ReLU(),
        nn.Linear(n_hidden, n_classes),
    )


def _lenet_widths(input_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(channels of conv 1, conv 2, hidden units, kernel size) sized to the input."""
    _, h, w = input_shape
    if min(h, w) <= 8:
        return 16, 32, 64, 3
    return 6, 16, 120, 5


def lenet(input_shape: tuple[int, int, int], n_classes: int = 10) -> nn.Sequential:
    """A LeNet-style CNN: two conv–ReLU–maxpool stages, then two Linear layers.

    1×8×8 digits get 3×3 kernels (16 and 32 filters, 64 hidden units); 28×28 and 32×32
    images get the LeNet-5 widths (6 and 16 filters of 5×5, 120 hidden units).
    """
    if len(input_shape) != 3:
        raise ValueError(f"lenet expects an input shape (C, H, W), got {input_shape}")
    c, h, w = input_shape
    c1, c2, hidden, k = _lenet_widths(input_shape)
    pad = k // 2
    # Two 2×2 max-pools with 'same' convolutions: spatial size floor(floor(h/2)/2).
    h_out, w_out = (h // 2) // 2, (w // 2) // 2
    if h_out < 1 or w_out < 1:
        raise ValueError(f"input {input_shape} is too small for two 2×2 pooling stages")
    return nn.Sequential(
        nn.Conv2d(c, c1, k, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, k, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * h_out * w_out, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def lenet5(input_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10) -> nn.Sequential:
    """LeNet-5: conv6(5×5)–ReLU–maxpool–conv16(5×5)–ReLU–maxpool–fc120–ReLU–fc84–ReLU–fc.

    Unpadded convolutions, so 1×28×28 inputs reach fc1 as 16×4×4 = 256 features. fc1 holds
    most of the weights and its inputs are ReLU + max-pool outputs (all ≥ 0, large mean):
    the case where a diagonal pruning score misses the cross terms of the curvature.
    """
    if len(input_shape) != 3:
        raise ValueError(f"lenet5 expects an input shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = input_shape
    h_out, w_out = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input {tuple(input_shape)} is too small for LeNet-5 (two unpadded 5×5 "
            "convolutions and two 2×2 pools need at least 16×16)"
        )
    return nn.Sequential(
        nn.Conv2d(c, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h_out * w_out, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, n_classes),
    )


def build_model(input_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """CancerNet for flat feature vectors, the LeNet-style CNN for (C, H, W) images."""
    if len(input_shape) == 1:
        return cancer_net(input_shape[0], 100, n_classes)
    if len(input_shape) == 3:
        return lenet(tuple(input_shape), n_classes)
    raise ValueError(
        f"no built-in model for inputs of shape {tuple(input_shape)}; "
        "accepted: (features,) for CancerNet or (C, H, W) for the CNN"
    )


# ---------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3×3 conv–BatchNorm stages plus a shortcut (1×1 conv–BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3×3 stem, stages of BasicBlocks, global pooling, Linear head."""

    def __init__(
        self, c_in: int, n_classes: int, widths: tuple[int, ...], blocks_per_stage: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c, w, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(w, w) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet(
    input_shape: tuple[int, int, int],
    n_classes: int = 10,
    depth: int = 20,
    widths: tuple[int, ...] = (16, 32, 64),
) -> ResNet:
    """CIFAR-style ResNet of ``depth`` = 6n + 2 layers (n BasicBlocks per stage for three
    stages; 2·len(widths)·n + 2 in general), stage widths ``widths``, stride 2 between
    stages. ``resnet((3, 32, 32))`` is ResNet-20.
    """
    if len(input_shape) != 3:
        raise ValueError(f"resnet expects an input shape (C, H, W), got {tuple(input_shape)}")
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {widths!r}")
    per_stage, rest = divmod(depth - 2, 2 * len(widths))
    if depth < 2 + 2 * len(widths) or rest:
        raise ValueError(
            f"depth {depth} does not fit {len(widths)} stages of BasicBlocks: it must be "
            f"2 + {2 * len(widths)}·n for n ≥ 1 (e.g. {2 + 2 * len(widths)}, "
            f"{2 + 4 * len(widths)})"
        )
    model = ResNet(input_shape[0], n_classes, tuple(widths), per_stage)
    model.input_shape = tuple(input_shape)  # lets prune/compress trace without a batch
    return model


# ---------------------------------------------------------------------------- transformer
class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out ``nn.Linear`` projections.

    The head count follows from the projections' width (``q.out_features // head_dim``),
    so removing whole heads (rows of q, k, v and columns of ``proj``) leaves a working,
    smaller module. Built from Linear layers, every projection gets Kronecker factors.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.head_dim = dim // n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, h, d).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, h * d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP.

    ``attention="linear"``: :class:`SelfAttention` (heads removable); ``"mha"``:
    ``nn.MultiheadAttention`` (its heads cannot be removed, its MLP neurons can).
    """

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, attention: str = "linear") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "linear":
            self.attn: nn.Module = SelfAttention(dim, n_heads)
        elif attention == "mha":
            self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        else:
            raise ValueError(f"attention must be 'linear' or 'mha', got {attention!r}")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            x = x + self.attn(h)
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """Non-overlapping p×p patches of a (C, H, W) image → (tokens, dim) by one strided conv."""

    def __init__(self, c_in: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Embedding + learned positions, pre-norm blocks, final LayerNorm, mean-pooled head."""

    def __init__(
        self,
        embed: nn.Module,
        n_tokens: int,
        n_classes: int,
        dim: int,
        depth: int,
        n_heads: int,
        mlp_dim: int,
        attention: str = "linear",
    ) -> None:
        super().__init__()
        self.embed = embed
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_tokens, dim))
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, n_heads, mlp_dim, attention) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(z).mean(dim=1))


def vit(
    input_shape: tuple[int, ...],
    n_classes: int = 10,
    dim: int = 64,
    depth: int = 2,
    n_heads: int = 4,
    mlp_ratio: int = 2,
    patch: int = 4,
    vocab_size: int | None = None,
    attention: str = "linear",
) -> ViT:
    """A small pre-norm transformer classifier.

    ``input_shape`` (C, H, W): images cut into ``patch``×``patch`` patches; (T,): sequences
    of T token ids below ``vocab_size`` (an ``nn.Embedding``). Blocks have ``n_heads``
    heads of width dim / n_heads and GELU MLPs of ``mlp_ratio``·dim neurons.
    ``attention="linear"`` builds each attention from four ``nn.Linear`` projections
    (:class:`SelfAttention`: Kronecker curvature, heads removable); ``"mha"`` uses
    ``nn.MultiheadAttention`` (its packed projections cannot lose heads).
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        c, h, w = shape
        if h % patch or w % patch:
            raise ValueError(f"patch {patch} does not divide the image size {h}×{w}")
        embed: nn.Module = PatchEmbedding(c, dim, patch)
        n_tokens = (h // patch) * (w // patch)
    elif len(shape) == 1:
        if vocab_size is None or vocab_size < 1:
            raise ValueError("token sequences (T,) need vocab_size, the number of token ids")
        embed, n_tokens = nn.Embedding(vocab_size, dim), shape[0]
    else:
        raise ValueError(
            f"vit expects (C, H, W) images or (T,) token sequences, got input shape {shape}"
        )
    model = ViT(embed, n_tokens, n_classes, dim, depth, n_heads, mlp_ratio * dim, attention)
    model.input_shape, model.vocab_size = shape, vocab_size  # for tracing without a batch
    return model


# ---------------------------------------------------------------------------- by name
MODEL_NAMES = ("auto", "resnet", "vit")


def model_by_name(name: str, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The main job's ``--model``: ``auto`` (:func:`build_model`), ``resnet`` (ResNet-20)
    or ``vit`` (4×4 patches, 2 blocks of 4 heads); the last two need (C, H, W) images."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")
    if name == "auto":
        return build_model(input_shape, n_classes)
    if len(input_shape) != 3:
        raise ValueError(
            f"--model {name} needs (C, H, W) images; this data set has inputs of shape "
            f"{tuple(input_shape)} (use --model auto)"
        )
    if name == "resnet":
        return resnet(tuple(input_shape), n_classes)
    patch = 4 if input_shape[1] % 4 == 0 and input_shape[2] % 4 == 0 else 2
    return vit(tuple(input_shape), n_classes, patch=patch)
