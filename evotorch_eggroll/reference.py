"""Naive reference of the ops: what each one computes, in plain float64 torch.

Every function here is written the obvious way (per-row factors gathered from
:mod:`evotorch_eggroll.noise`'s stream, then one ``einsum`` or a materialised weight), on
the CPU and in float64, so that it is easy to check by reading. The Triton kernels
(:mod:`evotorch_eggroll.kernels`, through :mod:`evotorch_eggroll.ops`) and the plain-torch
backend (:mod:`evotorch_eggroll.torch_ops`, an optimised path that groups rows by member,
reuses drawn factors and chunks the update) are tested against it.

The noise comes from :func:`evotorch_eggroll.noise.normal_stream` (float64 Box–Muller
rounded once to float32, then widened), the factor block's rows from
:class:`evotorch_eggroll.noise.FactorLayout`, and each member's noise index and sign from
:func:`evotorch_eggroll.noise.member_noise`. Nothing here is fast: use it at test sizes.

The arguments are those of :mod:`evotorch_eggroll.ops` (stream coordinates ``seed``,
``key``, ``epoch``; per-row ``member_ids``); tensors may live on any device and are read
back to the CPU. Results are float64 CPU tensors; a float64 CPU input that requires grad
keeps its autograd graph (gradients of the explicit formula).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import noise as _noise

__all__ = [
    "row_noise",
    "row_factor_blocks",
    "row_dense_noise",
    "lowrank_project",
    "lowrank_expand",
    "dense_noise_add",
    "perturbed_weights",
    "perturbed_linear",
    "lowrank_update",
    "dense_update",
]

# Per-row weights up to this many elements in all are materialised; above, the same
# formula runs in factored form (equal up to float64 rounding).
MATERIALISE_ELEMENTS = 1 << 22


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float64 CPU tensor (itself when it already is one, graph kept)."""
    return t.detach().cpu().double() if t.device.type != "cpu" else t.double()


def row_noise(member_ids: torch.Tensor, antithetic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise index ``(rows,)`` int64 and sign ``(rows,)`` float64 of each row's member."""
    idx, sign = _noise.member_noise(member_ids.reshape(-1).cpu(), antithetic)
    return idx, sign.double()


def row_factor_blocks(seed: int, key: int, epoch: int, member_ids: torch.Tensor, rows: int,
                      rank: int, antithetic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` rows of each batch row's factor block: ``(rows_b, rows, rank)``
    float64, and each batch row's sign ``(rows_b,)`` float64."""
    idx, sign = row_noise(member_ids, antithetic)
    uniq, inv = torch.unique(idx, return_inverse=True)  # each distinct draw generated once
    blocks = _noise.normal_stream(seed, key, epoch, uniq, rows * rank).view(-1, rows, rank)
    return blocks.double()[inv], sign


def row_dense_noise(seed: int, key: int, epoch: int, member_ids: torch.Tensor, numel: int,
                    antithetic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements ``0 .. numel - 1`` of each batch row's dense noise ``(rows, numel)`` float64,
    and each row's sign ``(rows,)`` float64."""
    blocks, sign = row_factor_blocks(seed, key, epoch, member_ids, numel, 1, antithetic)
    return blocks[:, :, 0], sign


def lowrank_project(v: torch.Tensor, member_ids: torch.Tensor, *, seed: int, key: int,
                    epoch: int, rank: int, row_offset: int, antithetic: bool) -> torch.Tensor:
    """``t[j] = v[j] @ F_j[row_offset : row_offset + D]`` for ``v (rows, D)``: ``(rows, r)``."""
    v = _f64(v)
    d = v.shape[1]
    f, _ = row_factor_blocks(seed, key, epoch, member_ids, row_offset + d, rank, antithetic)
    return torch.einsum("jd,jdr->jr", v, f[:, row_offset:])


def lowrank_expand(out: torch.Tensor, t: torch.Tensor, member_ids: torch.Tensor, *, seed: int,
                   key: int, epoch: int, rank: int, row_offset: int, scale: float,
                   antithetic: bool, bias_key: Optional[int] = None,
                   bias_scale: float = 0.0) -> torch.Tensor:
    """``out[j] + s_j (scale F_j[row_offset : row_offset + D] @ t[j] + bias_scale eps_j)``
    for ``out (rows, D)``, ``t (rows, r)`` (``eps_j``: elements ``0 .. D-1`` of ``bias_key``'s
    noise, only with ``bias_key``): a new ``(rows, D)`` tensor."""
    out, t = _f64(out), _f64(t)
    d = out.shape[1]
    f, sign = row_factor_blocks(seed, key, epoch, member_ids, row_offset + d, rank, antithetic)
    delta = scale * torch.einsum("jdr,jr->jd", f[:, row_offset:], t)
    if bias_key is not None:
        eps, _ = row_dense_noise(seed, bias_key, epoch, member_ids, d, antithetic)
        delta = delta + bias_scale * eps
    return out + sign[:, None] * delta


def dense_noise_add(out: torch.Tensor, member_ids: torch.Tensor, *, seed: int, key: int,
                    epoch: int, scale: float, antithetic: bool) -> torch.Tensor:
    """``out[j] + s_j scale eps_j[0 .. D)`` for ``out (rows, D)``: a new tensor."""
    out = _f64(out)
    eps, sign = row_dense_noise(seed, key, epoch, member_ids, out.shape[1], antithetic)
    return out + (sign * scale)[:, None] * eps


def perturbed_weights(weight: torch.Tensor, member_ids: torch.Tensor, *, seed: int, key: int,
                      epoch: int, rank: int, sigma: float, antithetic: bool) -> torch.Tensor:
    """Each row's perturbed weight ``W + s_j sigma/sqrt(r) A0_j B0_j^T``: ``(rows, m, n)``."""
    w = _f64(weight)
    layout = _noise.FactorLayout(w.shape[0], w.shape[1], rank)
    f, sign = row_factor_blocks(seed, key, epoch, member_ids, layout.rows, rank, antithetic)
    a0, b0 = layout.split(f)
    coef = (sign * sigma / math.sqrt(rank))[:, None, None]
    return w + coef * torch.bmm(a0, b0.transpose(1, 2))


def perturbed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     member_ids: torch.Tensor, *, seed: int, weight_key: Optional[int],
                     bias_key: Optional[int], epoch: int, rank: int, sigma: float,
                     antithetic: bool) -> torch.Tensor:
    """``out[j] = x[j] (W + s_j sigma/sqrt(r) A0_j B0_j^T)^T + b + s_j sigma eps_b_j`` for
    ``x (rows, n)``: ``(rows, m)``.

    The per-row weights are materialised when they take at most
    :data:`MATERIALISE_ELEMENTS` elements; above, the low-rank term is
    ``s_j sigma/sqrt(r) (x[j] B0_j) A0_j^T`` (the same number up to float64 rounding).
    ``weight_key``/``bias_key`` None leaves that parameter unperturbed.
    """
    x, w = _f64(x), _f64(weight)
    rows = x.shape[0]
    m, n = w.shape
    common = dict(seed=seed, epoch=epoch, antithetic=antithetic)
    if weight_key is None:
        out = x @ w.T
    elif rows * m * n <= MATERIALISE_ELEMENTS:
        ws = perturbed_weights(w, member_ids, key=weight_key, rank=rank, sigma=sigma, **common)
        out = torch.einsum("jn,jmn->jm", x, ws)
    else:
        layout = _noise.FactorLayout(m, n, rank)
        f, sign = row_factor_blocks(key=weight_key, member_ids=member_ids, rows=layout.rows,
                                    rank=rank, **common)
        a0, b0 = layout.split(f)
        low = torch.einsum("jr,jmr->jm", torch.einsum("jn,jnr->jr", x, b0), a0)
        out = x @ w.T + (sign * sigma / math.sqrt(rank))[:, None] * low
    if bias is not None:
        out = out + _f64(bias)
        if bias_key is not None:
            out = dense_noise_add(out, member_ids, key=bias_key, scale=sigma, **common)
    return out


def lowrank_update(m: int, n: int, *, seed: int, key: int, epoch: int, rank: int,
                   noise_indices: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``G = sum_k coeffs[k] A0_k B0_k^T`` of an ``(m, n)`` weight: ``(m, n)``."""
    idx = torch.as_tensor(noise_indices).reshape(-1).cpu()
    a0, b0 = _noise.lowrank_factors(seed, key, epoch, idx, m, n, rank)
    return torch.einsum("k,kmr,knr->mn", _f64(coeffs.reshape(-1)), a0.double(), b0.double())


def dense_update(numel: int, *, seed: int, key: int, epoch: int, noise_indices: torch.Tensor,
                 coeffs: torch.Tensor) -> torch.Tensor:
    """``g = sum_k coeffs[k] eps_k``: ``(numel,)``."""
    idx = torch.as_tensor(noise_indices).reshape(-1).cpu()
    eps = _noise.normal_stream(seed, key, epoch, idx, numel).double()
    return _f64(coeffs.reshape(-1)) @ eps
