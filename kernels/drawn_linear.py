"""Perturbed linear layer from drawn factors, in one launch (narrow layers).

``out[j] = x[j] W^T + b + s_j scale (x[j] B0_k) A0_k^T + s_j bias_scale eps_k`` with
``k`` row ``j``'s noise index, for factors drawn beforehand into a ``(K, n + m, R)`` block
(laid out as ``evotorch_eggroll.noise.FactorLayout`` says, read through the layout helpers
of :mod:`evotorch_eggroll.kernels.philox`) and bias noise into ``(K, m)``.

A program owns ``BLOCK_M`` batch rows and ``BLOCK_N`` output features: it runs the base
product over ``n`` in chunks of ``BLOCK_K`` (``tl.dot``, float32 accumulation) and, from
the same input tiles, the projection ``x B0`` of every row onto its own member's factors;
then it adds the expansion through ``A0``, the bias and the bias noise and writes the
output once. For the narrow layers of RL policies this replaces the base matmul and the
two factor kernels (three launches and two passes over the output) by one launch. Each
row's arithmetic depends only on that row, so results do not depend on the batch size or
the row order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS
from evotorch_eggroll.kernels.philox import device_guard, next_power_of_2, row_noise_index
from evotorch_eggroll.kernels.philox import drawn_a0_column, drawn_b0_column, factor_block_rows

# Layers up to this many input and output features take this kernel.
MAX_FEATURES = 512
BLOCK_M = 64
BLOCK_N_MAX = 64
BLOCK_K_MAX = 32
NUM_WARPS = 4


@triton.jit
def _drawn_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    f_ptr,
    e_ptr,
    out_ptr,
    n_rows,
    N_IN,
    M_OUT,
    stride_xm,
    stride_xk,
    stride_wm,
    stride_wk,
    stride_ids,
    stride_om,
    stride_on,
    base,
    scale,
    bias_scale,
    R: tl.constexpr,
    RP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_NOISE: tl.constexpr,
    BIAS_NOISE: tl.constexpr,
    ANTITHETIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < M_OUT
    index, sign = row_noise_index(ids_ptr, rows, stride_ids, row_ok, ANTITHETIC)
    sign = sign + tl.zeros((BLOCK_M,), tl.float32)  # (BLOCK_M,) also when it is a scalar
    block = (index - base) * (factor_block_rows(N_IN, M_OUT) * R)  # (BLOCK_M,) row's factors
    rk = tl.arange(0, RP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, RP), dtype=tl.float32)  # x B0 of each row
    k0 = N_IN * 0
    while k0 < N_IN:  # a while loop: runtime loop bounds trip Triton's interpreter
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N_IN
        xk_mask = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=xk_mask,
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + cols[None, :] * stride_wm + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if WEIGHT_NOISE:
            for r in tl.static_range(R):
                b0 = drawn_b0_column(f_ptr, block, ks, r, R,
                                     xk_mask)  # (BLOCK_M, BLOCK_K): column r of each row's B0
                part = tl.sum(x.to(tl.float32) * b0, axis=1)  # (BLOCK_M,)
                t += tl.where(rk[None, :] == r, part[:, None], 0.0)
        k0 += BLOCK_K
    if WEIGHT_NOISE:
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in tl.static_range(R):
            a0 = drawn_a0_column(f_ptr, block, cols, N_IN, r, R,
                                 row_ok[:, None] & col_ok[None, :])  # (BLOCK_M, BLOCK_N)
            t_r = tl.sum(tl.where(rk[None, :] == r, t, 0.0), axis=1)  # (BLOCK_M,)
            low += a0 * t_r[:, None]
        acc += low * (sign * scale)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if BIAS_NOISE:
        eps = tl.load(e_ptr + (index - base)[:, None] * M_OUT + cols[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += (sign * bias_scale)[:, None] * eps
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def block_sizes(n: int, m: int) -> dict:
    """``BLOCK_N`` (output features) and ``BLOCK_K`` (input features) of a program."""
    return dict(BLOCK_N=min(BLOCK_N_MAX, max(16, next_power_of_2(m))),
                BLOCK_K=min(BLOCK_K_MAX, max(16, next_power_of_2(n))))


def fits(n: int, m: int) -> bool:
    """Whether a ``(m, n)`` layer takes this kernel (narrow layers)."""
    return n <= MAX_FEATURES and m <= MAX_FEATURES


def drawn_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    member_ids: torch.Tensor,
    *,
    rank: int,
    scale: float,
    bias_scale: float,
    antithetic: bool,
    cache: tuple[torch.Tensor, int] | None,
    bias_cache: tuple[torch.Tensor, int] | None,
    precision: str,
) -> torch.Tensor:
    """``x (rows, n)`` through the perturbed layer ``weight (m, n)``: ``(rows, m)`` in x's dtype.

    Args:
        x: ``(rows, n)`` input, any strides; the weight's dtype.
        weight, bias: the layer (``bias`` may be None).
        member_ids: ``(rows,)`` integer member of each row.
        rank: factor rank ``R``.
        scale: multiplier of the low-rank term (``sigma / sqrt(R)``).
        bias_scale: multiplier of the bias noise (``sigma``).
        antithetic: members ``2k``, ``2k + 1`` share noise index ``k``, signs ``+1``/``-1``.
        cache: ``(block, base)``: drawn factor blocks ``(K, n + m, R)`` float32 of noise
            indices ``base ..``; every row's noise index must lie there. None: no weight noise.
        bias_cache: ``(block, base)``: drawn bias noise ``(K, m)``; None: no bias noise.
        precision: ``"ieee"`` or ``"tf32"`` for float32 inputs (ignored for bf16/fp16).
    """
    rows, n = x.shape
    m = weight.shape[0]
    out = torch.empty((rows, m), dtype=x.dtype, device=x.device)
    if rows == 0 or m == 0:
        return out
    f, base = cache if cache is not None else (out, 0)
    e, bias_base = bias_cache if bias_cache is not None else (out, base)
    if cache is not None and bias_cache is not None and bias_base != base:
        raise ValueError("the factor and bias caches must start at the same noise index")
    blocks = block_sizes(n, m)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(m, blocks["BLOCK_N"]))
    with device_guard(x):
        _drawn_linear_kernel[grid](
            x, weight, bias if bias is not None else out, member_ids, f, e, out,
            rows, n, m, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            member_ids.stride(0), out.stride(0), out.stride(1),
            base if cache is not None else bias_base, float(scale), float(bias_scale),
            R=rank, RP=next_power_of_2(rank), BLOCK_M=BLOCK_M, **blocks,
            HAS_BIAS=bias is not None, WEIGHT_NOISE=cache is not None,
            BIAS_NOISE=bias_cache is not None, ANTITHETIC=bool(antithetic),
            PRECISION=precision if x.dtype == torch.float32 else "ieee",
            num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return out
