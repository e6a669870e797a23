"""Launch configuration of the Triton block-sparse kernel: measured once per key and card.

Key = (rows bucket, n, k, block, density bucket, dtype). On a GPU the first call with a new
key times every candidate configuration with ``triton.testing.do_bench`` and stores the
fastest in the card's table (:mod:`spamkern.sparse.tables`); later calls — and later
processes — reuse it. ``SPAMKERN_AUTOTUNE=0`` skips measuring (default configuration).
"""

from __future__ import annotations

import os

from spamkern.sparse import tables


def rows_bucket(m: int) -> int:
    """Power of two ≥ m (at least 16): shapes within a bucket share one configuration."""
    return max(16, 1 << max(0, (m - 1).bit_length()))


def config_key(m: int, n: int, k: int, block: tuple[int, int], density: float, dtype) -> str:
    dens = round(density * 20) / 20
    dt = str(dtype).replace("torch.", "")
    return f"m{rows_bucket(m)}-n{n}-k{k}-b{block[0]}x{block[1]}-d{dens:.2f}-{dt}"


def _autotune_enabled() -> bool:
    return os.environ.get("SPAMKERN_AUTOTUNE", "1") != "0"


_MEMO: dict[tuple, dict] = {}  # (device, key) -> configuration, so a call reads no file


def triton_config(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features) -> dict:
    """The configuration to launch with (measured on a GPU, default in the interpreter)."""
    from spamkern.sparse._kernels import triton_module

    kb = triton_module()
    m, k = x.shape
    if x.device.type != "cuda" or not _autotune_enabled():
        return kb.default_config(m, x.device)
    _, bk, bn = blocks_t.shape
    n_blocks = (row_ptr.numel() - 1) * -(-k // bk)
    density = col_idx.numel() / max(1, n_blocks)
    key = config_key(m, out_features, k, (bn, bk), density, x.dtype)
    memo_key = (x.device, key)
    found = _MEMO.get(memo_key)
    if found is None:
        card = tables.card_name(x.device)
        found = tables.load(card)["triton_configs"].get(key)
        if found is None:
            found = tune(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features)
            tables.record(card, triton_config=(key, found))
        _MEMO[memo_key] = found
    return found


def tune(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features) -> dict:
    """Time every candidate configuration on these very tensors; return the fastest."""
    import triton.testing

    from spamkern.sparse._kernels import triton_module

    kb = triton_module()
    _, bk, bn = blocks_t.shape
    best, best_ms = None, float("inf")
    for config in kb.candidate_configs(x.shape[0], bn, bk):
        try:
            ms = triton.testing.do_bench(
                lambda c=config: kb.launch(
                    x, row_ptr, col_idx, blocks_t, row_order, bias, out_features, c
                ),
                warmup=5,
                rep=20,
            )
        except Exception:  # a configuration that does not fit this card (shared memory)
            continue
        if ms < best_ms:
            best, best_ms = dict(config), ms
    if best is None:
        best = kb.default_config(x.shape[0], x.device)
    best["ms"] = best_ms if best_ms != float("inf") else None
    return best
