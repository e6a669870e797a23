"""``nn.MultiheadAttention`` re-expressed as four recorded linear maps for the curvature pass.

PyTorch's attention applies its q/k/v projections and ``out_proj`` inside one fused function,
so no hook sees their outputs. During the curvature pass the attention module's output is
recomputed here as

    q, k, v = query·W_qᵀ + b_q, key·W_kᵀ + b_k, value·W_vᵀ + b_v     (recorded)
    ctx     = PyTorch's own attention of (q, k, v) with identity projections
    out     = ctx·W_oᵀ + b_o                                           (recorded)

(multiplying by an identity is exact), checked against the module's own output, so masks,
``bias_k``/``bias_v``, ``add_zero_attn`` and causal attention behave exactly as in PyTorch.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _in_projections(mha: nn.MultiheadAttention, query, key, value):
    """q, k, v computed as the module's own forward computes them: one packed product for
    self-attention, one for the shared key and value, else one each. Split products add in
    another order, and the recomputation replaces the module's output, so it must match
    bit for bit (a BLAS may block a 3E-column product differently from three E-column ones)."""
    weight, bias, E = mha.in_proj_weight, mha.in_proj_bias, mha.embed_dim
    if not mha._qkv_same_embed_dim:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    elif query is key and key is value:
        return F.linear(query, weight, bias).chunk(3, dim=-1)
    elif key is value:
        w_q, w_kv = weight.split([E, 2 * E])
        b_q, b_kv = bias.split([E, 2 * E]) if bias is not None else (None, None)
        return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
    else:
        weights = weight.chunk(3)
    biases = bias.chunk(3) if bias is not None else (None,) * 3
    return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))


RandomState = tuple[torch.device, torch.Tensor, torch.Tensor | None]


def random_state(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> RandomState | None:
    """The random state before a forward that draws attention dropout (training mode), so
    the recomputation draws the same mask; None when the forward draws nothing."""
    if not (mha.training and mha.dropout > 0):
        return None
    device = (args[0] if args else kwargs["query"]).device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return device, torch.get_rng_state(), cuda


def recorded_attention(
    mha: nn.MultiheadAttention,
    args: tuple,
    kwargs: dict,
    output: tuple,
    state: RandomState | None = None,
) -> tuple[tuple, dict[str, tuple[torch.Tensor, torch.Tensor, int]]]:
    """The module's output recomputed through explicit projections, and per site
    ("q", "k", "v", "out") its ``(input, output, positions)``: rows of the linear map and the
    number of sequence positions per sample (the weight-sharing count of the "expand" rule).

    ``state`` (from :func:`random_state` before the forward) replays the forward's dropout;
    the random state after the call is the one the module's own forward left."""
    if state is None:
        return _recorded(mha, args, kwargs, output)
    device, cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        return _recorded(mha, args, kwargs, output)


def _recorded(mha, args, kwargs, output):
    bound = _SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    query, key, value = call["query"], call["key"], call["value"]
    if query.dim() != 3:
        raise ValueError(
            "MultiheadAttention got an unbatched (2-D) input; the curvature needs one sequence "
            "per sample, (batch, length, embed) or (length, batch, embed), got "
            f"{tuple(query.shape)}"
        )
    if mha.batch_first:  # PyTorch's attention works sequence-first; keep shared inputs shared
        seq_first = {id(t): t.transpose(0, 1) for t in (query, key, value)}
        query, key, value = (seq_first[id(t)] for t in (query, key, value))
    q, k, v = _in_projections(mha, query, key, value)
    E = mha.embed_dim
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    ctx, weights = F.multi_head_attention_forward(
        q, k, v, E, mha.num_heads, None, None, mha.bias_k, mha.bias_v, mha.add_zero_attn,
        mha.dropout, eye, None, training=mha.training, key_padding_mask=call["key_padding_mask"],
        need_weights=call["need_weights"], attn_mask=call["attn_mask"],
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=call["average_attn_weights"], is_causal=call["is_causal"],
    )  # fmt: skip
    out = F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)
    result = out.transpose(0, 1) if mha.batch_first else out
    _check_same(mha, result, output[0])
    length, source = query.shape[0], key.shape[0]
    sites = {
        "q": (query, q, length),
        "k": (key, k, source),
        "v": (value, v, source),
        "out": (ctx, out, length),
    }
    return (result, *output[1:]), sites


def _check_same(mha: nn.Module, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The recomputation must be the module's own output (an option it cannot reproduce is an
    error, never a silently different curvature)."""
    tol = 1e-10 if ours.dtype == torch.float64 else 1e-4
    scale = float(theirs.detach().abs().max()) if theirs.numel() else 0.0
    if ours.shape != theirs.shape or float((ours - theirs).detach().abs().max()) > tol * max(
        1.0, scale
    ):
        raise ValueError(
            f"could not reproduce the output of {type(mha).__name__} through its projections "
            "(an unsupported option?); freeze its parameters (requires_grad=False) or use "
            "structure='diag'"
        )
