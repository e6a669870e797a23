"""Dense float64 references built from first principles, independent of the core's code.

Per-sample Jacobians come from ``torch.func.jacrev`` one sample at a time; Kronecker factors
from per-sample, per-position loops with patches cut out by slicing (no ``unfold``); square
roots of the output Hessians from an eigendecomposition (not the core's closed form).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def _sample(x, i: int):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _n(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def jacobians(model: nn.Module, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, C) and per-sample Jacobians (N, C, P) w.r.t. the trainable parameters."""
    model.eval()
    params = {n: p.detach() for n, p in trainable(model)}
    buffers = dict(model.named_buffers())
    outs, jacs = [], []
    for i in range(_n(x)):
        xi = _sample(x, i)

        def f(ps, xi=xi):
            return functional_call(model, ({**params, **ps}, buffers), (xi,))[0]

        jac = jacrev(f)(params)
        outs.append(f(params).detach())
        jacs.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1))
    return torch.stack(outs), torch.stack(jacs)


def output_hessian_roots(likelihood: str, curvature: str, f: torch.Tensor, y: torch.Tensor):
    """(N, C, K) matrices L_n with L_n L_nᵀ the per-sample output Hessian (GGN) or the
    outer product of the loss gradient (EF)."""
    if likelihood == "classification":
        p = torch.softmax(f, -1)
        if curvature == "ef":
            return (p - F.one_hot(y, f.shape[1]).to(f.dtype)).unsqueeze(-1)
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        vals, vecs = torch.linalg.eigh(lam)
        return vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)
    if curvature == "ef":
        return (f - y).unsqueeze(-1)
    return torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1)


def summed_loss(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if likelihood == "classification":
        return -torch.log_softmax(f, -1).gather(1, y[:, None]).sum()
    return 0.5 * ((f - y) ** 2).sum()


def dense_curvature(
    model: nn.Module, x, y, likelihood: str = "classification", curvature: str = "ggn"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (P, P) GGN Σ_n J_nᵀ Λ_n J_n (or EF Σ_n g_n g_nᵀ) and the summed loss."""
    f, J = jacobians(model, x)
    L = output_hessian_roots(likelihood, curvature, f, y)
    JL = J.transpose(1, 2) @ L  # (N, P, K)
    return torch.einsum("npk,nqk->pq", JL, JL), summed_loss(likelihood, f, y)


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> list[torch.Tensor]:
    """Input patches of one sample (c, H, W), one per output position, row-major."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):  # "same"/"valid": the pads Conv2d itself applies
        xp = F.pad(x, conv._reversed_padding_repeated_twice)
    else:
        ph, pw = conv.padding
        xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = []
    for i in range(oh):
        for j in range(ow):
            r, c = i * sh, j * sw
            out.append(
                xp[:, r : r + dh * (kh - 1) + 1 : dh, c : c + dw * (kw - 1) + 1 : dw].reshape(-1)
            )
    return out


def naive_kfac(
    model: nn.Module, x, y, likelihood: str = "classification", curvature: str = "ggn"
) -> dict[str, list[torch.Tensor]]:
    """KFAC factors per Linear/Conv2d parameter name (``[G, A]`` weight, ``[G]`` bias):
    A = Σ_n Σ_s a aᵀ / S / N, G = Σ_n Σ_k Σ_s g gᵀ, by loops over samples, columns, positions."""
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    G = {n: 0.0 for n, _ in layers}
    A = {n: 0.0 for n, _ in layers}
    n_data = _n(x)
    for i in range(n_data):
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(mod, inp, out, name, store=seen):
            store[name] = (inp[0], out)

        handles = [m.register_forward_hook(partial(record, name=n)) for n, m in layers]
        f = model(_sample(x, i))
        for h in handles:
            h.remove()
        L = output_hessian_roots(likelihood, curvature, f.detach(), y[i : i + 1])[0]
        for k in range(L.shape[1]):
            outs = [seen[n][1] for n, _ in layers]
            grads = torch.autograd.grad((f[0] * L[:, k]).sum(), outs, retain_graph=True)
            for (n, m), g in zip(layers, grads):
                if isinstance(m, nn.Linear):
                    cols = [g[0]]
                else:
                    cols = [g[0, :, r, c] for r in range(g.shape[2]) for c in range(g.shape[3])]
                G[n] = G[n] + sum(torch.outer(v, v) for v in cols)
        for n, m in layers:
            a = seen[n][0].detach()[0]
            rows = [a] if isinstance(m, nn.Linear) else _patches(a, m)
            A[n] = A[n] + sum(torch.outer(v, v) for v in rows) / len(rows)
    out: dict[str, list[torch.Tensor]] = {}
    for n, m in layers:
        prefix = f"{n}." if n else ""
        if m.weight.requires_grad:
            out[prefix + "weight"] = [G[n], A[n] / n_data]
        if m.bias is not None and m.bias.requires_grad:
            out[prefix + "bias"] = [G[n]]
    return out


def block_matrix(blocks) -> torch.Tensor:
    """Dense block-diagonal matrix of per-tensor blocks: kron(G, A), G, or diag(h)."""
    mats = []
    for b in blocks:
        if isinstance(b, torch.Tensor):
            mats.append(torch.diag(b.reshape(-1)))
        elif len(b) == 2:
            mats.append(torch.kron(b[0], b[1]))
        else:
            mats.append(b[0])
    return torch.block_diag(*mats)


def dense_precision(post) -> torch.Tensor:
    """s·K + diag(δ): K the posterior's curvature as a dense block-diagonal matrix, δ expanded
    by :func:`expected_log_prior`."""
    if post.structure == "kron":
        blocks = post.kron_factors
    else:
        blocks = [post.curvature.diags[i] for i in range(len(post.blocks))]
    K = block_matrix(blocks)
    return post.curvature_scale * K + torch.diag(expected_log_prior(post.prior).exp())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference entry."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def expected_log_prior(prior) -> torch.Tensor:
    """(P,) log δ from the prior's flat ``log_precision``, expanded per prior (docs/maths.md)."""
    lp = prior.log_precision.detach()
    parts, cursor = [], 0
    for index, slot in enumerate(prior.slots):
        shape, numel = slot.shape, slot.shape.numel()
        if prior.kind == "scalar":
            parts.append(lp[0].expand(numel))
        elif prior.kind == "layerwise":
            parts.append(lp[index].expand(numel))
        elif prior.kind == "parameterwise":
            parts.append(lp[cursor : cursor + numel])
            cursor += numel
        elif len(shape) >= 2:  # unitwise weight: exp(a_m + b_n), shared over kernel positions
            a = lp[cursor : cursor + shape[0]]
            b = lp[cursor + shape[0] : cursor + shape[0] + shape[1]]
            cursor += shape[0] + shape[1]
            grid = torch.empty(shape, dtype=lp.dtype)
            for m in range(shape[0]):
                for n in range(shape[1]):
                    grid[m, n] = a[m] + b[n]
            parts.append(grid.reshape(-1))
        else:  # unitwise 1-D tensor: one per entry
            parts.append(lp[cursor : cursor + numel])
            cursor += numel
    return torch.cat(parts)


def perturb_prior(post, seed: int, scale: float = 0.8) -> None:
    """Random, non-uniform hyperparameters (in place, no autograd)."""
    gen = torch.Generator().manual_seed(seed)
    lp = post.prior.log_precision
    with torch.no_grad():
        lp.add_(scale * torch.randn(lp.shape, generator=gen, dtype=lp.dtype))
