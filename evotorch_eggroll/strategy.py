"""EGGROLL and OpenES: evolution strategies over a PyTorch model's parameters.

EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025) perturbs every
weight matrix of member ``i`` by ``P_i = s_i sigma / sqrt(r) A0 B0^T`` (rank r, never
materialised in the batched forward) and every 1-D parameter by ``s_i sigma eps``. OpenES
(Salimans et al., 2017) is the same algorithm with full-rank noise on every parameter.
Both share one implementation, :class:`EvolutionStrategy`; the two public classes only
choose the noise kind.

One generation::

    with strategy.perturb(population_size=N) as pop:
        out = pop.batched_forward(model, x)        # all members in one forward
        fitnesses = evaluate(out)                  # (N,), higher is better
    metrics = strategy.step(fitnesses)

The update regenerates the noise from its coordinates (seed, parameter name, effective
epoch, noise index): ``g = (1/sqrt(N)) sum_i w_i P_i`` with shaped fitnesses ``w``, and
``-g`` goes to a torch optimizer as the gradient.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import checkpoint
from . import distributed as _dist
from . import noise as _noise
from . import ops
from ._graphs import GraphedCall
from ._host import start_read
from ._validation import (as_value_tensor, check_int, check_population_size, check_real,
                          check_seed, optimizer_class)
from .context import PerturbationContext, _check_member, _copies, _lookup_name, member_perturbation
from .evolved import EvolvedParam, EvolvedSet, NoiseCoords
from .module import ESModule
from .perturbation import Perturbation, PerturbationSequence
from .routing import check_supported_modules
from .shaping import (
    FitnessTransform,
    antithetic_fold,
    check_baseline,
    check_fitness_transform,
    check_nonfinite_policy,
    shape_fitnesses,
)
from .shaping import _shape_fitnesses_unchecked

__all__ = ["EvolutionStrategy", "EggrollStrategy", "OpenESStrategy"]

_EVENTS = ("on_step", "on_perturb")

# what a step computes on the device for its checks and metrics, read in one copy after the
# update is queued (then the two norms, then the caller's refusal flags)
_CHECKS = ("nonfinite", "nonfinite_weights", "all_equal", "first", "mean", "variance", "max",
           "min", "weight_mean")
# what a step whose caller does not want the metrics computes: what its refusals need
_LEAN_CHECKS = ("nonfinite", "nonfinite_weights")


class StepRefusal(NamedTuple):
    """A condition that refuses a step, computed on the device by the step's caller and
    read with the step's own checks after the update is queued (the update is then rolled
    back and ``error()`` raised)."""

    flag: torch.Tensor  # one element: nonzero refuses the step
    error: Callable[[], BaseException]


def _host_values(read: Callable[[], list]) -> list:
    """The step's one device-to-host read: the values of a copy started by
    :func:`~evotorch_eggroll._host.start_read`, as Python numbers."""
    return read()


# -- argument checks ---------------------------------------------------------------------------

def _population_size(value: Any) -> int:
    return check_population_size("population_size", value)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of all elements of ``tensors`` (float32, accumulated per tensor, on the
    first tensor's device), without a host synchronisation (one multi-tensor launch per
    device and dtype for the per-tensor norms)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    dev = norms[0].device
    return torch.linalg.vector_norm(torch.stack([v.to(dev) for v in norms]))


def _tensor_leaves(obj: Any, leaves: list[torch.Tensor]) -> None:
    """Appends the tensors of a nested dict/list/tuple structure to ``leaves``, in order."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensor_leaves(v, leaves)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_leaves(v, leaves)


def _with_leaves(obj: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """``obj`` rebuilt with its tensors replaced, in :func:`_tensor_leaves` order, by
    those of ``leaves``."""
    if isinstance(obj, torch.Tensor):
        return next(leaves)
    if isinstance(obj, dict):
        return {k: _with_leaves(v, leaves) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_with_leaves(v, leaves) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_with_leaves(v, leaves) for v in obj)
    return obj


def _clone_tensors(obj: Any) -> Any:
    """A copy of a nested dict/list/tuple structure (an optimizer ``state_dict``) in which
    every tensor is copied and everything else shared — what a rollback needs, far cheaper
    than ``copy.deepcopy``.

    Module-level helpers rather than recursive closures: a closure that calls itself is a
    reference cycle, and it would keep the copies alive until the garbage collector ran
    (GPU memory growing generation after generation between collections)."""
    leaves: list[torch.Tensor] = []
    _tensor_leaves(obj, leaves)
    return _with_leaves(obj, iter(_copies(leaves)))


def _held_copies(held: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bit-exact copies of ``tensors`` in the buffers of ``held`` (replaced when their
    shapes, dtypes or devices no longer match): one multi-tensor copy, and no allocation
    from one step to the next."""
    with torch.no_grad():
        if len(held) != len(tensors) or any(b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                                            for b, t in zip(held, tensors)):
            held[:] = _copies(tensors)
        elif tensors:
            torch._foreach_copy_(held, tensors)
    return list(held)


# values an optimizer's per-parameter state may hold besides tensors for the snapshot below
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None))


def _optimizer_snapshot(optimizer: torch.optim.Optimizer, held: list[torch.Tensor]) -> Any:
    """What :func:`_restore_optimizer` needs to put ``optimizer`` back as it is now: each
    parameter's state dict and a shallow copy of it (the same tensor objects), the values
    of those tensors copied into the buffers of ``held``, and each param group's settings.
    An optimizer whose state holds other mutable values gets a copy of its ``state_dict()``
    instead (what it costs: the dict built, and a new buffer for every tensor)."""
    entries = {p: (d, dict(d)) for p, d in optimizer.state.items()}
    values = [v for _, saved in entries.values() for v in saved.values()]
    if not all(isinstance(v, (torch.Tensor, *_IMMUTABLE)) for v in values):
        return _clone_tensors(optimizer.state_dict())
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return entries, tensors, _held_copies(held, tensors), groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, snapshot: Any) -> None:
    """Put ``optimizer`` back to an :func:`_optimizer_snapshot`: the tensors it held get
    their values back in place (a tensor the step changed in place and one it replaced by
    a new object both come back), each parameter's state dict its entries, state that the
    step created goes, and the param groups get their settings back."""
    if isinstance(snapshot, dict):  # a state_dict copy
        optimizer.load_state_dict(snapshot)
        return
    entries, tensors, copies, groups = snapshot
    if tensors:
        with torch.no_grad():
            torch._foreach_copy_(tensors, copies)
    state = optimizer.state
    for p in [p for p in state if p not in entries]:
        del state[p]
    for p, (d, saved) in entries.items():
        d.clear()
        d.update(saved)
        state[p] = d
    for g, saved in zip(optimizer.param_groups, groups):
        g.update(saved)


class EvolutionStrategy:
    """The shared implementation of :class:`EggrollStrategy` and :class:`OpenESStrategy`.

    Subclasses set ``_full_rank`` (dense noise on every parameter) and ``_algorithm``
    (the name stored in checkpoints). See :class:`EggrollStrategy` for the arguments.
    """

    _full_rank: bool = False
    _algorithm: str = "eggroll"
    _backend: str = "triton"  # strategies pickled before the backend choice existed
    nonfinite_fitness: str = "raise"  # ... and before the non-finite fitness policy

    def __init__(
        self,
        sigma: float = 0.1,
        lr: float = 0.01,
        rank: int = 4,
        optimizer: Union[str, type] = "adam",
        optimizer_kwargs: Optional[Mapping] = None,
        antithetic: bool = True,
        noise_reuse: int = 1,
        seed: int = 0,
        fitness_transform: FitnessTransform = "normalize",
        baseline: str = "mean",
        fitness_eps: float = 1e-8,
        group_size: int = 0,
        evolve_bias: bool = True,
        max_grad_norm: Optional[float] = None,
        distributed: bool = False,
        backend: str = "triton",
        nonfinite_fitness: str = "raise",
    ):
        self._sigma = check_real("sigma", sigma)
        self._lr = check_real("lr", lr)
        self._rank = check_int("rank", rank, 1)
        self._optimizer_cls = optimizer_class(optimizer)
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
            raise TypeError(f"optimizer_kwargs must be a mapping, got "
                            f"{type(optimizer_kwargs).__name__}")
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        if "lr" in self.optimizer_kwargs:
            raise ValueError("pass the learning rate as lr=..., not in optimizer_kwargs")
        self.antithetic = bool(antithetic)
        self.noise_reuse = check_int("noise_reuse", noise_reuse, 0)
        self._seed = check_seed(seed)
        self.fitness_transform = check_fitness_transform(fitness_transform)
        self.baseline = check_baseline(baseline)
        self.fitness_eps = check_real("fitness_eps", fitness_eps)
        self.group_size = check_int("group_size", group_size, 0)
        self.evolve_bias = bool(evolve_bias)
        self.max_grad_norm = (None if max_grad_norm is None
                              else check_real("max_grad_norm", max_grad_norm, allow_zero=False))
        self.distributed = bool(distributed)
        self._backend = ops.check_backend(backend)
        self.nonfinite_fitness = check_nonfinite_policy(nonfinite_fitness)

        self.model: Optional[nn.Module] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._evolved = EvolvedSet([])
        self._pending_freeze: set[str] = set()
        self.epoch = 0
        self.total_steps = 0
        self._active: Optional[PerturbationContext] = None
        self._last: Optional[tuple[int, int, NoiseCoords]] = None
        self._last_evaluated = True  # whether the last context ran a perturbed forward
        self._stepped: Optional[tuple[int, int]] = None  # (N, epoch) of the population just used
        self._warned: set[str] = set()  # the once-per-strategy warnings already given
        self._callbacks: dict[str, list[Callable]] = {e: [] for e in _EVENTS}
        # Budget (bytes) for drawing every member's factors once per perturbation context
        # (see PerturbationContext.cache_factors): None = 1 GiB (at most a quarter of the
        # GPU's memory), 0 = always generate inside the kernels. The buffers are reused
        # across contexts.
        self.factor_cache_bytes: Optional[int] = None
        self._factor_storage: dict[str, torch.Tensor] = {}
        self._draw_graphs: dict = {}  # captured factor draws (factor_cache._replay_draws)
        # a step's copies of the parameters and of the optimizer's tensors, for a rollback
        # (kept from one step to the next so that a step allocates nothing for them)
        self._rollback_buffers: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_draw_graphs"] = {}  # captured CUDA graphs neither pickle nor copy: captured again
        state["_rollback_buffers"] = ([], [])  # scratch space of a step
        state.pop("_graphed_gradients", None)
        return state

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _config_names(cls) -> tuple:
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    @classmethod
    def from_config(cls, cfg: Any) -> "EvolutionStrategy":
        """Build from a dataclass, mapping or attribute bag holding constructor argument
        names; unknown names are ignored."""
        names = cls._config_names()
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            items = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        elif isinstance(cfg, Mapping):
            items = dict(cfg)
        else:
            items = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        return cls(**{k: v for k, v in items.items() if k in names})

    def __repr__(self) -> str:
        state = (f"{len(self._evolved)} evolved parameters" if self.model is not None
                 else "not set up")
        rank = "" if self._full_rank else f", rank={self._rank}"
        return (f"{type(self).__name__}(sigma={self._sigma}, lr={self._lr}{rank}, "
                f"antithetic={self.antithetic}, noise_reuse={self.noise_reuse}, "
                f"seed={self._seed}, epoch={self.epoch}; {state})")

    # -- attributes -----------------------------------------------------------------------

    @property
    def sigma(self) -> float:
        """Noise scale (>= 0)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = check_real("sigma", value)

    @property
    def lr(self) -> float:
        """Learning rate; setting it updates the optimizer's param groups."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = check_real("lr", value)
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                group["lr"] = self._lr

    @property
    def seed(self) -> int:
        """Integer key of all noise."""
        return self._seed

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The torch optimizer over the evolved parameters (built in ``setup``)."""
        return self._optimizer

    @property
    def backend(self) -> str:
        """Which implementation computes the noise, the forward and the update:
        ``"triton"`` (the kernels), ``"torch"`` (plain torch) or ``"auto"`` (resolved per
        device); see :func:`evotorch_eggroll.ops.resolve_backend`."""
        return self._backend

    # -- setup ----------------------------------------------------------------------------

    def _require_setup(self, what: str) -> None:
        if self.model is None:
            raise RuntimeError(f"{what} needs a model: call strategy.setup(model) first")

    def _check_parameters_in_place(self) -> None:
        """Raise if the model no longer holds the evolved Parameter objects (e.g. after
        ``model.to("meta")`` or a conversion that replaced its parameters), or if they sit
        on a device the kernels cannot use (e.g. moved to the CPU)."""
        base = self.model.module if isinstance(self.model, ESModule) else self.model
        current = dict(base.named_parameters())
        for e in self._evolved:
            if current.get(e.name) is not e.param:
                raise RuntimeError(
                    f"parameter {e.name!r} is no longer the Parameter object of the model "
                    f"given to setup (a conversion such as model.to(...) replaced it, or it "
                    f"was reassigned); call strategy.setup(model) again")
            ops.check_kernel_device(e.param, f"parameter {e.name!r}", self._backend)

    def _world_info(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the process group, ``(0, 1)`` when not distributed."""
        if not self.distributed:
            return 0, 1
        return _dist.process_group_info()

    def _check_ranks_agree(self, params: Mapping[str, torch.Tensor], *, seed: int,
                           sigma: float, lr: float, rank: int, antithetic: bool,
                           noise_reuse: int, nonfinite_fitness: Optional[str] = None) -> None:
        """Distributed only: one tiny collective comparing the settings that key the noise
        and the update, and the starting values of the evolved parameters, across ranks.
        Raises the same ValueError on every rank when they differ (nothing is changed)."""
        if not self.distributed:
            return
        transform = self.fitness_transform
        settings = {
            "seed": int(seed),
            "algorithm": self._algorithm,
            "sigma": float(sigma),
            "lr": float(lr),
            "noise rank": 0 if self._full_rank else int(rank),
            "antithetic": bool(antithetic),
            "noise_reuse": int(noise_reuse),
            "fitness_transform": transform if isinstance(transform, str) else "<callable>",
            "baseline": self.baseline,
            "group_size": int(self.group_size),
            "max_grad_norm": self.max_grad_norm,
            "optimizer": self._optimizer_cls.__name__,
            "nonfinite_fitness": (self.nonfinite_fitness if nonfinite_fitness is None
                                  else nonfinite_fitness),
        }
        _dist.check_ranks_agree(settings, params, owner=type(self).__name__, hints={
            "seed": "Pass the same seed on every rank (a fixed number, not one drawn per "
                    "process): the ranks regenerate each other's noise from it.",
            "tensors": "Every rank must start from the same parameter values: seed the "
                       "model's initialisation identically on every rank (torch.manual_seed) "
                       "or copy rank 0's values (torch.distributed.broadcast) before setup.",
        })

    def setup(self, model: nn.Module, include: Optional[Iterable[str]] = None,
              exclude: Optional[Iterable[str]] = None) -> "EvolutionStrategy":
        """Discover the evolved parameters of ``model`` and build the optimizer.

        Evolved: parameters with ``requires_grad=True`` in ``named_parameters()`` order,
        restricted to ``include`` and minus ``exclude`` (exact dotted names), minus frozen
        ones (``freeze``, ``ESModule.freeze_parameter``), minus 1-D ones when
        ``evolve_bias=False``. Nothing is installed on the model.

        Args:
            model: the model, every parameter on a CUDA device (or on the CPU with
                ``backend="torch"``/``"auto"``, or under ``TRITON_INTERPRET=1``). Kept as
                ``self.model``, never wrapped.
            include: names to evolve (default: all).
            exclude: names not to evolve.

        Returns:
            self.

        Raises:
            RuntimeError: CPU parameters with ``backend="triton"`` without the
                interpreter; inside a perturb context.
            ValueError: unknown names, nothing to evolve, or a parameter owned by a module
                type whose forward cannot be perturbed per row (``exclude`` it).
                Distributed: ranks whose seed, settings or starting parameter values differ
                (raised on every rank, naming each rank's value).
        """
        if self._active is not None:
            raise RuntimeError("setup() cannot run inside a perturb context")
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup takes an nn.Module, got {type(model).__name__}")
        base = model.module if isinstance(model, ESModule) else model
        frozen = set(model.frozen_parameters) if isinstance(model, ESModule) else set()
        named = list(base.named_parameters())
        if not named:
            raise ValueError("the model has no parameters to evolve")
        for name, p in named:
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"parameter {name!r} is uninitialized (a lazy module): run one "
                                 f"forward pass before setup")
            ops.check_kernel_device(p, f"parameter {name!r}", self._backend)
        known = [n for n, _ in named]

        def names_of(arg: Optional[Iterable[str]], what: str) -> Optional[set]:
            if arg is None:
                return None
            if isinstance(arg, str):
                arg = [arg]
            out = set()
            for n in arg:
                if n not in known and isinstance(n, str) and n.startswith("module.") \
                        and n[len("module."):] in known:
                    n = n[len("module."):]
                if n not in known:
                    raise ValueError(f"{what} names unknown parameter {n!r}; parameters: {known}")
                out.add(n)
            return out

        inc, exc = names_of(include, "include"), names_of(exclude, "exclude") or set()
        pending = names_of(self._pending_freeze, "freeze") or set()
        chosen = [
            (n, p) for n, p in named
            if p.requires_grad and (inc is None or n in inc) and n not in exc
            and n not in frozen and n not in pending and (self.evolve_bias or p.dim() >= 2)
        ]
        if not chosen:
            raise ValueError("no parameters to evolve (check requires_grad, include/exclude, "
                             "frozen parameters and evolve_bias)")
        for n, p in chosen:
            if not p.is_floating_point():
                raise ValueError(f"parameter {n!r} has dtype {p.dtype}; only floating-point "
                                 f"parameters can be evolved")
        check_supported_modules(base, [n for n, _ in chosen])
        # a distributed strategy needs its process group and agreeing ranks now
        self._check_ranks_agree({n: p for n, p in chosen}, seed=self._seed, sigma=self._sigma,
                                lr=self._lr, rank=self._rank, antithetic=self.antithetic,
                                noise_reuse=self.noise_reuse)
        evolved = EvolvedSet(EvolvedParam(n, p, lowrank=not self._full_rank) for n, p in chosen)
        optimizer = self._optimizer_cls([e.param for e in evolved], lr=self._lr,
                                        **self.optimizer_kwargs)
        self.model = model
        self._evolved = evolved
        self._optimizer = optimizer
        self._factor_storage = {}
        self._draw_graphs = {}
        self._rollback_buffers = ([], [])
        self.epoch = 0
        self.total_steps = 0
        self._last = None
        self._stepped = None
        return self

    # -- parameters -------------------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(dotted name, Parameter)`` of every evolved parameter."""
        self._require_setup("named_parameters()")
        return [(e.name, e.param) for e in self._evolved]

    def parameters(self) -> list[nn.Parameter]:
        """The evolved Parameter objects."""
        return [p for _, p in self.named_parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Evolved parameters with dim >= 2."""
        return [p for p in self.parameters() if p.dim() >= 2]

    def bias_parameters(self) -> list[nn.Parameter]:
        """Evolved 1-D parameters."""
        return [p for p in self.parameters() if p.dim() == 1]

    def freeze(self, name: str) -> None:
        """Exclude one more parameter (dotted name) from evolution.

        Before ``setup`` the name is remembered and applied there; after it, the parameter
        leaves the evolved set and the optimizer (with its optimizer state).
        """
        if self._active is not None:
            raise RuntimeError("freeze() cannot run inside a perturb context")
        if not isinstance(name, str):
            raise TypeError(f"parameter names are strings, got {type(name).__name__}")
        if self.model is None:
            self._pending_freeze.add(name)
            return
        try:
            e = _lookup_name(self._evolved, name)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        if len(self._evolved) == 1:
            raise ValueError(f"cannot freeze {e.name!r}: it is the last evolved parameter")
        self._pending_freeze.add(e.name)
        self._evolved = self._evolved.without(e.name)
        for group in self._optimizer.param_groups:
            group["params"] = [q for q in group["params"] if q is not e.param]
        self._optimizer.state.pop(e.param, None)

    # -- noise coordinates ----------------------------------------------------------------

    def _coords(self, epoch: int, sigma: Optional[float] = None) -> NoiseCoords:
        eff = _noise.effective_epoch(epoch, self.noise_reuse)
        return NoiseCoords(seed=self._seed, epoch=eff,
                           sigma=self._sigma if sigma is None else sigma,
                           rank=1 if self._full_rank else self._rank,
                           antithetic=self.antithetic, backend=self._backend)

    # -- evaluation -------------------------------------------------------------------------

    def perturb(self, population_size: int, epoch: Optional[int] = None) -> PerturbationContext:
        """A context manager evaluating a population of ``population_size`` members.

        Args:
            population_size: N > 0.
            epoch: the noise epoch (default ``self.epoch``).

        Raises:
            RuntimeError: before setup, nested in another context of this strategy, CPU
                parameters without the interpreter.
            ValueError: N <= 0, or N not divisible by the world size when distributed.
        """
        self._require_setup("perturb()")
        n = _population_size(population_size)
        if self._active is not None:
            raise RuntimeError("perturbation contexts of one strategy cannot be nested")
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        rank, world = self._world_info()
        if n % world:
            raise ValueError(f"population_size {n} must be divisible by the world size "
                             f"{world} (every rank evaluates an equal slice)")
        self._check_parameters_in_place()
        if self.antithetic and n % 2:
            warnings.warn(
                f"antithetic sampling with an odd population_size ({n}): the last member has "
                f"no mirrored partner", UserWarning, stacklevel=2)
        per = n // world
        return PerturbationContext(self, self._evolved, self._coords(epoch), n, epoch,
                                   range(rank * per, (rank + 1) * per))

    def _context_enter(self, ctx: PerturbationContext) -> None:
        if self._active is not None:
            raise RuntimeError("perturbation contexts of one strategy cannot be nested")
        self._active = ctx
        try:
            for fn in self._callbacks["on_perturb"]:
                fn(ctx.population_size, ctx.epoch)
        except BaseException:
            self._active = None
            raise

    def _context_exit(self, ctx: PerturbationContext) -> None:
        if self._active is ctx:
            self._active = None
        self._last = (ctx.population_size, ctx.epoch, ctx.coords)
        self._last_evaluated = ctx.evaluated
        self._stepped = None

    def _warn_once(self, kind: str, message: str, stacklevel: int = 3) -> None:
        """Warn about ``kind`` the first time only; ``stacklevel`` counts from the caller of
        this method (3: the caller's caller, the user's call of a public method)."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    def eval(self):
        """Context manager under which ``model(x)`` is the plain, unperturbed model (also
        inside ``pop.iterate()``). ``model.training`` is not touched."""
        if self._active is None:
            return contextlib.nullcontext()
        return self._active._with_base_values()

    # -- fitness shaping ------------------------------------------------------------------

    def _shaping(self) -> dict:
        """The shaping settings, as :func:`shape_fitnesses` takes them after the transform."""
        return dict(baseline=self.baseline, eps=self.fitness_eps, group_size=self.group_size,
                    nonfinite=self.nonfinite_fitness)

    def _shape(self, f: torch.Tensor) -> torch.Tensor:
        return shape_fitnesses(f, self.fitness_transform, **self._shaping())

    def normalize_fitnesses(self, fitnesses: torch.Tensor) -> torch.Tensor:
        """The configured fitness transform (works before setup, on any device), with the
        ``nonfinite_fitness`` policy applied first: ``step(f)`` and
        ``step(normalize_fitnesses(f), prenormalized=True)`` use the same weights.

        Returns:
            Same shape and device as ``fitnesses``; its floating dtype (float32 for
            integer input).
        """
        f = torch.as_tensor(fitnesses)
        dtype = f.dtype if f.is_floating_point() else torch.get_default_dtype()
        return self._shape(f.reshape(-1).to(dtype)).to(dtype).reshape(f.shape)

    # -- the update -------------------------------------------------------------------------

    def _all_gather_fitnesses(self, local: torch.Tensor, n: int, epoch: Optional[int] = None
                              ) -> tuple[torch.Tensor, Optional[_dist.GatherChecks]]:
        """The N fitnesses from every rank's slice (one collective) and its checks, left on
        the device: read with the step's own, they refuse the step on every rank alike (a
        wrong slice length on any rank gives the same ValueError everywhere, a failure
        reported by another rank RankFailedError, ranks at different epochs RuntimeError)."""
        return _dist.all_gather_population_deferred(local, n, like=self._collective_like(), epoch=epoch)

    def _collective_like(self) -> Optional[torch.device]:
        return self._evolved.entries[0].param.device if self._evolved.entries else None

    def _report_failure_to_ranks(self, error: BaseException, n: int, epoch: int,
                                 during: str) -> None:
        """This generation's fitness all-gather as a rank that failed (see
        :func:`evotorch_eggroll.distributed.report_failure`)."""
        _dist.report_failure(error, n, like=self._collective_like(), epoch=epoch, during=during)

    def _pending_population(self) -> Optional[tuple[int, int]]:
        """``(N, epoch)`` of the population the next ``step`` would use: the open perturb
        context's, else the last one's, else (already stepped) the previous population's
        size at the current epoch; None before any population."""
        if self._active is not None:
            return self._active.population_size, self._active.epoch
        if self._last is not None:
            return self._last[0], self._last[1]
        if self._stepped is not None:
            return self._stepped[0], self.epoch
        return None

    def _local_fitnesses(self, fitnesses: Any) -> torch.Tensor:
        """``fitnesses`` as a real 1-D tensor (no communication)."""
        f = as_value_tensor(
            fitnesses, type_message="fitnesses must be a 1-D tensor or a sequence of real numbers "
                                    "(one per population member)",
            meta_message="fitnesses are a meta tensor, which holds no values; pass the evaluated "
                         "fitnesses (a CPU or CUDA tensor)")
        if f.dtype == torch.bool or f.is_complex():
            raise TypeError(f"fitnesses must be real numbers, got dtype {f.dtype}")
        if not f.is_floating_point():
            f = f.to(torch.float64)
        if f.dim() != 1 and sum(s != 1 for s in f.shape) <= 1:
            f = f.reshape(-1)
        if f.dim() != 1:
            raise ValueError(f"fitnesses must be 1-D (one value per population member), got "
                             f"shape {tuple(f.shape)}")
        return f

    @staticmethod
    def _all_values_given(fitnesses: Any, n: int) -> bool:
        """Whether ``fitnesses`` holds N values (the distributed form that does not
        communicate) rather than a slice to all-gather (or something unreadable)."""
        try:
            return torch.as_tensor(fitnesses).numel() == n
        except Exception:  # noqa: BLE001 - unreadable: taken for the default, a slice
            return False

    def _collect_fitnesses(self, fitnesses: Any, n: int, epoch: Optional[int] = None
                           ) -> tuple[torch.Tensor, Optional[_dist.GatherChecks]]:
        """All N fitnesses: ``fitnesses`` itself, or (distributed, a slice) all-gathered,
        with the all-gather's checks (None without one), which the step reads with its own.
        Distributed, an error in a slice is reported to the other ranks through the
        all-gather they wait in before it is raised here."""
        _, world = self._world_info()
        checks = None
        try:
            f = self._local_fitnesses(fitnesses)
        except Exception as err:
            if world > 1 and not self._all_values_given(fitnesses, n):
                self._report_failure_to_ranks(err, n, self.epoch if epoch is None else epoch,
                                              "step")
            raise
        if world > 1 and f.shape[0] != n:
            f, checks = self._all_gather_fitnesses(f, n, epoch)
        if f.shape[0] != n:
            raise ValueError(f"got {f.shape[0]} fitness values for a population of {n} members "
                             f"(the population_size of the last perturb context)")
        return f, checks

    def report_failure(self, error: BaseException, population_size: Optional[int] = None) -> None:
        """Tell the other ranks that this rank's evaluation of the generation failed.

        With ``distributed=True``, call it in place of :meth:`step` on a rank whose
        evaluation raised, then re-raise the exception::

            try:
                with strategy.perturb(N) as pop:
                    local_fitness = evaluate(pop)
            except Exception as exc:
                strategy.report_failure(exc)
                raise
            metrics = strategy.step(local_fitness)

        It takes part in the generation's fitness all-gather (the collective the other ranks
        wait in inside ``step``) with a failure flag and ``"ExceptionType: message"`` instead
        of fitnesses. ``step`` then raises
        :class:`~evotorch_eggroll.distributed.RankFailedError` on the other ranks at once,
        naming this rank and its exception, instead of leaving them waiting until the
        process group's timeout. No rank updates anything (parameters, optimizer state and
        epoch stay as they were), so the generation can be evaluated again on every rank.
        The other ranks must pass their own slices to ``step`` (with all N values on every
        rank, ``step`` does not communicate and cannot learn of the failure).

        Without ``distributed`` there is nobody to tell. In both cases the population of
        the last perturb context is discarded (``step`` needs a new one).

        Args:
            error: this rank's exception (its type and message, cut to 224 bytes, are
                sent).
            population_size: N, when this rank has not opened a perturb context yet (the
                first ``perturb`` failed); by default that of the open or last context, or
                of the previous step's population.

        Raises:
            RuntimeError: before setup; N unknown; the collective itself failed (e.g.
                another rank exited).
        """
        self._require_setup("report_failure()")
        pending = self._pending_population()
        if population_size is not None:
            epoch = pending[1] if pending is not None else self.epoch
            pending = (_population_size(population_size), epoch)
        if self._active is None:
            self._last = None
        _, world = self._world_info()
        if world == 1:
            return
        if pending is None:
            raise RuntimeError("report_failure() needs the population size: this rank has not "
                               "evaluated a population yet; pass population_size=N") from error
        self._report_failure_to_ranks(error, pending[0], pending[1], "evaluation")

    def step(self, fitnesses: Any, prenormalized: bool = False) -> dict:
        """Update the parameters from the fitnesses of the last perturb context's members.

        A step either completes or leaves everything as it was. The stages: find the
        population (``_step_population``), gather the fitnesses (``_collect_fitnesses``),
        shape them unless ``prenormalized`` and compute their checks and statistics on their
        device (``_step_weights``), fold antithetic pairs, regenerate the noise and form
        ``g = (1/sqrt(N)) sum_i w_i P_i`` per parameter (``_negative_gradients``), clip its
        global norm to ``max_grad_norm`` (``_clip_gradients``), hand ``-g`` to the optimizer
        as ``.grad`` (``_apply_update``; the parameters' own ``.grad`` are restored
        afterwards), read the checks and the metrics in one device-to-host copy, refuse
        the step if a check fails (``_refuse_or_warn``: the update is rolled back), advance
        ``epoch`` and ``total_steps`` (``_advance``), fire ``on_step``. No stage before the
        update reads the fitnesses' values back to the host, so on a GPU the whole update
        is queued behind the evaluation that produced them.

        Args:
            fitnesses: ``(N,)`` values, higher is better. Distributed: this rank's
                ``(N / world,)`` slice (``pop.local_member_ids()``), all-gathered in one
                collective; or all N values, identical on every rank, used as given
                without communication. Every rank must call ``step`` and pass the same
                kind (a wrong slice length on any rank raises on every rank). A rank whose
                evaluation failed calls :meth:`report_failure` instead.
            prenormalized: use the fitnesses as the weights ``w`` as given (they must be
                finite, whatever ``nonfinite_fitness`` says).

        Returns:
            Metrics (plain Python numbers): ``grad_norm`` (after clipping),
            ``param_delta_norm``, ``fitness_mean``/``std`` (population std)/``max``/``min``
            (raw; of the finite fitnesses only), ``normalized_fitness_mean``, ``epoch`` (of
            the evaluated population), ``lr``, ``sigma``, ``population_size``,
            ``nonfinite_count`` (members whose fitness was NaN or inf and that
            ``nonfinite_fitness="worst"`` ranked last; 0 otherwise).

        Raises:
            RuntimeError: before setup, inside a perturb context, without a preceding one;
                parameters or fitnesses on an unusable device (e.g. ``meta``).
            ValueError: wrong number or shape of fitnesses, NaN/inf (with
                ``nonfinite_fitness="raise"``, in prenormalized weights, or in every
                fitness), N not a multiple of group_size.
            TypeError: fitnesses that are not real numbers (bool, complex, strings).
            RankFailedError: (distributed, slices) another rank reported that it failed in
                this generation (:meth:`report_failure`, or an error in its own ``step``
                before the all-gather); the message names the rank and its exception.

        Failure semantics: errors in the arguments and the state are raised before anything
        changes; errors in the fitnesses' values (NaN/inf) are found after the update is
        queued, which is then rolled back (the parameters and the optimizer state
        bit-exactly as before; the optimizer's own step hooks, if any, have run). Either
        way ``epoch``/``total_steps`` do not advance and the perturb context stays
        available for another ``step``. Distributed with slices,
        an error this rank finds before the all-gather (in its fitnesses or its state) is
        first reported to the other ranks through the all-gather they wait in, so that every
        rank raises at once and none updates; ranks that arrive at different epochs (after
        a step that failed on some ranks only, past the all-gather) raise RuntimeError on
        every rank. If the optimizer raises (or the step is interrupted), the parameters and
        the optimizer state are restored to their values before the step,
        ``epoch``/``total_steps`` do not advance and the error propagates. ``on_step``
        callbacks run after the update is complete and the counters have advanced: an
        exception from a callback propagates (later callbacks do not run) and the update
        is kept.
        """
        return self._step(fitnesses, prenormalized)[0]

    def _step(self, fitnesses: Any, prenormalized: bool,
              refusals: Sequence[StepRefusal] = (), metrics: bool = True,
              extra: Optional[torch.Tensor] = None) -> tuple[Optional[dict], list]:
        """:meth:`step`, with ``refusals``: conditions computed by the caller on the device
        (EGGROLL's checks of the raw fitnesses) that refuse the step like the strategy's own
        checks, read with them (distributed with a slice of fitnesses, the all-gather's
        checks come first); ``metrics=False`` for a caller that does not use the
        metrics (EGGROLL): then, unless an ``on_step`` callback wants them, the step computes
        only what its checks need (no fitness statistics, no norms unless clipping needs
        one) and gives None for the metrics; and ``extra``, a 1-D tensor that the caller
        computed on the device, read in the same copy as the checks. The update is the same
        either way. Returns ``(metrics, values of extra)`` (an empty list without it).

        No stage before the update reads a value of the fitnesses back to the host: the
        update is queued on the device behind the evaluation, and the checks that depend
        on the values (non-finite fitnesses, the warnings) are read in one copy. With the
        metrics that copy follows the update (it holds the norms); without them it starts
        before the update is queued and waits for the checks only, so that on a GPU the
        host goes on while the device runs the update. A refused step is rolled back from
        the snapshots the update takes (the parameters and the optimizer state bit-exactly
        as before) and raises; ``epoch`` does not advance and the perturb context stays
        available.
        """
        n, epoch, coords = self._step_population(fitnesses)
        f, gathered = self._collect_fitnesses(fitnesses, n, epoch)
        if gathered is not None:  # distributed: the all-gather's checks come first
            refusals = (gathered, *refusals)
        if self.group_size and n % self.group_size:
            raise ValueError(f"population size {n} is not a multiple of group_size="
                             f"{self.group_size}")
        lean = not metrics and not self._callbacks["on_step"]
        w, checks = self._step_weights(f, prenormalized, lean)
        names = _LEAN_CHECKS if lean else _CHECKS + ("grad_norm", "param_delta_norm")
        flags = [r.flag.reshape(1).to(checks) for r in refusals]
        extras = [] if extra is None else [extra.reshape(-1).to(checks)]
        # without the norms the copy starts before the update is queued: it does not wait for it
        read = start_read(torch.cat([checks, *flags, *extras])) if lean else None
        neg_grads, norm = self._clip_gradients(self._negative_gradients(w, n, coords),
                                               need_norm=not lean)
        delta, snapshot = self._apply_update(neg_grads, need_delta=not lean)
        try:
            if not lean:
                norms = torch.stack([norm.to(delta.device), delta]).to(checks)
                read = start_read(torch.cat([checks, norms, *flags, *extras]))
            values = _host_values(read)
            checked = dict(zip(names, values))
            self._refuse_or_warn(checked, values[len(names):len(names) + len(flags)],
                                 refusals, n, prenormalized)
        except BaseException:
            self._roll_back(*snapshot)
            raise
        result = None if lean else self._step_metrics(checked, n, epoch)
        self._advance(n, epoch)
        for fn in self._callbacks["on_step"]:  # none when lean
            fn(dict(result))
        return result, values[len(names) + len(flags):]

    def _step_population(self, fitnesses: Any) -> tuple[int, int, NoiseCoords]:
        """First stage of :meth:`step`: ``(N, epoch, noise coordinates)`` of the population
        to update from. Raises if there is none (before setup, inside a perturb context, no
        context since the last step) or the parameters moved; distributed with a slice of
        fitnesses, the error is first reported to the ranks waiting in the all-gather."""
        self._require_setup("step()")
        try:
            if self._active is not None:
                raise RuntimeError("step() cannot run inside a perturb context; call it after "
                                   "the `with strategy.perturb(...)` block")
            if self._last is None:
                if self._stepped is not None:
                    n, epoch = self._stepped
                    raise RuntimeError(
                        f"step() needs a preceding perturb context: the population of the last "
                        f"one (population_size={n}, epoch={epoch}) was already used by a "
                        f"step(); evaluate a new population in `with strategy.perturb(N) as "
                        f"pop:` first")
                raise RuntimeError("step() needs a preceding perturb context: evaluate the "
                                   "population in `with strategy.perturb(N) as pop:` first")
            self._check_parameters_in_place()
        except Exception as err:
            # distributed, a slice: the other ranks wait in this generation's all-gather
            pending = self._pending_population()
            if (pending is not None and self._world_info()[1] > 1
                    and not self._all_values_given(fitnesses, pending[0])):
                self._report_failure_to_ranks(err, pending[0], pending[1], "step")
            raise
        return self._last

    def _step_weights(self, f: torch.Tensor, prenormalized: bool, lean: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shaping stage of :meth:`step`: the weights of the N fitnesses (``f`` itself when
        ``prenormalized``, else shaped under the ``nonfinite_fitness`` policy) and what the
        checks and the metrics need, both computed on ``f``'s device with no host read.

        Returns:
            ``(w, checks)``: the weights ``(N,)`` float64 and the float64 vector of
            :data:`_CHECKS` (the non-finite fitnesses and weights, whether all fitnesses are
            equal, the first fitness, and the mean, population variance, maximum and
            minimum of the finite fitnesses, the mean weight); with ``lean``, of
            :data:`_LEAN_CHECKS` only (the two counts).
        """
        f64 = f.detach().to(torch.float64)
        w = f64 if prenormalized else _shape_fitnesses_unchecked(
            f.detach(), self.fitness_transform, **self._shaping())
        if lean:
            bad = (~torch.isfinite(f64)).sum(dtype=torch.float64)
            bad_w = bad if prenormalized else (~torch.isfinite(w)).sum(dtype=torch.float64)
            return w, torch.stack([bad, bad_w])
        finite = torch.isfinite(f64)
        count = finite.sum(dtype=torch.float64)
        inf = torch.full((), float("inf"), dtype=torch.float64, device=f64.device)  # no copy
        mean = torch.where(finite, f64, 0.0).sum() / count
        var = torch.where(finite, (f64 - mean).square(), 0.0).sum() / count
        checks = torch.stack([
            f64.shape[0] - count,
            (~torch.isfinite(w)).sum(dtype=torch.float64),
            (f64 == f64[0]).all().to(torch.float64),
            f64[0],
            mean,
            var,
            torch.where(finite, f64, -inf).amax(),
            torch.where(finite, f64, inf).amin(),
            w.mean(),
        ])
        return w, checks

    def _refuse_or_warn(self, checked: dict, flags: list, refusals: Sequence[StepRefusal],
                        n: int, prenormalized: bool) -> None:
        """Raises the first error that the values read after the update call for (the
        caller's refusals first, by their ``flags``, then non-finite fitnesses against the
        policy, then non-finite shaped weights); else gives the once-per-strategy warnings
        (the equal-fitness one only when ``checked`` has ``all_equal``)."""
        for refusal, flag in zip(refusals, flags):
            if flag:
                raise refusal.error()
        nonfinite, bad_weights = int(checked["nonfinite"]), int(checked["nonfinite_weights"])
        equal, first = checked.get("all_equal", 0.0), checked.get("first")
        if nonfinite:
            if prenormalized:
                raise ValueError(
                    "prenormalized weights contain NaN or inf; nothing was updated (weights "
                    "are used as given: nonfinite_fitness applies to raw fitnesses, e.g. "
                    "through strategy.normalize_fitnesses)")
            if self.nonfinite_fitness == "raise":
                raise ValueError(
                    f"fitnesses contain NaN or inf; nothing was updated ({nonfinite} of {n} "
                    f"members; nonfinite_fitness='worst' ranks such members below every finite "
                    f"one)")
            if nonfinite == n:
                raise ValueError(f"all {n} fitnesses are NaN or inf; nothing was updated "
                                 f"(nonfinite_fitness='worst' needs at least one finite fitness "
                                 f"to rank them below)")
        if bad_weights:
            raise ValueError("shaped fitnesses contain NaN or inf; nothing was updated")
        if not self._last_evaluated:
            self._warn_once(
                "unevaluated",
                "step() follows a perturb context in which no perturbed forward ran "
                "(pop.batched_forward, or model(x) inside pop.iterate()): a plain model(x) "
                "in the context computes the unperturbed model, so these fitnesses say "
                "nothing about the perturbations (warned once per strategy)", stacklevel=5)
        if n > 1 and not nonfinite and equal:
            self._warn_once(
                "equal",
                f"all {n} {'prenormalized weights' if prenormalized else 'fitnesses'} are "
                f"equal ({first!r}): the ES gradient is zero and the parameters do "
                f"not change (warned once per strategy)", stacklevel=5)

    def _negative_gradients(self, w: torch.Tensor, n: int,
                            coords: NoiseCoords) -> list[torch.Tensor]:
        """Gradient stage of :meth:`step`: ``-g`` per evolved parameter (float32, flat as
        the update kernels return it), ``g = (1/sqrt(N)) sum_i w_i P_i`` with antithetic
        pairs folded onto their shared draw and the noise regenerated from ``coords``.

        The optimizer minimises, so it gets ``-g``: negating the coefficients gives exactly
        ``-g`` (negation is exact through every product and sum). The pairs are folded on
        the weights' device (exact in float64 there as anywhere); the draws and the
        coefficients are copied once per parameter device, the coefficients times each
        noise scale formed once per device and scale.

        On one CUDA device with the Triton kernels, the stage is replayed from a captured
        CUDA graph from the second step of the same population and settings on (the kernels
        read the epoch from device memory): one copy of the weights and one graph launch
        instead of a few launches per parameter, the same numbers bit for bit.
        """
        if self._gradients_graphable(w, coords):
            graphed = self.__dict__.get("_graphed_gradients")
            if graphed is None:
                graphed = self._graphed_gradients = GraphedCall("the update's gradient stage")
            scales = tuple(e.noise_scale(coords) for e in self._evolved)
            key = (n, coords.seed, coords.sigma, coords.rank, coords.antithetic, coords.backend,
                   self.antithetic, scales,
                   tuple((e.key, e.param.data_ptr(), e.param.dtype, e.param.shape, e.lowrank,
                          ops.update_precision(e.param)) for e in self._evolved))
            epoch = torch.full((1,), coords.epoch, dtype=torch.int64, device=w.device)
            return graphed(lambda w_, epoch_: self._gradient_stage(w_, n, coords, epoch_), key, w, epoch)
        return self._gradient_stage(w, n, coords, None)

    def _gradients_graphable(self, w: torch.Tensor, coords: NoiseCoords) -> bool:
        """Whether the gradient stage can be captured: every evolved parameter on ``w``'s
        CUDA device, the Triton kernels computing, no compilation under way."""
        if not w.is_cuda or torch.compiler.is_compiling() or not len(self._evolved):
            return False
        if any(e.param.device != w.device for e in self._evolved):
            return False
        return not ops._runs_torch_fast(coords.backend, w)

    def _gradient_stage(self, w: torch.Tensor, n: int, coords: NoiseCoords,
                        epoch: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """The body of :meth:`_negative_gradients` (``epoch``: see ``EvolvedParam.gradient``)."""
        idx, coeffs = antithetic_fold(w, self.antithetic)
        neg_coeffs = -(coeffs / math.sqrt(n))
        on_device: dict = {}
        scaled: dict = {}
        neg_grads = []
        for e in self._evolved:
            dev = e.param.device
            if dev not in on_device:
                on_device[dev] = (idx.to(dev), neg_coeffs.to(dev, torch.float32))
            scale = e.noise_scale(coords)
            if (dev, scale) not in scaled:
                scaled[dev, scale] = on_device[dev][1] * scale
            neg_grads.append(e.gradient(coords, on_device[dev][0], scaled[dev, scale],
                                        scaled=True, epoch=epoch))
        return neg_grads

    def _clip_gradients(self, neg_grads: list[torch.Tensor], need_norm: bool = True
                        ) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Clipping stage of :meth:`step`: the global norm of ``neg_grads`` and, with
        ``max_grad_norm`` set, the gradients scaled to that norm where it is exceeded (the
        factor ``max_grad_norm / (norm + 1e-6)`` formed on the device in float64; a norm
        within the bound multiplies by exactly 1), with no host read.

        Returns:
            ``(neg_grads, norm)``: the gradients to apply and their global norm (a 0-dim
            float32 tensor, not synchronised; None when neither ``need_norm`` nor clipping
            asks for it).
        """
        if self.max_grad_norm is None and not need_norm:
            return neg_grads, None
        norm = _total_norm(neg_grads)
        if self.max_grad_norm is not None and neg_grads:
            wide = norm.to(torch.float64)
            factor = torch.where(wide > self.max_grad_norm, self.max_grad_norm / (wide + 1e-6),
                                 1.0).to(torch.float32)
            neg_grads = [g * factor.to(g.device) for g in neg_grads]
            norm = _total_norm(neg_grads)
        return neg_grads, norm

    def _apply_update(self, neg_grads: list[torch.Tensor], need_delta: bool = True
                      ) -> tuple[Optional[torch.Tensor], tuple]:
        """Optimizer stage of :meth:`step`: hands ``neg_grads`` to the optimizer as the
        parameters' ``.grad`` and steps it; the parameters' own ``.grad`` are put back
        afterwards.

        If the optimizer raises (or the step is interrupted), the parameters and the
        optimizer state go back to their values before this call and the error propagates.
        With ``lr == 0`` the parameters are restored bit-exactly (an optimizer adding a
        signed zero could flip -0.0 to +0.0).

        Returns:
            ``(delta, snapshot)``: the norm of the parameters' change (a 0-dim float32
            tensor, not synchronised; None without ``need_delta``) and the snapshot that
            :meth:`_roll_back` restores.
        """
        params = [e.param for e in self._evolved]
        held_params, held_state = self._rollback_buffers
        before = _held_copies(held_params, [p.detach() for p in params])
        own_grads = [p.grad for p in params]
        snapshot = (params, before, _optimizer_snapshot(self._optimizer, held_state))
        try:
            for p, g in zip(params, neg_grads):
                p.grad = g.to(p.dtype).view_as(p)
            self._optimizer.step()
        except BaseException:
            self._roll_back(*snapshot)
            raise
        finally:
            for p, g in zip(params, own_grads):
                p.grad = g
        with torch.no_grad():
            if self._lr == 0.0 and params:
                torch._foreach_copy_(params, before)
            if not need_delta:
                return None, snapshot
            delta = _total_norm(torch._foreach_sub([p.float() for p in params],
                                                   [b.float() for b in before]) if params else [])
        return delta, snapshot

    def _roll_back(self, params: list[torch.Tensor], before: list[torch.Tensor],
                   optimizer_state: Any) -> None:
        """Puts the parameters and the optimizer state back to an :meth:`_apply_update`
        snapshot."""
        if params:
            with torch.no_grad():
                torch._foreach_copy_(params, before)
        _restore_optimizer(self._optimizer, optimizer_state)

    def _step_metrics(self, checked: dict, n: int, epoch: int) -> dict:
        """Metrics stage of :meth:`step` (plain Python numbers; see its Returns) from the
        values read after the update, by name."""
        nonfinite = int(checked["nonfinite"])
        return {
            "grad_norm": checked["grad_norm"],
            "param_delta_norm": checked["param_delta_norm"],
            "fitness_mean": checked["mean"],
            "fitness_std": math.sqrt(checked["variance"]) if n - nonfinite > 1 else 0.0,
            "fitness_max": checked["max"],
            "fitness_min": checked["min"],
            "normalized_fitness_mean": checked["weight_mean"],
            "epoch": int(epoch),
            "lr": float(self._lr),
            "sigma": float(self._sigma),
            "population_size": int(n),
            "nonfinite_count": nonfinite,
        }

    def _advance(self, n: int, epoch: int) -> None:
        """Last stage of :meth:`step` (cannot fail): the counters advance and the population
        ``(n, epoch)`` is marked as used."""
        self.epoch += 1
        self.total_steps += 1
        self._last = None
        self._stepped = (n, epoch)

    # -- callbacks --------------------------------------------------------------------------

    def register_callback(self, event: str, fn: Callable) -> None:
        """``"on_step"``: ``fn(metrics)`` once per step; ``"on_perturb"``:
        ``fn(population_size, epoch)`` once per perturb context."""
        if event not in _EVENTS:
            raise ValueError(f"unknown event {event!r}; expected 'on_step' or 'on_perturb'")
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {type(fn).__name__}")
        self._callbacks[event].append(fn)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs: hyperparameters that key the noise,
        counters, optimizer state and evolved parameter values. Tensors, numbers, strings,
        lists and dicts only (``torch.load(..., weights_only=True)`` works)."""
        self._require_setup("state_dict()")
        return {
            "algorithm": self._algorithm,
            "noise_stream_version": _noise.STREAM_VERSION,
            "sigma": float(self._sigma),
            "lr": float(self._lr),
            "epoch": int(self.epoch),
            "total_steps": int(self.total_steps),
            "seed": int(self._seed),
            "rank": 0 if self._full_rank else int(self._rank),
            "antithetic": bool(self.antithetic),
            "noise_reuse": int(self.noise_reuse),
            "nonfinite_fitness": self.nonfinite_fitness,
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
            "parameters": {e.name: e.param.detach().clone() for e in self._evolved},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (the loaded seed, rank, antithetic, noise_reuse and
        nonfinite_fitness override the constructor's; a state without
        ``nonfinite_fitness``, saved before that setting existed, keeps the current one).

        Validated before anything changes: keys, algorithm and noise stream version, the
        types and ranges of the settings, the parameter names (the same architecture),
        shapes, floating dtypes and finite values, and the optimizer state (rehearsed on a
        scratch optimizer); see :mod:`evotorch_eggroll.checkpoint`. On any error the
        strategy, its optimizer and the model are exactly as before.

        Raises:
            KeyError: missing keys.
            TypeError: values of the wrong type.
            ValueError: another algorithm, architecture, shape, non-finite values or an
                optimizer state that does not fit.
        """
        self._require_setup("load_state_dict()")
        if self._active is not None:
            raise RuntimeError("load_state_dict() cannot run inside a perturb context")
        loaded = checkpoint.check_state_dict(state, algorithm=self._algorithm,
                                             full_rank=self._full_rank, evolved=self._evolved,
                                             nonfinite_fitness=self.nonfinite_fitness)
        checkpoint.rehearse_optimizer_state(self._optimizer, self._optimizer_cls, self._lr,
                                            self.optimizer_kwargs, loaded.optimizer)
        self._check_ranks_agree(loaded.parameters, seed=loaded.seed, sigma=loaded.sigma,
                                lr=loaded.lr, rank=loaded.rank, antithetic=loaded.antithetic,
                                noise_reuse=loaded.noise_reuse,
                                nonfinite_fitness=loaded.nonfinite_fitness)
        self._load_optimizer_and_parameters(loaded)
        self._adopt_loaded_settings(loaded)

    def _load_optimizer_and_parameters(self, loaded: checkpoint.CheckedState) -> None:
        """Load stage of :meth:`load_state_dict`: the optimizer state, then the parameter
        values; if writing the values fails, the optimizer state goes back to what it was."""
        previous = self._optimizer.state_dict()  # references: loading replaces, never mutates
        self._optimizer.load_state_dict(copy.deepcopy(loaded.optimizer))
        try:
            with torch.no_grad():
                for e in self._evolved:
                    e.param.copy_(loaded.parameters[e.name].to(e.param.device))
        except BaseException:
            self._optimizer.load_state_dict(previous)
            raise

    def _adopt_loaded_settings(self, loaded: checkpoint.CheckedState) -> None:
        """Last stage of :meth:`load_state_dict` (cannot fail): the loaded settings and
        counters replace the strategy's, and no population is pending any more."""
        self._sigma = loaded.sigma
        self.lr = loaded.lr
        self.epoch = loaded.epoch
        self.total_steps = loaded.total_steps
        self._seed = loaded.seed
        if not self._full_rank:
            self._rank = loaded.rank
        self.antithetic = loaded.antithetic
        self.noise_reuse = loaded.noise_reuse
        self.nonfinite_fitness = loaded.nonfinite_fitness
        self._last = None
        self._stepped = None

    # -- inspection -------------------------------------------------------------------------

    def _entry(self, param: Union[torch.Tensor, str]) -> EvolvedParam:
        self._require_setup("inspection")
        if isinstance(param, str):
            return _lookup_name(self._evolved, param)
        e = self._evolved.lookup(param) if isinstance(param, torch.Tensor) else None
        if e is None:
            raise ValueError("param is not one of this strategy's evolved Parameter objects "
                             "(looked up by identity); see strategy.parameters()")
        return e

    def _perturbation(self, e: EvolvedParam, member_id: int, epoch: Optional[int],
                      sigma: Optional[float] = None) -> Perturbation:
        k = _check_member(member_id)
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        return member_perturbation(e, self._coords(epoch, sigma), k, epoch)

    def _sample_perturbation(self, param: torch.Tensor, member_id: int,
                             epoch: Optional[int] = None) -> Perturbation:
        """Member ``member_id``'s perturbation of ``param`` (an evolved Parameter object) at
        ``epoch`` (default ``self.epoch``): exactly the noise forward and update use."""
        return self._perturbation(self._entry(param), member_id, epoch)

    def member_perturbation(self, param: Union[torch.Tensor, str], member_id: int,
                            epoch: Optional[int] = None, *, sigma: Optional[float] = None) -> Perturbation:
        """Member ``member_id``'s perturbation of ``param`` (an evolved Parameter object or its
        dotted name) at ``epoch`` (default ``self.epoch``), scaled by ``sigma`` (default
        ``self.sigma``): with the sigma a generation ran with, exactly the noise its forward
        and update used, e.g. to rebuild a member of an earlier generation."""
        e = self._entry(param)
        return self._perturbation(e, member_id, epoch, None if sigma is None else check_real("sigma", sigma))

    def sample_perturbations(self, param: Union[torch.Tensor, str], population_size: int,
                             epoch: Optional[int] = None) -> PerturbationSequence:
        """The perturbations of members ``0..N-1`` of ``param`` at ``epoch`` (default
        ``self.epoch``): a lazy sequence (len, index, slice, iterate).

        ``param`` is an evolved Parameter object or its dotted name, so
        ``strategy.sample_perturbations("fc.weight", N)[k]`` is member ``k``'s perturbation
        of ``fc.weight`` (inside a perturb context, ``pop.get_perturbation(k, "fc.weight")``
        gives the same at the context's epoch)."""
        e = self._entry(param)
        n = _population_size(population_size)
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        return PerturbationSequence(lambda k: self._perturbation(e, k, epoch), n)

    def _get_perturbation(self, param_name: str, member_id: int,
                          epoch: Optional[int] = None) -> Perturbation:
        """Like :meth:`_sample_perturbation`, by dotted parameter name. The public ways to
        the same noise: ``sample_perturbations(param_name, N, epoch)[member_id]`` and,
        inside a perturb context, ``pop.get_perturbation(member_id, param_name)``."""
        if not isinstance(param_name, str):
            raise TypeError(f"param_name must be a string, got {type(param_name).__name__}")
        return self._perturbation(self._entry(param_name), member_id, epoch)

    def get_antithetic_partner(self, member_id: int) -> int:
        """The mirrored partner of a member: ``member_id ^ 1``."""
        return _check_member(member_id) ^ 1

    def is_positive_perturbation(self, member_id: int) -> bool:
        """True for even members when antithetic; always True otherwise."""
        return _noise.member_sign(_check_member(member_id), self.antithetic) > 0


class EggrollStrategy(EvolutionStrategy):
    """EGGROLL: evolution strategy with low-rank weight perturbations.

    Args:
        sigma: noise scale (0 is legal: all perturbations exactly zero).
        lr: learning rate of the optimizer (0 leaves parameters bit-identical).
        rank: rank r >= 1 of the weight noise ``A0 B0^T``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or a ``torch.optim.Optimizer``
            subclass.
        optimizer_kwargs: forwarded to the optimizer (``lr`` is passed separately).
        antithetic: mirrored sampling: members ``2k`` and ``2k+1`` share noise with signs
            +1 and -1.
        noise_reuse: 0 = one noise draw for every epoch; n >= 1 = fresh noise every n epochs.
        seed: integer key of all noise (``0 <= seed < 2**64``).
        fitness_transform: ``"normalize"``, ``"rank"``, ``"centered_rank"``, ``"none"`` or a
            callable ``Tensor -> Tensor``.
        baseline: ``"mean"`` or ``"antithetic"`` (pairwise).
        fitness_eps: epsilon of the z-score denominator.
        group_size: 0, or shape within consecutive groups of this many members.
        evolve_bias: False leaves 1-D parameters alone.
        max_grad_norm: clip the global norm of the ES gradient.
        distributed: shard the population over the ranks of the initialized
            ``torch.distributed`` group: ``pop.local_member_ids()`` is this rank's
            contiguous slice, ``step`` all-gathers the N fitnesses and every rank applies
            the same update. ``setup``, ``step`` and ``load_state_dict`` are then collective
            (call them on every rank); ``setup`` checks that all ranks agree on the seed,
            settings and starting parameters.
        backend: which implementation runs the noise, the batched forward and the update.
            ``"triton"`` (default): the Triton kernels; the model must be on a CUDA GPU
            (or on the CPU under ``TRITON_INTERPRET=1``, the kernels in Triton's slow
            interpreter, for debugging), else ``setup`` raises. ``"torch"``: the plain-torch
            CPU path, the same perturbations and updates from the same noise stream
            (bit-identical Philox words, normals within float32 rounding) computed with
            batched matrix products, on any device. ``"auto"``: the kernels on CUDA
            devices and under the interpreter, plain torch otherwise.
        nonfinite_fitness: what ``step`` does with NaN, +inf or -inf fitnesses.
            ``"raise"`` (default): a ValueError, nothing updated. ``"worst"``: such a
            member has diverged and ranks below every finite member, whatever the sign
            of its value (+inf too). Before shaping, its fitness is replaced by
            ``lo - (hi - lo)`` (``lo``/``hi``: the smallest/largest finite fitness; when
            those are equal, ``lo - max(|lo|, 1)``), so every transform (and a callable)
            sees finite values: rank transforms put such members last, tied among
            themselves; ``"normalize"`` and ``"none"`` use the replacement value. An
            antithetic pair whose two members both diverged contributes nothing. The
            count is the ``nonfinite_count`` metric; the fitness metrics describe the
            finite members. All members non-finite, or non-finite prenormalized weights,
            remain a ValueError before anything changes. Distributed, every rank applies
            the rule to the same all-gathered fitnesses.

    Note:
        AdamW applies its (decoupled) weight decay, 0.01 by default, even when the ES
        gradient is zero; pass ``optimizer_kwargs={"weight_decay": 0.0}`` to avoid it.
    """

    _full_rank = False
    _algorithm = "eggroll"

    @property
    def rank(self) -> int:
        """The rank r of the weight noise."""
        return self._rank


class OpenESStrategy(EvolutionStrategy):
    """OpenES: the same interface and conventions as :class:`EggrollStrategy` without
    ``rank``: every parameter gets full-rank noise ``s_i sigma eps`` (materialised per
    member in the forward, by nature)."""

    _full_rank = True
    _algorithm = "openes"

    def __init__(
        self,
        sigma: float = 0.1,
        lr: float = 0.01,
        optimizer: Union[str, type] = "adam",
        optimizer_kwargs: Optional[Mapping] = None,
        antithetic: bool = True,
        noise_reuse: int = 1,
        seed: int = 0,
        fitness_transform: FitnessTransform = "normalize",
        baseline: str = "mean",
        fitness_eps: float = 1e-8,
        group_size: int = 0,
        evolve_bias: bool = True,
        max_grad_norm: Optional[float] = None,
        distributed: bool = False,
        backend: str = "triton",
        nonfinite_fitness: str = "raise",
    ):
        super().__init__(sigma=sigma, lr=lr, rank=1, optimizer=optimizer,
                         optimizer_kwargs=optimizer_kwargs, antithetic=antithetic,
                         noise_reuse=noise_reuse, seed=seed,
                         fitness_transform=fitness_transform, baseline=baseline,
                         fitness_eps=fitness_eps, group_size=group_size,
                         evolve_bias=evolve_bias, max_grad_norm=max_grad_norm,
                         distributed=distributed, backend=backend,
                         nonfinite_fitness=nonfinite_fitness)
