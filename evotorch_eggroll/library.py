"""The kernel launchers as PyTorch operators, so that ``torch.compile`` sees them.

Every launch the batched forward makes (``lowrank_project``, ``lowrank_expand_``,
``dense_noise_add_``, ``drawn_linear`` and ``normal_block``) is registered under the
``evotorch_eggroll::`` namespace with :func:`torch.library.custom_op` and a fake
implementation that gives the output's shape, dtype and strides without running a kernel.
Dynamo then records one operator call per launch instead of tracing into Triton (which it
cannot do), and ``torch.compile(..., fullgraph=True)`` traces a whole
``pop.batched_forward`` with no graph break; Inductor calls the operators from its
generated code, also inside CUDA graphs (the launchers allocate only their outputs and
never synchronise with the device).

The operators are opaque to the compiler rather than ``torch.library.triton_op``: Triton's
interpreter (``TRITON_INTERPRET=1``, the CPU test path) hands out kernels that
``torch.library.wrap_triton`` cannot trace, so one registration serves the GPU and the
interpreter alike and is tested on both.

Eager calls skip the dispatcher: :func:`kernel_modules` returns the launcher modules
themselves unless Dynamo is tracing, so the eager path costs exactly what it did before.
While tracing it returns stand-ins with the launchers' signatures that call the
registered operators.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

__all__ = ["kernel_modules", "OPERATORS"]

_NS = "evotorch_eggroll"
_MASK32 = 0xFFFFFFFF

_MODULES: list = []


def _launchers() -> SimpleNamespace:
    """The kernel modules, imported on first use (so Triton is imported only then)."""
    if not _MODULES:
        from .kernels import dense_noise, drawn_linear, drawn_mlp, lowrank_expand
        from .kernels import lowrank_project, lowrank_update
        from .kernels import normal_block

        _MODULES.append(SimpleNamespace(
            dense_noise=dense_noise, drawn_linear=drawn_linear, drawn_mlp=drawn_mlp,
            lowrank_expand=lowrank_expand, lowrank_project=lowrank_project,
            lowrank_update=lowrank_update, normal_block=normal_block))
    return _MODULES[0]


def _seed(seed_lo: int, seed_hi: int) -> int:
    return (seed_hi << 32) | seed_lo


def _split(seed: int) -> tuple[int, int]:
    """The seed as two 32-bit words (the operators' ``int`` arguments are 64-bit signed)."""
    return seed & _MASK32, (seed >> 32) & _MASK32


def _cache(block: Optional[torch.Tensor], base: int) -> Optional[tuple[torch.Tensor, int]]:
    return None if block is None else (block, base)


# -- the operators ----------------------------------------------------------------------------


@torch.library.custom_op(f"{_NS}::lowrank_project", mutates_args=())
def _lowrank_project_op(
    v: torch.Tensor, member_ids: torch.Tensor, seed_lo: int, seed_hi: int, key: int,
    epoch: int, rank: int, row_offset: int, antithetic: bool, block_rows: Optional[int],
    cache: Optional[torch.Tensor], cache_base: int,
) -> torch.Tensor:
    """``(rows, rank)`` float32: see ``kernels.lowrank_project.lowrank_project``."""
    return _launchers().lowrank_project.lowrank_project(
        v, member_ids, seed=_seed(seed_lo, seed_hi), key=key, epoch=epoch, rank=rank,
        row_offset=row_offset, antithetic=antithetic, block_rows=block_rows,
        cache=_cache(cache, cache_base))


@_lowrank_project_op.register_fake
def _(v, member_ids, seed_lo, seed_hi, key, epoch, rank, row_offset, antithetic, block_rows,
      cache, cache_base):
    return v.new_empty((v.shape[0], rank), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::lowrank_expand_", mutates_args=("out",))
def _lowrank_expand_op(
    out: torch.Tensor, t: torch.Tensor, member_ids: torch.Tensor, seed_lo: int, seed_hi: int,
    key: int, epoch: int, rank: int, row_offset: int, scale: float, antithetic: bool,
    bias_key: Optional[int], bias_scale: float, block_rows: Optional[int],
    cache: Optional[torch.Tensor], cache_base: int, bias_cache: Optional[torch.Tensor],
    bias_cache_base: int,
) -> None:
    """In place on ``out``: see ``kernels.lowrank_expand.lowrank_expand_``."""
    _launchers().lowrank_expand.lowrank_expand_(
        out, t, member_ids, seed=_seed(seed_lo, seed_hi), key=key, epoch=epoch, rank=rank,
        row_offset=row_offset, scale=scale, antithetic=antithetic, bias_key=bias_key,
        bias_scale=bias_scale, block_rows=block_rows, cache=_cache(cache, cache_base),
        bias_cache=_cache(bias_cache, bias_cache_base))


@_lowrank_expand_op.register_fake
def _(out, t, member_ids, seed_lo, seed_hi, key, epoch, rank, row_offset, scale, antithetic,
      bias_key, bias_scale, block_rows, cache, cache_base, bias_cache, bias_cache_base):
    return None


@torch.library.custom_op(f"{_NS}::dense_noise_add_", mutates_args=("out",))
def _dense_noise_add_op(
    out: torch.Tensor, member_ids: torch.Tensor, seed_lo: int, seed_hi: int, key: int,
    epoch: int, scale: float, antithetic: bool, block_rows: Optional[int],
) -> None:
    """In place on ``out``: see ``kernels.dense_noise.dense_noise_add_``."""
    _launchers().dense_noise.dense_noise_add_(
        out, member_ids, seed=_seed(seed_lo, seed_hi), key=key, epoch=epoch, scale=scale,
        antithetic=antithetic, block_rows=block_rows)


@_dense_noise_add_op.register_fake
def _(out, member_ids, seed_lo, seed_hi, key, epoch, scale, antithetic, block_rows):
    return None


@torch.library.custom_op(f"{_NS}::drawn_linear", mutates_args=())
def _drawn_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    member_ids: torch.Tensor, rank: int, scale: float, bias_scale: float, antithetic: bool,
    cache: Optional[torch.Tensor], cache_base: int, bias_cache: Optional[torch.Tensor],
    bias_cache_base: int, precision: str,
) -> torch.Tensor:
    """``(rows, m)`` in ``x``'s dtype: see ``kernels.drawn_linear.drawn_linear``."""
    return _launchers().drawn_linear.drawn_linear(
        x, weight, bias, member_ids, rank=rank, scale=scale, bias_scale=bias_scale,
        antithetic=antithetic, cache=_cache(cache, cache_base),
        bias_cache=_cache(bias_cache, bias_cache_base), precision=precision)


@_drawn_linear_op.register_fake
def _(x, weight, bias, member_ids, rank, scale, bias_scale, antithetic, cache, cache_base,
      bias_cache, bias_cache_base, precision):
    if cache is not None and bias_cache is not None and bias_cache_base != cache_base:
        raise ValueError("the factor and bias caches must start at the same noise index")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{_NS}::normal_block_", mutates_args=("out",))
def _normal_block_op(
    out: torch.Tensor, noise_indices: torch.Tensor, seed_lo: int, seed_hi: int, key: int,
    epoch: int, numel: int, first_element: int,
) -> None:
    """Writes ``(K, numel)`` normals to ``out``: see ``kernels.normal_block.normal_block``."""
    _launchers().normal_block.normal_block(
        _seed(seed_lo, seed_hi), key, epoch, noise_indices, numel, first_element, out=out)


@_normal_block_op.register_fake
def _(out, noise_indices, seed_lo, seed_hi, key, epoch, numel, first_element):
    return None


OPERATORS = {
    "lowrank_project": _lowrank_project_op,
    "lowrank_expand_": _lowrank_expand_op,
    "dense_noise_add_": _dense_noise_add_op,
    "drawn_linear": _drawn_linear_op,
    "normal_block_": _normal_block_op,
}


# -- stand-ins with the launchers' signatures, used while Dynamo traces ------------------------


def _split_cache(cache: Optional[tuple[torch.Tensor, int]]) -> tuple[Optional[torch.Tensor], int]:
    return (None, 0) if cache is None else (cache[0], int(cache[1]))


def _lowrank_project(v, member_ids, *, seed, key, epoch, rank, row_offset, antithetic,
                     block_rows=None, cache=None):
    return _lowrank_project_op(v, member_ids, *_split(seed), key, epoch, rank, row_offset,
                               bool(antithetic), block_rows, *_split_cache(cache))


def _lowrank_expand_(out, t, member_ids, *, seed, key, epoch, rank, row_offset, scale,
                     antithetic, bias_key=None, bias_scale=0.0, block_rows=None, cache=None,
                     bias_cache=None):
    _lowrank_expand_op(out, t, member_ids, *_split(seed), key, epoch, rank, row_offset,
                       float(scale), bool(antithetic), bias_key, float(bias_scale), block_rows,
                       *_split_cache(cache), *_split_cache(bias_cache))
    return out


def _dense_noise_add_(out, member_ids, *, seed, key, epoch, scale, antithetic, block_rows=None):
    _dense_noise_add_op(out, member_ids, *_split(seed), key, epoch, float(scale),
                        bool(antithetic), block_rows)
    return out


def _drawn_linear(x, weight, bias, member_ids, *, rank, scale, bias_scale, antithetic, cache,
                  bias_cache, precision):
    return _drawn_linear_op(x, weight, bias, member_ids, rank, float(scale), float(bias_scale),
                            bool(antithetic), *_split_cache(cache), *_split_cache(bias_cache),
                            precision)


def _normal_block(seed, key, epoch, noise_indices, numel, first_element=0, out=None):
    if first_element % 4:
        raise ValueError(f"first_element must be a multiple of 4, got {first_element}")
    idx = noise_indices.reshape(-1).to(torch.int64).contiguous()
    if out is None:
        out = torch.empty((idx.shape[0], numel), dtype=torch.float32, device=idx.device)
    _normal_block_op(out, idx, *_split(seed), key, epoch, numel, first_element)
    return out


def _fits(n: int, m: int) -> bool:
    return _launchers().drawn_linear.fits(n, m)


def _dense_update(numel, **kwargs):
    return _launchers().dense_noise.dense_update(numel, **kwargs)


def _lowrank_update(m, n, **kwargs):
    return _launchers().lowrank_update.lowrank_update(m, n, **kwargs)


# Built here, not while tracing (Dynamo does not construct namespaces). The updates are not
# part of a forward and keep their launchers.
_TRACED = SimpleNamespace(
    dense_noise=SimpleNamespace(dense_noise_add_=_dense_noise_add_, dense_update=_dense_update),
    drawn_linear=SimpleNamespace(drawn_linear=_drawn_linear, fits=_fits),
    lowrank_expand=SimpleNamespace(lowrank_expand_=_lowrank_expand_),
    lowrank_project=SimpleNamespace(lowrank_project=_lowrank_project),
    lowrank_update=SimpleNamespace(lowrank_update=_lowrank_update),
    normal_block=SimpleNamespace(normal_block=_normal_block),
)


def kernel_modules() -> SimpleNamespace:
    """The launcher modules (``.lowrank_project.lowrank_project(...)`` etc.): the kernel
    modules themselves in eager mode, stand-ins calling the registered operators while
    Dynamo traces (same signatures, same results)."""
    if torch.compiler.is_compiling():
        return _TRACED
    return _launchers()


# -- member ids -----------------------------------------------------------------------------


def member_range_message(population_size: int, lo: int, hi: int) -> str:
    return (f"member ids must lie in [0, {population_size}) (the population size), got values "
            f"in [{lo}, {hi}]")


def check_member_ids_async(ids: torch.Tensor, population_size: int) -> None:
    """Assert on the device, without waiting for it, that ``ids`` lie in
    ``[0, population_size)`` (a failure stops the device's work with this message)."""
    ok = ((ids >= 0) & (ids < population_size)).all()
    torch._assert_async(ok, f"member ids must lie in [0, {population_size}) (the population "
                            f"size)")


@torch.library.custom_op(f"{_NS}::member_ids", mutates_args=())
def _member_ids_op(ids: torch.Tensor, population_size: int, device: torch.device
                   ) -> torch.Tensor:
    """``ids`` as int64 on ``device``, checked to lie in ``[0, population_size)``: a
    ValueError, or a device-side assertion while a CUDA graph is being captured."""
    out = ids.to(device=device, dtype=torch.int64, copy=True)
    if out.numel():
        if out.is_cuda and torch.cuda.is_current_stream_capturing():
            check_member_ids_async(out, population_size)
        else:
            lo, hi = torch.aminmax(out)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= population_size:
                raise ValueError(member_range_message(population_size, lo, hi))
    return out


@_member_ids_op.register_fake
def _(ids, population_size, device):
    return torch.empty(ids.shape, dtype=torch.int64, device=device)


OPERATORS["member_ids"] = _member_ids_op


def checked_member_ids(ids: torch.Tensor, population_size: int, device: torch.device
                       ) -> torch.Tensor:
    """The ``evotorch_eggroll::member_ids`` operator: checked int64 member ids on ``device``
    (a new tensor), with no data-dependent Python control flow for the compiler to trace."""
    return _member_ids_op(ids, population_size, device)
