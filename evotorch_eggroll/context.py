"""The perturbation context: ``with strategy.perturb(N, epoch) as pop``.

Inside the context the model keeps its base parameters. ``pop.batched_forward`` evaluates
many members in one call of the model's own forward (see :mod:`evotorch_eggroll.routing`);
``pop.iterate`` writes one member's perturbed values into the parameters at a time for
plain ``model(x)`` calls. On exit every evolved parameter is restored bit-exactly from a
copy saved on entry, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import fused_mlp, library, ops
from . import noise as _noise
from ._validation import as_value_tensor, check_int
from .evolved import EvolvedParam, EvolvedSet, NoiseCoords
from .factor_cache import FactorCache, default_budget_bytes
from .perturbation import Perturbation
from .routing import ROWS, RowPerturbationMode

__all__ = ["PerturbationContext"]



# The last member-id tensor found in range, so that a batched forward called again with the
# same, unmodified tensor (the usual evaluation loop) does not synchronise with the device
# to re-read its range. The key holds a weak reference (the cache keeps nothing alive), the
# tensor's in-place version counter (any in-place write, also through a view, invalidates
# it), its storage address, shape, dtype and device, and the population size; the entry
# also keeps the range found (lowest and highest id).
_validated_ids: Optional[tuple] = None


def _ids_key(t: object, n: int) -> Optional[tuple]:
    if not isinstance(t, torch.Tensor) or t.requires_grad:
        return None
    return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, n)


def _validated_range(t: object, n: int) -> Optional[tuple[int, int]]:
    """``(lowest, highest)`` id of ``t`` if it was found in range and is unchanged since."""
    cached = _validated_ids
    if cached is None:
        return None
    ref, key, bounds = cached
    return bounds if ref() is t and _ids_key(t, n) == key else None


def _remember_validated(t: object, n: int, bounds: tuple[int, int]) -> None:
    global _validated_ids
    key = _ids_key(t, n)
    if key is not None:
        _validated_ids = (weakref.ref(t), key, bounds)


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bit-exact copies of ``tensors`` (one multi-tensor copy per device and dtype instead
    of a clone each)."""
    out = [torch.empty_like(t) for t in tensors]
    if out:
        torch._foreach_copy_(out, tensors)
    return out


class PerturbationContext:
    """Evaluation of one population. Built by ``strategy.perturb``; enter once.

    Attributes:
        population_size: N.
        epoch: the requested epoch (noise uses the effective epoch ``coords.epoch``).
        coords: stream coordinates of this population's noise.
        evaluated: True once a perturbed forward ran in the context (``batched_forward``,
            or a member's values written by ``iterate``).
    """

    def __init__(
        self,
        owner,
        evolved: EvolvedSet,
        coords: NoiseCoords,
        population_size: int,
        epoch: int,
        local_members: range,
    ):
        self._owner = owner
        self._evolved = evolved
        self.coords = coords
        self.population_size = int(population_size)
        self.epoch = int(epoch)
        self._local = local_members
        self._saved: Optional[list[torch.Tensor]] = None
        self._active = False
        self._used = False
        self._iter_token: Optional[object] = None
        self._cache: Optional[FactorCache] = None
        self._cache_decided = False  # whether factors are drawn is decided at the first call
        self.evaluated = False  # a perturbed forward ran (batched_forward or iterate)
        self._last_generated: Optional[bool] = None

    def __repr__(self) -> str:
        state = "active" if self._active else ("exited" if self._used else "not entered")
        return (f"PerturbationContext(population_size={self.population_size}, "
                f"epoch={self.epoch}, {state})")

    # -- population -------------------------------------------------------------------

    @property
    def local_population_size(self) -> int:
        """Number of members this rank evaluates (N when not distributed)."""
        return len(self._local)

    def local_member_ids(self) -> torch.Tensor:
        """This rank's contiguous slice of member ids: ``(local_population_size,)`` int64 on
        the CPU (index any tensor with it; ``batched_forward`` moves it as needed)."""
        return torch.arange(self._local.start, self._local.stop, dtype=torch.int64)

    # -- enter / exit -------------------------------------------------------------------

    def __enter__(self) -> "PerturbationContext":
        if self._used:
            raise RuntimeError("a perturbation context can be entered only once; call "
                               "strategy.perturb(...) again for a new one")
        self._owner._context_enter(self)
        self._used = True
        with torch.no_grad():
            self._saved = _copies([e.param.detach() for e in self._evolved])
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._restore()
        finally:
            if self._cache is not None:
                self._cache.release()
                self._cache = None
            self._active = False
            self._iter_token = None
            self._saved = None
            self._owner._context_exit(self)
        return False  # never swallow exceptions

    def _restore(self) -> None:
        """Write the saved base values back (bit-exact copy; ``.data`` so that autograd
        graphs recorded inside the context stay valid)."""
        if not self._saved:
            return
        with torch.no_grad():
            torch._foreach_copy_([e.param.data for e in self._evolved], self._saved)

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"{what} is only available inside the `with strategy.perturb(...)"
                               f" as pop:` block")

    # -- batched evaluation --------------------------------------------------------------

    def _resolve_member_ids(self, member_ids, rows: int, device: torch.device
                            ) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
        """The ``(rows,)`` int64 member ids on ``device`` and their range ``(lo, hi)``.

        The range is None when it was checked without reading it on the host: while
        ``torch.compile`` traces (the ``evotorch_eggroll::member_ids`` operator checks the
        values when the compiled code runs) and while a CUDA graph is being captured (a
        device-side assertion checks them at every replay)."""
        n = self.population_size
        if member_ids is None:
            start = self._local.start
            if start + rows > n:
                raise ValueError(
                    f"batched_forward got {rows} rows, but the population has only {n} "
                    f"members (rows map to members {start}..{start + rows - 1} by default); "
                    f"pass member_ids to map several rows to one member"
                )
            ids = torch.arange(start, start + rows, device=device, dtype=torch.int64)
            return ids, (start, start + rows - 1)
        ids = as_value_tensor(
            member_ids, type_message="member_ids must be a 1-D integer tensor or a sequence of ints",
            meta_message="member_ids is a meta tensor, which holds no values; pass the member ids "
                         "on the CPU or on the input's device")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"member_ids must be integers, got dtype {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != rows:
            raise ValueError(f"member_ids must have shape ({rows},) (one member per input row), "
                             f"got {tuple(ids.shape)}")
        if torch.compiler.is_compiling():
            return library.checked_member_ids(ids, n, device), None
        ids = ids.to(device=device, dtype=torch.int64)
        if not rows:
            return ids, (0, -1)
        bounds = _validated_range(member_ids, n)
        if bounds is None and ids.is_cuda and torch.cuda.is_current_stream_capturing():
            library.check_member_ids_async(ids, n)  # reading the range would synchronise
            return ids, None
        if bounds is None:
            lo, hi = torch.aminmax(ids)  # reading the range synchronises with the device
            bounds = (int(lo), int(hi))
            if bounds[0] < 0 or bounds[1] >= n:
                raise ValueError(library.member_range_message(n, *bounds))
            _remember_validated(member_ids, n, bounds)
        return ids, bounds

    # -- drawn factors ------------------------------------------------------------------

    def cache_factors(self) -> bool:
        """Draw every local member's factors now, for the rest of this context.

        Inside a context the same members are usually evaluated many times (an RL
        rollout), and the forward kernels would otherwise generate each member's factors
        at every call. Once drawn (bit for bit the numbers the kernels generate and the
        update regenerates), the forward reads them instead, and narrow float32 linear
        layers run base product and noise in one kernel. ``batched_forward`` draws them
        by itself at the first call of a context, so every call of a context computes the
        same way; the outputs of the two ways agree to float32 rounding. Nothing is drawn
        when the factors would take more than the strategy's ``factor_cache_bytes``
        (default: 1 GiB, at most a quarter of the GPU's memory and half of what is free;
        0 turns drawing off); the kernels then generate them at every call. The drawn
        factors are zeroed when the context exits.

        Nothing is drawn inside code compiled by ``torch.compile`` or while a CUDA graph is
        being captured: call this (or one eager ``batched_forward``) first, or the context
        generates the factors at every call.

        Returns:
            True when the drawn factors are in use.
        """
        self._require_active("cache_factors")
        if self._cache is not None:
            return True
        if not len(self._local) or not len(self._evolved):
            return False
        if torch.compiler.is_compiling():
            return False  # buffers and draws belong before the compiled code, not inside it
        device = next(iter(self._evolved)).param.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # allocations and draws belong before a capture, not inside it
        storage = getattr(self._owner, "_factor_storage", None)
        if storage is None:
            storage = {}
        budget = getattr(self._owner, "factor_cache_bytes", None)
        if budget is None:
            allocates = not FactorCache.holds(self._evolved, self.coords, self._local, storage)
            budget = default_budget_bytes(device, allocates)
        if FactorCache.size_bytes(self._evolved, self.coords, self._local) > budget:
            return False
        self._cache = FactorCache.draw(self._evolved, self.coords, self._local, storage,
                                       getattr(self._owner, "_draw_graphs", None))
        self._cache_decided = True
        return True

    def batched_forward(self, model: nn.Module, x: torch.Tensor,
                        member_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None
                        ) -> torch.Tensor:
        """Run ``model(x)`` with row ``j`` of every evolved layer using member ``member_ids[j]``.

        For a linear layer ``out_j = x_j W^T + b + s_j sigma/sqrt(r) (x_j B0_j) A0_j^T +
        s_j sigma eps_b_j``. The model's own forward runs; ops that consume evolved
        parameters are routed to per-row perturbed kernels for this call only (the ops and
        layers, how the batch is followed through the forward and the rule for inputs
        without the batch dimension: :mod:`evotorch_eggroll.routing`).

        Args:
            model: the strategy's model or a submodule of it.
            x: ``(R, ...)`` input; may be non-contiguous or expanded.
            member_ids: ``(R,)`` ints in ``[0, N)``; default row ``j`` -> member ``j`` (of
                this rank's slice when distributed).

        Returns:
            The model's output. Differentiable with respect to ``x`` (also after the
            context exited); no graph under ``torch.no_grad()``.

        ``torch.compile(..., fullgraph=True)`` traces this call (linear and convolution
        layers, norm affines, elementwise activations; embeddings and OpenES weights need
        data-dependent shapes and do not trace), and it runs inside a CUDA graph capture; both
        need the factors drawn beforehand to use them (see :meth:`cache_factors`). Member
        ids are then checked by the compiled code, or on the device during a capture.

        Raises:
            RuntimeError: outside the context, during ``iterate``, CPU input while the
                strategy's backend is the kernels and the interpreter is off, or an evolved
                parameter the forward did not consume through a routed op.
            ValueError: member ids of the wrong shape or outside ``[0, N)``.
        """
        return self._forward(model, x, member_ids, False)[0]

    def _batched_argmax(self, model: nn.Module, x: torch.Tensor,
                        member_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None
                        ) -> tuple[torch.Tensor, int]:
        """``(indices, width)``: the ``(R,)`` int64 index of each row's largest output of
        ``batched_forward(model, x, member_ids)`` (as ``torch.argmax`` picks it) and the
        outputs per row. A plain MLP served by the one-launch kernel computes the indices in
        that launch (discrete-action policies: no separate reduction per step)."""
        out, fused = self._forward(model, x, member_ids, True)
        return out if fused else fused_mlp.argmax_rows(out)

    def _forward(self, model: nn.Module, x: torch.Tensor,
                 member_ids: Optional[Union[torch.Tensor, Sequence[int]]], argmax: bool
                 ) -> tuple[Any, bool]:
        """:meth:`batched_forward`'s work: ``(output, False)``, or ``((indices, width), True)``
        when ``argmax`` is asked for and the one-launch kernel ran the model."""
        self._require_active("batched_forward")
        if self._iter_token is not None:
            raise RuntimeError("batched_forward cannot run while pop.iterate() holds a member's "
                               "values in the parameters; finish or break the loop first")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batched_forward takes a Tensor input, got {type(x).__name__}")
        self._check_devices(x)
        if x.dim() == 0:
            raise ValueError("batched_forward needs an input with a leading batch dimension")
        ids, bounds = self._resolve_member_ids(member_ids, x.shape[0], x.device)
        if not self._cache_decided:  # a flag, not a count: compiled code keeps one graph
            self._owned(model)  # a model without evolved parameters is refused before drawing
            self._cache_decided = True
            if self._cache is None:
                self.cache_factors()  # decided once, so every call of the context takes one path
        if bounds is None:  # checked to lie in [0, N) without reading them on the host
            bounds = (0, self.population_size - 1)
        cache = self._cache if self._cache is not None and self._cache.covers(*bounds) else None
        out = fused_mlp.try_forward(model, x, ids, self._evolved, self.coords, cache, argmax)
        if out is not None:  # a plain MLP served by the drawn factors: one launch
            self._last_generated = False
            self.evaluated = True
            return out, argmax
        own = self._owned(model)
        mode = RowPerturbationMode(self._evolved, self.coords, ids, cache)
        mode.mark(x, ROWS)  # the input carries the batch in its first dimension
        with mode:
            out = model(x)
        self._last_generated = mode.generated
        self.evaluated = True
        missing = [e.name for e in own if id(e.param) not in mode.consumed]
        if missing:
            raise RuntimeError(
                f"evolved parameter(s) {missing} were not consumed by any op batched_forward "
                f"perturbs per row during this forward, so they would have been evaluated "
                f"unperturbed. Make the forward use them (through F.linear, matmuls with the "
                f"weight on the right, F.conv1d/2d, F.embedding, norm affines, elementwise ops "
                f"with the activation, attention or recurrent layers), or leave them out with "
                f"setup(model, exclude={missing!r})."
            )
        return out, False

    def _check_devices(self, x: torch.Tensor) -> None:
        """Raise unless the strategy's backend computes with ``x`` and every evolved
        parameter is on ``x``'s device (which then computes with them too)."""
        device, backend = x.device, self.coords.backend
        if ops.kernel_device_ok(device, backend):
            for e in self._evolved:
                if e.param.device != device:
                    break
            else:
                return
        for e in self._evolved:  # something is off: the first problem, parameters first
            ops.check_kernel_device(e.param, f"parameter {e.name!r}", backend)
        devices = sorted({str(e.param.device) for e in self._evolved})
        ops.check_kernel_device(x, f"the batched_forward input (parameters on "
                                   f"{', '.join(devices)})", backend)
        for e in self._evolved:
            if e.param.device != device:
                raise RuntimeError(f"the batched_forward input is on {device} but parameter "
                                   f"{e.name!r} is on {e.param.device}; move the input to "
                                   f"{e.param.device}")

    def _owned(self, model: nn.Module) -> list[EvolvedParam]:
        """The evolved parameters among ``model``'s; raise when there are none."""
        lookup = self._evolved.by_id.get
        own = [e for e in map(lookup, map(id, model.parameters())) if e is not None]
        if not own:
            raise RuntimeError("the model given to batched_forward holds none of this "
                               "strategy's evolved parameters; pass the model given to setup "
                               "(or a submodule of it)")
        return own

    def _prepare_replay(self) -> bool:
        """Draw the factors for forwards captured in a CUDA graph: a graph captured in an
        earlier context of the same shape (see :meth:`_replay_key`) replays this context's
        perturbed forwards without calling :meth:`batched_forward`, so the context counts as
        evaluated. False when nothing is drawn (the forward then runs eagerly)."""
        if not self.cache_factors():
            return False
        self.evaluated = True
        return True

    def _replay_key(self) -> Optional[tuple]:
        """What a CUDA graph that captured this context's ``batched_forward`` reads besides
        tensor contents, or None when the last forward generated noise itself (it then
        depends on the epoch, which the kernels take as a launch argument) or no factors
        are drawn.

        With every op served by the drawn factors, the captured kernels read the
        parameters and the factor buffers (whose contents the next context of the same
        shape rewrites at the same addresses) and take sigma and the rank as launch
        arguments: a graph captured in one context replays correctly in a later one with
        the same key.
        """
        if self._cache is None or self._last_generated:
            return None
        c = self.coords
        return (id(self._owner), c.seed, c.sigma, c.rank, c.antithetic, self.population_size,
                self._local.start, self._local.stop,
                tuple(e.param.data_ptr() for e in self._evolved), self._cache.addresses())

    def vmap_forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Same as ``batched_forward(model, x)`` (kept for callers of a vmap-style API)."""
        return self.batched_forward(model, x)

    # -- sequential evaluation -----------------------------------------------------------

    def iterate(self) -> Iterator[int]:
        """Yield this rank's member ids (``0..N-1`` when not distributed); while member ``k``
        is current, plain ``model(x)`` computes member ``k``'s perturbed function (its
        perturbation is written into the parameters). Base values come back when the loop
        ends, breaks or raises.
        """
        self._require_active("iterate")
        if self._iter_token is not None:
            raise RuntimeError("pop.iterate() is already running")
        token = object()
        self._iter_token = token
        return self._iterate(token)

    def _iterate(self, token: object) -> Iterator[int]:
        try:
            for k in self._local:
                if self._iter_token is not token:
                    return
                self._write_member(k)
                self.evaluated = True
                yield k
        finally:
            if self._active and self._iter_token is token:
                self._restore()
                self._iter_token = None

    def _write_member(self, k: int) -> None:
        with torch.no_grad():
            for e, saved in zip(self._evolved, self._saved):
                ids = torch.tensor([k], dtype=torch.int64, device=saved.device)
                p = e.perturbations(self.coords, ids)[0]  # (*shape) float32
                e.param.data.copy_((saved.float() + p).to(saved.dtype))

    @contextlib.contextmanager
    def _with_base_values(self) -> Iterator[None]:
        """Base values in the parameters for the duration (used by ``strategy.eval()``):
        while ``iterate`` holds a member's values they are set aside and written back."""
        member = None
        if self._active and self._iter_token is not None:
            member = [e.param.detach().clone() for e in self._evolved]
            self._restore()
        try:
            yield
        finally:
            if member is not None and self._active:
                with torch.no_grad():
                    for e, v in zip(self._evolved, member):
                        e.param.data.copy_(v)

    # -- inspection ------------------------------------------------------------------------

    def get_factors(self, member_id: int, param_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors of one member's perturbation of one weight.

        Returns:
            ``A (m, r)`` with sign and ``sigma / sqrt(r)`` folded in and ``B (n, r)``, in the
            parameter's dtype and device, so ``A @ B.T`` is exactly the additive
            perturbation (reshaped to the parameter for conv weights).

        Raises:
            ValueError: member outside ``[0, N)`` or a parameter with dense noise (use
                :meth:`get_perturbation` for those).
            KeyError: unknown parameter name.
        """
        k = _check_member(member_id, self.population_size)
        e = _lookup_name(self._evolved, param_name)
        if not e.lowrank:
            raise ValueError(f"parameter {e.name!r} has dense (full-rank) noise and no low-rank "
                             f"factors; use pop.get_perturbation(member_id, {e.name!r})"
                             f".as_matrix()")
        return member_perturbation(e, self.coords, k, self.epoch).factors

    def get_perturbation(self, member_id: int, param_name: str) -> Perturbation:
        """One member's perturbation of one evolved parameter in this population, low-rank
        or dense: exactly the noise the batched forward and the update use.

        Args:
            member_id: a member in ``[0, N)``.
            param_name: the parameter's dotted name (as in ``strategy.named_parameters()``).

        Returns:
            A :class:`~evotorch_eggroll.perturbation.Perturbation` at this context's epoch;
            ``.as_matrix()`` is the additive perturbation in the parameter's shape.

        Raises:
            ValueError: member outside ``[0, N)``.
            TypeError: a member id that is not an integer.
            KeyError: unknown parameter name.
        """
        k = _check_member(member_id, self.population_size)
        return member_perturbation(_lookup_name(self._evolved, param_name), self.coords, k,
                                   self.epoch)


def member_perturbation(e: EvolvedParam, coords: NoiseCoords, member_id: int,
                        epoch: int) -> Perturbation:
    """The :class:`Perturbation` of evolved parameter ``e`` for member ``member_id`` (already
    validated) at the noise coordinates ``coords`` (``epoch``: the requested epoch, recorded
    in the result)."""
    ids = torch.tensor([member_id], dtype=torch.int64, device=e.param.device)
    if e.lowrank:
        a, b = e.factors(coords, ids)
        factors: Union[tuple, torch.Tensor] = (a[0].to(e.param.dtype), b[0].to(e.param.dtype))
        rank: Optional[int] = coords.rank
    else:
        factors = e.dense(coords, ids)[0].to(e.param.dtype)
        rank = None
    return Perturbation(param_name=e.name, shape=tuple(e.param.shape), factors=factors,
                        rank=rank, member_id=member_id, epoch=epoch,
                        sign=_noise.member_sign(member_id, coords.antithetic))


def _check_member(member_id, population_size: Optional[int] = None) -> int:
    """Validate a member id (an integer, >= 0, below ``population_size`` if given)."""
    k = check_int("member_id", member_id, 0)
    if population_size is not None and k >= population_size:
        raise ValueError(f"member id {k} out of range: must lie in [0, {population_size})")
    return k


def _lookup_name(evolved: EvolvedSet, name: str) -> EvolvedParam:
    e = evolved.by_name.get(name)
    if e is None and isinstance(name, str) and name.startswith("module."):
        e = evolved.by_name.get(name[len("module."):])
    if e is None:
        raise KeyError(f"{name!r} is not an evolved parameter; evolved: "
                       f"{list(evolved.by_name)}")
    return e
