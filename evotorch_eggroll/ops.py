"""Low-rank noise operations: the layer between the Triton kernels and the strategy.

Everything here takes stream coordinates (``seed``, parameter ``key``, effective ``epoch``)
and per-row member ids, and regenerates noise from the stream of
:mod:`evotorch_eggroll.noise` inside Triton kernels (:mod:`evotorch_eggroll.kernels`);
nothing is stored between calls.

Conventions: the factor block of a weight ``(m, n)`` of rank ``r`` and the rows ``B0`` and
``A0`` occupy in it, and each member's noise index and sign, are defined once in
:mod:`evotorch_eggroll.noise` (:class:`~evotorch_eggroll.noise.FactorLayout`,
:func:`~evotorch_eggroll.noise.member_noise`); the ops take factor-block row offsets from
there. A member's weight perturbation is ``sign * sigma / sqrt(r) * A0 @ B0.T``; a 1-D
parameter's is ``sign * sigma * eps``.

Backends: every op takes ``backend=`` (:data:`BACKENDS`), resolved per device by
:func:`resolve_backend`. ``"triton"`` (the default) runs the kernels: CUDA tensors on the
GPU; CPU tensors only while Triton's interpreter is active (``TRITON_INTERPRET=1`` set
before Triton is imported), otherwise the GPU-required RuntimeError is raised.
``"torch"`` runs the plain-torch implementation of :mod:`evotorch_eggroll.torch_ops` on any
device (the fast way on a CPU; same Philox words, normals within the stream's tolerance).
``"auto"`` takes the kernels on CUDA devices and on the CPU under the interpreter, plain
torch otherwise. Member ids
are used as stream counters only (never as memory offsets): they must lie in
``[0, 2**32)`` (``[0, 2**33)`` with antithetic sampling); the caller validates them.

Numerics: noise is generated in float32; the kernels accumulate in float32 and write the
input's dtype. ``lowrank_update``'s matrix product runs at the precision the caller picks
(:func:`update_precision` follows the parameter's dtype and PyTorch's TF32 switch).
"""

from __future__ import annotations

import math
import operator
import os
from typing import NamedTuple, Optional

import torch

from . import library, torch_ops
from ._validation import check_int
from .noise import FactorLayout

__all__ = [
    "normal_block",
    "lowrank_factors",
    "lowrank_project",
    "lowrank_expand_",
    "dense_noise_add_",
    "perturbed_linear",
    "lowrank_branch",
    "lowrank_update",
    "update_precision",
    "dense_update",
    "interpreter_active",
    "check_kernel_device",
    "check_backend",
    "resolve_backend",
    "BACKENDS",
    "GPU_REQUIRED_MESSAGE",
]

_WORD = 1 << 32  # counters are 32-bit words
_MAX_ELEMENTS = 4 * _WORD  # element // 4 must fit a counter word

BACKENDS = ("triton", "torch", "auto")

GPU_REQUIRED_MESSAGE = (
    "EGGROLL's Triton kernels need a CUDA GPU: they generate the noise in parallel for "
    "every population member, and that is only fast on a GPU. Move the model and inputs to "
    "a CUDA device (e.g. model.cuda()); on a machine without one, use a GPU instance or "
    "Colab. To run on the CPU instead, opt in to the plain-torch CPU path: create the "
    "strategy with backend=\"torch\" (e.g. EggrollStrategy(..., backend=\"torch\"), or "
    "backend=\"auto\" for the kernels on a GPU and plain torch on the CPU); it computes the "
    "same perturbations and updates from the same noise with batched matrix products. For "
    "debugging the kernels, setting TRITON_INTERPRET=1 before Triton is imported runs them "
    "on the CPU through Triton's interpreter (slow)."
)


def interpreter_active() -> bool:
    """True when Triton's interpreter runs our kernels (``TRITON_INTERPRET=1`` at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: object) -> str:
    """Validate a backend name: one of :data:`BACKENDS` (``"triton"``, ``"torch"``,
    ``"auto"``)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation that runs for tensors on ``device``: ``"triton"`` or ``"torch"``.

    ``"auto"`` resolves to the kernels on CUDA devices and, while Triton's interpreter is
    active, on the CPU; to plain torch on every other device.
    """
    backend = check_backend(backend)
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return "triton"
    return "torch"


def kernel_device_ok(device: torch.device, backend: str = "triton") -> bool:
    """Whether :func:`check_kernel_device` passes for tensors on ``device``."""
    kind = device.type
    return kind == "cuda" or (kind != "meta" and (
        resolve_backend(backend, device) == "torch" or (kind == "cpu" and interpreter_active())))


def check_kernel_device(t: torch.Tensor, what: str = "tensor", backend: str = "triton") -> None:
    """Raise unless ``backend`` can compute with ``t``: the GPU-required RuntimeError (which
    names the plain-torch opt-in) for CPU tensors when it resolves to the kernels without
    the interpreter; a RuntimeError for meta tensors (no values) with any backend."""
    if kernel_device_ok(t.device, backend):
        return
    if t.device.type == "meta":
        raise RuntimeError(f"{what} is on the meta device, which holds shapes but no values; "
                           f"create it (or move it) on the model's device")
    raise RuntimeError(f"{what} is on {t.device}. {GPU_REQUIRED_MESSAGE}")


# -- validation ---------------------------------------------------------------------------


def _check_tensor(t: object, what: str, backend: str = "triton") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    check_kernel_device(t, what, backend)
    return t


def _check_integer(t: torch.Tensor, what: str) -> None:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")


def _check_floating(t: torch.Tensor, what: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


def _check_same_device(*pairs: tuple[str, torch.Tensor]) -> None:
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _check_word(value: object, what: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None
    if not 0 <= value < _WORD:
        raise ValueError(f"{what} must lie in [0, 2**32), got {value}")
    return value


def _check_stream(seed: object, key: object, epoch: object) -> tuple[int, int, int]:
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    return seed, _check_word(key, "key"), _check_word(epoch, "epoch")


def _check_count(value: object, what: str, minimum: int) -> int:
    return check_int(what, value, minimum)


def _check_member_ids(member_ids: torch.Tensor, rows: int, ref: tuple[str, torch.Tensor],
                      backend: str = "triton") -> None:
    _check_tensor(member_ids, "member_ids", backend)
    _check_integer(member_ids, "member_ids")
    if member_ids.dim() != 1 or member_ids.shape[0] != rows:
        raise ValueError(
            f"member_ids must have shape ({rows},) (one member per row), got "
            f"{tuple(member_ids.shape)}"
        )
    _check_same_device(ref, ("member_ids", member_ids))


def _check_noise_indices(noise_indices: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    _check_tensor(noise_indices, "noise_indices", backend)
    _check_integer(noise_indices, "noise_indices")
    if noise_indices.dim() > 1:
        raise ValueError(
            f"noise_indices must be 1-D (K,), got shape {tuple(noise_indices.shape)}"
        )
    return noise_indices.reshape(-1)


# What the checks above accept, tested cheaply: the ops test these first and run the checks
# (which raise the same errors as always, in the same order) only when one of them fails.
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                             torch.uint16, torch.uint32, torch.uint64})


def _noise_indices_ok(noise_indices: object) -> bool:
    """Whether ``noise_indices`` is an integer tensor of at most one dimension (the device
    is the caller's to test, with :func:`kernel_device_ok`)."""
    return (isinstance(noise_indices, torch.Tensor) and noise_indices.dtype in _INTEGER_DTYPES
            and noise_indices.dim() <= 1)


def _stream_ok(seed: object, key: object, epoch: object) -> bool:
    """Whether :func:`_check_stream` passes and returns its arguments unchanged."""
    return (type(seed) is int and type(key) is int and type(epoch) is int
            and 0 <= key < _WORD and 0 <= epoch < _WORD)


def _runs_torch_fast(backend: str, t: torch.Tensor) -> bool:
    """:func:`_runs_torch` without re-validating the usual backend names."""
    if backend == "triton":
        return False
    return backend == "torch" or _runs_torch(backend, t)


def _check_rows(rank: int, row_offset: int, d: int, total_rows: int) -> None:
    if row_offset < 0 or row_offset + d > total_rows:
        raise ValueError(
            f"rows [{row_offset}, {row_offset + d}) do not lie in the factor block of "
            f"{total_rows} rows"
        )
    if total_rows * rank > _MAX_ELEMENTS:
        raise ValueError(f"factor block of {total_rows} x {rank} elements exceeds 2**34")


def _check_row_input(v: torch.Tensor, member_ids: torch.Tensor, seed: object, key: object,
                     epoch: object, backend: str) -> tuple[int, int, int]:
    """Check a per-row input ``v (rows, D)`` (floating), its member ids and the stream
    coordinates; returns ``(seed, key, epoch)`` as ints."""
    _check_tensor(v, "v", backend)
    _check_floating(v, "v")
    if v.dim() != 2:
        raise ValueError(f"v must be 2-D (rows, D), got shape {tuple(v.shape)}")
    _check_member_ids(member_ids, v.shape[0], ("v", v), backend)
    return _check_stream(seed, key, epoch)


FactorCacheArg = Optional[tuple[torch.Tensor, int]]


def _check_cache(cache: FactorCacheArg, what: str, rows: int, rank: int,
                 ref: tuple[str, torch.Tensor], backend: str = "triton") -> FactorCacheArg:
    """Check a ``(block, base)`` cache of drawn factors: ``block (K, rows, rank)`` (or
    ``(K, rows)`` for 1-D noise) contiguous float32 on ``ref``'s device, ``base >= 0``."""
    if cache is None:
        return None
    block, base = cache
    _check_tensor(block, what, backend)
    shape = (rows, rank) if block.dim() == 3 else (rows,)
    if (block.dtype != torch.float32 or not block.is_contiguous()
            or tuple(block.shape[1:]) != shape):
        raise ValueError(f"{what} must be a contiguous float32 tensor of shape (K, "
                         f"{', '.join(map(str, shape))}), got {block.dtype} "
                         f"{tuple(block.shape)}")
    _check_same_device(ref, (what, block))
    return block, _check_count(base, f"{what} base", 0)


def _kernels():
    """The kernel launcher modules (imported on first use, so Triton is imported only then);
    while ``torch.compile`` traces, stand-ins that call the registered operators of
    :mod:`evotorch_eggroll.library`."""
    return library.kernel_modules()


def _runs_torch(backend: str, t: torch.Tensor) -> bool:
    """True when ``backend`` resolves to the plain-torch implementation for ``t``."""
    return resolve_backend(backend, t.device) == "torch"


class _Impls(NamedTuple):
    """The modules whose functions run the per-row ops for one resolved backend (the
    kernel launchers, or :mod:`evotorch_eggroll.torch_ops` for all three)."""

    project: object
    expand: object
    dense: object


def _impls(backend: str) -> _Impls:
    """:class:`_Impls` of a resolved backend (``"triton"`` or ``"torch"``)."""
    if backend == "torch":
        return _Impls(torch_ops, torch_ops, torch_ops)
    kern = _kernels()
    return _Impls(kern.lowrank_project, kern.lowrank_expand, kern.dense_noise)


# -- noise inspection ---------------------------------------------------------------------


def normal_block(
    seed: int, key: int, epoch: int, noise_indices: torch.Tensor, numel: int,
    out: Optional[torch.Tensor] = None, *, backend: str = "triton",
) -> torch.Tensor:
    """Normals of elements ``0..numel-1`` for each noise index.

    Args:
        seed: stream seed (Python int).
        key: parameter key in ``[0, 2**32)``.
        epoch: effective epoch in ``[0, 2**32)``.
        noise_indices: ``(K,)`` integer tensor, values in ``[0, 2**32)``.
        numel: elements per noise index.
        out: optional contiguous ``(K, numel)`` float32 tensor to write the normals to.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``(K, numel)`` float32 on ``noise_indices.device`` (``out`` when given).
    """
    if not (_noise_indices_ok(noise_indices) and _stream_ok(seed, key, epoch)
            and type(numel) is int and 0 <= numel <= _MAX_ELEMENTS
            and (out is None or isinstance(out, torch.Tensor)
                 and out.device == noise_indices.device)
            and kernel_device_ok(noise_indices.device, backend)):
        idx = _check_noise_indices(noise_indices, backend)
        seed, key, epoch = _check_stream(seed, key, epoch)
        numel = _check_count(numel, "numel", 0)
        if numel > _MAX_ELEMENTS:
            raise ValueError(f"numel must be at most 2**34, got {numel}")
        if out is not None:
            _check_tensor(out, "out", backend)
    idx = noise_indices if noise_indices.dim() == 1 else noise_indices.reshape(-1)
    if _runs_torch_fast(backend, idx):
        return torch_ops.normal_block(seed, key, epoch, idx, numel, out=out)
    return _kernels().normal_block.normal_block(seed, key, epoch, idx, numel, out=out)


def lowrank_factors(
    seed: int, key: int, epoch: int, noise_indices: torch.Tensor, m: int, n: int, rank: int,
    *, backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled factors of a ``(m, n)`` weight, exactly those the forward and update use.

    Returns:
        ``A0 (K, m, r)`` and ``B0 (K, n, r)``, float32 views of one ``(K, n + m, r)`` block
        (:class:`~evotorch_eggroll.noise.FactorLayout`).
    """
    layout = FactorLayout(_check_count(m, "m", 0), _check_count(n, "n", 0),
                          _check_count(rank, "rank", 1))
    block = normal_block(seed, key, epoch, noise_indices, layout.numel,
                         backend=backend).view(-1, layout.rows, layout.rank)
    return layout.split(block)


# -- per-row noise ------------------------------------------------------------------------


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
    cache: FactorCacheArg = None,
    backend: str = "triton",
) -> torch.Tensor:
    """``t[j] = v[j] @ F_j[row_offset : row_offset + D]`` for ``v (rows, D)``: ``(rows, r)`` float32.

    ``F_j`` is member ``j``'s unscaled factor block of ``total_rows = n + m`` rows, generated
    inside the kernel, or read from ``cache = (block, base)``: the blocks
    ``(K, total_rows, r)`` of noise indices ``base .. base + K - 1`` drawn beforehand by
    :func:`normal_block` (every row's noise index must lie there; the result is the same
    bit for bit). ``v`` may have any strides and a floating dtype (math in float32).
    ``backend``: see the module docstring.
    """
    seed, key, epoch = _check_row_input(v, member_ids, seed, key, epoch, backend)
    rank = _check_count(rank, "rank", 1)
    row_offset = _check_count(row_offset, "row_offset", 0)
    total_rows = _check_count(total_rows, "total_rows", 0)
    _check_rows(rank, row_offset, v.shape[1], total_rows)
    cache = _check_cache(cache, "cache", total_rows, rank, ("v", v), backend)
    return _impls(resolve_backend(backend, v.device)).project.lowrank_project(
        v, member_ids, seed=seed, key=key, epoch=epoch, rank=rank, row_offset=row_offset,
        antithetic=bool(antithetic), cache=cache,
    )


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
    cache: FactorCacheArg = None,
    backend: str = "triton",
) -> torch.Tensor:
    """In place: ``out[j] += sign_j * scale * F_j[row_offset : row_offset + D] @ t[j]``.

    ``out (rows, D)`` floating, any strides (float32 math, one rounding to ``out``'s dtype);
    ``t (rows, r)``; ``cache`` as for :func:`lowrank_project`; ``backend``: see the module
    docstring. Returns ``out``.
    """
    _check_tensor(out, "out", backend)
    _check_floating(out, "out")
    if out.dim() != 2:
        raise ValueError(f"out must be 2-D (rows, D), got shape {tuple(out.shape)}")
    rank = _check_count(rank, "rank", 1)
    _check_tensor(t, "t", backend)
    _check_floating(t, "t")
    if tuple(t.shape) != (out.shape[0], rank):
        raise ValueError(f"t must have shape ({out.shape[0]}, {rank}), got {tuple(t.shape)}")
    _check_same_device(("out", out), ("t", t))
    _check_member_ids(member_ids, out.shape[0], ("out", out), backend)
    seed, key, epoch = _check_stream(seed, key, epoch)
    row_offset = _check_count(row_offset, "row_offset", 0)
    total_rows = _check_count(total_rows, "total_rows", 0)
    _check_rows(rank, row_offset, out.shape[1], total_rows)
    cache = _check_cache(cache, "cache", total_rows, rank, ("out", out), backend)
    return _impls(resolve_backend(backend, out.device)).expand.lowrank_expand_(
        out, t, member_ids, seed=seed, key=key, epoch=epoch, rank=rank, row_offset=row_offset,
        scale=float(scale), antithetic=bool(antithetic), cache=cache,
    )


def dense_noise_add_(
    out: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    scale: float,
    antithetic: bool,
    backend: str = "triton",
) -> torch.Tensor:
    """In place: ``out[j] += sign_j * scale * eps_j[0..D)`` (1-D parameter noise, per row).

    ``out (rows, D)`` floating, any strides; ``backend``: see the module docstring.
    Returns ``out``.
    """
    _check_tensor(out, "out", backend)
    _check_floating(out, "out")
    if out.dim() != 2:
        raise ValueError(f"out must be 2-D (rows, D), got shape {tuple(out.shape)}")
    _check_member_ids(member_ids, out.shape[0], ("out", out), backend)
    seed, key, epoch = _check_stream(seed, key, epoch)
    if out.shape[1] > _MAX_ELEMENTS:
        raise ValueError(f"at most 2**34 elements per row, got {out.shape[1]}")
    return _impls(resolve_backend(backend, out.device)).dense.dense_noise_add_(
        out, member_ids, seed=seed, key=key, epoch=epoch, scale=float(scale),
        antithetic=bool(antithetic),
    )


# -- the perturbed linear layer -----------------------------------------------------------


class _LinearNoise(NamedTuple):
    seed: int
    weight_key: Optional[int]
    bias_key: Optional[int]
    epoch: int
    rank: int
    scale: float  # sigma / sqrt(rank), the low-rank term's scale
    sigma: float  # the bias noise's scale
    antithetic: bool
    backend: str  # resolved: "triton" or "torch"
    project: slice  # factor-block rows the input is projected through (B0 for a linear layer)
    expand: slice  # factor-block rows the projection is expanded through (A0 for a linear layer)


class _LowRankLinear(torch.autograd.Function):
    """Project -> expand through each row's factor block, optionally on top of a linear layer.

    ``out[j] = x[j] W^T + b + s_j scale F_j[expand] (F_j[project]^T x[j]) + s_j sigma eps_b``
    with ``F_j`` row ``j``'s unscaled factor block (laid out as
    :class:`~evotorch_eggroll.noise.FactorLayout` says); a linear layer projects through
    ``B0`` and expands through ``A0``. ``weight`` is given only for such a whole linear layer
    (:func:`perturbed_linear`); without it (and ``bias``) it is the low-rank branch alone,
    ``(rows, len(expand))`` float32 (:func:`lowrank_branch`).

    Backward: ``dx = g W + s scale F[project] (F[expand]^T g)`` (the mirrored project/expand,
    factors regenerated from the stream coordinates: it may run after the perturbation
    context exited); ``dW = g^T x`` and ``db = sum_rows g`` (the noise depends on neither).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, member_ids, noise: _LinearNoise, weight_cache,
                bias_cache):
        bias_key = noise.bias_key if bias is not None else None
        ctx.save_for_backward(x if weight is not None else None, weight, member_ids)
        ctx.noise = noise
        ctx.x_dtype = x.dtype
        linear = weight is not None  # a whole linear layer: project B0, expand A0
        if noise.backend == "torch" and linear:
            return torch_ops.perturbed_linear(
                x, weight, bias, member_ids, seed=noise.seed, weight_key=noise.weight_key,
                bias_key=bias_key, epoch=noise.epoch, rank=noise.rank, scale=noise.scale,
                sigma=noise.sigma, antithetic=noise.antithetic, weight_cache=weight_cache,
                bias_cache=bias_cache if bias_key is not None else None)
        if noise.backend != "torch" and linear and weight_cache is not None:
            kern = _kernels()
            m, n = weight.shape
            if x.dtype == torch.float32 and kern.drawn_linear.fits(n, m):
                # narrow layer with drawn factors: base product and noise in one launch
                tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
                return kern.drawn_linear.drawn_linear(
                    x, weight, bias, member_ids, rank=noise.rank, scale=noise.scale,
                    bias_scale=noise.sigma, antithetic=noise.antithetic, cache=weight_cache,
                    bias_cache=bias_cache if bias_key is not None else None,
                    precision="tf32" if tf32 else "ieee")
        if weight is None:
            out = torch.zeros(x.shape[0], _length(noise.expand), dtype=torch.float32,
                              device=x.device)
        else:
            out = torch.nn.functional.linear(x, weight, bias)  # (rows, m)
        impls = _impls(noise.backend)
        common = dict(seed=noise.seed, epoch=noise.epoch, antithetic=noise.antithetic)
        if noise.weight_key is not None:
            t = impls.project.lowrank_project(
                x, member_ids, key=noise.weight_key, rank=noise.rank,
                row_offset=noise.project.start, cache=weight_cache, **common)
            impls.expand.lowrank_expand_(
                out, t, member_ids, key=noise.weight_key, rank=noise.rank,
                row_offset=noise.expand.start, scale=noise.scale, bias_key=bias_key,
                bias_scale=noise.sigma, cache=weight_cache,
                bias_cache=bias_cache if bias_key is not None else None, **common)
        elif bias_key is not None:
            impls.dense.dense_noise_add_(out, member_ids, key=bias_key, scale=noise.sigma,
                                         **common)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, member_ids = ctx.saved_tensors
        noise: _LinearNoise = ctx.noise
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if noise.backend == "torch" and weight is not None:
                grad_x = torch_ops.perturbed_linear_grad_x(
                    grad_out, weight, member_ids, seed=noise.seed, weight_key=noise.weight_key,
                    epoch=noise.epoch, rank=noise.rank, scale=noise.scale,
                    antithetic=noise.antithetic)
            else:
                if weight is not None:
                    grad_x = grad_out.mm(weight)  # (rows, n)
                else:
                    grad_x = torch.zeros(grad_out.shape[0], _length(noise.project),
                                         dtype=torch.float32, device=grad_out.device)
                if noise.weight_key is not None:
                    impls = _impls(noise.backend)
                    common = dict(seed=noise.seed, key=noise.weight_key, epoch=noise.epoch,
                                  rank=noise.rank, antithetic=noise.antithetic)
                    u = impls.project.lowrank_project(grad_out, member_ids,
                                                      row_offset=noise.expand.start,
                                                      **common)  # (rows, r)
                    impls.expand.lowrank_expand_(grad_x, u, member_ids,
                                                 row_offset=noise.project.start,
                                                 scale=noise.scale, **common)
                grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t().mm(x)  # (m, n)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)  # (m,)
        return grad_x, grad_w, grad_b, None, None, None, None


def _length(rows: slice) -> int:
    return rows.stop - rows.start


def _rows_and_ids(x: torch.Tensor, member_ids: torch.Tensor) -> torch.Tensor:
    """Member id of every row of ``x.reshape(-1, n)``: ``(rows,)``."""
    lead = tuple(x.shape[:-1])
    if tuple(member_ids.shape) == lead:
        return member_ids.reshape(-1)
    if len(lead) >= 2 and member_ids.dim() == 1 and member_ids.shape[0] == lead[0]:
        # one member per leading row, shared by the inner dimensions (e.g. a sequence)
        view = member_ids.view(-1, *([1] * (len(lead) - 1)))
        return view.expand(lead).reshape(-1)
    raise ValueError(
        f"member_ids of shape {tuple(member_ids.shape)} do not match the rows of x "
        f"{tuple(x.shape)}: expected {lead}" + (f" or ({lead[0]},)" if len(lead) >= 2 else "")
    )


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
    weight_cache: FactorCacheArg = None,
    bias_cache: FactorCacheArg = None,
    backend: str = "triton",
) -> torch.Tensor:
    """``out[j] = x[j] W^T + b + s_j sigma/sqrt(r) (x[j] B0_j) A0_j^T + s_j sigma eps_b_j``.

    ``x (rows, n)``, ``weight (m, n)``, ``bias (m,)`` or None, ``member_ids (rows,)``.
    ``weight_key``/``bias_key`` None means that parameter is not perturbed. Differentiable
    with respect to ``x``, ``weight`` and ``bias``.

    ``x`` may also be ``(..., n)`` with ``member_ids`` of shape ``x.shape[:-1]``, or of
    shape ``(x.shape[0],)`` when every inner row of a leading row uses the same member;
    the output is then ``(..., m)``. The base product is ``F.linear`` (cuBLAS); the low-rank
    term and the bias noise are added by the kernels in float32, with one rounding to the
    input dtype. Under ``torch.no_grad()`` the output has no ``grad_fn``.

    ``weight_cache``/``bias_cache``: ``(block, base)`` draws of the weight's factor blocks
    ``(K, n + m, r)`` and the bias noise ``(K, m)`` for noise indices
    ``base .. base + K - 1`` (see :func:`lowrank_project`); the forward then reads them
    instead of generating them (same result bit for bit; every row's noise index must lie
    in the range). The backward always regenerates.

    ``backend`` (see the module docstring): with ``"torch"`` the same computation runs as
    batched products in plain torch, each distinct member's factors generated (or read)
    once per call.
    """
    _check_tensor(x, "x", backend)
    _check_tensor(weight, "weight", backend)
    _check_floating(x, "x")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (m, n), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (rows, {n}), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    _check_same_device(("weight", weight), ("x", x))
    if bias is not None:
        _check_tensor(bias, "bias", backend)
        if tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype")
        _check_same_device(("weight", weight), ("bias", bias))
    _check_tensor(member_ids, "member_ids", backend)
    _check_integer(member_ids, "member_ids")
    ids = _rows_and_ids(x, member_ids)
    _check_member_ids(ids, ids.shape[0], ("x", x), backend)
    seed, _, epoch = _check_stream(seed, 0, epoch)
    if weight_key is not None:
        weight_key = _check_word(weight_key, "weight_key")
        rank = _check_count(rank, "rank", 1)
        rows = FactorLayout(m, n, rank).rows
        _check_rows(rank, 0, rows, rows)
    if bias_key is not None:
        bias_key = _check_word(bias_key, "bias_key")
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite, got {sigma}")
    if sigma == 0.0:  # every perturbation is exactly zero
        weight_key = bias_key = None
    if weight_key is None:
        rank = 1  # unused
    layout = FactorLayout(m, n, rank)
    weight_cache = (_check_cache(weight_cache, "weight_cache", layout.rows, rank, ("x", x),
                                 backend) if weight_key is not None else None)
    bias_cache = (_check_cache(bias_cache, "bias_cache", m, 1, ("x", x), backend)
                  if bias_key is not None else None)
    noise = _LinearNoise(seed, weight_key, bias_key, epoch, rank, sigma / math.sqrt(rank), sigma,
                         bool(antithetic), resolve_backend(backend, x.device),
                         project=layout.b_rows, expand=layout.a_rows)
    x2 = x.reshape(-1, n)
    out = _LowRankLinear.apply(x2, weight, bias, ids, noise, weight_cache, bias_cache)
    return out.reshape(*x.shape[:-1], m)


def lowrank_branch(
    v: torch.Tensor,
    member_ids: torch.Tensor,
    *,
    seed: int,
    key: int,
    epoch: int,
    layout: FactorLayout,
    project: slice,
    expand: slice,
    sigma: float,
    antithetic: bool,
    backend: str = "triton",
) -> torch.Tensor:
    """``out[j] = s_j sigma/sqrt(r) F_j[expand] (F_j[project]^T v[j])``: ``(rows, len(expand))``
    float32, differentiable with respect to ``v``.

    The low-rank term of a weight used in another form than a whole linear layer: ``x @ W``
    projects through ``A0`` and expands through ``B0`` (``project=layout.a_rows``,
    ``expand=layout.b_rows``), a slice of the weight's output rows expands through the
    matching rows of ``A0`` (:meth:`~evotorch_eggroll.noise.FactorLayout.a_part`). ``F_j`` is
    row ``j``'s unscaled factor block of ``layout`` (generated from the stream, never
    stored: the backward may run after the perturbation context exited); ``v (rows, D)``
    with ``D = len(project)``. Computed by the same autograd Function as
    :func:`perturbed_linear`.
    """
    seed, key, epoch = _check_row_input(v, member_ids, seed, key, epoch, backend)
    rank = _check_count(layout.rank, "rank", 1)
    for name, rows in (("project", project), ("expand", expand)):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"{name} must be a slice of factor-block rows with step 1")
        start = _check_count(rows.start, f"{name}.start", 0)
        _check_rows(rank, start, _check_count(rows.stop, f"{name}.stop", start) - start,
                    layout.rows)
    if _length(project) != v.shape[1]:
        raise ValueError(f"v has {v.shape[1]} columns but project selects {_length(project)} "
                         f"factor-block rows")
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite, got {sigma}")
    noise = _LinearNoise(seed, key, None, epoch, rank, sigma / math.sqrt(rank), sigma,
                         bool(antithetic), resolve_backend(backend, v.device),
                         project=slice(project.start, project.stop),
                         expand=slice(expand.start, expand.stop))
    return _LowRankLinear.apply(v, None, None, member_ids, noise, None, None)


# -- the update ---------------------------------------------------------------------------


def _check_update_inputs(noise_indices: torch.Tensor, coeffs: torch.Tensor,
                         backend: str = "triton") -> torch.Tensor:
    idx = _check_noise_indices(noise_indices, backend)
    _check_tensor(coeffs, "coeffs", backend)
    _check_floating(coeffs, "coeffs")
    if coeffs.reshape(-1).shape[0] != idx.shape[0] or coeffs.dim() > 1:
        raise ValueError(
            f"coeffs must have shape ({idx.shape[0]},) like noise_indices, got "
            f"{tuple(coeffs.shape)}"
        )
    _check_same_device(("noise_indices", idx), ("coeffs", coeffs))
    return idx


def _update_inputs_ok(noise_indices: object, coeffs: object, backend: str) -> bool:
    """Whether :func:`_check_update_inputs` passes (tested cheaply; the device last, so that
    an unknown backend raises as the checks would)."""
    return (_noise_indices_ok(noise_indices) and isinstance(coeffs, torch.Tensor)
            and coeffs.is_floating_point() and coeffs.dim() <= 1
            and coeffs.numel() == noise_indices.numel()
            and coeffs.device == noise_indices.device
            and kernel_device_ok(noise_indices.device, backend))


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
    precision: str = "ieee",
    backend: str = "triton",
) -> torch.Tensor:
    """``G = sum_k coeffs[k] * A0_k @ B0_k^T``: ``(m, n)`` float32 (scales are the caller's).

    The factors are regenerated in chunks of noise indices (bounded memory) and each chunk
    is one ``(m, K_chunk r) @ (K_chunk r, n)`` product with float32 accumulation:
    ``precision="ieee"`` multiplies the float32 factors in IEEE float32, ``"tf32"`` on TF32
    tensor cores, ``"bf16"`` rounds the factors to bfloat16 once and uses bf16 tensor cores.
    ``backend``: see the module docstring (plain torch: the same chunked products).
    """
    if precision not in ("ieee", "tf32", "bf16"):
        raise ValueError(f"precision must be 'ieee', 'tf32' or 'bf16', got {precision!r}")
    if not (_update_inputs_ok(noise_indices, coeffs, backend) and _stream_ok(seed, key, epoch)
            and type(m) is int and type(n) is int and type(rank) is int and m >= 0 and n >= 0
            and rank >= 1 and (n + m) * rank <= _MAX_ELEMENTS):
        _check_update_inputs(noise_indices, coeffs, backend)
        seed, key, epoch = _check_stream(seed, key, epoch)
        m = _check_count(m, "m", 0)
        n = _check_count(n, "n", 0)
        rank = _check_count(rank, "rank", 1)
        rows = FactorLayout(m, n, rank).rows
        _check_rows(rank, 0, rows, rows)
    idx = noise_indices if noise_indices.dim() == 1 else noise_indices.reshape(-1)
    impl = torch_ops if _runs_torch_fast(backend, idx) else _kernels().lowrank_update
    return impl.lowrank_update(
        m, n, seed=seed, key=key, epoch=epoch, rank=rank, noise_indices=idx,
        coeffs=coeffs if coeffs.dim() == 1 else coeffs.reshape(-1), precision=precision,
    )


def update_precision(param: torch.Tensor) -> str:
    """The update product's precision for a weight: the precision its forward runs at.

    ``"bf16"`` for bfloat16/float16 weights; ``"tf32"`` for float32 CUDA weights while
    PyTorch's TF32 switch for matrix products is on
    (``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")``); ``"ieee"`` otherwise.
    """
    if param.dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if param.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dense_update(
    numel: int,
    *,
    seed: int,
    key: int,
    epoch: int,
    noise_indices: torch.Tensor,
    coeffs: torch.Tensor,
    backend: str = "triton",
) -> torch.Tensor:
    """``g = sum_k coeffs[k] * eps_k``: ``(numel,)`` float32, summed over ``k`` in order
    (``backend``: see the module docstring; plain torch sums by matrix products)."""
    if not (_update_inputs_ok(noise_indices, coeffs, backend) and _stream_ok(seed, key, epoch)
            and type(numel) is int and 0 <= numel <= _MAX_ELEMENTS):
        _check_update_inputs(noise_indices, coeffs, backend)
        seed, key, epoch = _check_stream(seed, key, epoch)
        numel = _check_count(numel, "numel", 0)
        if numel > _MAX_ELEMENTS:
            raise ValueError(f"numel must be at most 2**34, got {numel}")
    idx = noise_indices if noise_indices.dim() == 1 else noise_indices.reshape(-1)
    impl = torch_ops if _runs_torch_fast(backend, idx) else _kernels().dense_noise
    return impl.dense_update(
        numel, seed=seed, key=key, epoch=epoch, noise_indices=idx,
        coeffs=coeffs if coeffs.dim() == 1 else coeffs.reshape(-1),
    )
