"""The networks of the main job: CancerNet and small LeNet-style CNNs.

Every model is a plain residual-free :class:`torch.nn.Sequential` of Linear/Conv2d layers,
zero-preserving activations, pooling and Flatten, so that structured (unit) masks can be
compressed into a physically smaller model (:func:`spamkern.pruning.compress`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["build_model", "cancer_net", "lenet", "lenet5"]


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
