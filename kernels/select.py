"""k-th smallest score per segment by radix select on the device (no sort, no host copy).

A float's bit pattern, with the sign bit flipped for positives and all bits flipped for
negatives, is an unsigned integer key with the same order as the floats. The k-th smallest
key is found 8 bits at a time from the top: a histogram pass counts, per segment, the next
digit of the keys that still match the digits chosen so far; a scan pass picks the digit
whose cumulative count reaches k and lowers k by the counts below it. float32 needs 4
rounds, float64 8, each two launches, whatever the number of segments (global pruning is
one segment, layerwise pruning one per parameter tensor). NaN scores sort above +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spamkern.dispatch import register_impl

from ._util import interpreting

RADIX_BITS = 8
N_BINS = 1 << RADIX_BITS


@triton.jit
def _to_key(x, BITS: tl.constexpr):
    """Order-preserving unsigned key of a float."""
    if BITS == 32:
        b = x.to(tl.int32, bitcast=True)
        key = b ^ ((b >> 31) | -2147483648)
        return key.to(tl.uint32, bitcast=True)
    else:
        b = x.to(tl.int64, bitcast=True)
        key = b ^ ((b >> 63) | -9223372036854775808)
        return key.to(tl.uint64, bitcast=True)


@triton.jit
def _from_key(key, BITS: tl.constexpr):
    """Inverse of ``_to_key``."""
    if BITS == 32:
        k = key.to(tl.int32, bitcast=True)
        b = tl.where(k < 0, k ^ -2147483648, ~k)
        return b.to(tl.float32, bitcast=True)
    else:
        k = key.to(tl.int64, bitcast=True)
        b = tl.where(k < 0, k ^ -9223372036854775808, ~k)
        return b.to(tl.float64, bitcast=True)


@triton.jit
def _uint_of(bits, BITS: tl.constexpr):
    if BITS == 32:
        return bits.to(tl.uint32, bitcast=True)
    else:
        return bits.to(tl.uint64, bitcast=True)


@triton.jit
def _radix_hist_kernel(
    x_ptr, hist_ptr, prefix_ptr, prog_seg_ptr, prog_start_ptr, seg_off_ptr, seg_size_ptr,
    SHIFT: tl.constexpr, FIRST: tl.constexpr, BITS: tl.constexpr,
    RADIX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    seg = tl.load(prog_seg_ptr + pid)
    local = tl.load(prog_start_ptr + pid) + tl.arange(0, BLOCK)
    mask = local < tl.load(seg_size_ptr + seg)
    x = tl.load(x_ptr + tl.load(seg_off_ptr + seg) + local, mask=mask, other=0.0)
    key = _to_key(x, BITS)
    if not FIRST:
        prefix = _uint_of(tl.load(prefix_ptr + seg), BITS)
        mask = mask & ((key >> (SHIFT + RADIX)) == (prefix >> (SHIFT + RADIX)))
    digit = ((key >> SHIFT) & ((1 << RADIX) - 1)).to(tl.int32)
    counts = tl.histogram(digit, 1 << RADIX, mask=mask)
    tl.atomic_add(hist_ptr + seg * (1 << RADIX) + tl.arange(0, 1 << RADIX), counts)


@triton.jit
def _radix_scan_kernel(
    hist_ptr, prefix_ptr, krem_ptr, k_ptr, out_ptr,
    SHIFT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, BITS: tl.constexpr,
    RADIX: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    bins = tl.arange(0, 1 << RADIX)
    counts = tl.load(hist_ptr + seg * (1 << RADIX) + bins)
    k = tl.load(krem_ptr + seg)
    below = tl.cumsum(counts, 0)
    digit = tl.sum((below < k).to(tl.int32), 0)
    k = k - tl.sum(tl.where(bins < digit, counts, 0), 0)
    tl.store(krem_ptr + seg, k)
    if FIRST:
        prefix = _uint_of(tl.load(prefix_ptr + seg) * 0, BITS)
    else:
        prefix = _uint_of(tl.load(prefix_ptr + seg), BITS)
    prefix = prefix | (digit.to(prefix.dtype) << SHIFT)
    if BITS == 32:
        tl.store(prefix_ptr + seg, prefix.to(tl.int32, bitcast=True))
    else:
        tl.store(prefix_ptr + seg, prefix.to(tl.int64, bitcast=True))
    if LAST:
        value = _from_key(prefix, BITS)
        value = tl.where(tl.load(k_ptr + seg) > 0, value, float("-inf"))
        tl.store(out_ptr + seg, value)


def _block_size() -> int:
    return 1 << 16 if interpreting() else 4096


_PLAN_CACHE: dict[tuple, tuple[int, list[torch.Tensor]]] = {}


def _plan(sizes: tuple[int, ...], device: torch.device):
    """(number of programs, [program→segment, program start, segment offset, segment size])."""
    key = (sizes, device, _block_size())
    if key not in _PLAN_CACHE:
        block = _block_size()
        prog_seg, prog_start, offsets = [], [], []
        offset = 0
        for i, size in enumerate(sizes):
            offsets.append(offset)
            offset += size
            for start in range(0, size, block):
                prog_seg.append(i)
                prog_start.append(start)
        tables = [
            torch.tensor(v, dtype=torch.int64, device=device)
            for v in (prog_seg, prog_start, offsets, list(sizes))
        ]
        if len(_PLAN_CACHE) > 64:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = (len(prog_seg), tables)
    return _PLAN_CACHE[key]


def _segment_kth_smallest_launch(
    scores: torch.Tensor, sizes: list[int], ks: list[int]
) -> torch.Tensor:
    """(S,) k-th smallest per segment; ``-inf`` where k = 0."""
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"radix select takes float32/float64 scores, got {scores.dtype}")
    scores = scores.contiguous()
    bits = 32 if scores.dtype == torch.float32 else 64
    int_dtype = torch.int32 if bits == 32 else torch.int64
    n_seg = len(sizes)
    n_programs, tables = _plan(tuple(int(s) for s in sizes), scores.device)
    rounds = bits // RADIX_BITS
    hist = torch.zeros(rounds, n_seg, N_BINS, dtype=torch.int32, device=scores.device)
    k_dev = _k_tensor(tuple(int(k) for k in ks), scores.device)
    krem = k_dev.clamp(min=1)  # a fresh copy: the scan kernels lower it in place
    prefix = torch.empty(n_seg, dtype=int_dtype, device=scores.device)
    out = torch.empty(n_seg, dtype=scores.dtype, device=scores.device)
    hist_warps = 1 if interpreting() else 4
    for r in range(rounds):
        shift = bits - RADIX_BITS * (r + 1)
        _radix_hist_kernel[(n_programs,)](
            scores, hist[r], prefix, *tables,
            SHIFT=shift, FIRST=r == 0, BITS=bits, RADIX=RADIX_BITS, BLOCK=_block_size(),
            num_warps=hist_warps,
        )  # fmt: skip
        _radix_scan_kernel[(n_seg,)](
            hist[r], prefix, krem, k_dev, out,
            SHIFT=shift, FIRST=r == 0, LAST=r == rounds - 1, BITS=bits, RADIX=RADIX_BITS,
            num_warps=1,
        )  # fmt: skip
    return out


_K_CACHE: dict[tuple, torch.Tensor] = {}


def _k_tensor(ks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The ranks on the device, copied once per (ranks, device) rather than every call."""
    key = (ks, device)
    if key not in _K_CACHE:
        if len(_K_CACHE) > 64:
            _K_CACHE.clear()
        _K_CACHE[key] = torch.tensor(ks, dtype=torch.int32, device=device)
    return _K_CACHE[key]


@torch.library.custom_op("spamkern::triton_segment_kth_smallest", mutates_args=())
def triton_segment_kth_smallest(
    scores: torch.Tensor, sizes: list[int], ks: list[int]
) -> torch.Tensor:
    """Custom-op form of the radix select (what ``torch.compile`` traces)."""
    return _segment_kth_smallest_launch(scores, sizes, ks)


@triton_segment_kth_smallest.register_fake
def _(scores, sizes, ks):
    return scores.new_empty(len(sizes))


def _supported(scores: torch.Tensor, *args) -> bool:
    return scores.dtype in (torch.float32, torch.float64)


@register_impl("segment_kth_smallest", "triton", supports=_supported)
def segment_kth_smallest_triton(
    scores: torch.Tensor, sizes: list[int], ks: list[int]
) -> torch.Tensor:
    # eager calls skip the custom-op wrapper (tens of µs of Python per call)
    fn = (
        triton_segment_kth_smallest
        if torch.compiler.is_compiling()
        else _segment_kth_smallest_launch
    )
    return fn(scores, list(sizes), list(ks))


@register_impl("kth_smallest", "triton", supports=_supported)
def kth_smallest_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    return segment_kth_smallest_triton(scores, [scores.numel()], [int(k)])[0]
