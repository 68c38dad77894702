"""Normal block: the stream's normals of a run of elements for K noise indices.

``out[k, i]`` is the normal of element ``first_element + i`` of noise index
``noise_indices[k]``. This is
what inspection and the reference-facing tests read; the fused kernels produce the same
numbers through the same helpers (:mod:`evotorch_eggroll.kernels.philox`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.philox import (
    first_quad_of,
    index_operand,
    launch_per_index,
    next_power_of_2,
    normal_run,
    stream_seed,
)
from evotorch_eggroll.noise import normals_out

BLOCK_E = 1024  # elements per program (a multiple of 4)


@triton.jit(do_not_specialize=["first_quad", "seed_lo", "seed_hi", "key", "epoch"])
def _normal_block_kernel(
    idx_ptr,
    out_ptr,
    numel,
    first_quad,
    seed_lo,
    seed_hi,
    key,
    epoch,
    BLOCK_E: tl.constexpr,
    EPOCH_IN_MEMORY: tl.constexpr = False,
):
    pid_k = tl.program_id(0)
    pid_e = tl.program_id(1)
    seed = stream_seed(seed_lo, seed_hi)
    if EPOCH_IN_MEMORY:  # ``epoch`` is a pointer to it (a graph replays with the value of the day)
        epoch = tl.load(epoch)
    noise_index = tl.load(idx_ptr + pid_k)
    first = pid_e.to(tl.int64) * BLOCK_E  # position in the output row
    z = normal_run(seed, first_quad + first // 4, noise_index, key, epoch, BLOCK_E // 4)
    pos = first + tl.arange(0, BLOCK_E).to(tl.int64)
    tl.store(out_ptr + pid_k.to(tl.int64) * numel + pos, z, mask=pos < numel)


def normal_block(
    seed: int,
    key: int,
    epoch: int,
    noise_indices: torch.Tensor,
    numel: int,
    first_element: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normals of elements ``first_element .. first_element + numel - 1`` per noise index.

    Args:
        seed: stream seed (Python int).
        key: parameter key in ``[0, 2**32)``.
        epoch: effective epoch in ``[0, 2**32)``.
        noise_indices: ``(K,)`` integer tensor with values in ``[0, 2**32)``.
        numel: elements per noise index.
        first_element: first element, a multiple of 4 (``first_element + numel <= 2**34``).
        out: optional contiguous ``(K, numel)`` float32 tensor on that device to write to.

    Returns:
        ``(K, numel)`` float32 on ``noise_indices.device`` (``out`` when given).
    """
    first_quad = first_quad_of(first_element)
    idx = index_operand(noise_indices)
    out = normals_out(idx, numel, out)
    block_e = min(BLOCK_E, max(16, next_power_of_2(numel)))
    return launch_per_index(_normal_block_kernel, idx, out, first_quad, seed, key, epoch,
                            block_e, block_e)


def normal_block_epoch_in_memory(seed: int, key: int, epoch: torch.Tensor,
                                 noise_indices: torch.Tensor, numel: int,
                                 out: torch.Tensor) -> torch.Tensor:
    """:func:`normal_block` from element 0 with the epoch read from the one-element int64
    tensor ``epoch`` when the kernel runs (a launch captured in a CUDA graph then draws
    the epoch that tensor holds at each replay). Same numbers, bit for bit."""
    idx = index_operand(noise_indices)
    block_e = min(BLOCK_E, max(16, next_power_of_2(numel)))
    return launch_per_index(_normal_block_kernel, idx, out, 0, seed, key, epoch, block_e,
                            block_e, True)
