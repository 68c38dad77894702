"""Factors drawn once per perturbation context, for populations evaluated many times.

An RL rollout calls ``pop.batched_forward`` hundreds of times inside one perturbation
context, with the same members every time. Generating every member's factors inside the
kernels at every call then costs far more than the layer's arithmetic (narrow layers need
``r (m + n)`` normals per member and call against ``2 m n`` multiply-adds per row). A
:class:`FactorCache` draws the factor block of every low-rank weight (laid out as
:class:`evotorch_eggroll.noise.FactorLayout` says) and the noise of every 1-D parameter
once, for the noise indices of the context's local members, with the same normal-block
kernel that inspection uses (the very numbers the kernels generate and the update
regenerates); the forward kernels then read those instead of generating them.

The cache lives only while its context is open: its buffers are zeroed when the context
exits (no noise outlives its context). The buffers themselves are kept by the strategy and
reused by the next context of the same shape, so their addresses stay fixed from one
generation to the next (a captured CUDA graph can keep reading them).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._graphs import GraphedCall
from .evolved import EvolvedParam, EvolvedSet, NoiseCoords
from .noise import noise_index_range  # re-exported: its home is noise.py

__all__ = ["FactorCache", "noise_index_range", "default_budget_bytes"]

# The cache's size when the strategy sets no budget: at most this many bytes, and at most
# this share of the device's memory (and half of what is free).
DEFAULT_BUDGET = 1 << 30
DEFAULT_MEMORY_SHARE = 0.25


def default_budget_bytes(device: torch.device, allocates: bool = True) -> int:
    """1 GiB, at most a quarter of a CUDA device's memory and, for a draw that
    ``allocates`` new buffers, half of what is free on it now; on the CPU (the interpreter)
    256 MiB. (A draw into buffers the strategy already holds needs no free memory, and
    asking the driver for it takes about 0.1 ms.)"""
    if device.type != "cuda":
        return 256 << 20
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(DEFAULT_BUDGET, total * DEFAULT_MEMORY_SHARE)
    if allocates:
        budget = min(budget, torch.cuda.mem_get_info(device)[0] * 0.5)
    return int(budget)


def _cached_entries(evolved: EvolvedSet) -> list[EvolvedParam]:
    """Parameters whose noise the forward can read from a cache: low-rank weights and 1-D
    parameters (biases)."""
    return [e for e in evolved if e.lowrank or e.param.dim() == 1]


def _row_width(e: EvolvedParam, rank: int) -> tuple[int, ...]:
    return (e.layout(rank).rows, rank) if e.lowrank else (e.param.numel(),)


def _held_buffer(storage: dict, e: EvolvedParam, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The buffer ``storage`` holds for ``e`` when it has ``shape`` and ``e``'s device (a
    draw reuses it), else None."""
    buf = storage.get(e.name)
    if buf is None or buf.shape != shape or buf.device != e.param.device:
        return None
    return buf


def _replay_draws(draws: list, seed: int, epoch: int, indices: range, backend: str,
                  graphs: dict) -> bool:
    """Draw ``draws`` through a :class:`GraphedCall` kept in ``graphs``, the epoch read from
    device memory: from the second time in a row that the same draws into the same buffers
    are asked for, one copy and one graph launch instead of a kernel launch per parameter.
    False where a graph cannot serve (the CPU, the plain-torch backend, parameters on
    several devices, a compilation under way): the caller launches the draws itself."""
    if not draws or draws[0][2] == 0 or backend == "torch" or torch.compiler.is_compiling():
        return False
    device = draws[0][3].device
    if device.type != "cuda" or any(out.device != device for *_, out in draws):
        return False
    from .kernels.normal_block import normal_block_epoch_in_memory

    def launch(epoch_t: torch.Tensor) -> None:
        for e, idx, numel, out in draws:
            normal_block_epoch_in_memory(seed, e.key, epoch_t, idx, numel, out)

    plan = (seed, indices, tuple((e.key, numel, out.data_ptr(), idx.data_ptr())
                                 for e, idx, numel, out in draws))
    graphed = graphs.get(("draws", device))
    if graphed is None:
        graphed = graphs[("draws", device)] = GraphedCall("the factor draws")
    graphed(launch, plan, torch.full((1,), epoch, dtype=torch.int64, device=device))
    return True


class FactorCache:
    """The drawn noise of every cached parameter for one range of noise indices.

    Attributes:
        members: the member ids covered (the context's local slice).
        indices: their noise indices; ``block(e)`` holds them in this order.
    """

    def __init__(self, members: range, indices: range, blocks: dict[int, torch.Tensor]):
        self.members = members
        self.indices = indices
        self._blocks = blocks

    @staticmethod
    def size_bytes(evolved: EvolvedSet, coords: NoiseCoords, members: range) -> int:
        """Bytes a cache for ``members`` takes."""
        k = len(noise_index_range(members, coords.antithetic))
        total = 0
        for e in _cached_entries(evolved):
            numel = 1
            for s in _row_width(e, coords.rank):
                numel *= s
            total += 4 * k * numel
        return total

    @staticmethod
    def holds(evolved: EvolvedSet, coords: NoiseCoords, members: range, storage: dict) -> bool:
        """Whether ``storage`` already holds every buffer that :meth:`draw` fills for
        ``members`` (same shape and device): the draw then allocates nothing."""
        k = len(noise_index_range(members, coords.antithetic))
        return all(_held_buffer(storage, e, (k, *_row_width(e, coords.rank))) is not None
                   for e in _cached_entries(evolved))

    @classmethod
    def draw(cls, evolved: EvolvedSet, coords: NoiseCoords, members: range,
             storage: dict, graphs: Optional[dict] = None) -> "FactorCache":
        """Draw the noise of ``members`` into buffers of ``storage`` (a dict kept by the
        strategy: buffers of matching shape and device are reused, others replaced).
        ``graphs``: a dict kept by the strategy for the captured draws of later contexts
        (see :func:`_replay_draws`); without it every draw is launched."""
        if graphs is None:
            graphs = {}
        indices = noise_index_range(members, coords.antithetic)
        k = len(indices)
        seed, epoch, rank, backend = coords.seed, coords.epoch, coords.rank, coords.backend
        blocks: dict[int, torch.Tensor] = {}
        draws = []  # (entry, noise indices, numel, output view)
        for e in _cached_entries(evolved):
            device = e.param.device
            width = _row_width(e, rank)
            shape = (k, *width)
            buf = _held_buffer(storage, e, shape)
            if buf is None:
                buf = torch.empty(shape, dtype=torch.float32, device=device)
                storage[e.name] = buf
            # one index tensor per device (kept while the range stays: a captured draw reads it)
            held = graphs.get(("indices", device))
            if held is not None and held[0] == indices:
                idx = held[1]
            else:
                idx = torch.arange(indices.start, indices.stop, dtype=torch.int64, device=device)
                graphs[("indices", device)] = (indices, idx)
            numel = width[0] * width[1] if len(width) == 2 else width[0]
            if not k:
                numel = 0
            draws.append((e, idx, numel, buf.view(k, numel)))
            blocks[id(e.param)] = buf
        if not _replay_draws(draws, seed, epoch, indices, backend, graphs):
            for e, idx, numel, out in draws:
                ops.normal_block(seed, e.key, epoch, idx, numel, out=out, backend=backend)
        return cls(members, indices, blocks)

    @property
    def blocks(self) -> dict[int, torch.Tensor]:
        """The drawn buffers by ``id`` of their parameter (what :meth:`get` looks up; the
        start of every buffer is noise index ``indices.start``)."""
        return self._blocks

    def covers(self, lo: int, hi: int) -> bool:
        """True when members ``lo .. hi`` (inclusive) all lie in the cached slice."""
        return self.members.start <= lo and hi < self.members.stop

    def get(self, e: Optional[EvolvedParam]) -> Optional[tuple[torch.Tensor, int]]:
        """``(block, base)`` of a parameter for the kernels, or None when not cached."""
        if e is None:
            return None
        block = self._blocks.get(id(e.param))
        return None if block is None else (block, self.indices.start)

    def addresses(self) -> tuple:
        """Device addresses of the buffers (they stay fixed while the shapes do)."""
        return tuple(b.data_ptr() for b in self._blocks.values())

    def release(self) -> None:
        """Zero every buffer: the noise does not outlive its context."""
        blocks = list(self._blocks.values())
        if blocks:
            with torch.no_grad():
                torch._foreach_zero_(blocks)  # one multi-tensor launch, not one per buffer
        self._blocks = {}
