"""Low-rank update: ``G = sum_k c_k A0_k B0_k^T`` of an ``(m, n)`` weight.

The factors are regenerated (never loaded from an earlier call) ``K_chunk`` noise indices
at a time (each noise index's factor block laid out as ``evotorch_eggroll.noise.FactorLayout``
says, split by the device helpers ``factor_block_part``, ``b0_row_of`` and ``a0_row_of`` of
:mod:`evotorch_eggroll.kernels.philox`), written straight into the two matrices of one
product:
``A (m, K_chunk * R)`` with ``A[i, k*R + q] = c_k * A0_k[i, q]`` and
``B (n, K_chunk * R)`` with ``B[i, k*R + q] = B0_k[i, q]``; then ``G += A @ B^T`` as one
matrix product with a float32 result, at one of three precisions:

* ``"ieee"``: float32 factors, IEEE float32 product (TF32 switched off for it);
* ``"tf32"``: float32 factors, TF32 tensor-core product (float32 accumulation);
* ``"bf16"``: factors rounded once to bfloat16 when written, bf16 tensor-core product with
  float32 accumulation.

Memory stays bounded by ``UPDATE_CHUNK_ELEMENTS`` generated normals; the chunking depends
only on the shape, so the result is deterministic on a given device.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS
from evotorch_eggroll.kernels.philox import (
    a0_row_of,
    b0_row_of,
    device_guard,
    factor_block_part,
    next_power_of_2,
    normal_run,
    split_seed,
    stream_seed,
    update_operands,
)

BLOCK_E = 1024  # normals generated per program (a multiple of 4)
UPDATE_CHUNK_ELEMENTS = 1 << 26  # normals held at once (256 MiB of float32)
NUM_WARPS = 4


@triton.jit
def _round_to_bf16(x):
    """Finite float32 ``x`` rounded to the nearest bf16 value (ties to even), as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


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
    EPOCH_IN_MEMORY: tl.constexpr = False,
):
    pid_k = tl.program_id(0)
    first = tl.program_id(1).to(tl.int64) * BLOCK_E
    seed = stream_seed(seed_lo, seed_hi)
    if EPOCH_IN_MEMORY:  # ``epoch`` points at it (a captured launch replays with its current value)
        epoch = tl.load(epoch)
    noise_index = tl.load(idx_ptr + pid_k)
    coef = tl.load(coef_ptr + pid_k).to(tl.float32)
    z = normal_run(seed, first // 4, noise_index, key, epoch, BLOCK_E // 4)  # (BLOCK_E,)
    elem = first + tl.arange(0, BLOCK_E).to(tl.int64)
    row = elem // R  # factor-block row (row-major block)
    col = pid_k.to(tl.int64) * R + elem % R
    in_b, in_a = factor_block_part(row, n, m)
    zb = z
    za = coef * z
    if a_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even here, so the cast to bf16 below is exact on every backend
        # (Triton's interpreter truncates float32 -> bf16)
        zb = _round_to_bf16(zb)
        za = _round_to_bf16(za)
    tl.store(b_ptr + b0_row_of(row) * stride_bn + col, zb.to(b_ptr.dtype.element_ty), mask=in_b)
    tl.store(a_ptr + a0_row_of(row, n) * stride_am + col, za.to(a_ptr.dtype.element_ty),
             mask=in_a)


PRECISIONS = ("ieee", "tf32", "bf16")


@contextlib.contextmanager
def float32_matmul(tf32: bool):
    """Run CUDA float32 matrix products in TF32 (``tf32``) or IEEE precision inside the block."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision; older releases only allow_tf32
    attr, value = (("fp32_precision", "tf32" if tf32 else "ieee")
                   if hasattr(matmul, "fp32_precision") else ("allow_tf32", tf32))
    saved = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, saved)


def _add_float32_product(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tf32: bool) -> None:
    """``g += a @ b^T`` for float32 operands in TF32 (``tf32``) or IEEE precision: as
    :func:`float32_matmul` does around it, without changing the switch when it already
    says so."""
    matmul = torch.backends.cuda.matmul
    attr, value = (("fp32_precision", "tf32" if tf32 else "ieee")
                   if hasattr(matmul, "fp32_precision") else ("allow_tf32", tf32))
    if getattr(matmul, attr) == value:
        g.addmm_(a, b.T)
        return
    with float32_matmul(tf32):
        g.addmm_(a, b.T)


def _add_bf16_product(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``g += a @ b^T`` for bf16 ``a``, ``b`` and float32 ``g``, accumulated in float32."""
    if g.is_cuda:
        try:  # bf16 operands, float32 output (torch >= 2.8 on CUDA)
            g.add_(torch.mm(a, b.T, out_dtype=torch.float32))
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # no bf16 -> float32 mm here
            pass
    with float32_matmul(False):  # the same bf16 values, multiplied in float32
        g.addmm_(a.float(), b.float().T)


def factor_matrices(
    m: int,
    n: int,
    *,
    seed: int,
    key: int,
    epoch: int | torch.Tensor,
    rank: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Side-by-side factors of K noise indices, ``A`` scaled by ``coeffs``.

    Args:
        m, n: weight shape ``(m, n)``.
        seed, key, epoch: stream coordinates of the weight; ``epoch`` may be a one-element
            int64 tensor on the device, read when the kernel runs (a launch captured in a
            CUDA graph then draws the epoch that tensor holds at each replay).
        rank: factor rank ``R``.
        noise_indices: ``(K,)`` integer tensor.
        coeffs: ``(K,)`` floating tensor.
        dtype: ``torch.float32`` or ``torch.bfloat16`` (each value rounded once from the
            float32 ``coeffs[k] * A0_k`` or ``B0_k``).

    Returns:
        ``A (m, K*R)`` with ``A[:, k*R:(k+1)*R] = coeffs[k] * A0_k`` and
        ``B (n, K*R)`` with ``B[:, k*R:(k+1)*R] = B0_k``, of ``dtype``.
    """
    idx, coef = update_operands(noise_indices, coeffs)
    device = idx.device
    k = idx.shape[0]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"factor matrices are float32 or bfloat16, got {dtype}")
    a = torch.empty((m, k * rank), dtype=dtype, device=device)
    b = torch.empty((n, k * rank), dtype=dtype, device=device)
    numel = (n + m) * rank  # FactorLayout(m, n, rank).numel
    if k == 0 or numel == 0:
        return a, b
    block_e = min(BLOCK_E, max(16, next_power_of_2(numel)))
    seed_lo, seed_hi = split_seed(seed)
    # a and b are contiguous: their row strides are k * rank. The constexprs R, BLOCK_E go
    # positionally (Triton binds keyword arguments one parameter name at a time).
    with device_guard(a):
        _factor_matrices_kernel[(k, -(-numel // block_e))](
            idx, coef, a, b, m, n, k * rank, k * rank, seed_lo, seed_hi, key, epoch,
            rank, block_e, isinstance(epoch, torch.Tensor), num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return a, b


def lowrank_update(
    m: int,
    n: int,
    *,
    seed: int,
    key: int,
    epoch: int | torch.Tensor,
    rank: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
    chunk: int | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """``G = sum_k coeffs[k] * A0_k @ B0_k^T``.

    Args:
        m, n: weight shape ``(m, n)``.
        seed, key, epoch: stream coordinates of the weight (``epoch``: as in
            :func:`factor_matrices`).
        rank: factor rank ``R``.
        noise_indices: ``(K,)`` integer tensor.
        coeffs: ``(K,)`` floating tensor.
        chunk: noise indices per product; None keeps about ``UPDATE_CHUNK_ELEMENTS``
            normals at once.
        precision: ``"ieee"``, ``"tf32"`` or ``"bf16"`` (see the module docstring).

    Returns:
        ``(m, n)`` float32 on ``noise_indices.device``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    idx = noise_indices if noise_indices.dim() == 1 else noise_indices.reshape(-1)
    coef = coeffs if coeffs.dim() == 1 else coeffs.reshape(-1)
    g = torch.zeros((m, n), dtype=torch.float32, device=idx.device)
    k = idx.shape[0]
    if k == 0 or m == 0 or n == 0:
        return g
    if chunk is None:
        chunk = max(1, UPDATE_CHUNK_ELEMENTS // ((n + m) * rank))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for start in range(0, k, chunk):
        if start or chunk < k:
            chunk_idx, chunk_coef = idx[start:start + chunk], coef[start:start + chunk]
        else:  # one chunk: all of them
            chunk_idx, chunk_coef = idx, coef
        a, b = factor_matrices(m, n, seed=seed, key=key, epoch=epoch, rank=rank,
                               noise_indices=chunk_idx, coeffs=chunk_coef, dtype=dtype)
        if precision == "bf16":
            _add_bf16_product(g, a, b)
        else:
            _add_float32_product(g, a, b, precision == "tf32")
    return g
