"""Per-row perturbed computation inside the model's own forward.

``batched_forward`` runs ``model(x)`` under :class:`RowPerturbationMode`, a
``TorchFunctionMode`` installed for that one call. Every torch function call passes
through it; calls whose arguments contain an evolved parameter are rerouted so that row
``j`` of the batch computes with member ``member_ids[j]``'s perturbed parameter:

========================================  ============================================
op (where the evolved parameter sits)      per-row computation
========================================  ============================================
``F.linear`` weight / bias                 ``ops.perturbed_linear`` (low-rank weight,
                                           dense bias noise); OpenES weights: grouped
                                           dense matmul
``F.conv1d`` / ``F.conv2d`` weight / bias  base conv + low-rank branch on the unfolded
                                           patches (weight as ``(out, in/groups * k)``)
``F.embedding`` weight                     base lookup + low-rank rows ``A0[idx] B0^T``
``F.layer_norm`` / ``group_norm`` /        normalisation without affine, then the
``batch_norm`` / ``instance_norm`` /       per-row perturbed affine
``rms_norm`` weight / bias
add / sub / mul / div with an activation   the parameter replaced by its per-row
                                           perturbed values (biases, scales)
========================================  ============================================

Rows: the first dimension of the op's input is the batch of ``batched_forward``; all
other positions of a sample (sequence steps, pixels) share the sample's member. An op that
receives an evolved parameter anywhere else (``w.T``, ``torch.matmul(x, w)``,
``F.prelu``, attention internals ...) raises a RuntimeError naming the parameter: nothing
is ever silently evaluated unperturbed. The same holds at ``setup`` for parameters of
module types whose forward is known not to go through the ops above
(:func:`check_supported_modules`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import ops
from .evolved import EvolvedParam, EvolvedSet, NoiseCoords, member_noise
from .factor_cache import FactorCache

__all__ = ["RowPerturbationMode", "check_supported_modules", "UNSUPPORTED_MODULE_TYPES"]

# Module types whose parameters never reach a routed op in the way we perturb per row.
UNSUPPORTED_MODULE_TYPES: tuple = (
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.PReLU,
    nn.Bilinear,
    nn.EmbeddingBag,
    nn.Conv3d,
    nn.modules.conv._ConvTransposeNd,
)

_SUPPORTED_OPS = (
    "F.linear, F.conv1d/F.conv2d, F.embedding, F.layer_norm/group_norm/batch_norm/"
    "instance_norm/rms_norm, and elementwise add/sub/mul/div with an activation whose first "
    "dimension is the batch"
)


def _exclude_hint(name: str) -> str:
    return (f"Leave it out of evolution with setup(model, exclude=[{name!r}]) "
            f"(or strategy.freeze({name!r}) / ESModule.freeze_parameter).")


def check_supported_modules(root: nn.Module, names: Sequence[str]) -> None:
    """Reject evolved parameters owned by (or nested in) a module type we cannot perturb.

    Args:
        root: the module whose ``named_parameters()`` produced ``names``.
        names: dotted names of the parameters to evolve.

    Raises:
        ValueError: naming the first such parameter and suggesting ``exclude=``.
    """
    for name in names:
        parts = name.split(".")[:-1]
        module = root
        path = [module]
        for part in parts:
            module = getattr(module, part)
            path.append(module)
        for mod in path:
            if isinstance(mod, UNSUPPORTED_MODULE_TYPES):
                raise ValueError(
                    f"parameter {name!r} belongs to a {type(mod).__name__}, whose forward "
                    f"does not go through ops that batched_forward can perturb per row "
                    f"({_SUPPORTED_OPS}). {_exclude_hint(name)}"
                )


# -- tensor metadata that may be read from an evolved parameter -----------------------------

_METADATA_ATTRS = frozenset({
    "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "layout",
    "is_leaf", "grad_fn", "names", "is_sparse", "is_quantized", "is_meta", "is_mps",
    "is_xpu", "itemsize", "nbytes", "grad", "is_nested",
})
_METADATA_METHODS = frozenset({
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.__len__, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.element_size, torch.Tensor.get_device, torch.Tensor.data_ptr,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.storage_offset,
    torch.Tensor.__repr__, torch.Tensor.__format__,
})


def _is_metadata(func: Callable) -> bool:
    if func in _METADATA_METHODS:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") in _METADATA_ATTRS


def _func_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


# -- argument binding ----------------------------------------------------------------------

def _binder(names: Sequence[str], defaults: dict) -> Callable[[tuple, dict], dict]:
    def bind(args: tuple, kwargs: dict) -> dict:
        out = dict(defaults)
        out.update(zip(names, args))
        out.update(kwargs)
        return out
    return bind


def _python_binder(fn: Callable) -> Callable[[tuple, dict], dict]:
    sig = inspect.signature(fn)

    def bind(args: tuple, kwargs: dict) -> dict:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    return bind


_bind_linear = _binder(("input", "weight", "bias"), {"bias": None})
_bind_conv = _binder(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                     {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})


def _tuple(v: Any, nd: int) -> tuple:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(e) for e in v)
    return v * nd if len(v) == 1 else v


# -- the low-rank branch: differentiable with respect to its input ----------------------------

class _LowRankBranch(torch.autograd.Function):
    """``out[j] = s_j * scale * F_j[out_off : out_off + M] @ (F_j[in_off : in_off + D]^T v[j])``.

    ``F_j`` is member ``j``'s unscaled factor block ``(total_rows, r)``; ``v (rows, D)``;
    ``out (rows, M)`` float32. Only the noise's coordinates are kept for backward, so it
    may run after the perturbation context exited.
    """

    @staticmethod
    def forward(ctx, v, member_ids, coords, key, in_offset, out_offset, out_features,
                total_rows):
        common = dict(seed=coords.seed, key=key, epoch=coords.epoch, rank=coords.rank,
                      total_rows=total_rows, antithetic=coords.antithetic,
                      backend=coords.backend)
        t = ops.lowrank_project(v, member_ids, row_offset=in_offset, **common)  # (rows, r)
        out = torch.zeros(v.shape[0], out_features, dtype=torch.float32, device=v.device)
        ops.lowrank_expand_(out, t, member_ids, row_offset=out_offset,
                            scale=coords.lowrank_scale, **common)
        ctx.save_for_backward(member_ids)
        ctx.cfg = (coords, common, in_offset, out_offset, v.shape[1], v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        (member_ids,) = ctx.saved_tensors
        coords, common, in_offset, out_offset, d, v_dtype = ctx.cfg
        u = ops.lowrank_project(dout, member_ids, row_offset=out_offset, **common)  # (rows, r)
        dv = torch.zeros(dout.shape[0], d, dtype=torch.float32, device=dout.device)
        ops.lowrank_expand_(dv, u, member_ids, row_offset=in_offset,
                            scale=coords.lowrank_scale, **common)
        return dv.to(v_dtype), None, None, None, None, None, None, None


def _grouped_matvec(v: torch.Tensor, inv: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``out[j] = mats[inv[j]] @ v[j]`` for ``v (rows, D)``, ``mats (K, M, D)``: ``(rows, M)``.

    Rows are grouped by matrix and padded to the largest group, so this is one ``bmm``.
    Differentiable with respect to ``v``.
    """
    k = mats.shape[0]
    rows = v.shape[0]
    order = torch.argsort(inv, stable=True)
    g = inv[order]
    counts = torch.bincount(inv, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows, device=v.device) - starts[g]
    width = int(counts.max()) if rows else 0
    padded = v.new_zeros(k, width, v.shape[1]).index_put((g, pos), v[order])  # (K, c, D)
    res = torch.bmm(padded, mats.transpose(1, 2))  # (K, c, M)
    return res[g, pos][torch.argsort(order)]


def _dense_weight_rows(ep: EvolvedParam, coords: NoiseCoords, v: torch.Tensor,
                       row_ids: torch.Tensor, out_slice: slice) -> torch.Tensor:
    """Full-rank (OpenES) weight noise applied per row: ``s_j sigma E_j[out_slice] @ v[j]``.

    ``v (rows, D)`` with ``D = ep.n``; returns ``(rows, len(out_slice))`` float32.
    """
    idx, sign = member_noise(row_ids, coords.antithetic)
    uniq, inv = torch.unique(idx, return_inverse=True)
    eps = ops.normal_block(coords.seed, ep.key, coords.epoch, uniq, ep.m * ep.n,
                           backend=coords.backend)
    mats = eps.view(-1, ep.m, ep.n)[:, out_slice]  # (K, M, D)
    res = _grouped_matvec(v.float(), inv, mats)
    return res * (sign * coords.sigma)[:, None]


# -- the mode -------------------------------------------------------------------------------

class RowPerturbationMode(TorchFunctionMode):
    """Routes ops that consume evolved parameters to per-row perturbed computation.

    Args:
        evolved: the strategy's evolved parameters.
        coords: stream coordinates of the current perturbation context.
        member_ids: ``(R,)`` int64 member of each batch row, on the input's device.
        cache: drawn factors covering every row's member (or None): linear layers read
            their weight and bias noise from it instead of generating it.

    Attributes:
        generated: True once an op generated noise itself during this forward (an op the
            cache does not serve), so the computation depends on the stream coordinates
            and not only on the cache.
    """

    def __init__(self, evolved: EvolvedSet, coords: NoiseCoords, member_ids: torch.Tensor,
                 cache: Optional[FactorCache] = None):
        super().__init__()
        self.evolved = evolved
        self.coords = coords
        self.member_ids = member_ids
        self.cache = cache
        self.generated = False
        self.batch = int(member_ids.shape[0])
        self.consumed: set[int] = set()
        self._rows_cache: dict[int, torch.Tensor] = {}

    # helpers ---------------------------------------------------------------------------

    def lookup(self, obj: Any) -> Optional[EvolvedParam]:
        # Evolved entries are Parameters; testing the type first keeps other tensors
        # (activations) away from id(), which torch.compile cannot trace for them.
        return self.evolved.lookup(obj) if isinstance(obj, torch.nn.Parameter) else None

    def consume(self, *entries: Optional[EvolvedParam], generated: bool = True) -> None:
        """Mark parameters as perturbed in this forward (``generated``: their noise was
        generated here rather than read from the cache)."""
        for e in entries:
            if e is not None:
                self.consumed.add(id(e.param))
                self.generated = self.generated or generated

    def reject(self, func: Callable, values: Any) -> None:
        """Raise if an evolved parameter occurs among ``values`` (any nesting)."""
        for leaf in tree_leaves(values):
            e = self.lookup(leaf)
            if e is not None:
                raise RuntimeError(
                    f"parameter {e.name!r} reaches {_func_name(func)}, which batched_forward "
                    f"cannot perturb per row; it perturbs evolved parameters consumed by "
                    f"{_SUPPORTED_OPS}. Use one of those in the forward. "
                    f"{_exclude_hint(e.name)}"
                )

    def row_members(self, t: torch.Tensor, what: str, trailing: int) -> torch.Tensor:
        """Member of each row of ``t`` flattened to ``(-1, *t.shape[-trailing:])``."""
        if t.dim() <= trailing or t.shape[0] != self.batch:
            self.batch_error(what, t)
        per = 1
        for s in t.shape[1:t.dim() - trailing]:
            per *= int(s)
        ids = self._rows_cache.get(per)
        if ids is None:
            ids = self.member_ids if per == 1 else self.member_ids.repeat_interleave(per)
            self._rows_cache[per] = ids
        return ids

    def batch_error(self, what: str, t: torch.Tensor) -> None:
        raise RuntimeError(
            f"batched_forward maps row j of its input to member_ids[j], so every perturbed "
            f"op must see the batch ({self.batch} rows) as the first dimension of its input; "
            f"{what} got an input of shape {tuple(t.shape)}. Keep the batch dimension first "
            f"through the model (all other positions of a sample share its member)."
        )

    def per_row_values(self, p: torch.Tensor, e: Optional[EvolvedParam]) -> torch.Tensor:
        """``(R, *p.shape)`` perturbed values of ``p`` per batch row (``p`` if not evolved)."""
        if e is None:
            return p
        delta = e.row_deltas(self.coords, self.member_ids)
        return p.unsqueeze(0) + delta.to(p.dtype)

    # dispatch ----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            return route(self, func, args, kwargs)
        if not _is_metadata(func):
            self.reject(func, (args, kwargs))
        return func(*args, **kwargs)


# -- routes ---------------------------------------------------------------------------------

def _route_linear(mode: RowPerturbationMode, func, args, kwargs):
    a = _bind_linear(args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    we, be = mode.lookup(w), mode.lookup(b)
    mode.reject(func, [x] + [v for k, v in a.items() if k not in ("weight", "bias")])
    if we is None and be is None:
        return func(*args, **kwargs)
    c = mode.coords
    ids = mode.row_members(x, "F.linear", trailing=1)  # (rows,) after flattening x
    m, n = w.shape
    low = we is not None and we.lowrank
    cache = mode.cache if low else None  # the bias cache is read by the low-rank kernel
    served = cache is not None and cache.get(we) is not None and (
        be is None or cache.get(be) is not None)
    seed, epoch = c.seed, c.epoch
    if served and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        # the drawn factors serve the whole forward and no backward regenerates them: the
        # stream coordinates are unused, so compiled code does not specialise on the epoch
        # (one graph serves every context of the same shape)
        seed, epoch = 0, 0
    # one member per leading row, shared by the inner positions: ops expands the ids
    out = ops.perturbed_linear(
        x, w, b, mode.member_ids, seed=seed, weight_key=we.key if low else None,
        bias_key=be.key if be is not None else None, epoch=epoch, rank=c.rank,
        sigma=c.sigma, antithetic=c.antithetic,
        weight_cache=cache.get(we) if cache is not None else None,
        bias_cache=cache.get(be) if cache is not None else None, backend=c.backend,
    )  # (R, ..., m)
    if we is not None and not low:
        dense = _dense_weight_rows(we, c, x.reshape(-1, n), ids, slice(0, m))  # (rows, m)
        out = out + dense.view(out.shape).to(out.dtype)
    mode.consume(we, be, generated=not served)
    return out


def _unfold_patches(x: torch.Tensor, kernel: tuple, stride, padding, dilation,
                    nd: int) -> tuple[torch.Tensor, int]:
    """im2col rows of a conv input: ``(B * L, C * prod(kernel))`` and ``L``."""
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nd
        elif padding == "same":
            pads = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0,) * nd
        else:
            raise ValueError(f"unknown conv padding {padding!r}")
    padding = _tuple(padding, nd)
    if nd == 1:
        x, kernel = x.unsqueeze(2), (1,) + tuple(kernel)
        stride, padding, dilation = (1,) + stride, (0,) + padding, (1,) + dilation
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, Ck, L)
    length = cols.shape[-1]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), length


def _route_conv(nd: int):
    def route(mode: RowPerturbationMode, func, args, kwargs):
        a = _bind_conv(args, kwargs)
        x, w, b = a["input"], a["weight"], a["bias"]
        we, be = mode.lookup(w), mode.lookup(b)
        mode.reject(func, [x] + [v for k, v in a.items() if k not in ("weight", "bias")])
        if we is None and be is None:
            return func(*args, **kwargs)
        c = mode.coords
        if x.dim() != nd + 2:
            mode.batch_error(f"F.conv{nd}d (unbatched input)", x)
        mode.row_members(x, f"F.conv{nd}d", trailing=nd + 1)
        base = func(*args, **kwargs)  # (B, O, *spatial)
        bsz, out_ch = base.shape[0], base.shape[1]
        delta = None
        if we is not None:
            patches, length = _unfold_patches(x, tuple(w.shape[2:]), a["stride"], a["padding"],
                                              a["dilation"], nd)
            if length != base[0, 0].numel():
                raise RuntimeError(f"conv{nd}d: unfolded {length} positions, expected "
                                   f"{base[0, 0].numel()}")
            ids = mode.member_ids.repeat_interleave(length)
            groups = int(a["groups"])
            n, og = we.n, out_ch // groups
            parts = []
            for g in range(groups):
                v = patches[:, g * n:(g + 1) * n]  # (B * L, n)
                if we.lowrank:
                    parts.append(_LowRankBranch.apply(v, ids, c, we.key, 0, n + g * og, og,
                                                      n + we.m))
                else:
                    parts.append(_dense_weight_rows(we, c, v, ids, slice(g * og, (g + 1) * og)))
            d = torch.cat(parts, dim=1) if groups > 1 else parts[0]  # (B * L, O)
            delta = d.view(bsz, length, out_ch).transpose(1, 2).reshape(base.shape)
        if be is not None:
            bd = be.row_deltas(c, mode.member_ids).view(bsz, out_ch, *([1] * nd))
            delta = bd if delta is None else delta + bd
        mode.consume(we, be)
        return base + delta.to(base.dtype)
    return route


_bind_embedding = _python_binder(F.embedding)


def _route_embedding(mode: RowPerturbationMode, func, args, kwargs):
    a = _bind_embedding(args, kwargs)
    idx, w = a["input"], a["weight"]
    we = mode.lookup(w)
    mode.reject(func, [v for k, v in a.items() if k != "weight"])
    if we is None:
        return func(*args, **kwargs)
    c = mode.coords
    ids = mode.row_members(idx, "F.embedding", trailing=0)  # one member per token
    base = func(*args, **kwargs)  # (*idx.shape, dim)
    tok = idx.reshape(-1)
    nidx, sign = member_noise(ids, c.antithetic)
    uniq, inv = torch.unique(nidx, return_inverse=True)
    if we.lowrank:
        a0, _ = ops.lowrank_factors(c.seed, we.key, c.epoch, uniq, we.m, we.n, c.rank,
                                    backend=c.backend)
        rows_a = a0[inv, tok]  # (tokens, r): the A0 row of each token
        delta = torch.zeros(tok.shape[0], we.n, dtype=torch.float32, device=base.device)
        # F_j[0:n] = B0_j, so this adds s_j sigma/sqrt(r) B0_j @ A0_j[tok]
        ops.lowrank_expand_(delta, rows_a.contiguous(), ids, seed=c.seed, key=we.key,
                            epoch=c.epoch, rank=c.rank, row_offset=0, total_rows=we.n + we.m,
                            scale=c.lowrank_scale, antithetic=c.antithetic, backend=c.backend)
    else:
        eps = ops.normal_block(c.seed, we.key, c.epoch, uniq, we.m * we.n,
                               backend=c.backend).view(-1, we.m, we.n)
        delta = eps[inv, tok] * (sign * c.sigma)[:, None]
    mode.consume(we)
    return base + delta.view(base.shape).to(base.dtype)


def _affine(mode, func, a, name_w, name_b, x, view_shape: Callable[[torch.Tensor], tuple],
            call: Callable[[dict], torch.Tensor]):
    """Shared by the norm routes: normalise without affine, then apply per-row affine."""
    w, b = a.get(name_w), a.get(name_b)
    we, be = mode.lookup(w), mode.lookup(b)
    mode.reject(func, [v for k, v in a.items() if k not in (name_w, name_b)])
    if we is None and be is None:
        return None
    mode.row_members(x, _func_name(func), trailing=0)
    plain = dict(a)
    plain[name_w] = None
    if name_b is not None:
        plain[name_b] = None
    y = call(plain)
    for p, e in ((w, we), (b, be)):
        if p is None:
            continue
        if e is None:
            v = p.view(view_shape(p)[1:])
        else:
            v = mode.per_row_values(p, e).view(view_shape(p))
        y = y * v if p is w else y + v
    mode.consume(we, be)
    return y


def _route_norm(fn: Callable, name_w: str, name_b: Optional[str], channel_last: bool):
    bind = _python_binder(fn)

    def route(mode: RowPerturbationMode, func, args, kwargs):
        a = bind(args, kwargs)
        x = a["input"]
        if channel_last:  # affine over the trailing normalized_shape
            def view_shape(p):
                k = len(p.shape)
                return (mode.batch,) + (1,) * (x.dim() - 1 - k) + tuple(p.shape)
        else:  # affine over channel dim 1
            def view_shape(p):
                return (mode.batch, p.shape[0]) + (1,) * (x.dim() - 2)
        out = _affine(mode, func, a, name_w, name_b, x, view_shape, lambda kw: fn(**kw))
        return func(*args, **kwargs) if out is None else out
    return route


_ELEMENTWISE = {
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.true_divide, torch.Tensor.multiply, torch.Tensor.subtract,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.multiply,
    torch.subtract,
}
_ELEMENTWISE_INPLACE = {
    torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.mul_, torch.Tensor.div_,
    torch.Tensor.true_divide_, torch.Tensor.multiply_, torch.Tensor.subtract_,
}


def _route_elementwise(mode: RowPerturbationMode, func, args, kwargs):
    if len(args) < 2:
        mode.reject(func, (args, kwargs))
        return func(*args, **kwargs)
    a0, a1 = args[0], args[1]
    e0, e1 = mode.lookup(a0), mode.lookup(a1)
    mode.reject(func, (args[2:], kwargs))
    if e0 is None and e1 is None:
        return func(*args, **kwargs)
    e, p, other = (e0, a0, a1) if e0 is not None else (e1, a1, a0)
    if (e0 is not None and e1 is not None) or (e0 is not None and func in _ELEMENTWISE_INPLACE) \
            or not isinstance(other, torch.Tensor) or other.dim() < 2:
        mode.reject(func, [p])
    mode.row_members(other, _func_name(func), trailing=0)
    shape = list(p.shape)
    while len(shape) > other.dim() - 1 and shape and shape[0] == 1:
        shape.pop(0)
    if len(shape) > other.dim() - 1:
        mode.reject(func, [p])
    delta = e.row_deltas(mode.coords, mode.member_ids).reshape(mode.batch, *shape)
    rows = p.reshape(shape).unsqueeze(0) + delta.to(p.dtype)  # (R, *shape)
    rows = rows.view(mode.batch, *([1] * (other.dim() - 1 - len(shape))), *shape)
    mode.consume(e)
    new = (rows, a1) if e0 is not None else (a0, rows)
    return func(*new, *args[2:], **kwargs)


_ROUTES: dict = {
    F.linear: _route_linear,
    torch.conv1d: _route_conv(1),
    torch.conv2d: _route_conv(2),
    F.embedding: _route_embedding,
    F.layer_norm: _route_norm(F.layer_norm, "weight", "bias", channel_last=True),
    F.group_norm: _route_norm(F.group_norm, "weight", "bias", channel_last=False),
    F.batch_norm: _route_norm(F.batch_norm, "weight", "bias", channel_last=False),
    F.instance_norm: _route_norm(F.instance_norm, "weight", "bias", channel_last=False),
}
if hasattr(F, "rms_norm"):
    _ROUTES[F.rms_norm] = _route_norm(F.rms_norm, "weight", None, channel_last=True)
for _f in _ELEMENTWISE | _ELEMENTWISE_INPLACE:
    _ROUTES[_f] = _route_elementwise
