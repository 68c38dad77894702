"""Low-rank update: ``G = sum_k c_k A0_k B0_k^T`` of an ``(m, n)`` weight.

The factors are regenerated (never loaded from an earlier call) ``K_chunk`` noise indices
at a time, written straight into the two matrices of one product:
``A (m, K_chunk * R)`` with ``A[i, k*R + q] = c_k * A0_k[i, q]`` and
``B (n, K_chunk * R)`` with ``B[i, k*R + q] = B0_k[i, q]``; then ``G += A @ B^T`` as one
float32 matrix product in IEEE precision (TF32 is switched off for it). Memory stays
bounded by ``UPDATE_CHUNK_ELEMENTS`` generated normals; the chunking depends only on the
shape, so the result is deterministic.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.philox import device_guard, normal_run, split_seed, stream_seed

BLOCK_E = 1024  # normals generated per program (a multiple of 4)
UPDATE_CHUNK_ELEMENTS = 1 << 26  # normals held at once (256 MiB of float32)
NUM_WARPS = 4


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "key", "epoch"])
def _factor_matrices_kernel(
    idx_ptr,
    coef_ptr,
    a_ptr,
    b_ptr,
    m,
    n,
    stride_am,
    stride_bn,
    seed_lo,
    seed_hi,
    key,
    epoch,
    R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_k = tl.program_id(0)
    first = tl.program_id(1).to(tl.int64) * BLOCK_E
    seed = stream_seed(seed_lo, seed_hi)
    noise_index = tl.load(idx_ptr + pid_k)
    coef = tl.load(coef_ptr + pid_k).to(tl.float32)
    z = normal_run(seed, first // 4, noise_index, key, epoch, BLOCK_E // 4)  # (BLOCK_E,)
    elem = first + tl.arange(0, BLOCK_E).to(tl.int64)
    row = elem // R  # factor-block row: B0 rows first, then A0 rows
    col = pid_k.to(tl.int64) * R + elem % R
    in_b = row < n
    in_a = (row >= n) & (row < n + m)
    tl.store(b_ptr + row * stride_bn + col, z, mask=in_b)
    tl.store(a_ptr + (row - n) * stride_am + col, coef * z, mask=in_a)


@contextlib.contextmanager
def ieee_float32_matmul():
    """Run CUDA float32 matrix products in IEEE precision (no TF32) inside the block."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # older torch
        saved = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


def factor_matrices(
    m: int,
    n: int,
    *,
    seed: int,
    key: int,
    epoch: int,
    rank: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Side-by-side factors of K noise indices, ``A`` scaled by ``coeffs``.

    Args:
        m, n: weight shape ``(m, n)``.
        seed, key, epoch: stream coordinates of the weight.
        rank: factor rank ``R``.
        noise_indices: ``(K,)`` integer tensor.
        coeffs: ``(K,)`` floating tensor.

    Returns:
        ``A (m, K*R)`` with ``A[:, k*R:(k+1)*R] = coeffs[k] * A0_k`` and
        ``B (n, K*R)`` with ``B[:, k*R:(k+1)*R] = B0_k``, float32.
    """
    idx = noise_indices.reshape(-1).to(torch.int64).contiguous()
    coef = coeffs.reshape(-1).to(device=idx.device, dtype=torch.float32).contiguous()
    k = idx.numel()
    a = torch.empty((m, k * rank), dtype=torch.float32, device=idx.device)
    b = torch.empty((n, k * rank), dtype=torch.float32, device=idx.device)
    numel = (n + m) * rank
    if k == 0 or numel == 0:
        return a, b
    block_e = min(BLOCK_E, max(16, triton.next_power_of_2(numel)))
    seed_lo, seed_hi = split_seed(seed)
    with device_guard(a):
        _factor_matrices_kernel[(k, triton.cdiv(numel, block_e))](
            idx, coef, a, b, m, n, a.stride(0), b.stride(0), seed_lo, seed_hi, key, epoch,
            R=rank, BLOCK_E=block_e, num_warps=NUM_WARPS,
        )
    return a, b


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
    chunk: int | None = None,
) -> torch.Tensor:
    """``G = sum_k coeffs[k] * A0_k @ B0_k^T``.

    Args:
        m, n: weight shape ``(m, n)``.
        seed, key, epoch: stream coordinates of the weight.
        rank: factor rank ``R``.
        noise_indices: ``(K,)`` integer tensor.
        coeffs: ``(K,)`` floating tensor.
        chunk: noise indices per product; None keeps about ``UPDATE_CHUNK_ELEMENTS``
            normals at once.

    Returns:
        ``(m, n)`` float32 on ``noise_indices.device``.
    """
    idx = noise_indices.reshape(-1)
    coef = coeffs.reshape(-1)
    g = torch.zeros((m, n), dtype=torch.float32, device=idx.device)
    k = idx.numel()
    if k == 0 or m == 0 or n == 0:
        return g
    if chunk is None:
        chunk = max(1, UPDATE_CHUNK_ELEMENTS // ((m + n) * rank))
    for start in range(0, k, chunk):
        a, b = factor_matrices(m, n, seed=seed, key=key, epoch=epoch, rank=rank,
                               noise_indices=idx[start:start + chunk],
                               coeffs=coef[start:start + chunk])
        with ieee_float32_matmul():
            g.addmm_(a, b.T)
    return g
