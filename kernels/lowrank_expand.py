"""Low-rank expand: ``out[j] += sign_j * scale * F_j[row_offset : row_offset + D] @ t[j]``.

The mirror of :mod:`evotorch_eggroll.kernels.lowrank_project`: the forward expands the
projected input through ``A0`` (``row_offset = n``), the backward expands the projected
output gradient through ``B0`` (``row_offset = 0``). Optionally fused with the 1-D noise of
the bias: ``out[j, d] += sign_j * bias_scale * eps_j[d]`` (key ``bias_key``, elements
``0..D-1``), which shares the row walk and the member bookkeeping.

Grid: (blocks of ``BLOCK_ROWS`` batch rows, chunks of ``ROWS`` output columns). A chunk's
factor tile is generated once per run of rows with the same noise index. ``out`` is
updated in place: read, add the float32 delta, round once to ``out``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS, row_mask
from evotorch_eggroll.kernels.philox import (
    bias_tile_plan,
    cache_arguments,
    device_guard,
    normal_tile,
    row_tile_plan,
    row_noise_index,
    rows_per_program,
    split_seed,
    stream_seed,
)

BLOCK_E = 1024  # normals generated per chunk (tile of about BLOCK_E / R rows)
MAX_BLOCK_ROWS = 16  # batch rows per program, upper bound
NUM_WARPS = 4


@triton.jit(
    do_not_specialize=["seed_lo", "seed_hi", "key", "epoch", "row_offset", "scale", "bias_key",
                       "bias_scale", "cache_base", "cache_rows", "bias_cache_base",
                       "bias_cache_rows"]
)
def _lowrank_expand_kernel(
    out_ptr,
    t_ptr,
    ids_ptr,
    n_rows,
    D,
    stride_om,
    stride_od,
    stride_tm,
    stride_tk,
    stride_ids,
    seed_lo,
    seed_hi,
    key,
    epoch,
    row_offset,
    scale,
    bias_key,
    bias_scale,
    cache_ptr,
    cache_base,
    cache_rows,
    bias_cache_ptr,
    bias_cache_base,
    bias_cache_rows,
    R: tl.constexpr,
    RP: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_BLOCK_Q: tl.constexpr,
    BIAS_DIRECT: tl.constexpr,
    CACHED: tl.constexpr,
    BIAS_CACHED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ANTITHETIC: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    d0 = tl.program_id(1) * ROWS
    seed = stream_seed(seed_lo, seed_hi)
    tile_row = tl.arange(0, TILE_ROWS)
    col = tl.arange(0, RP)
    d = d0 + tile_row  # (TILE_ROWS,)
    d_ok = (tile_row < ROWS) & (d < D)
    factors = tl.zeros((TILE_ROWS, RP), dtype=tl.float32)
    bias_noise = tl.zeros((TILE_ROWS,), dtype=tl.float32)
    current = row0 * 0 - 1  # noise index of the tiles in hand (none yet)
    for i in range(BLOCK_ROWS):
        row = row0 + i
        row_ok = row < n_rows
        noise_index, sign = row_noise_index(ids_ptr, row, stride_ids, row_ok, ANTITHETIC)
        if row_ok & (noise_index != current):
            factors = normal_tile(seed, noise_index, key, epoch, row_offset + d0,
                                  R, RP, ROWS, TILE_ROWS, BLOCK_Q, DIRECT,
                                  cache_ptr, cache_base, cache_rows, CACHED)
            if HAS_BIAS:
                eps = normal_tile(seed, noise_index, bias_key, epoch, d0,
                                  1, 1, ROWS, TILE_ROWS, BIAS_BLOCK_Q, BIAS_DIRECT,
                                  bias_cache_ptr, bias_cache_base, bias_cache_rows,
                                  BIAS_CACHED)
                bias_noise = tl.reshape(eps, (TILE_ROWS,))
            current = noise_index
        coef = tl.load(t_ptr + row * stride_tm + col * stride_tk,
                       mask=row_mask(col < R, row_ok), other=0.0).to(tl.float32)  # (RP,)
        delta = tl.sum(factors * coef[None, :], axis=1) * (sign * scale)  # (TILE_ROWS,)
        if HAS_BIAS:
            delta += (sign * bias_scale) * bias_noise
        ptrs = out_ptr + row * stride_om + d.to(tl.int64) * stride_od
        mask = row_mask(d_ok, row_ok)
        base = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (base.to(tl.float32) + delta).to(base.dtype), mask=mask)


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
    scale: float,
    antithetic: bool,
    bias_key: int | None = None,
    bias_scale: float = 0.0,
    block_rows: int | None = None,
    cache: tuple[torch.Tensor, int] | None = None,
    bias_cache: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """In place: ``out[j] += sign_j * scale * F_j[row_offset : row_offset + D] @ t[j]``.

    Args:
        out: ``(rows, D)`` floating tensor, updated in place (any strides).
        t: ``(rows, R)`` tensor (float32 from the project kernel).
        member_ids: ``(rows,)`` integer tensor.
        seed, key, epoch: stream coordinates of the weight.
        rank: factor rank ``R``.
        row_offset: first factor-block row used.
        scale: multiplier of the low-rank term (e.g. ``sigma / sqrt(R)``).
        antithetic: members ``2k``, ``2k + 1`` share noise index ``k``, signs ``+1``/``-1``.
        bias_key: when given, also add ``sign_j * bias_scale * eps_j[0..D)`` of this key.
        bias_scale: multiplier of the 1-D noise (e.g. ``sigma``).
        block_rows: batch rows per program (power of two); None picks one.
        cache: ``(block, base)``: the factor blocks ``(K, total_rows, R)`` float32 of noise
            indices ``base .. base + K - 1`` drawn beforehand (every row's noise index in
            that range); None generates them. The result is the same bit for bit.
        bias_cache: likewise ``(K, D)`` float32 draws of the bias key (with ``bias_key``).

    Returns:
        ``out``.
    """
    rows, d = out.shape
    if rows == 0 or d == 0:
        return out
    plan = row_tile_plan(rank, row_offset, d, BLOCK_E)
    bias_plan = bias_tile_plan(plan["ROWS"], plan["TILE_ROWS"])
    if block_rows is None:
        block_rows = rows_per_program(rows, out.device, MAX_BLOCK_ROWS)
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(d, plan["ROWS"]))
    with device_guard(out):
        _lowrank_expand_kernel[grid](
            out, t, member_ids, rows, d,
            out.stride(0), out.stride(1), t.stride(0), t.stride(1), member_ids.stride(0),
            seed_lo, seed_hi, key, epoch, row_offset, float(scale),
            0 if bias_key is None else bias_key, float(bias_scale),
            *cache_arguments(cache, out), *cache_arguments(bias_cache, out),
            **plan, HAS_BIAS=bias_key is not None, **bias_plan,
            CACHED=cache is not None, BIAS_CACHED=bias_cache is not None,
            BLOCK_ROWS=block_rows, ANTITHETIC=bool(antithetic), num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
