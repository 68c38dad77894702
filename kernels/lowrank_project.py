"""Low-rank project: ``t[j] = v[j] @ F_j[row_offset : row_offset + D]`` for every batch row.

``F_j`` is the ``(total_rows, R)`` factor block of row ``j``'s member (rows ``0..n-1`` are
``B0``, rows ``n..n+m-1`` are ``A0``), generated inside the kernel and never stored. The
forward projects ``x`` through ``B0`` (``row_offset = 0``); the backward projects the output
gradient through ``A0`` (``row_offset = n``).

One program walks ``BLOCK_ROWS`` consecutive batch rows over all of ``D``, chunk by chunk:
a chunk's factor tile is generated once and reused by every following row of the same
noise index (members ``2k`` and ``2k + 1`` share one with antithetic sampling). Each row's
reduction is the same sequence of chunk sums whatever the program, so results do not
depend on the batch size, the row order or ``BLOCK_ROWS``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS, row_mask
from evotorch_eggroll.kernels.philox import (
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
# Deferred reduction (one cross-thread reduction per row instead of one per chunk): each
# row keeps a (GROUP, RP) accumulator with GROUP * RP = ACC_ELEMENTS (one value per thread
# at NUM_WARPS = 4).
ACC_ELEMENTS = 128


def extra_constexprs(plan: dict, block_rows: int) -> dict:
    """Constexpr arguments of the reduction scheme for a :func:`row_tile_plan` plan."""
    group = max(1, min(plan["TILE_ROWS"], ACC_ELEMENTS // plan["RP"]))
    return dict(GROUP=group,
                TILE_FOLDS=plan["TILE_ROWS"].bit_length() - group.bit_length(),
                GROUP_FOLDS=group.bit_length() - 1)


@triton.jit
def _fold_rows(x, FOLDS: tl.constexpr):
    """``(N, RP) -> (N >> FOLDS, RP)``: FOLDS times ``x[g] + x[g + h/2]`` (h: current height)."""
    for _ in tl.static_range(FOLDS):
        x = tl.sum(tl.reshape(x, (2, x.shape[0] // 2, x.shape[1])), axis=0)
    return x


@triton.jit
def _fold_rows3(x, FOLDS: tl.constexpr):
    """``(B, G, RP) -> (B, RP)`` with ``G = 2**FOLDS``, halving along the middle axis."""
    for _ in tl.static_range(FOLDS):
        x = tl.sum(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2, x.shape[2])), axis=1)
    return tl.reshape(x, (x.shape[0], x.shape[2]))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "key", "epoch", "row_offset", "cache_base",
                               "cache_rows"])
def _lowrank_project_kernel(
    v_ptr,
    ids_ptr,
    t_ptr,
    n_rows,
    D,
    stride_vm,
    stride_vd,
    stride_ids,
    stride_tm,
    seed_lo,
    seed_hi,
    key,
    epoch,
    row_offset,
    cache_ptr,
    cache_base,
    cache_rows,
    R: tl.constexpr,
    RP: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DIRECT: tl.constexpr,
    CACHED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ANTITHETIC: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_FOLDS: tl.constexpr,
    GROUP_FOLDS: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    seed = stream_seed(seed_lo, seed_hi)
    tile_row = tl.arange(0, TILE_ROWS)
    col = tl.arange(0, RP)
    slot = tl.arange(0, BLOCK_ROWS)
    # Deferred reduction: per row, a (GROUP, RP) float32 accumulator; each chunk's
    # products v[d] F[d, k] are folded onto it by halving (element g + h/2 onto g, one
    # addition each, so the order is fixed by the code, not by the compiler's layout),
    # and the accumulator is folded to (RP,) once per row at the end.
    acc3 = tl.zeros((BLOCK_ROWS, GROUP, RP), dtype=tl.float32)
    factors = tl.zeros((TILE_ROWS, RP), dtype=tl.float32)
    d0 = D * 0
    while d0 < D:  # a while loop: runtime loop bounds trip Triton's interpreter
        d = d0 + tile_row  # (TILE_ROWS,)
        d_ok = (tile_row < ROWS) & (d < D)
        current = row0 * 0 - 1  # noise index of the factor tile in hand (none yet)
        for i in range(BLOCK_ROWS):
            row = row0 + i
            row_ok = row < n_rows
            noise_index, _ = row_noise_index(ids_ptr, row, stride_ids, row_ok, ANTITHETIC)
            if row_ok & (noise_index != current):
                factors = normal_tile(seed, noise_index, key, epoch, row_offset + d0,
                                      R, RP, ROWS, TILE_ROWS, BLOCK_Q, DIRECT,
                                      cache_ptr, cache_base, cache_rows, CACHED)
                current = noise_index
            v = tl.load(v_ptr + row * stride_vm + d.to(tl.int64) * stride_vd,
                        mask=row_mask(d_ok, row_ok), other=0.0).to(tl.float32)  # (TILE_ROWS,)
            part = _fold_rows(v[:, None] * factors, TILE_FOLDS)  # (GROUP, RP)
            acc3 = tl.where(slot[:, None, None] == i, acc3 + part[None, :, :], acc3)
        d0 += ROWS
    acc = _fold_rows3(acc3, GROUP_FOLDS)  # (BLOCK_ROWS, RP)
    rows = row0 + slot
    mask = (rows[:, None] < n_rows) & (col[None, :] < R)
    tl.store(t_ptr + rows[:, None] * stride_tm + col[None, :], acc, mask=mask)


def lowrank_project(
    v: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    rank: int,
    row_offset: int,
    antithetic: bool,
    block_rows: int | None = None,
    cache: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """``t[j] = v[j] @ F_j[row_offset : row_offset + D]``.

    Args:
        v: ``(rows, D)`` floating tensor, any strides.
        member_ids: ``(rows,)`` integer tensor, member of each row.
        seed, key, epoch: stream coordinates (``key``, ``epoch`` in ``[0, 2**32)``).
        rank: factor rank ``R``.
        row_offset: first factor-block row used.
        antithetic: members ``2k``, ``2k + 1`` share noise index ``k`` when True.
        block_rows: batch rows per program (power of two); None picks one.
        cache: ``(block, base)``: the factor blocks ``(K, total_rows, R)`` float32
            (contiguous) of noise indices ``base .. base + K - 1``, drawn beforehand; every
            row's noise index must lie in that range. None generates the factors.

    Returns:
        ``(rows, R)`` float32, bit for bit the same with or without ``cache``.
    """
    rows, d = v.shape
    t = torch.empty((rows, rank), dtype=torch.float32, device=v.device)
    if rows == 0:
        return t
    if d == 0:
        return t.zero_()
    plan = row_tile_plan(rank, row_offset, d, BLOCK_E)
    if block_rows is None:
        block_rows = rows_per_program(rows, v.device, MAX_BLOCK_ROWS)
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(rows, block_rows),)
    with device_guard(v):
        _lowrank_project_kernel[grid](
            v, member_ids, t, rows, d,
            v.stride(0), v.stride(1), member_ids.stride(0), t.stride(0),
            seed_lo, seed_hi, key, epoch, row_offset, *cache_arguments(cache, t),
            **plan, **extra_constexprs(plan, block_rows), CACHED=cache is not None,
            BLOCK_ROWS=block_rows, ANTITHETIC=bool(antithetic), num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return t
