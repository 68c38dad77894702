"""Per-row perturbed computation inside the model's own forward.

``batched_forward`` runs ``model(x)`` under :class:`RowPerturbationMode`, a
``TorchFunctionMode`` installed for that one call. Every torch function call passes
through it; calls whose arguments contain an evolved parameter are rerouted so that row
``j`` of the batch computes with member ``member_ids[j]``'s perturbed parameter:

==========================================  ==========================================
op (where the evolved parameter sits)        per-row computation
==========================================  ==========================================
``F.linear`` weight / bias                   ``ops.perturbed_linear`` (low-rank weight,
                                             dense bias noise); OpenES weights: grouped
                                             dense matmul
``x @ W.T``, ``torch.matmul(x, W.t())``,     the same op as ``F.linear(x, W, b)``
``torch.mm``, ``torch.addmm(b, x, W.t())``
``x @ W``, ``torch.addmm(b, x, W)`` (weight  base product + low-rank branch with the
``(in, out)``, e.g. GPT-2's ``Conv1D``)      factors read the other way round
``F.conv1d`` / ``F.conv2d`` weight / bias    base conv + low-rank branch on the unfolded
                                             patches (weight as ``(out, in/groups * k)``)
``F.embedding`` weight                       base lookup + low-rank rows ``A0[idx] B0^T``
``F.layer_norm`` / ``group_norm`` /          normalisation without affine, then the
``batch_norm`` / ``instance_norm`` /         per-row perturbed affine
``rms_norm`` weight / bias
add / sub / mul / div with an activation     the parameter replaced by its per-row
                                             perturbed values (biases, scales)
``F.multi_head_attention_forward``           per-row input / output projections (packed
(``nn.MultiheadAttention``, the              or separate weights), ``bias_k`` /
``nn.Transformer*`` layers)                  ``bias_v``; the attention as PyTorch's
``torch._VF.lstm`` / ``gru`` / ``rnn_*``     the recurrence step by step, input and
and their ``*_cell`` ops (``nn.LSTM``,       hidden projections through the perturbed
``nn.GRU``, ``nn.RNN`` and the cells)        linear op
==========================================  ==========================================

Rows: ``batched_forward``'s input carries the batch in its first dimension, and the mode
follows it through the forward (:class:`BatchLayout`: transposes, permutes and reshapes
move or merge it; elementwise ops broadcast it). Linear, matmul, embedding, norm-affine
and elementwise routes take the batch in any dimension before the features, attention and
recurrent routes where PyTorch's layout puts it (``batch_first`` or not), convolutions
and channel norms in the first dimension; all other positions of a sample (sequence
steps, pixels) share the sample's member.

Batch-free inputs: an input of a perturbed linear, matmul or embedding op that is not
computed from the batch and whose first dimension is not the batch (``wpe(torch.arange
(T))``, a constant vector) is computed once per batch row: the result gets the batch as a
new leading dimension, ``(R, ...)``, or in place of a leading size-1 dimension (GPT-2's
``arange(T)[None]``, the unbatched model's broadcast batch), and broadcasts against the
batch as the unperturbed result would. A tensor not computed from the batch whose first
dimension has R entries counts as batched (a hidden state kept from an earlier call); where
that or the batch's new place would pair rows of different members (``arange(T)`` with
``T == R`` added to ``(R, T, C)`` embeddings), the op that combines them raises a
RuntimeError. Under ``torch.compile`` nothing is followed: perturbed ops
then need the batch as their input's first dimension.

An op that receives an evolved parameter anywhere else (``W @ x``, ``torch.einsum``,
``F.prelu`` ...) raises a RuntimeError naming the parameter: nothing is ever silently
evaluated unperturbed. The same holds at ``setup`` for parameters of module types whose
forward is known not to go through the ops above (:func:`check_supported_modules`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .evolved import EvolvedParam, EvolvedSet, NoiseCoords
from .factor_cache import FactorCache
from .noise import member_noise

__all__ = ["RowPerturbationMode", "check_supported_modules", "UNSUPPORTED_MODULE_TYPES"]

# Module types whose parameters never reach a routed op in the way we perturb per row.
UNSUPPORTED_MODULE_TYPES: tuple = (
    nn.PReLU,
    nn.Bilinear,
    nn.EmbeddingBag,
    nn.Conv3d,
    nn.modules.conv._ConvTransposeNd,
)

_SUPPORTED_OPS = (
    "F.linear, x @ W.T / x @ W / torch.matmul / torch.mm / torch.addmm with the weight on "
    "the right, F.conv1d/F.conv2d, F.embedding, F.layer_norm/group_norm/batch_norm/"
    "instance_norm/rms_norm, elementwise add/sub/mul/div with an activation, "
    "nn.MultiheadAttention and the recurrent layers and cells"
)


def _exclude_hint(name: str) -> str:
    return (f"Leave it out of evolution with setup(model, exclude=[{name!r}]) "
            f"(or strategy.freeze({name!r}) / ESModule.freeze_parameter).")


def _unsupported(module: nn.Module) -> Optional[str]:
    """Why the parameters of ``module`` cannot be perturbed per row, or None."""
    if isinstance(module, UNSUPPORTED_MODULE_TYPES):
        return (f"a {type(module).__name__}, whose forward does not go through ops that "
                f"batched_forward can perturb per row ({_SUPPORTED_OPS})")
    if isinstance(module, nn.LSTM) and module.proj_size > 0:
        return ("an LSTM with proj_size > 0, whose projected recurrence batched_forward does "
                "not perturb per row")
    return None


def check_supported_modules(root: nn.Module, names: Sequence[str]) -> None:
    """Reject evolved parameters owned by (or nested in) a module we cannot perturb.

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
            why = _unsupported(mod)
            if why is not None:
                raise ValueError(f"parameter {name!r} belongs to {why}. {_exclude_hint(name)}")


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

def _lowrank_branch(c: NoiseCoords, we: EvolvedParam, v: torch.Tensor, ids: torch.Tensor,
                    project: slice, expand: slice) -> torch.Tensor:
    """``s_j sigma/sqrt(r) F_j[expand] (F_j[project]^T v[j])`` of the evolved weight ``we``
    for ``v (rows, len(project))``: ``(rows, len(expand))`` float32 (see
    :func:`evotorch_eggroll.ops.lowrank_branch`; the rows come from ``we``'s
    :class:`~evotorch_eggroll.noise.FactorLayout`)."""
    return ops.lowrank_branch(v, ids, seed=c.seed, key=we.key, epoch=c.epoch,
                              layout=we.layout(c.rank), project=project, expand=expand,
                              sigma=c.sigma, antithetic=c.antithetic, backend=c.backend)


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
                       row_ids: torch.Tensor, out_slice: slice,
                       transposed: bool = False) -> torch.Tensor:
    """Full-rank (OpenES) weight noise applied per row: ``s_j sigma E_j[out_slice] @ v[j]``
    (``E_j^T[out_slice] @ v[j]`` when ``transposed``).

    ``v (rows, D)`` with ``D = ep.n`` (``ep.m`` when ``transposed``); returns
    ``(rows, len(out_slice))`` float32.
    """
    idx, sign = member_noise(row_ids, coords.antithetic)
    uniq, inv = torch.unique(idx, return_inverse=True)
    eps = ops.normal_block(coords.seed, ep.key, coords.epoch, uniq, ep.m * ep.n,
                           backend=coords.backend).view(-1, ep.m, ep.n)
    if transposed:
        eps = eps.transpose(1, 2)
    mats = eps[:, out_slice]  # (K, M, D)
    res = _grouped_matvec(v.float(), inv, mats)
    return res * (sign * coords.sigma)[:, None]


# -- where the batch sits -------------------------------------------------------------------

class BatchLayout(NamedTuple):
    """Where the batch of ``batched_forward`` sits in a tensor derived from its input.

    Dimension ``dim`` holds ``R * per`` entries and batch row ``j`` owns entries
    ``j * per .. j * per + per - 1``: ``per > 1`` once the batch was merged with the
    dimensions behind it (``x.view(-1, n)`` of an ``(R, T, n)`` input has ``per = T``).
    """

    dim: int
    per: int = 1


ROWS = BatchLayout(0, 1)
_LOST = BatchLayout(-1, 0)  # derived from the batch, which is no longer one dimension

_SWAPS = {torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.Tensor.swapaxes,
          torch.swapdims, torch.Tensor.swapdims}
_PERMUTES = {torch.permute, torch.Tensor.permute}
_MOVEDIMS = {torch.movedim, torch.Tensor.movedim, torch.moveaxis, torch.Tensor.moveaxis}
_MATRIX_TRANSPOSES = {torch.t, torch.Tensor.t}
_RESHAPES = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.view_as,
             torch.Tensor.reshape_as, torch.flatten, torch.Tensor.flatten, torch.unflatten,
             torch.Tensor.unflatten, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze,
             torch.Tensor.unsqueeze}


def _getter_name(func: Callable) -> str:
    """The attribute name of a property getter (``Tensor.T``'s ``__get__``), else ''."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return getattr(owner, "__name__", "")
    return ""


def _dims_arg(args: tuple, kwargs: dict, name: str) -> tuple:
    """The dims of ``permute``-like calls given as varargs or as one sequence."""
    if name in kwargs:
        v = kwargs[name]
    elif len(args) == 2 and not isinstance(args[1], int):
        v = args[1]
    else:
        v = args[1:]
    return tuple(int(d) for d in (v if isinstance(v, (tuple, list, torch.Size)) else (v,)))


def _moved_dim(func: Callable, args: tuple, kwargs: dict, ndim: int, d: int) -> Optional[int]:
    """Position of dimension ``d`` of ``args[0]`` in the result of a dimension-reordering op,
    or None when ``func`` does not reorder dimensions."""
    if func in _SWAPS:
        names = ("dim0", "dim1") if func in (torch.transpose, torch.Tensor.transpose) else \
            ("axis0", "axis1") if func in (torch.swapaxes, torch.Tensor.swapaxes) else \
            ("dim0", "dim1")
        a = kwargs.get(names[0], args[1] if len(args) > 1 else None)
        b = kwargs.get(names[1], args[2] if len(args) > 2 else None)
        a, b = int(a) % ndim, int(b) % ndim
        return b if d == a else a if d == b else d
    if func in _PERMUTES:
        dims = [x % ndim for x in _dims_arg(args, kwargs, "dims")]
        return dims.index(d)
    if func in _MOVEDIMS:
        def as_list(v):
            return [int(x) % ndim for x in (v if isinstance(v, (tuple, list)) else (v,))]
        src = as_list(kwargs.get("source", args[1] if len(args) > 1 else None))
        dst = as_list(kwargs.get("destination", args[2] if len(args) > 2 else None))
        if d in src:
            return dst[src.index(d)]
        rest = [i for i in range(ndim) if i not in src]  # keep their order in the free slots
        free = [i for i in range(ndim) if i not in dst]
        return free[rest.index(d)]
    if func in _MATRIX_TRANSPOSES:
        return d if ndim < 2 else 1 - d
    name = _getter_name(func)
    if name in ("T", "H"):
        return ndim - 1 - d
    if name in ("mT", "mH"):
        return 2 * ndim - 3 - d if d >= ndim - 2 else d  # the last two swap
    return None


def _reshaped_layout(src: torch.Tensor, lay: BatchLayout, out: torch.Tensor,
                     batch: int) -> BatchLayout:
    """Layout after an op that keeps the elements in row-major order (view, reshape, ...)."""
    if lay.per == 1:  # the batch dimension itself kept whole, after as many elements
        before = math.prod(src.shape[:lay.dim])
        seen = 1
        for i, size in enumerate(out.shape):
            if seen == before and size == batch:
                return BatchLayout(i, 1)
            seen *= size
            if seen > before:
                break
    if lay.dim == 0 and out.dim() >= 1:  # merged with (or split from) the dims behind it
        block = src.numel() // batch  # elements of one batch row
        row = math.prod(out.shape[1:])
        if row and block % row == 0 and out.shape[0] == batch * (block // row):
            return BatchLayout(0, block // row)
    return _LOST


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

    Outside ``torch.compile`` the mode follows the batch through the forward: the input
    (see :meth:`mark`) and every tensor computed from it record where the batch sits
    (:class:`BatchLayout`), through transposes, permutes and reshapes, so that an op can
    tell an input that carries the batch from one that does not (:meth:`layout`).
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
        self._rows_cache: dict = {}
        # compiled code cannot key dictionaries by tensor identity: no tracking there
        tracking = not torch.compiler.is_compiling()
        self._layouts: Optional[WeakIdKeyDictionary] = WeakIdKeyDictionary() if tracking else None
        # tensors that are an evolved 2-D weight seen through a transpose: (entry, transposed)
        self._views: Optional[WeakIdKeyDictionary] = WeakIdKeyDictionary() if tracking else None
        self._marked = False

    # helpers ---------------------------------------------------------------------------

    def lookup(self, obj: Any) -> Optional[EvolvedParam]:
        # Evolved entries are Parameters; testing the type first keeps other tensors
        # (activations) away from id(), which torch.compile cannot trace for them.
        return self.evolved.lookup(obj) if isinstance(obj, torch.nn.Parameter) else None

    def weight_view(self, obj: Any) -> Optional[tuple[EvolvedParam, bool]]:
        """``(entry, transposed)`` when ``obj`` is an evolved 2-D parameter (``False``) or a
        transpose of one (``True``: ``obj`` is ``W.T``), else None."""
        e = self.lookup(obj)
        if e is not None:
            return (e, False) if e.param.dim() == 2 else None
        if self._views and isinstance(obj, torch.Tensor):
            return self._views.get(obj)
        return None

    def consume(self, *entries: Optional[EvolvedParam], generated: bool = True) -> None:
        """Mark parameters as perturbed in this forward (``generated``: their noise was
        generated here rather than read from the cache)."""
        for e in entries:
            if e is not None:
                self.consumed.add(id(e.param))
                self.generated = self.generated or generated

    def reject(self, func: Callable, values: Any) -> None:
        """Raise if an evolved parameter (or a transpose of one) occurs among ``values``."""
        for leaf in tree_leaves(values):
            e = self.lookup(leaf)
            if e is None and self._views and isinstance(leaf, torch.Tensor):
                view = self._views.get(leaf)
                e = view[0] if view is not None else None
            if e is not None:
                raise RuntimeError(
                    f"parameter {e.name!r} reaches {_func_name(func)}, which batched_forward "
                    f"cannot perturb per row; it perturbs evolved parameters consumed by "
                    f"{_SUPPORTED_OPS}. Use one of those in the forward. "
                    f"{_exclude_hint(e.name)}"
                )

    # where the batch sits ----------------------------------------------------------------

    def mark(self, out: Any, layout: BatchLayout) -> None:
        """Record that the tensors in ``out`` carry the batch as ``layout`` (no-op while
        compiling)."""
        self._marked = True
        if self._layouts is None:
            return
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._layouts[leaf] = layout

    def layout(self, t: torch.Tensor, trailing: int = 0) -> Optional[BatchLayout]:
        """Where the batch sits in ``t``: a :class:`BatchLayout`, ``_LOST`` (``t`` was
        computed from the batch, which is no longer one of its dimensions) or None (``t``
        does not carry the batch: batch-free).

        A tensor not computed from the input whose first dimension has R entries counts as
        batched (``ROWS``): a hidden state kept from an earlier call, say; unless that
        dimension is one of the op's ``trailing`` feature dimensions. While compiling
        nothing is tracked: such tensors are ``ROWS``, every other one ``_LOST``.
        """
        first_is_batch = t.dim() > trailing and t.shape[0] == self.batch
        if self._layouts is None:
            return ROWS if first_is_batch else _LOST
        known = self._layouts.get(t)
        if known is None:
            return ROWS if first_is_batch else None
        if known is not _LOST and t.dim() > known.dim \
                and t.shape[known.dim] == self.batch * known.per:
            return known
        return _LOST

    def _propagate(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Give the outputs of an op that read a tensor carrying the batch their layout.

        Raises:
            RuntimeError: the op combined tensors whose batches land in different
                dimensions of its output (broadcasting would pair every row with every
                other row).
        """
        sources = []
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                known = self._layouts.get(leaf)
                if known is not None:
                    sources.append((leaf, known))
        if not sources:
            return
        for o in tree_leaves(out):
            if not isinstance(o, torch.Tensor):
                continue
            found = {self._layout_after(func, args, kwargs, src, lay, o) for src, lay in sources}
            found.discard(_LOST)
            if len(found) > 1:
                dims = sorted(lay.dim for lay in found)
                raise RuntimeError(
                    f"{_func_name(func)} combines tensors whose batch ({self.batch} rows) "
                    f"lands in different dimensions ({dims}) of its result of shape "
                    f"{tuple(o.shape)}, which would pair rows of different members. A "
                    f"batch-free tensor given to a perturbed op gets the batch as a new "
                    f"leading dimension (or in place of a leading size-1 one), and a tensor "
                    f"not computed from the batch whose "
                    f"first dimension has {self.batch} entries counts as batched: keep "
                    f"batch-free inputs of perturbed ops without a leading batch-sized "
                    f"dimension, or give them the batch explicitly (expand to {self.batch} rows)."
                )
            self._layouts[o] = found.pop() if found else _LOST

    def _layout_after(self, func, args, kwargs, src, lay, o) -> BatchLayout:
        if lay is _LOST or src.dim() <= lay.dim or \
                src.shape[lay.dim] != self.batch * lay.per:
            return _LOST
        if args and args[0] is src:
            if func in _RESHAPES:
                return _reshaped_layout(src, lay, o, self.batch)
            moved = _moved_dim(func, args, kwargs, src.dim(), lay.dim)
            if moved is not None:
                return BatchLayout(moved, lay.per) if o.dim() == src.dim() else _LOST
        # elementwise ops, broadcasting and most others: dimensions aligned from the right
        d = lay.dim + o.dim() - src.dim()
        if 0 <= d < o.dim() and o.shape[d] == src.shape[lay.dim]:
            return BatchLayout(d, lay.per)
        if lay.dim == 0 and o.dim() >= 1 and o.shape[0] == src.shape[0]:
            return lay  # a trailing dimension was reduced or indexed away
        return _LOST

    def rows(self, t: torch.Tensor, what: str, trailing: int,
             broadcast: bool = False) -> tuple[torch.Tensor, torch.Tensor, BatchLayout]:
        """Per-row members of the op input ``t`` whose last ``trailing`` dims are features.

        Returns ``(t, ids, layout)``: ``ids (rows,)`` is the member of every row of
        ``t.reshape(-1, *t.shape[t.dim() - trailing:])``. A batch-free ``t`` (see
        :meth:`layout`) is, with ``broadcast``, expanded to ``(R, *t.shape)`` (or, when its
        first dimension has size 1 and is not a feature dimension, to ``(R, *t.shape[1:])``)
        so that the op computes it once per batch row (the returned ``t``); without, it is an
        error, as is a tensor computed from the batch whose batch is gone or among the
        features.
        """
        lay = self.layout(t, trailing)
        if lay is None and broadcast:
            # a leading size-1 dimension is the unbatched model's broadcast batch: it becomes
            # the R rows; any other batch-free input gets them as a new leading dimension
            lead_one = t.dim() > trailing and t.shape[0] == 1
            t = t.expand(self.batch, *t.shape[1:]) if lead_one else t.expand(self.batch, *t.shape)
            lay = ROWS
        if lay is None or lay is _LOST or lay.dim >= t.dim() - trailing:
            self.batch_error(what, t, lay)
        lead = tuple(t.shape[:t.dim() - trailing])
        key = (lead, lay)
        ids = self._rows_cache.get(key)
        if ids is None:
            ids = self.ids_per(lay.per)
            if len(lead) > 1:
                shape = [1] * len(lead)
                shape[lay.dim] = -1
                ids = ids.view(shape).expand(lead).reshape(-1)
            self._rows_cache[key] = ids
        return t, ids, lay

    def row_members(self, t: torch.Tensor, what: str, trailing: int) -> torch.Tensor:
        """Member of each row of ``t`` flattened to ``(-1, *t.shape[-trailing:])``, for ops
        that need the batch as the first dimension of ``t``."""
        t, ids, lay = self.rows(t, what, trailing)
        if lay != ROWS:
            self.batch_error(what, t, lay)
        return ids

    def batch_error(self, what: str, t: torch.Tensor, lay: Optional[BatchLayout] = ROWS) -> None:
        if lay is None:
            why = ("that input does not carry the batch (it is not computed from the "
                   "batched_forward input and its first dimension is not the batch)")
        elif lay is _LOST:
            why = ("that input was computed from the batch, but the batch is no longer one "
                   "of its dimensions (a reduction over it, a concatenation along it, or a "
                   "reshape that mixed it with other dimensions)")
        else:
            why = f"its batch sits in dimension {lay.dim}"
        raise RuntimeError(
            f"batched_forward maps row j of its input to member_ids[j], so every perturbed "
            f"op must see the batch ({self.batch} rows) as a dimension of its input (the "
            f"leading dimension where the op has no other place for it); {what} got an input "
            f"of shape {tuple(t.shape)}: {why}. Keep the batch dimension first through the "
            f"model (all other positions of a sample share its member)."
        )

    def ids_per(self, per: int) -> torch.Tensor:
        """``(R * per,)``: each row's member id repeated ``per`` times (built once per call
        of ``batched_forward`` for each ``per``)."""
        if per == 1:
            return self.member_ids
        ids = self._rows_cache.get(per)
        if ids is None:
            ids = self._rows_cache[per] = self.member_ids.repeat_interleave(per)
        return ids

    def per_row_values(self, p: torch.Tensor, e: Optional[EvolvedParam],
                       per: int = 1) -> torch.Tensor:
        """``(R * per, *p.shape)`` perturbed values of ``p`` per batch row, each repeated
        ``per`` times (``p`` itself if not evolved)."""
        if e is None:
            return p
        delta = e.row_deltas(self.coords, self.ids_per(per))
        return p.unsqueeze(0) + delta.to(p.dtype)

    # dispatch ----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_metadata(func):
            return func(*args, **kwargs)
        route = _ROUTES.get(func)
        if route is None and _getter_name(func) in ("T", "mT"):
            route = _route_transpose
        self._marked = False
        if route is not None:
            out = route(self, func, args, kwargs)
        else:
            self.reject(func, (args, kwargs))
            out = func(*args, **kwargs)
        if not self._marked and self._layouts is not None:
            self._propagate(func, args, kwargs, out)
        return out


# -- routes ---------------------------------------------------------------------------------

def _linear_rows(mode: RowPerturbationMode, x: torch.Tensor, w: torch.Tensor,
                 b: Optional[torch.Tensor], we: Optional[EvolvedParam],
                 be: Optional[EvolvedParam], what: str) -> torch.Tensor:
    """``F.linear(x, w, b)`` with each row's perturbation of the evolved ``w``/``b``.

    ``x (..., n)`` carries the batch in any dimension but the last; a batch-free ``x`` is
    computed once per batch row: ``(R, *x.shape[:-1], m)``.
    """
    c = mode.coords
    x, ids, lay = mode.rows(x, what, trailing=1, broadcast=True)  # ids: (rows,)
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
    # batch first: one member per leading row, shared by the inner positions (ops expands
    # the ids); elsewhere: one member per row of x
    row_ids = mode.member_ids if lay == ROWS else ids.view(x.shape[:-1])
    out = ops.perturbed_linear(
        x, w, b, row_ids, seed=seed, weight_key=we.key if low else None,
        bias_key=be.key if be is not None else None, epoch=epoch, rank=c.rank,
        sigma=c.sigma, antithetic=c.antithetic,
        weight_cache=cache.get(we) if cache is not None else None,
        bias_cache=cache.get(be) if cache is not None else None, backend=c.backend,
    )  # (..., m)
    if we is not None and not low:
        dense = _dense_weight_rows(we, c, x.reshape(-1, n), ids, slice(0, m))  # (rows, m)
        out = out + dense.view(out.shape).to(out.dtype)
    mode.consume(we, be, generated=not served)
    mode.mark(out, lay)
    return out


def _route_linear(mode: RowPerturbationMode, func, args, kwargs):
    a = _bind_linear(args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    we, be = mode.lookup(w), mode.lookup(b)
    mode.reject(func, [x] + [v for k, v in a.items() if k not in ("weight", "bias")])
    if we is None and be is None:
        return func(*args, **kwargs)
    return _linear_rows(mode, x, w, b, we, be, "F.linear")


def _right_matmul_rows(mode: RowPerturbationMode, x: torch.Tensor, we: EvolvedParam,
                       what: str) -> torch.Tensor:
    """``x @ W`` with each row's perturbation of the evolved ``W (m, n)``: ``x (..., m)``.

    ``x (W + P) = x W + s sigma/sqrt(r) (x A0) B0^T``: the factor block's rows are read the
    other way round than by a linear layer (``A0`` projects, ``B0`` expands).
    """
    c = mode.coords
    w = we.param
    m, n = w.shape
    if x.dim() < 1 or x.shape[-1] != m:
        raise RuntimeError(f"{what}: an input of shape {tuple(x.shape)} cannot be multiplied "
                           f"by {we.name!r} of shape {tuple(w.shape)}")
    x, ids, lay = mode.rows(x, what, trailing=1, broadcast=True)
    base = torch.matmul(x, w)  # (..., n)
    v = x.reshape(-1, m)
    if we.lowrank:
        layout = we.layout(c.rank)
        delta = _lowrank_branch(c, we, v, ids, layout.a_rows, layout.b_rows)  # (rows, n)
    else:
        delta = _dense_weight_rows(we, c, v, ids, slice(0, n), transposed=True)
    mode.consume(we)
    out = base + delta.view(base.shape).to(base.dtype)
    mode.mark(out, lay)
    return out


def _matmul_rows(mode: RowPerturbationMode, x: torch.Tensor, view: tuple[EvolvedParam, bool],
                 what: str, bias: Optional[torch.Tensor] = None,
                 be: Optional[EvolvedParam] = None) -> torch.Tensor:
    """``x @ V`` where ``V`` is an evolved weight ``W`` or its transpose ``W.T``; with the
    transpose (a linear layer of ``W``) plus ``bias`` (evolved as ``be``) if given."""
    e, transposed = view
    if transposed:  # x @ W.T is a linear layer of W
        if x.dim() < 1 or x.shape[-1] != e.param.shape[1]:
            raise RuntimeError(f"{what}: an input of shape {tuple(x.shape)} cannot be "
                               f"multiplied by the transpose of {e.name!r} of shape "
                               f"{tuple(e.param.shape)}")
        return _linear_rows(mode, x, e.param, bias, e, be, what)
    assert bias is None, "a bias goes with the transposed view (a linear layer) only"
    return _right_matmul_rows(mode, x, e, what)


def _bias_rows(mode: RowPerturbationMode, bias: torch.Tensor, be: Optional[EvolvedParam],
               out: torch.Tensor, lay: BatchLayout) -> torch.Tensor:
    """A bias to add to ``out`` (whose batch sits as ``lay`` says): per-row values of an
    evolved 1-D bias, or ``bias`` itself."""
    if be is None:
        return bias
    if bias.dim() != 1 or lay.dim >= out.dim() - 1:
        mode.reject(torch.addmm, [bias])
    values = mode.per_row_values(bias, be, lay.per)  # (R * per, k)
    shape = [1] * out.dim()
    shape[lay.dim], shape[-1] = values.shape[0], values.shape[1]
    mode.consume(be)
    return values.view(shape)


_LEFT_WEIGHT = ("computes W @ x with an evolved weight W on the left; batched_forward "
                "perturbs an evolved 2-D weight in the positions of a linear layer: "
                "x @ W.T, torch.matmul(x, W.t()), F.linear(x, W) (weight (out, in)), or "
                "x @ W and torch.addmm(bias, x, W) (weight (in, out)), x carrying the batch")


def _route_transpose(mode: RowPerturbationMode, func, args, kwargs):
    """``W.T``, ``W.t()``, ``W.transpose(0, 1)`` ... of an evolved 2-D weight: a view that
    the matmul routes recognise (every other use of it is an error)."""
    view = mode.weight_view(args[0]) if args else None
    if view is None or mode._views is None:
        mode.reject(func, (args, kwargs))
        return func(*args, **kwargs)
    mode.reject(func, (args[1:], kwargs))
    moved = _moved_dim(func, args, kwargs, 2, 0)
    out = func(*args, **kwargs)
    mode._views[out] = (view[0], view[1] != (moved == 1))
    mode._marked = True
    return out


def _route_matmul(mode: RowPerturbationMode, func, args, kwargs):
    if func is torch.Tensor.__rmatmul__:
        x, w = args[1], args[0]  # other @ self
    else:
        names = ("input", "mat2") if func in (torch.mm, torch.Tensor.mm) else ("input", "other")
        a = _binder(names, {})(args, kwargs)
        x, w = a.get(names[0]), a.get(names[1])
    vx, vw = mode.weight_view(x), mode.weight_view(w)
    if vx is None and vw is None:
        mode.reject(func, (args, kwargs))
        return func(*args, **kwargs)
    name = _func_name(func)
    if vx is not None:
        raise RuntimeError(f"parameter {vx[0].name!r} reaches {name}, which {_LEFT_WEIGHT}. "
                           f"{_exclude_hint(vx[0].name)}")
    if kwargs.get("out") is not None:
        raise RuntimeError(f"{name} with out= cannot take an evolved weight in batched_forward")
    mode.reject(func, [x])
    return _matmul_rows(mode, x, vw, name)


_bind_addmm = _binder(("input", "mat1", "mat2"), {"beta": 1, "alpha": 1})


def _route_addmm(mode: RowPerturbationMode, func, args, kwargs):
    a = _bind_addmm(args, kwargs)
    bias, x, w = a["input"], a["mat1"], a["mat2"]
    vx, vw, be = mode.weight_view(x), mode.weight_view(w), mode.lookup(bias)
    if vx is None and vw is None and be is None:
        mode.reject(func, (args, kwargs))
        return func(*args, **kwargs)
    name = _func_name(func)
    if vx is not None:
        raise RuntimeError(f"parameter {vx[0].name!r} reaches {name} as mat1, which "
                           f"{_LEFT_WEIGHT}. {_exclude_hint(vx[0].name)}")
    if a.get("out") is not None:
        raise RuntimeError(f"{name} with out= cannot take an evolved parameter in "
                           f"batched_forward")
    beta, alpha = a["beta"], a["alpha"]
    mode.reject(func, [x, beta, alpha])
    if be is not None and bias.dim() != 1:
        mode.reject(func, [bias])
    if vw is None:  # an evolved bias beside a plain weight
        mode.reject(func, [w])
        _, _, lay = mode.rows(x, name, trailing=1)  # the batch must be in the rows of x
        y = torch.mm(x, w)
        if alpha != 1:
            y = y * alpha
        out = y + _bias_rows(mode, bias, be, y, lay)
        mode.mark(out, lay)
        return out
    if alpha == 1 and beta == 1 and vw[1] and bias.dim() == 1:  # bias + x @ W.T: F.linear
        return _matmul_rows(mode, x, vw, name, bias, be)
    y = _matmul_rows(mode, x, vw, name)
    lay = mode.layout(y, trailing=1)
    if alpha != 1:
        y = y * alpha
    if beta == 0:
        out = y
    else:
        b = _bias_rows(mode, bias, be, y, lay)
        out = y + (b if beta == 1 else beta * b)
    mode.mark(out, lay)
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
            mode.batch_error(f"F.conv{nd}d (unbatched input)", x, None)
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
            ids = mode.ids_per(length)
            groups = int(a["groups"])
            n, og = we.n, out_ch // groups
            parts = []
            for g in range(groups):
                v = patches[:, g * n:(g + 1) * n]  # (B * L, n)
                if we.lowrank:
                    layout = we.layout(c.rank)
                    parts.append(_lowrank_branch(c, we, v, ids, layout.b_rows,
                                                 layout.a_part(slice(g * og, (g + 1) * og))))
                else:
                    parts.append(_dense_weight_rows(we, c, v, ids, slice(g * og, (g + 1) * og)))
            d = torch.cat(parts, dim=1) if groups > 1 else parts[0]  # (B * L, O)
            delta = d.view(bsz, length, out_ch).transpose(1, 2).reshape(base.shape)
        if be is not None:
            bd = be.row_deltas(c, mode.member_ids).view(bsz, out_ch, *([1] * nd))
            delta = bd if delta is None else delta + bd
        mode.consume(we, be)
        out = base + delta.to(base.dtype)
        mode.mark(out, ROWS)
        return out
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
    # one member per token; batch-free indices (positions) are looked up once per row
    idx, ids, lay = mode.rows(idx, "F.embedding", trailing=0, broadcast=True)
    a["input"] = idx
    base = func(**a)  # (*idx.shape, dim)
    tok = idx.reshape(-1)
    nidx, sign = member_noise(ids, c.antithetic)
    uniq, inv = torch.unique(nidx, return_inverse=True)
    if we.lowrank:
        a0, _ = ops.lowrank_factors(c.seed, we.key, c.epoch, uniq, we.m, we.n, c.rank,
                                    backend=c.backend)
        rows_a = a0[inv, tok]  # (tokens, r): the A0 row of each token
        delta = torch.zeros(tok.shape[0], we.n, dtype=torch.float32, device=base.device)
        # F_j[b_rows] = B0_j, so this adds s_j sigma/sqrt(r) B0_j @ A0_j[tok]
        layout = we.layout(c.rank)
        ops.lowrank_expand_(delta, rows_a.contiguous(), ids, seed=c.seed, key=we.key,
                            epoch=c.epoch, rank=c.rank, row_offset=layout.b_offset,
                            total_rows=layout.rows,
                            scale=c.lowrank_scale, antithetic=c.antithetic, backend=c.backend)
    else:
        eps = ops.normal_block(c.seed, we.key, c.epoch, uniq, we.m * we.n,
                               backend=c.backend).view(-1, we.m, we.n)
        delta = eps[inv, tok] * (sign * c.sigma)[:, None]
    mode.consume(we)
    out = base + delta.view(base.shape).to(base.dtype)
    mode.mark(out, lay)
    return out


def _batch_view(values: torch.Tensor, lay: BatchLayout, ndim: int, k: int) -> torch.Tensor:
    """``values (R * per, *pshape)`` viewed to broadcast against a tensor of ``ndim``
    dimensions whose batch sits as ``lay`` says and whose last ``k`` dims match ``pshape``."""
    pshape = tuple(values.shape[1:])
    return values.view(*([1] * lay.dim), values.shape[0],
                       *([1] * (ndim - 1 - lay.dim - k)), *pshape)


def _affine(mode, func, a, name_w, name_b, x, channel_last: bool,
            call: Callable[[dict], torch.Tensor]):
    """Shared by the norm routes: normalise without affine, then apply per-row affine
    (over the trailing dims of ``x`` when ``channel_last``, else over dim 1)."""
    w, b = a.get(name_w), a.get(name_b)
    we, be = mode.lookup(w), mode.lookup(b)
    mode.reject(func, [v for k, v in a.items() if k not in (name_w, name_b)])
    if we is None and be is None:
        return None
    what = _func_name(func)
    k = (w if w is not None else b).dim() if channel_last else 0
    if channel_last:
        _, _, lay = mode.rows(x, what, trailing=k)  # the batch anywhere before the affine
    else:
        mode.row_members(x, what, trailing=0)  # channels in dim 1: the batch first
        lay = ROWS
    plain = dict(a)
    plain[name_w] = None
    if name_b is not None:
        plain[name_b] = None
    y = call(plain)
    for p, e in ((w, we), (b, be)):
        if p is None:
            continue
        if channel_last:
            v = p if e is None else _batch_view(mode.per_row_values(p, e, lay.per), lay,
                                                x.dim(), k)
        else:
            v = p.view(p.shape[0], *([1] * (x.dim() - 2)))
            if e is not None:
                v = mode.per_row_values(p, e).view(mode.batch, *v.shape)
        y = y * v if p is w else y + v
    mode.consume(we, be)
    mode.mark(y, lay)
    return y


def _route_norm(fn: Callable, name_w: str, name_b: Optional[str], channel_last: bool):
    bind = _python_binder(fn)

    def route(mode: RowPerturbationMode, func, args, kwargs):
        a = bind(args, kwargs)
        out = _affine(mode, func, a, name_w, name_b, a["input"], channel_last,
                      lambda kw: fn(**kw))
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
    shape = list(p.shape)
    while len(shape) > other.dim() - 1 and shape and shape[0] == 1:
        shape.pop(0)
    if len(shape) > other.dim() - 1:
        mode.reject(func, [p])
    # the batch of the activation anywhere before the dims the parameter broadcasts over
    _, _, lay = mode.rows(other, _func_name(func), trailing=len(shape))
    rows = mode.per_row_values(p, e, lay.per).reshape(-1, *shape)  # (R * per, *shape)
    rows = _batch_view(rows, lay, other.dim(), len(shape))
    mode.consume(e)
    new = (rows, a1) if e0 is not None else (a0, rows)
    out = func(*new, *args[2:], **kwargs)
    mode.mark(out, lay)
    return out


# -- attention ---------------------------------------------------------------------------------

def _linear_part(mode: RowPerturbationMode, x: torch.Tensor, w: torch.Tensor,
                 we: Optional[EvolvedParam], rows: slice, b: Optional[torch.Tensor],
                 be: Optional[EvolvedParam], bias_rows: slice,
                 bias_deltas: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, w[rows], b[bias_rows])`` per batch row, perturbed as the whole evolved
    ``w``/``b`` are (``x (R, ..., n)`` batch first): the projections packed in one weight.
    ``bias_deltas()``: the ``(R, len(b))`` per-row noise of the evolved ``b``, drawn once for
    every part of the same call."""
    if rows == slice(0, w.shape[0]) and (b is None or bias_rows == slice(0, b.shape[0])):
        return _linear_rows(mode, x, w, b, we, be, "F.multi_head_attention_forward")
    c = mode.coords
    n = w.shape[1]
    out = F.linear(x, w[rows], None if b is None else b[bias_rows])  # (R, ..., k)
    if we is not None:
        ids = mode.row_members(x, "F.multi_head_attention_forward", trailing=1)
        v = x.reshape(-1, n)
        if we.lowrank:
            layout = we.layout(c.rank)
            d = _lowrank_branch(c, we, v, ids, layout.b_rows, layout.a_part(rows))
        else:
            d = _dense_weight_rows(we, c, v, ids, rows)
        out = out + d.view(out.shape).to(out.dtype)
    if be is not None:
        bd = bias_deltas()[:, bias_rows]  # (R, k)
        out = out + bd.view(bd.shape[0], *([1] * (x.dim() - 2)), bd.shape[1]).to(out.dtype)
    mode.consume(we, be)
    return out


_MHA_PARAMS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight",
               "out_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_bind_mha = _python_binder(F.multi_head_attention_forward)


def _mha_batch_first(mode: RowPerturbationMode, t: torch.Tensor, what: str) -> torch.Tensor:
    """``(L, N, E)`` attention input -> ``(N, L, E)``, checking that N is the batch."""
    _check_batch_dim(mode, t, 1, f"F.multi_head_attention_forward's {what}", ndim=3)
    return t.transpose(0, 1)


def _route_mha(mode: RowPerturbationMode, func, args, kwargs):
    """``nn.MultiheadAttention``'s functional forward with per-row projections.

    Computes what ``F.multi_head_attention_forward`` does, batch first: the input
    projections (packed or separate weights) and the output projection per row, ``bias_k``
    / ``bias_v`` per row, the attention itself as PyTorch does (masks, ``add_zero_attn``,
    ``static_k`` / ``static_v``, dropout, ``need_weights``).
    """
    a = _bind_mha(args, kwargs)
    ent = {k: mode.lookup(a[k]) for k in _MHA_PARAMS}
    mode.reject(func, [v for k, v in a.items() if k not in _MHA_PARAMS])
    if all(e is None for e in ent.values()):
        return func(*args, **kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    heads, embed = int(a["num_heads"]), int(a["embed_dim_to_check"])
    kpm, attn_mask, is_causal = a["key_padding_mask"], a["attn_mask"], bool(a["is_causal"])
    need_weights = bool(a["need_weights"])
    q_in = _mha_batch_first(mode, query, "query")  # (N, L, E)
    k_in = q_in if key is query else _mha_batch_first(mode, key, "key")  # (N, S, Ek)
    v_in = k_in if value is key else _mha_batch_first(mode, value, "value")
    n_rows, tgt, e = q_in.shape
    if e != embed or embed % heads:
        return func(*args, **kwargs)  # PyTorch's own error
    hd = embed // heads
    kpm = F._canonical_mask(mask=kpm, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=q_in.dtype)
    if is_causal and attn_mask is None:
        return func(*args, **kwargs)  # PyTorch's error: is_causal needs the mask
    if is_causal and kpm is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=q_in.dtype, check_other=False)
        if kpm is not None:
            is_causal = False

    drawn: list[torch.Tensor] = []

    def bias_deltas() -> torch.Tensor:  # the packed bias's per-row noise, drawn once
        if not drawn:
            drawn.append(ent["in_proj_bias"].row_deltas(mode.coords, mode.member_ids))
        return drawn[0]

    def part(x, wname, rows, brows):
        return _linear_part(mode, x, a[wname], ent[wname], rows, a["in_proj_bias"],
                            ent["in_proj_bias"], brows, bias_deltas)

    thirds = [slice(i * embed, (i + 1) * embed) for i in range(3)]
    if not a["use_separate_proj_weight"]:
        if key is query and value is key:  # self-attention: one packed product
            q, k, v = part(q_in, "in_proj_weight", slice(0, 3 * embed),
                           slice(0, 3 * embed)).chunk(3, dim=-1)
        elif value is key:
            q = part(q_in, "in_proj_weight", thirds[0], thirds[0])
            k, v = part(k_in, "in_proj_weight", slice(embed, 3 * embed),
                        slice(embed, 3 * embed)).chunk(2, dim=-1)
        else:
            q, k, v = (part(x, "in_proj_weight", r, r) for x, r in zip((q_in, k_in, v_in), thirds))
    else:
        q, k, v = (part(x, name, slice(0, embed), r) for x, name, r in zip(
            (q_in, k_in, v_in), ("q_proj_weight", "k_proj_weight", "v_proj_weight"), thirds))

    # masks as (1 or N, 1 or H, L, S), broadcast against the (N, H, L, S) scores
    if attn_mask is not None:
        attn_mask = attn_mask.view(1, 1, *attn_mask.shape) if attn_mask.dim() == 2 else \
            attn_mask.view(n_rows, heads, *attn_mask.shape[1:])
    if a["bias_k"] is not None and a["bias_v"] is not None:
        extra = []
        for name in ("bias_k", "bias_v"):
            p = a[name]
            rows = mode.per_row_values(p, ent[name]) if ent[name] is not None else \
                p.unsqueeze(0).expand(n_rows, *p.shape)
            extra.append(rows.reshape(n_rows, 1, embed).to(q.dtype))
            mode.consume(ent[name])
        k, v = torch.cat([k, extra[0]], dim=1), torch.cat([v, extra[1]], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    q = q.reshape(n_rows, tgt, heads, hd).transpose(1, 2)  # (N, H, L, hd)
    k = k.reshape(n_rows, -1, heads, hd).transpose(1, 2) if a["static_k"] is None else \
        a["static_k"].view(n_rows, heads, -1, hd)
    v = v.reshape(n_rows, -1, heads, hd).transpose(1, 2) if a["static_v"] is None else \
        a["static_v"].view(n_rows, heads, -1, hd)
    if a["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(n_rows, heads, 1, hd)], dim=2)
        v = torch.cat([v, v.new_zeros(n_rows, heads, 1, hd)], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    if kpm is not None:
        kpm = kpm.view(n_rows, 1, 1, kpm.shape[-1])
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    weights = None
    if need_weights:
        scores = (q * (1.0 / hd) ** 0.5) @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        y = weights @ v  # (N, H, L, hd)
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    y = y.transpose(1, 2).reshape(n_rows, tgt, embed)  # (N, L, E)
    out = _linear_rows(mode, y, a["out_proj_weight"], a["out_proj_bias"],
                       ent["out_proj_weight"], ent["out_proj_bias"],
                       "F.multi_head_attention_forward").transpose(0, 1)  # (L, N, E)
    if weights is not None:
        mode.mark(weights, ROWS)
    mode.mark(out, BatchLayout(1, 1))
    return out, weights


# -- recurrent layers --------------------------------------------------------------------------

def _gates(mode: RowPerturbationMode, x: torch.Tensor, w: torch.Tensor,
           b: Optional[torch.Tensor], what: str) -> torch.Tensor:
    """``F.linear(x, w, b)`` per batch row (``x (R, ..., n)``), perturbed where evolved."""
    we, be = mode.lookup(w), mode.lookup(b)
    if we is None and be is None:
        return F.linear(x, w, b)
    return _linear_rows(mode, x, w, b, we, be, what)


def _cell_step(kind: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
               c: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One recurrence step from the input gates ``gi`` and the hidden gates ``gh``."""
    if kind == "lstm":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)), None


def _check_batch_dim(mode: RowPerturbationMode, t: torch.Tensor, dim: int, what: str,
                     ndim: Optional[int] = None) -> None:
    """Check that ``t`` (of exactly ``ndim`` dimensions, when given) carries the batch in
    dimension ``dim``, where attention and recurrent layers take it."""
    known = mode._layouts.get(t) if mode._layouts is not None else None
    shaped = t.dim() > dim if ndim is None else t.dim() == ndim
    if not shaped or t.shape[dim] != mode.batch or known not in (None, BatchLayout(dim, 1)):
        mode.batch_error(f"{what} (batch in dimension {dim}; unbatched inputs are not "
                         f"perturbed per row)", t, known if shaped else None)


def _route_rnn(kind: str):
    """``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``, the ops of ``nn.LSTM``,
    ``nn.GRU`` and ``nn.RNN``: the recurrence step by step, each row's input and hidden
    projections through the perturbed linear op (the input projection of all steps in one
    call)."""
    what = f"torch._VF.{kind}"

    def route(mode: RowPerturbationMode, func, args, kwargs):
        if not any(mode.lookup(v) is not None for v in tree_leaves((args, kwargs))):
            mode.reject(func, (args, kwargs))
            return func(*args, **kwargs)
        packed = isinstance(args[1], torch.Tensor) if kind == "lstm" else \
            len(args) > 2 and isinstance(args[2], torch.Tensor)
        if packed or kwargs:
            raise RuntimeError(f"{what} with a PackedSequence input cannot be perturbed per "
                               f"row by batched_forward; pass the padded batch instead")
        x, hx, params, has_bias, layers, dropout, train, bidirectional, batch_first = args
        dirs = 2 if bidirectional else 1
        per = 4 if has_bias else 2
        if len(params) != layers * dirs * per:
            raise RuntimeError(f"{what}: an LSTM with proj_size > 0 cannot be perturbed per "
                               f"row by batched_forward")
        if dropout > 0 and train and layers > 1:
            raise RuntimeError(f"{what}: dropout between layers in training mode cannot be "
                               f"perturbed per row by batched_forward; use eval() or "
                               f"dropout=0")
        _check_batch_dim(mode, x, 0 if batch_first else 1, what)
        h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
        for t in (h0, c0):
            if t is not None:
                _check_batch_dim(mode, t, 1, f"{what} (initial state)")
        seq = x if batch_first else x.transpose(0, 1)  # (R, T, in)
        steps = seq.shape[1]
        finals_h, finals_c = [], []
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                w_ih, w_hh = params[k * per], params[k * per + 1]
                b_ih, b_hh = (params[k * per + 2], params[k * per + 3]) if has_bias else \
                    (None, None)
                gi = _gates(mode, seq, w_ih, b_ih, what)  # (R, T, G): every step at once
                h, c = h0[k], None if c0 is None else c0[k]  # (R, H)
                order = range(steps - 1, -1, -1) if d == 1 else range(steps)
                hs = [None] * steps
                for t in order:
                    h, c = _cell_step(kind, gi[:, t], _gates(mode, h, w_hh, b_hh, what), h, c)
                    hs[t] = h
                outs.append(torch.stack(hs, dim=1))  # (R, T, H)
                finals_h.append(h)
                finals_c.append(c)
            seq = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]  # (R, T, dirs * H)
        out = seq if batch_first else seq.transpose(0, 1)
        h_n = torch.stack(finals_h)  # (layers * dirs, R, H)
        mode.mark(out, ROWS if batch_first else BatchLayout(1, 1))
        mode.mark(h_n, BatchLayout(1, 1))
        if kind != "lstm":
            return out, h_n
        c_n = torch.stack(finals_c)
        mode.mark(c_n, BatchLayout(1, 1))
        return out, h_n, c_n
    return route


def _route_rnn_cell(kind: str):
    """``torch._VF.lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell`` (the
    ops of the ``nn`` cells): one step with per-row perturbed projections."""
    what = f"torch._VF.{kind}_cell"
    names = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")

    def route(mode: RowPerturbationMode, func, args, kwargs):
        a = _binder(names, {"b_ih": None, "b_hh": None})(args, kwargs)
        if not any(mode.lookup(v) is not None for v in tree_leaves(a)):
            mode.reject(func, (args, kwargs))
            return func(*args, **kwargs)
        mode.reject(func, [a["input"], a["hx"]])
        x, hx = a["input"], a["hx"]
        h, c = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
        _check_batch_dim(mode, x, 0, what)
        for t in (h, c):
            if t is not None:
                _check_batch_dim(mode, t, 0, f"{what} (state)")
        h, c = _cell_step(kind, _gates(mode, x, a["w_ih"], a["b_ih"], what),
                          _gates(mode, h, a["w_hh"], a["b_hh"], what), h, c)
        out = (h, c) if kind == "lstm" else h
        mode.mark(out, ROWS)
        return out
    return route


_ROUTES: dict = {
    F.linear: _route_linear,
    torch.matmul: _route_matmul,
    torch.Tensor.matmul: _route_matmul,
    torch.Tensor.__matmul__: _route_matmul,
    torch.Tensor.__rmatmul__: _route_matmul,
    torch.mm: _route_matmul,
    torch.Tensor.mm: _route_matmul,
    torch.addmm: _route_addmm,
    torch.Tensor.addmm: _route_addmm,
    torch.conv1d: _route_conv(1),
    torch.conv2d: _route_conv(2),
    F.embedding: _route_embedding,
    F.multi_head_attention_forward: _route_mha,
    torch.lstm: _route_rnn("lstm"),
    torch.gru: _route_rnn("gru"),
    torch.rnn_tanh: _route_rnn("rnn_tanh"),
    torch.rnn_relu: _route_rnn("rnn_relu"),
    torch.lstm_cell: _route_rnn_cell("lstm"),
    torch.gru_cell: _route_rnn_cell("gru"),
    torch.rnn_tanh_cell: _route_rnn_cell("rnn_tanh"),
    torch.rnn_relu_cell: _route_rnn_cell("rnn_relu"),
    F.layer_norm: _route_norm(F.layer_norm, "weight", "bias", channel_last=True),
    F.group_norm: _route_norm(F.group_norm, "weight", "bias", channel_last=False),
    F.batch_norm: _route_norm(F.batch_norm, "weight", "bias", channel_last=False),
    F.instance_norm: _route_norm(F.instance_norm, "weight", "bias", channel_last=False),
}
if hasattr(F, "rms_norm"):
    _ROUTES[F.rms_norm] = _route_norm(F.rms_norm, "weight", None, channel_last=True)
for _f in _ELEMENTWISE | _ELEMENTWISE_INPLACE:
    _ROUTES[_f] = _route_elementwise
for _f in _SWAPS | _PERMUTES | _MATRIX_TRANSPOSES:
    _ROUTES[_f] = _route_transpose
