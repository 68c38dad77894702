"""Dense (full-rank) noise of 1-D parameters and OpenES: per-row add and weighted sum.

A parameter of ``L`` elements owns stream elements ``0..L-1`` directly.

* :func:`dense_noise_add_`: ``out[j, e] += sign_j * scale * eps_j[e]`` for every batch row
  (a perturbed bias, per row). Consecutive rows of one noise index reuse the generated
  chunk.
* :func:`dense_update`: ``g[e] = sum_k coeffs[k] * eps_k[e]``, the ES gradient of a dense
  parameter, regenerating the noise chunk by chunk: programs sum fixed slices of ``k`` in
  order into a small partial-sum workspace, which one deterministic reduction then adds
  up, so the result does not depend on the device or the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS, row_mask
from evotorch_eggroll.kernels.philox import (
    device_guard,
    next_power_of_2,
    normal_run,
    row_noise_index,
    rows_per_program,
    split_seed,
    stream_seed,
    update_operands,
)

BLOCK_E = 1024  # elements per program (a multiple of 4)
MAX_BLOCK_ROWS = 16  # batch rows per program, upper bound
NUM_WARPS = 4
UPDATE_SPLIT_K = 64  # noise indices one update program sums, at least
MAX_PARTIAL_ELEMENTS = 1 << 24  # bound on the update's partial-sum workspace (floats)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "key", "epoch", "scale"])
def _dense_noise_add_kernel(
    out_ptr,
    ids_ptr,
    n_rows,
    D,
    stride_om,
    stride_od,
    stride_ids,
    seed_lo,
    seed_hi,
    key,
    epoch,
    scale,
    BLOCK_E: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ANTITHETIC: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    first = tl.program_id(1).to(tl.int64) * BLOCK_E
    seed = stream_seed(seed_lo, seed_hi)
    elem = first + tl.arange(0, BLOCK_E).to(tl.int64)
    elem_ok = elem < D
    eps = tl.zeros((BLOCK_E,), dtype=tl.float32)
    current = row0 * 0 - 1  # noise index of the chunk in hand (none yet)
    for i in range(BLOCK_ROWS):
        row = row0 + i
        row_ok = row < n_rows
        noise_index, sign = row_noise_index(ids_ptr, row, stride_ids, row_ok, ANTITHETIC)
        if row_ok & (noise_index != current):
            eps = normal_run(seed, first // 4, noise_index, key, epoch, BLOCK_E // 4)
            current = noise_index
        ptrs = out_ptr + row * stride_om + elem * stride_od
        mask = row_mask(elem_ok, row_ok)
        base = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (base.to(tl.float32) + (sign * scale) * eps).to(base.dtype), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "key", "epoch", "K", "k_per_split"])
def _dense_update_kernel(
    idx_ptr,
    coef_ptr,
    partial_ptr,
    K,
    k_per_split,
    numel,
    seed_lo,
    seed_hi,
    key,
    epoch,
    BLOCK_E: tl.constexpr,
    EPOCH_IN_MEMORY: tl.constexpr = False,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_E
    split = tl.program_id(1).to(tl.int64)
    seed = stream_seed(seed_lo, seed_hi)
    if EPOCH_IN_MEMORY:  # ``epoch`` points at it (a captured launch replays with its current value)
        epoch = tl.load(epoch)
    elem = first + tl.arange(0, BLOCK_E).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    k = split * k_per_split
    k_end = tl.minimum(k + k_per_split, K)
    while k < k_end:  # a while loop: runtime loop bounds trip Triton's interpreter
        noise_index = tl.load(idx_ptr + k)
        coef = tl.load(coef_ptr + k).to(tl.float32)
        acc += coef * normal_run(seed, first // 4, noise_index, key, epoch, BLOCK_E // 4)
        k += 1
    tl.store(partial_ptr + split * numel + elem, acc, mask=elem < numel)


def _block_e(numel: int) -> int:
    return min(BLOCK_E, max(16, triton.next_power_of_2(numel)))


def dense_noise_add_(
    out: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    scale: float,
    antithetic: bool,
    block_rows: int | None = None,
) -> torch.Tensor:
    """In place: ``out[j, e] += sign_j * scale * eps_j[e]``.

    Args:
        out: ``(rows, D)`` floating tensor, any strides.
        member_ids: ``(rows,)`` integer tensor.
        seed, key, epoch: stream coordinates of the parameter.
        scale: multiplier (e.g. ``sigma``).
        antithetic: members ``2k``, ``2k + 1`` share noise index ``k``, signs ``+1``/``-1``.
        block_rows: batch rows per program (power of two); None picks one.

    Returns:
        ``out``.
    """
    rows, d = out.shape
    if rows == 0 or d == 0:
        return out
    block_e = _block_e(d)
    if block_rows is None:
        block_rows = rows_per_program(rows, out.device, MAX_BLOCK_ROWS)
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(d, block_e))
    with device_guard(out):
        _dense_noise_add_kernel[grid](
            out, member_ids, rows, d, out.stride(0), out.stride(1), member_ids.stride(0),
            seed_lo, seed_hi, key, epoch, float(scale),
            BLOCK_E=block_e, BLOCK_ROWS=block_rows, ANTITHETIC=bool(antithetic),
            num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return out


def dense_update(
    numel: int,
    *,
    seed: int,
    key: int,
    epoch: int | torch.Tensor,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
) -> torch.Tensor:
    """``g = sum_k coeffs[k] * eps_k``.

    Args:
        numel: elements of the parameter.
        seed, key, epoch: stream coordinates of the parameter; ``epoch`` may be a
            one-element int64 tensor on the device, read when the kernel runs.
        noise_indices: ``(K,)`` integer tensor.
        coeffs: ``(K,)`` floating tensor.

    Returns:
        ``(numel,)`` float32 on ``noise_indices.device``.
    """
    idx, coef = update_operands(noise_indices, coeffs)
    device = idx.device
    k = idx.shape[0]
    if numel == 0 or k == 0:
        return torch.zeros((numel,), dtype=torch.float32, device=device)
    # Split K into fixed slices, each summed in order by its own program, then reduce the
    # partial sums with one deterministic torch.sum: enough parallelism for huge populations
    # and few elements (biases), and the order of additions depends only on (K, numel).
    per = max(1, MAX_PARTIAL_ELEMENTS // numel)
    k_per_split = max(UPDATE_SPLIT_K, -(-k // per))
    splits = -(-k // k_per_split)
    partial = torch.empty((splits, numel), dtype=torch.float32, device=device)
    block_e = min(BLOCK_E, max(16, next_power_of_2(numel)))  # _block_e(numel)
    seed_lo, seed_hi = split_seed(seed)
    # BLOCK_E goes positionally (Triton binds keyword arguments one parameter name at a time)
    with device_guard(partial):
        _dense_update_kernel[(-(-numel // block_e), splits)](
            idx, coef, partial, k, k_per_split, numel, seed_lo, seed_hi, key, epoch,
            block_e, isinstance(epoch, torch.Tensor), num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return partial[0] if splits == 1 else partial.sum(dim=0)
