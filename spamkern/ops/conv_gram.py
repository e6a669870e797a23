"""A convolution's Kronecker input factor Σ_{n,s} u_ns u_nsᵀ without its patch matrix.

The patch matrix U of a k_h × k_w convolution over c channels has B·S rows of d = c·k_h·k_w
entries, and UᵀU costs d²·B·S multiply-adds: k_h·k_w times the d·c_out·B·S of the
convolution itself when c_out is about c, and more for narrow layers (LeNet-5's second
convolution, 6 → 16 channels of 5 × 5: 150/16 = 9.4 times its forward). Unfolding U and
transposing it to rows also writes k_h·k_w copies of the input, twice.

Row correlations remove a factor of about k_h. Cut each patch into its k_h rows: kernel
row i of the patch at output row r reads input row ρ = σ·r + δ·i (stride σ, dilation δ
along the height) at k_w horizontal offsets, a segment of n = k_w·c entries. The block of
the factor between kernel rows i and i + m sums, over output rows and columns, the
products of the segments of input rows ρ and ρ + δ·m. With V_ρ the (B·W_out, n) matrix of
row ρ's segments,

    block(i, i + m) = Σ_r F_m[σ·r + δ·i],    F_m[ρ] = V_ρᵀ V_{ρ+δm},

and F_m does not depend on i: one batched product per lag m = 0 … k_h − 1 over the input
rows, then every block is a sum of F_m over a window of rows (the blocks below the
diagonal are the transposes). That is Σ_m (R − δm)·n²·B·W_out multiply-adds, R the input
rows read, against d²·H_out·W_out·B: about k_h/2 times fewer than even one triangle of
UᵀU at stride 1, and V is k_w copies of the input instead of k_h·k_w. Along whichever axis
(height or width) the count is lowest; a 1 × 1 kernel, or a stride as large as the
kernel, gains nothing and takes the patch rows directly (channels last, one triangle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spamkern.dispatch import register_impl, select_impl
from spamkern.ops.factors import gram_upper, mirror_upper_

Pair = tuple[int, int]

# one triangle of UᵀU by column panels costs about this share of the full product
_UPPER_SHARE = 0.6


def conv_patch_gram(
    x: torch.Tensor,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    out: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """KFAC input factor of a Conv2d (groups=1) from its input ``x`` (B, C, H, W).

    Returns ``out + alpha · UᵀU`` with ``U`` the (B·S, c·kh·kw) patch matrix, in the
    row-major (c, kh, kw) order of ``conv.weight.flatten(1)``.
    """
    if x.ndim != 4:
        raise ValueError(f"conv_patch_gram expects (B, C, H, W) input, got {tuple(x.shape)}")
    impl = select_impl("conv_patch_gram", x)
    return impl(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), out, alpha)


@register_impl("conv_patch_gram", "torch")
def conv_patch_gram_torch(
    x: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    out: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    """``out += alpha · UᵀU`` by :func:`patch_gram`; 16-bit inputs are multiplied in
    float32 (a new ``out`` is float32), as the kernels do."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    gram = patch_gram(x, kernel_size, stride, padding, dilation)  # a fresh tensor
    if out is None:
        return gram if alpha == 1.0 else gram.mul_(alpha)
    return out.add_(gram, alpha=alpha)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output positions of a convolution along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def patch_gram(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """Σ over samples and output positions of u uᵀ, u the patch of ``x`` (B, c, H, W) in
    ``F.unfold``'s (c, k_h, k_w) order (that of ``conv.weight.flatten(1)``), computed by
    the cheapest of row correlations, column correlations and the patch rows."""
    sizes = tuple(
        output_size(x.shape[2 + a], kernel[a], stride[a], padding[a], dilation[a]) for a in (0, 1)
    )
    if min(sizes) <= 0:
        raise ValueError(
            f"a {kernel} convolution (stride {stride}, padding {padding}, dilation {dilation}) "
            f"of a {tuple(x.shape[2:])} input has no output positions"
        )
    route = cheapest_route(x.shape, kernel, stride, dilation, sizes)
    if route == "rows":
        return _gram_by_rows(x, kernel, stride, padding, dilation)
    if route == "cols":  # the same along the width: swap the axes there and back
        geometry = [(pair[1], pair[0]) for pair in (kernel, stride, padding, dilation)]
        gram = _gram_by_rows(x.transpose(2, 3), *geometry)
        c, kh, kw = x.shape[1], *kernel
        return _reorder(gram, (c, kw, kh), (0, 2, 1))
    return _gram_of_patch_rows(x, kernel, stride, padding, dilation)


def cheapest_route(shape, kernel: Pair, stride: Pair, dilation: Pair, sizes: Pair) -> str:
    """The route with the fewest multiply-adds: "rows", "cols" or "patches"."""
    b, c = shape[0], shape[1]
    d = c * kernel[0] * kernel[1]
    costs = {"patches": _UPPER_SHARE * d * d * sizes[0] * sizes[1] * b}
    for axis, name in ((0, "rows"), (1, "cols")):
        k, s, dil = kernel[axis], stride[axis], dilation[axis]
        if k == 1:
            continue
        n = c * kernel[1 - axis]  # a segment: one kernel row (column) over the other axis
        read = s * (sizes[axis] - 1) + dil * (k - 1) + 1
        products = sum(read - dil * m for m in range(k))
        costs[name] = products * n * n * b * sizes[1 - axis]
    return min(costs, key=costs.get)


def _channels_last(x: torch.Tensor, padding: Pair) -> torch.Tensor:
    """(B, H + 2p_h, W + 2p_w, c): a view of ``x`` when there is no padding (the strided
    windows below copy from it once), else a padded copy."""
    xc = x.permute(0, 2, 3, 1)
    if padding[0] or padding[1]:
        return F.pad(xc, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    return xc


def _padded_input(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """(the padded input channels last, output height, output width)."""
    xp = _channels_last(x, padding)
    h_out = output_size(xp.shape[1], kernel[0], stride[0], 0, dilation[0])
    w_out = output_size(xp.shape[2], kernel[1], stride[1], 0, dilation[1])
    return xp, h_out, w_out


def _gram_by_rows(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """Row correlations (module docstring); the result in (c, k_h, k_w) order."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    xp, h_out, w_out = _padded_input(x, kernel, stride, padding, dilation)
    b, c = xp.shape[0], xp.shape[3]
    read = sh * (h_out - 1) + dh * (kh - 1) + 1  # the input rows any patch reads
    s_b, s_h, s_w, s_c = xp.stride()
    segments = xp.as_strided((read, b, w_out, kw, c), (s_h, s_b, s_w * sw, s_w * dw, s_c))
    v = segments.reshape(read, b * w_out, kw * c)  # V_ρ for every row ρ read
    n = kw * c
    blocks = v.new_empty(kh, kh, n, n)
    for m in range(kh):
        lag = dh * m
        products = torch.bmm(v[: read - lag].mT, v[lag:])  # F_m[ρ], ρ = 0 … read − lag − 1
        p0, p1, p2 = products.stride()
        windows = products.as_strided((kh - m, h_out, n, n), (dh * p0, sh * p0, p1, p2))
        sums = windows.sum(1)  # block (i, i + m) for i = 0 … k_h − m − 1
        rows = torch.arange(kh - m)
        blocks[rows, rows + m] = sums
        if m:
            blocks[rows + m, rows] = sums.mT
    # blocks[i, i'] is indexed by (k_w, c) pairs: one (k_h, k_w, c) matrix, then (c, k_h, k_w)
    gram = blocks.permute(0, 2, 1, 3).reshape(kh * n, kh * n)
    return _reorder(gram, (kh, kw, c), (2, 0, 1))


def _gram_of_patch_rows(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """One triangle of UᵀU, U's rows taken channels last from a strided view (one copy)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    xp, h_out, w_out = _padded_input(x, kernel, stride, padding, dilation)
    b, c = xp.shape[0], xp.shape[3]
    s_b, s_h, s_w, s_c = xp.stride()
    shape = (b, h_out, w_out, kh, kw, c)
    patches = xp.as_strided(shape, (s_b, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    gram = mirror_upper_(gram_upper(patches.reshape(b * h_out * w_out, kh * kw * c)))
    return _reorder(gram, (kh, kw, c), (2, 0, 1))


def _reorder(gram: torch.Tensor, factors: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """Permute a Gram matrix's index, read as the product ``factors``, to ``order`` on
    both sides."""
    k = len(factors)
    perm = (*order, *(k + o for o in order))
    d = gram.shape[0]
    return gram.reshape(*factors, *factors).permute(perm).reshape(d, d)
