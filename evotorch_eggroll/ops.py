"""Low-rank noise operations: the layer between the Triton kernels and the strategy.

Everything here takes stream coordinates (``seed``, parameter ``key``, effective ``epoch``)
and per-row member ids, and regenerates noise from the stream of
:mod:`evotorch_eggroll.noise`; nothing is stored between calls.

Conventions (SPEC §3): a weight ``(m, n)`` of rank ``r`` owns the factor block
``F (n + m, r)``; rows ``0..n-1`` are ``B0`` and rows ``n..n+m-1`` are ``A0``. Member ``j``
uses noise index ``j // 2`` and sign ``(-1)**j`` when ``antithetic``, else index ``j`` and
sign ``+1``. Its weight perturbation is ``sign * sigma / sqrt(r) * A0 @ B0.T``; a 1-D
parameter's is ``sign * sigma * eps``.

NOTE: the bodies below are plain-torch stand-ins built on the reference stream; the Triton
launchers replace them with identical signatures.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import noise as _noise

__all__ = [
    "normal_block",
    "lowrank_factors",
    "lowrank_project",
    "lowrank_expand_",
    "dense_noise_add_",
    "perturbed_linear",
    "lowrank_update",
    "dense_update",
]


def _member_noise(member_ids: torch.Tensor, antithetic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = member_ids.to(torch.int64)
    if antithetic:
        return ids // 2, 1.0 - 2.0 * (ids % 2).to(torch.float32)
    return ids, torch.ones_like(ids, dtype=torch.float32)


def normal_block(
    seed: int, key: int, epoch: int, noise_indices: torch.Tensor, numel: int
) -> torch.Tensor:
    """Normals of elements ``0..numel-1`` for each noise index: ``(K, numel)`` float32 on
    ``noise_indices.device``."""
    out = _noise.normal_stream(seed, key, epoch, noise_indices.cpu(), numel)
    return out.to(noise_indices.device)


def lowrank_factors(
    seed: int, key: int, epoch: int, noise_indices: torch.Tensor, m: int, n: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled factors ``A0 (K, m, r)``, ``B0 (K, n, r)`` (float32) of a ``(m, n)`` weight."""
    block = normal_block(seed, key, epoch, noise_indices, (n + m) * rank).view(-1, n + m, rank)
    return block[:, n:], block[:, :n]


def lowrank_project(
    v: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    rank: int,
    row_offset: int,
    total_rows: int,
    antithetic: bool,
) -> torch.Tensor:
    """``t[j] = v[j] @ F_j[row_offset : row_offset + D]`` for ``v (rows, D)``: ``(rows, r)`` float32.

    ``F_j`` is member ``j``'s unscaled factor block of ``total_rows = n + m`` rows.
    """
    idx, _ = _member_noise(member_ids, antithetic)
    d = v.shape[1]
    uniq, inv = torch.unique(idx, return_inverse=True)
    block = normal_block(seed, key, epoch, uniq, total_rows * rank).view(-1, total_rows, rank)
    f = block[:, row_offset : row_offset + d][inv]  # (rows, D, r)
    return torch.einsum("jd,jdr->jr", v.float(), f)


def lowrank_expand_(
    out: torch.Tensor,
    t: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    rank: int,
    row_offset: int,
    total_rows: int,
    scale: float,
    antithetic: bool,
) -> torch.Tensor:
    """In place: ``out[j] += sign_j * scale * F_j[row_offset : row_offset + D] @ t[j]``."""
    idx, sign = _member_noise(member_ids, antithetic)
    d = out.shape[1]
    uniq, inv = torch.unique(idx, return_inverse=True)
    block = normal_block(seed, key, epoch, uniq, total_rows * rank).view(-1, total_rows, rank)
    f = block[:, row_offset : row_offset + d][inv]  # (rows, D, r)
    delta = torch.einsum("jdr,jr->jd", f, t.float()) * (sign * scale)[:, None]
    out.add_(delta.to(out.dtype))
    return out


def dense_noise_add_(
    out: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    scale: float,
    antithetic: bool,
) -> torch.Tensor:
    """In place: ``out[j] += sign_j * scale * eps_j[0..D)`` (1-D parameter noise, per row)."""
    idx, sign = _member_noise(member_ids, antithetic)
    uniq, inv = torch.unique(idx, return_inverse=True)
    eps = normal_block(seed, key, epoch, uniq, out.shape[1])[inv]
    out.add_((eps * (sign * scale)[:, None]).to(out.dtype))
    return out


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    member_ids: torch.Tensor,
    *,
    seed: int,
    weight_key: Optional[int],
    bias_key: Optional[int],
    epoch: int,
    rank: int,
    sigma: float,
    antithetic: bool,
) -> torch.Tensor:
    """``out[j] = x[j] W^T + b + s_j sigma/sqrt(r) (x[j] B0_j) A0_j^T + s_j sigma eps_b_j``.

    ``x (rows, n)``, ``weight (m, n)``, ``bias (m,)`` or None, ``member_ids (rows,)``.
    ``weight_key``/``bias_key`` None means that parameter is not perturbed. Differentiable
    with respect to ``x``, ``weight`` and ``bias``.
    """
    m, n = weight.shape
    out = torch.nn.functional.linear(x, weight, bias)
    if weight_key is not None:
        common = dict(seed=seed, key=weight_key, epoch=epoch, rank=rank, total_rows=n + m,
                      antithetic=antithetic)
        t = lowrank_project(x, member_ids, row_offset=0, **common)
        out = out.clone()
        lowrank_expand_(out, t, member_ids, row_offset=n, scale=sigma / math.sqrt(rank), **common)
    if bias is not None and bias_key is not None:
        dense_noise_add_(out, member_ids, seed=seed, key=bias_key, epoch=epoch, scale=sigma,
                         antithetic=antithetic)
    return out


def lowrank_update(
    m: int,
    n: int,
    *,
    seed: int,
    key: int,
    epoch: int,
    rank: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
) -> torch.Tensor:
    """``G = sum_k coeffs[k] * A0_k @ B0_k^T``: ``(m, n)`` float32 (scales are the caller's)."""
    a0, b0 = lowrank_factors(seed, key, epoch, noise_indices, m, n, rank)
    a = a0 * coeffs.float().view(-1, 1, 1)
    return torch.einsum("kmr,knr->mn", a, b0)


def dense_update(
    numel: int,
    *,
    seed: int,
    key: int,
    epoch: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
) -> torch.Tensor:
    """``g = sum_k coeffs[k] * eps_k``: ``(numel,)`` float32."""
    eps = normal_block(seed, key, epoch, noise_indices, numel)
    return coeffs.float() @ eps


GPU_REQUIRED_MESSAGE = (
    "EGGROLL needs a CUDA GPU: its noise is generated inside Triton kernels, in parallel for "
    "every population member, and that is only fast on a GPU. Move the model and inputs to "
    "a CUDA device (e.g. model.cuda()); on a machine without one, use a GPU instance or "
    "Colab. For debugging only, setting TRITON_INTERPRET=1 before Triton is imported runs "
    "the same kernels on the CPU through Triton's interpreter (slow)."
)


def interpreter_active() -> bool:
    """True when Triton's interpreter runs our kernels (``TRITON_INTERPRET=1`` at import)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(t: torch.Tensor, what: str = "tensor") -> None:
    """Raise the GPU-required RuntimeError for CPU tensors unless the interpreter is active."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_active():
        return
    raise RuntimeError(f"{what} is on {t.device}. {GPU_REQUIRED_MESSAGE}")
