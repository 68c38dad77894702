"""EvoTorch problem adapters for neuroevolution with EGGROLL.

Each adapter is a valid ``evotorch.Problem`` whose decision vector is the concatenation of
the network's evolved parameters, so stock EvoTorch searchers (PGPE, SNES, CMA-ES, ...) run
on it through the usual materialised path: every solution vector becomes a set of network
parameters, and with a batched evaluation each network call runs all solutions at once
(``torch.func.vmap`` over their parameters). Next to that, every adapter offers a low-rank
side channel that the :class:`~evotorch_eggroll.algorithms.EGGROLL` searcher uses:
:meth:`EggrollNEProblem.evaluate_population` evaluates a whole population inside an
``EggrollStrategy`` perturbation context, where each network call is one
``pop.batched_forward`` over the rows of all members and no member's weights are ever
materialised.

Both paths run the same evaluation code. An adapter describes its evaluation once, in
:meth:`EggrollNEProblem._evaluate_members`, in terms of a :class:`PopulationForward` (a
callable that runs the network for many members at once, one member per input row); the
searcher decides whether that callable is backed by low-rank perturbations or by
materialised parameter vectors.

Adapters:

* :class:`EggrollNEProblem`: the base class (give ``batched_eval_func`` or
  ``network_eval_func``, or subclass and override ``_evaluate_members``).
* :class:`EggrollSupervisedNE`: minimise a loss over minibatches of a dataset.
* :class:`EggrollVecGymNE`: maximise the episode return in a Gymnasium vector environment
  (or the torch-native :class:`~evotorch_eggroll.envs.CartPole`), one environment per member.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import pickle
import warnings
import zlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from evotorch import Solution, SolutionBatch
from evotorch.neuroevolution.baseneproblem import BaseNEProblem
from evotorch.neuroevolution.net import str_to_net
from torch import nn

from .envs import CartPole
from .module import ESModule

try:  # Gymnasium >= 1.1
    from gymnasium.vector import AutoresetMode
except ImportError:  # pragma: no cover - Gymnasium 1.0 always resets on the next step
    AutoresetMode = None  # type: ignore[assignment]

__all__ = [
    "PopulationForward",
    "EggrollNEProblem",
    "EggrollSupervisedNE",
    "EggrollVecGymNE",
    "RunningObsNorm",
]

NetworkLike = Union[str, nn.Module, Callable[..., nn.Module]]
DeviceLike = Optional[Union[str, torch.device]]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_device(device: DeviceLike) -> torch.device:
    """The problem's device: CUDA when there is a GPU and none is given; a device that
    cannot be used here raises a ValueError/RuntimeError that says what to pass instead."""
    if device is None:
        return _default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...): "
                         f"{err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(
                f"device={device!r}, but no CUDA GPU is available here (torch.cuda.is_available() "
                "is False): pass device='cpu', or leave device out to use a GPU when there is one"
            )
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"device={device!r}, but this machine has {count} CUDA device(s)")
    return dev


def _mix_seed(*parts: int) -> int:
    """A 31-bit seed derived deterministically from integers (no Python ``hash``)."""
    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return zlib.crc32(data) & 0x7FFFFFFF


def _call_with_accepted(fn: Callable, available: Mapping[str, Any], extra: Mapping[str, Any]) -> Any:
    """Call ``fn(**extra, **subset)`` where the subset holds the ``available`` keywords ``fn`` accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**extra)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in available.items() if (accepts_any or k in params) and k not in extra}
    return fn(**kwargs, **extra)


def _autoreset_disabled(env: gym.vector.VectorEnv) -> bool:
    """True when the vector environment does not reset ended sub-environments itself."""
    mode = env.metadata.get("autoreset_mode")
    return str(getattr(mode, "value", mode)).lower() == "disabled"


class PopulationForward:
    """Runs the network for several population members at once, one member per input row.

    Instances are handed to :meth:`EggrollNEProblem._evaluate_members`. Inside the EGGROLL
    searcher a call is one ``pop.batched_forward`` of the strategy's perturbation context;
    for stock EvoTorch searchers it runs the network with each member's materialised
    parameter vector, all members of a call in one ``torch.func.vmap`` where the network
    allows it. Calls are made under ``torch.no_grad()``.

    Attributes:
        member_ids: ``(K,)`` int64 ids of the members being evaluated, on the network's
            device. These are the only ids a call may use. In a distributed EGGROLL run
            they are this rank's slice of the population (global ids).
        num_members: ``K``.
        population_size: ``N``, the size of the whole population the members belong to
            (``K`` unless only part of it is evaluated here, e.g. one rank's slice).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        member_ids: torch.Tensor,
        population_size: Optional[int] = None,
        replay: Optional[tuple[Callable[[], Any], Callable[[], Optional[tuple]]]] = None,
    ):
        self._fn = fn
        self.member_ids = member_ids
        self.population_size = int(member_ids.shape[0]) if population_size is None else int(population_size)
        self._replay = replay

    def prepare_replay(self) -> bool:
        """Get ready for calls captured in a CUDA graph and replayed in later evaluations
        (under EGGROLL: draw the factors once). False when this forward cannot be replayed."""
        if self._replay is None:
            return False
        self._replay[0]()
        return True

    def replay_key(self) -> Optional[tuple]:
        """After a call: what a CUDA graph that captured such calls depends on besides tensor
        contents (a graph replays correctly in a later evaluation with an equal key), or
        None when a captured call would only be valid for this evaluation."""
        return None if self._replay is None else self._replay[1]()

    @property
    def num_members(self) -> int:
        return int(self.member_ids.shape[0])

    def __call__(self, x: torch.Tensor, member_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward ``x`` with row ``j`` computed by member ``member_ids[j]``.

        Args:
            x: ``(rows, *in)`` network input.
            member_ids: ``(rows,)`` ids taken from :attr:`member_ids`; default: row ``j`` is
                member ``self.member_ids[j]`` (then ``rows`` must equal ``num_members``).

        Returns:
            ``(rows, *out)`` network output.
        """
        if member_ids is None:
            member_ids = self.member_ids
            if x.shape[0] != member_ids.shape[0]:
                raise ValueError(
                    f"without member_ids, x needs one row per member ({member_ids.shape[0]}), "
                    f"got {x.shape[0]} rows"
                )
        else:
            member_ids = torch.as_tensor(member_ids, dtype=torch.int64, device=self.member_ids.device)
            if member_ids.shape != (x.shape[0],):
                raise ValueError(
                    f"member_ids must have shape ({x.shape[0]},) (one id per row of x), "
                    f"got {tuple(member_ids.shape)}"
                )
        return self._fn(x, member_ids)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every member on the same input: ``x (B, *in)`` -> ``(K, B, *out)``."""
        k, b = self.num_members, x.shape[0]
        rows = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])  # (K*B, *in)
        out = self._fn(rows, self.member_ids.repeat_interleave(b))
        return out.reshape(k, b, *out.shape[1:])

    def per_member(self, x: torch.Tensor) -> torch.Tensor:
        """Member ``k`` on its own rows ``x[k]``: ``x (K, B, *in)`` -> ``(K, B, *out)``."""
        k, b = x.shape[0], x.shape[1]
        if k != self.num_members:
            raise ValueError(f"x must have one leading slice per member ({self.num_members}), got {k}")
        out = self._fn(x.reshape(k * b, *x.shape[2:]), self.member_ids.repeat_interleave(b))
        return out.reshape(k, b, *out.shape[1:])


# Errors by which torch.func.vmap reports a network it cannot batch (data-dependent Python
# control flow, .item(), in-place updates of unbatched tensors, random ops, missing batching rules).
_VMAP_ERRORS = (RuntimeError, NotImplementedError)


class _MaterialisedMembers:
    """The network function of materialised population members, for :class:`PopulationForward`.

    Member ``m`` runs ``net`` with the evolved parameters ``params[name][m]``; parameters that
    are not evolved, and buffers, are the network's own. A call ``(x, ids)`` on rows of one
    member is a single ``functional_call``. Rows of several members, each with the same
    number of rows ``c``, are sorted by member into ``(U, c, *in)`` and run as one
    ``torch.func.vmap`` of ``functional_call`` over the ``U`` members' parameters; outputs
    return to the original row order. Unequal row counts, and networks ``vmap`` cannot run
    (after the first failure, remembered in :attr:`vmap_ok`), take one call per member.

    Attributes:
        net: The network (its structure, frozen parameters and buffers are used).
        params: Evolved parameters of all members, name -> ``(P, *shape)``.
        member_ids: ``arange(P)``, the ids a call may use.
        vmap_ok: None until a ``vmap`` call was tried, then whether it worked.
    """

    def __init__(self, net: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.net = net
        self.params = params
        p = next(iter(params.values())).shape[0]
        self.member_ids = torch.arange(p, dtype=torch.int64, device=next(iter(params.values())).device)
        self.vmap_ok: Optional[bool] = None

    def _member(self, m: int) -> dict[str, torch.Tensor]:
        return {n: t[m] for n, t in self.params.items()}

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``x[j]`` through member ``ids[j]``: ``x (rows, *in)`` -> ``(rows, *out)``."""
        rows = x.shape[0]
        num_members = self.member_ids.shape[0]
        if ids is self.member_ids and rows == num_members and num_members > 1:
            # Row j is member j (the default of PopulationForward.__call__): no sorting needed.
            out = self._vmapped(self.params, x.unsqueeze(1))
            if out is not None:
                return out.reshape(rows, *out.shape[2:])
            return self._loop(x, ids)
        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        u = uniq.shape[0]
        if u <= 1:
            return torch.func.functional_call(self.net, self._member(int(uniq[0]) if u else 0), (x,))
        c = rows // u
        if self.vmap_ok is False or rows % u != 0 or (c > 1 and not bool((counts == c).all())):
            return self._loop(x, ids)
        order = torch.argsort(inverse, stable=True)  # rows grouped by member, in uniq order
        xs = x.index_select(0, order).reshape(u, c, *x.shape[1:])
        if u == num_members:  # every member present: uniq is arange(P)
            params = self.params
        else:
            params = {n: t.index_select(0, uniq) for n, t in self.params.items()}
        res = self._vmapped(params, xs)
        if res is None:
            return self._loop(x, ids)
        res = res.reshape(rows, *res.shape[2:])
        return torch.empty_like(res).index_copy_(0, order, res)

    def _vmapped(self, params: dict[str, torch.Tensor], xs: torch.Tensor) -> Optional[torch.Tensor]:
        """``(U, c, *out)`` outputs of the ``U`` members in ``params`` on ``xs (U, c, *in)``,
        or None when ``vmap`` cannot run this network (remembered: later calls skip it)."""
        if self.vmap_ok is False:
            return None
        net = self.net

        def one(member_params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(net, member_params, (x,))

        try:
            out = torch.func.vmap(one)(params, xs)
        except torch.cuda.OutOfMemoryError:  # a real failure, not a vmap limitation
            raise
        except _VMAP_ERRORS:
            self.vmap_ok = False
            return None
        if not isinstance(out, torch.Tensor) or tuple(out.shape[:2]) != tuple(xs.shape[:2]):
            # Not one output row per input row: the per-member loop defines the result.
            self.vmap_ok = False
            return None
        self.vmap_ok = True
        return out

    def _loop(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One ``functional_call`` per member present in ``ids``."""
        out = None
        for m in torch.unique(ids).tolist():
            rows = (ids == m).nonzero().squeeze(1)
            o = torch.func.functional_call(self.net, self._member(m), (x[rows],))
            if out is None:
                out = o.new_empty((x.shape[0], *o.shape[1:]))
            out[rows] = o
        return out


class EggrollNEProblem(BaseNEProblem):
    """Base EvoTorch problem over a network's evolved parameters, with a low-rank side channel.

    The decision vector concatenates the evolved parameters (``requires_grad=True``, in
    ``named_parameters()`` order, filtered by ``include``/``exclude``), flattened row-major,
    so ``solution_length`` is their total number of elements. Frozen parameters and
    buffers keep the network's values.

    Describe the evaluation in one of two ways:

    * batched (preferred): ``batched_eval_func(forward) -> fitness (K,)`` or override
      :meth:`_evaluate_members`, where ``forward`` is a :class:`PopulationForward` for the
      ``K`` members to evaluate. Under EGGROLL each network call evaluates all members in
      one ``batched_forward``.
    * per network: ``network_eval_func(net) -> fitness`` or override
      :meth:`_evaluate_network`, called once per member with a network computing that
      member's function (under EGGROLL, via the perturbation context's ``iterate``).

    Example:
        >>> def fitness(forward):
        ...     x = torch.linspace(-1, 1, 32, device=forward.member_ids.device)[:, None]
        ...     y = forward.shared(x)                           # (K, 32, 1)
        ...     return -((y[..., 0] - x[:, 0].sin()) ** 2).mean(dim=1)
        >>> problem = EggrollNEProblem("max", nn.Linear(1, 1), batched_eval_func=fitness)

    Args:
        objective_sense: ``"min"`` or ``"max"``.
        network: An ``nn.Module`` (copied), a callable returning one (called with the
            keywords of ``network_args`` and any of :meth:`_network_constants` it accepts),
            or a string that EvoTorch's ``str_to_net`` parses, such as
            ``"Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)"``, whose names are
            :meth:`network_constants` (``network_args`` included) and
            :meth:`_str_network_constants`.
        network_args: Keyword arguments for a callable ``network``, and names a string
            ``network`` may use.
        batched_eval_func: ``forward -> (K,)`` fitnesses, see above.
        network_eval_func: ``net -> fitness`` (a scalar), see above.
        include: Names of the only parameters to evolve (default: all trainable ones).
        exclude: Names of parameters not to evolve.
        initial_bounds: Bounds for EvoTorch's uniform initial solutions. Default None: the
            network's own initial parameters are the initial solution (EvoTorch searchers'
            ``center_init``).
        eval_dtype: dtype of fitnesses (default: float32).
        device: Device of the network and of populations (default: CUDA when available).
        seed: Seed of the problem's own randomness (data order, environment resets);
            None draws one.
        num_actors, actor_config, num_gpus_per_actor, num_subbatches, subbatch_size:
            forwarded to ``evotorch.Problem`` (Ray-parallel materialised evaluation).
    """

    def __init__(
        self,
        objective_sense: str,
        network: NetworkLike,
        *,
        batched_eval_func: Optional[Callable[[PopulationForward], torch.Tensor]] = None,
        network_eval_func: Optional[Callable[[nn.Module], Any]] = None,
        network_args: Optional[Mapping[str, Any]] = None,
        include: Optional[Iterable[str]] = None,
        exclude: Optional[Iterable[str]] = None,
        initial_bounds: Optional[tuple] = None,
        eval_dtype: Optional[Any] = None,
        device: DeviceLike = None,
        seed: Optional[int] = None,
        num_actors: Optional[Union[int, str]] = None,
        actor_config: Optional[dict] = None,
        num_gpus_per_actor: Optional[Union[int, float, str]] = None,
        num_subbatches: Optional[int] = None,
        subbatch_size: Optional[int] = None,
    ) -> None:
        device = _resolve_device(device)
        self._batched_eval_func = batched_eval_func
        self._network_eval_func = network_eval_func
        if not (self._has_batched_evaluation() or self._has_network_evaluation()):
            raise TypeError(
                f"{type(self).__name__} does not know how to evaluate a network: pass "
                "batched_eval_func=(forward -> fitnesses) or network_eval_func=(net -> fitness), "
                "or override _evaluate_members / _evaluate_network in a subclass"
            )
        self._network_args = dict(network_args or {})
        self._architecture = network if isinstance(network, str) else None
        network = self._build_network(network)
        self._frozen_names: frozenset = frozenset()
        if isinstance(network, ESModule):
            # Evolve what the wrapper says, under the wrapped module's own parameter names.
            self._frozen_names = network.frozen_parameters
            network = network.module
        self._network = network.to(device)
        self._evolved_names = self._select_evolved(include, exclude)
        self._seed_value = int.from_bytes(os.urandom(4), "little") >> 1 if seed is None else int(seed)
        self._eval_network: Optional[nn.Module] = None

        params = dict(self._network.named_parameters())
        first = params[self._evolved_names[0]]
        super().__init__(
            objective_sense=objective_sense,
            initial_bounds=initial_bounds,
            solution_length=self.num_evolved,
            dtype=first.dtype,
            eval_dtype=torch.float32 if eval_dtype is None else eval_dtype,
            device=device,
            seed=seed,
            num_actors=num_actors,
            actor_config=actor_config,
            num_gpus_per_actor=num_gpus_per_actor,
            num_subbatches=num_subbatches,
            subbatch_size=subbatch_size,
        )
        with torch.no_grad():
            self._initial_vector = self.parameters_to_vector(self._network).to(self.device)

    # ------------------------------------------------------------------ network

    @property
    def _network_constants(self) -> dict:
        """Keywords a callable ``network`` may accept (extended by subclasses)."""
        return {}

    @property
    def _str_network_constants(self) -> dict:
        """Further names a string ``network`` may use (none here; for subclasses, as in EvoTorch)."""
        return {}

    def network_constants(self) -> dict:
        """The named constants of network construction: :attr:`_network_constants` updated
        with ``network_args`` (as EvoTorch's ``NEProblem.network_constants``)."""
        return {**self._network_constants, **self._network_args}

    def _build_network(self, network: NetworkLike) -> nn.Module:
        if isinstance(network, nn.Module):
            return copy.deepcopy(network)
        if isinstance(network, str):
            return str_to_net(network, **self.network_constants(), **self._str_network_constants)
        if not callable(network):
            raise TypeError(
                f"network must be an nn.Module, a callable returning one or a network string, got {network!r}"
            )
        net = _call_with_accepted(network, self._network_constants, self._network_args)
        if not isinstance(net, nn.Module):
            raise TypeError(f"the network callable returned {type(net).__name__}, expected an nn.Module")
        return net

    def _select_evolved(self, include: Optional[Iterable[str]], exclude: Optional[Iterable[str]]) -> list[str]:
        named = [
            (n, p) for n, p in self._network.named_parameters() if p.requires_grad and n not in self._frozen_names
        ]
        names = [n for n, _ in named]
        for label, given in (("include", include), ("exclude", exclude)):
            unknown = sorted(set(given or ()) - set(dict(self._network.named_parameters())))
            if unknown:
                raise ValueError(f"{label} names parameters the network does not have: {unknown}")
        if include is not None:
            keep = set(include)
            names = [n for n in names if n in keep]
        if exclude is not None:
            drop = set(exclude)
            names = [n for n in names if n not in drop]
        if not names:
            raise ValueError("the network has no parameters to evolve (none trainable after include/exclude)")
        return names

    @property
    def network(self) -> nn.Module:
        """The problem's network (its evolved parameters hold the initial solution)."""
        return self._network

    @property
    def evolved_parameter_names(self) -> list[str]:
        """Dotted names of the evolved parameters, in decision-vector order."""
        return list(self._evolved_names)

    @property
    def num_evolved(self) -> int:
        """Number of evolved scalars (``solution_length``)."""
        params = dict(self._network.named_parameters())
        return sum(params[n].numel() for n in self._evolved_names)

    @property
    def network_device(self) -> torch.device:
        """Where networks run: the problem's device (a Ray actor's auxiliary device remotely)."""
        return self.device if self.is_main else torch.device(self.aux_device)

    def parameters_to_vector(self, net: nn.Module) -> torch.Tensor:
        """The evolved parameters of ``net`` (same architecture) as one ``(L,)`` vector."""
        params = dict(net.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self._evolved_names])

    def _split_vector(self, vector: torch.Tensor, net: nn.Module) -> dict[str, torch.Tensor]:
        """The evolved parameters of one solution ``vector (L,)``: name -> view of it."""
        return {n: t[0] for n, t in self._split_population(vector.unsqueeze(0), net).items()}

    def _split_population(self, values: torch.Tensor, net: nn.Module) -> dict[str, torch.Tensor]:
        """The evolved parameters of every solution in ``values (P, L)``: name -> ``(P, *shape)``.

        Each entry is a view into ``values`` (no copy unless a parameter's dtype differs).
        """
        params = dict(net.named_parameters())
        length = sum(params[n].numel() for n in self._evolved_names)
        if values.shape[-1] != length:
            raise ValueError(f"expected a vector of length {length}, got {values.shape[-1]}")
        out, start = {}, 0
        for n in self._evolved_names:
            p = params[n]
            out[n] = values[:, start : start + p.numel()].reshape(values.shape[0], *p.shape).to(p.dtype)
            start += p.numel()
        return out

    @torch.no_grad()
    def vector_to_parameters(self, vector: torch.Tensor, net: nn.Module) -> None:
        """Copy ``vector (L,)`` into the evolved parameters of ``net`` (in place)."""
        params = dict(net.named_parameters())
        vector = torch.as_tensor(vector).to(next(iter(params.values())).device)
        for n, v in self._split_vector(vector, net).items():
            params[n].copy_(v)

    @staticmethod
    def _solution_vector(solution: Union[Solution, torch.Tensor, Iterable]) -> torch.Tensor:
        """``solution`` (a Solution, tensor or iterable of numbers) as a plain 1-D tensor."""
        if isinstance(solution, Solution):
            solution = solution.values
        vector = torch.as_tensor(solution)
        if type(vector) is not torch.Tensor:  # EvoTorch's read-only tensors
            vector = vector.as_subclass(torch.Tensor)
        return vector.reshape(-1)

    def make_net(self, solution: Union[Solution, torch.Tensor, Iterable]) -> nn.Module:
        """A new copy of the network holding ``solution``'s parameters."""
        net = copy.deepcopy(self._network)
        self.vector_to_parameters(self._solution_vector(solution), net)
        return net

    def parameterize_net(self, parameters: Union[Solution, torch.Tensor, Iterable]) -> nn.Module:
        """The problem's working network, filled with ``parameters`` and returned.

        As EvoTorch's ``NEProblem.parameterize_net``: no copy is made, every call fills and
        returns the same network object (so a network returned earlier changes too); use
        :meth:`make_net` for an independent copy. The working network is not
        :attr:`network`, whose parameters keep the initial solution.
        """
        if self._eval_network is None:
            self._eval_network = copy.deepcopy(self._network)
        self.vector_to_parameters(self._solution_vector(parameters), self._eval_network)
        return self._eval_network

    def _fill(self, values: torch.Tensor) -> None:
        if self.initial_lower_bounds is not None and self.initial_upper_bounds is not None:
            return super()._fill(values)
        values[:] = self._initial_vector.to(values.device, values.dtype)

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_eval_network"]

    # ------------------------------------------------------------------ evaluation hooks

    def _has_batched_evaluation(self) -> bool:
        return self._batched_eval_func is not None or (
            type(self)._evaluate_members is not EggrollNEProblem._evaluate_members
        )

    def _has_network_evaluation(self) -> bool:
        return self._network_eval_func is not None or (
            type(self)._evaluate_network is not EggrollNEProblem._evaluate_network
        )

    def _evaluate_members(self, forward: PopulationForward) -> torch.Tensor:
        """Fitnesses of the members ``forward.member_ids``: a ``(K,)`` tensor (or sequence).

        Override in subclasses (or pass ``batched_eval_func``). Runs under ``no_grad``.
        """
        if self._batched_eval_func is None:
            raise NotImplementedError
        return self._batched_eval_func(forward)

    def _evaluate_network(self, net: nn.Module) -> Any:
        """Fitness of one network (a scalar). Override or pass ``network_eval_func``."""
        if self._network_eval_func is None:
            raise NotImplementedError
        return self._network_eval_func(net)

    def _lowrank_status(self) -> dict:
        """The problem status reported after a low-rank population evaluation."""
        return {}

    # ------------------------------------------------------------------ distributed EGGROLL

    def _distributed_setup(self) -> None:
        """Distributed EGGROLL, once on every rank at the searcher's construction: adopt
        rank 0's seed for the problem's own randomness (data order, environment resets), so
        that a seed drawn per process (``seed=None``) cannot make the ranks' members see
        different data. Subclasses with more shared state extend this."""
        from . import distributed as _dist

        seed = torch.tensor([self._seed_value], dtype=torch.int64)
        self._seed_value = int(_dist.broadcast_from_rank0(seed, like=self.device)[0])

    def _distributed_merge(self) -> None:
        """Distributed EGGROLL, on every rank after each rank evaluated its slice of a
        population: make the problem's running state (counters, statistics) global, the same
        on every rank. The base class keeps no such state."""

    def _generation_state(self) -> dict:
        """What evaluating one population advances in the problem, taken by the EGGROLL
        searcher before each evaluation: a generation whose evaluation raises (on any rank,
        when distributed) is undone with :meth:`_restore_generation_state`, so that every
        rank continues as if it had not been evaluated. Subclasses with running state
        (data position, counters, statistics) extend both methods."""
        return {"after_eval_status": dict(getattr(self, "_after_eval_status", None) or {})}

    def _restore_generation_state(self, state: dict) -> None:
        """Put back what :meth:`_generation_state` took."""
        self._after_eval_status = dict(state["after_eval_status"])

    def _as_fitness(self, values: Any, k: int) -> torch.Tensor:
        fit = torch.as_tensor(values) if not isinstance(values, torch.Tensor) else values
        fit = fit.detach()
        if fit.dim() == 2 and fit.shape[1] == 1:
            fit = fit[:, 0]
        if fit.shape != (k,):
            raise ValueError(f"the evaluation returned fitnesses of shape {tuple(fit.shape)}, expected ({k},)")
        return fit

    # ------------------------------------------------------------------ materialised path

    def _materialised_forward(self, net: nn.Module, values: torch.Tensor) -> PopulationForward:
        """A PopulationForward whose member ``i`` is the solution vector ``values[i]``.

        Calls covering several members run them all at once with ``torch.func.vmap`` (see
        :class:`_MaterialisedMembers`); networks ``vmap`` cannot trace are run member by member.
        """
        members = _MaterialisedMembers(net, self._split_population(values, net))
        return PopulationForward(members, members.member_ids)

    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        device = self.network_device
        if next(self._network.parameters()).device != device:
            self._network.to(device)
        values = batch.values.to(device)
        if type(values) is not torch.Tensor:
            values = values.as_subclass(torch.Tensor)
        with torch.no_grad():
            if self._has_batched_evaluation():
                fit = self._as_fitness(self._evaluate_members(self._materialised_forward(self._network, values)), len(batch))
            else:
                if self._eval_network is None:
                    self._eval_network = copy.deepcopy(self._network)
                results = []
                for v in values:
                    self.vector_to_parameters(v, self._eval_network)
                    results.append(torch.as_tensor(self._evaluate_network(self._eval_network), dtype=torch.float64))
                fit = torch.stack(results)
        batch.set_evals(fit.to(batch.device, self.eval_dtype))

    # ------------------------------------------------------------------ low-rank side channel

    def evaluate_population(
        self, pop: Any, network: nn.Module, member_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None
    ) -> torch.Tensor:
        """Evaluate population members through an EGGROLL perturbation context.

        Args:
            pop: The open context of ``strategy.perturb(N)`` for a strategy set up on
                ``network``.
            network: The network the strategy evolves (same architecture as
                :attr:`network`; it holds the search center).
            member_ids: Members to evaluate (default: ``pop.local_member_ids()``).

        Returns:
            ``(K,)`` fitnesses in the problem's own sense (not negated), float32 on the
            network's device, one per member id.
        """
        local = pop.local_member_ids()
        if member_ids is None:
            member_ids = local
        device = next(network.parameters()).device
        ids = torch.as_tensor(list(member_ids) if not isinstance(member_ids, torch.Tensor) else member_ids)
        # the context's own slice (the usual case) can be captured and replayed
        own_slice = member_ids is local or (ids.device.type == "cpu" and torch.equal(ids.to(torch.int64), local))
        ids = ids.to(device=device, dtype=torch.int64)
        with torch.no_grad():
            if self._has_batched_evaluation():
                fwd = PopulationForward(
                    lambda x, rid: pop.batched_forward(network, x, member_ids=rid), ids, pop.population_size,
                    replay=(pop._prepare_replay, pop._replay_key) if own_slice else None,
                )
                fit = self._as_fitness(self._evaluate_members(fwd), ids.shape[0])
            else:
                wanted = {int(i): j for j, i in enumerate(ids.tolist())}
                values: list = [None] * len(wanted)
                for k in pop.iterate():
                    if k in wanted:
                        values[wanted[k]] = torch.as_tensor(self._evaluate_network(network), dtype=torch.float64)
                fit = torch.stack(values)
        self._after_eval_status = self._lowrank_status()
        return fit.to(device=device, dtype=torch.float32)


class EggrollSupervisedNE(EggrollNEProblem):
    """Minimise a supervised loss: fitness = mean loss over ``num_minibatches`` minibatches.

    Mirrors ``evotorch.neuroevolution.SupervisedNE`` (objective ``"min"``). Each network call
    evaluates the whole population on a minibatch: with ``common_minibatch=True`` all members
    see the same minibatches (drawn once per evaluation), otherwise every member draws its
    own. Minibatches are drawn without replacement from a seeded shuffle of the dataset
    (the incomplete tail of an epoch is skipped so that all minibatches have the same size),
    so runs are reproducible and resume exactly after pickling.

    Args:
        dataset: An indexable dataset of ``(x, y)`` pairs (e.g. ``TensorDataset``).
        network: ``nn.Module``, a callable returning one, or a network string (names from
            ``network_args``), as for :class:`EggrollNEProblem`.
        loss_func: ``loss(y_hat (B, ...), y (B, ...)) -> scalar``; or override ``_loss``.
            Evaluated for all members at once with ``torch.func.vmap`` when possible,
            otherwise member by member.
        minibatch_size: Rows per minibatch (default None: the whole dataset).
        num_minibatches: Minibatches per evaluation (default 1).
        common_minibatch: Whether all members share the minibatches (default True).
        device: Device of the network and data (default: CUDA when available).
        **kwargs: Further :class:`EggrollNEProblem` keywords (``include``, ``exclude``,
            ``seed``, ``network_args``, ``num_actors``, ...).
    """

    def __init__(
        self,
        dataset: Any,
        network: NetworkLike,
        loss_func: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        *,
        minibatch_size: Optional[int] = None,
        num_minibatches: int = 1,
        common_minibatch: bool = True,
        device: DeviceLike = None,
        **kwargs: Any,
    ) -> None:
        if minibatch_size is not None and int(minibatch_size) < 1:
            raise ValueError(f"minibatch_size must be a positive integer, got {minibatch_size!r}")
        if int(num_minibatches) < 1:
            raise ValueError(f"num_minibatches must be a positive integer, got {num_minibatches!r}")
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self._loss_func = loss_func
        self._minibatch_size = None if minibatch_size is None else min(int(minibatch_size), len(dataset))
        self._num_minibatches = int(num_minibatches)
        self._common_minibatch = bool(common_minibatch)
        self._data_epoch = 0
        self._data_pos = 0
        self._perm: Optional[torch.Tensor] = None
        self._vmap_ok: Optional[bool] = None
        if loss_func is None and type(self)._loss is EggrollSupervisedNE._loss:
            raise TypeError("pass loss_func=(y_hat, y -> loss) or override _loss in a subclass")
        super().__init__("min", network, device=device, **kwargs)

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_perm"]

    def _generation_state(self) -> dict:
        return dict(super()._generation_state(), data=(self._data_epoch, self._data_pos, self._perm))

    def _restore_generation_state(self, state: dict) -> None:
        super()._restore_generation_state(state)
        self._data_epoch, self._data_pos, self._perm = state["data"]

    def _loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one member on one minibatch (a scalar)."""
        raise NotImplementedError

    def loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_func(y_hat, y)`` if given, else ``self._loss(y_hat, y)``."""
        return self._loss(y_hat, y) if self._loss_func is None else self._loss_func(y_hat, y)

    def _indices(self, size: int) -> torch.Tensor:
        n = len(self.dataset)
        if self._data_pos + size > n:
            self._data_epoch += 1
            self._data_pos = 0
            self._perm = None
        if self._perm is None:
            g = torch.Generator().manual_seed(_mix_seed(self._seed_value, self._data_epoch))
            self._perm = torch.randperm(n, generator=g)
        idx = self._perm[self._data_pos : self._data_pos + size]
        self._data_pos += size
        return idx

    def get_minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next minibatch ``(x, y)`` on the network's device."""
        return self._fetch(self._indices(self._batch_rows()))

    def _batch_rows(self) -> int:
        return len(self.dataset) if self._minibatch_size is None else self._minibatch_size

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``idx`` of the dataset as ``(x, y)`` on the network's device."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            batch = [t[idx] for t in tensors]
        else:
            batch = torch.utils.data.default_collate([self.dataset[i] for i in idx.tolist()])
        x, y = batch
        return x.to(self.network_device), y.to(self.network_device)

    def _member_losses(self, y_hat: torch.Tensor, y: torch.Tensor, shared_y: bool) -> torch.Tensor:
        """Loss per member: ``y_hat (K, B, ...)``, ``y (B, ...)`` or ``(K, B, ...)`` -> ``(K,)``."""
        if self._vmap_ok is not False:
            try:
                out = torch.func.vmap(self.loss, in_dims=(0, None if shared_y else 0))(y_hat, y)
                self._vmap_ok = True
                return out.reshape(-1).float()
            except Exception:
                if self._vmap_ok:
                    raise
                self._vmap_ok = False
        losses = [self.loss(y_hat[k], y if shared_y else y[k]) for k in range(y_hat.shape[0])]
        return torch.stack([torch.as_tensor(v, device=y_hat.device).reshape(()) for v in losses]).float()

    def _member_minibatches(self, forward: PopulationForward) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One minibatch per evaluated member (``common_minibatch=False``).

        Members of the population draw in id order, ``0..N-1``; when only some of them are
        evaluated here (one rank's slice of a distributed population), the others' draws
        are skipped without loading their rows, so member ``m`` sees the data it would see
        in a single-process run and every rank's data cursor ends up in the same place.
        """
        ids = forward.member_ids.tolist()
        n = forward.population_size
        if ids == list(range(n)):
            return [self.get_minibatch() for _ in ids]
        rows = self._batch_rows()
        wanted = set(ids)
        drawn = {}
        for m in range(max(n, max(ids) + 1)):
            idx = self._indices(rows)
            if m in wanted:
                drawn[m] = self._fetch(idx)
        return [drawn[m] for m in ids]

    def _evaluate_members(self, forward: PopulationForward) -> torch.Tensor:
        k = forward.num_members
        total = torch.zeros(k, dtype=torch.float32, device=forward.member_ids.device)
        for _ in range(self._num_minibatches):
            if self._common_minibatch:
                x, y = self.get_minibatch()
                losses = self._member_losses(forward.shared(x), y, shared_y=True)
            else:
                pairs = self._member_minibatches(forward)
                xs = torch.stack([p[0] for p in pairs])  # (K, B, *in)
                ys = torch.stack([p[1] for p in pairs])  # (K, B, *out)
                losses = self._member_losses(forward.per_member(xs), ys, shared_y=False)
            total += losses.to(total.device) / self._num_minibatches
        return total


class RunningObsNorm:
    """Running mean and variance of observations, kept on one device in float64.

    ``normalize(obs) = (obs - mean) / sqrt(var + eps)`` with the population variance of
    every observation seen so far.
    """

    def __init__(self, shape: Sequence[int], device: DeviceLike = None, eps: float = 1e-8) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
        self.sum_of_squares = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
        self.eps = float(eps)

    def update(self, obs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add the rows of ``obs (E, *shape)`` (only those where ``mask (E,)`` is True)."""
        x = obs.to(torch.float64)
        if mask is not None:
            w = mask.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
            self.count += w.sum()
            self.sum += (x * w).sum(0)
            self.sum_of_squares += (x * x * w).sum(0)
        else:
            self.count += x.shape[0]
            self.sum += x.sum(0)
            self.sum_of_squares += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1.0)

    @property
    def stdev(self) -> torch.Tensor:
        var = (self.sum_of_squares / self.count.clamp_min(1.0) - self.mean**2).clamp_min(0.0)
        return torch.sqrt(var + self.eps)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs.to(torch.float64) - self.mean) / self.stdev).to(obs.dtype)

    def to(self, device: DeviceLike) -> "RunningObsNorm":
        """A copy on ``device``."""
        out = copy.copy(self)
        out.count, out.sum, out.sum_of_squares = (t.to(device) for t in (self.count, self.sum, self.sum_of_squares))
        return out

    @classmethod
    def from_stats(cls, stats: Any, shape: Sequence[int], device: DeviceLike = None) -> "RunningObsNorm":
        """A new instance on ``device`` holding the counts of ``stats``: a :class:`RunningObsNorm`
        or anything with ``count``, ``sum`` and ``sum_of_squares`` (such as EvoTorch's
        ``RunningNorm``; an empty one gives empty statistics). The sums must have the shape
        ``shape``; raises ValueError otherwise and TypeError for other objects."""
        shape = tuple(int(d) for d in shape)
        if not all(hasattr(stats, a) for a in ("count", "sum", "sum_of_squares")):
            raise TypeError(
                "observation stats must be a RunningObsNorm or have count, sum and sum_of_squares "
                f"(like EvoTorch's RunningNorm), got {type(stats).__name__}"
            )
        out = cls(shape, device=device, eps=getattr(stats, "eps", 1e-8))
        if stats.sum is None and stats.sum_of_squares is None:  # EvoTorch's RunningNorm before any data
            return out
        for name in ("sum", "sum_of_squares"):
            value = torch.as_tensor(getattr(stats, name))
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"observation stats have {name} of shape {tuple(value.shape)}; "
                    f"the observations of this problem have shape {shape}"
                )
            getattr(out, name).copy_(value.to(device=out.sum.device, dtype=torch.float64))
        count = torch.as_tensor(stats.count)
        if count.numel() != 1 or not bool(count.reshape(()) >= 0):
            raise ValueError(f"observation stats need a count >= 0 (one number), got {stats.count!r}")
        out.count.copy_(count.reshape(()).to(torch.float64))
        return out


class _ObsNormPolicy(nn.Module):
    """A policy network preceded by fixed observation normalisation."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, stdev: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("obs_mean", mean.float().clone())
        self.register_buffer("obs_stdev", stdev.float().clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.obs_mean) / self.obs_stdev)


class EggrollVecGymNE(EggrollNEProblem):
    """Maximise the mean episode return in a vectorised environment, one environment per member.

    Mirrors ``evotorch.neuroevolution.VecGymNE``. For ``K`` members, ``K`` environments run
    side by side; every step, the policy network computes all members' actions in one call
    (under EGGROLL, one ``batched_forward``). An environment's return stops accumulating at
    the end of its first episode (``terminated or truncated``, or ``episode_length`` steps):
    whatever the environment does afterwards (Gymnasium's next-step or same-step autoreset,
    or stepping past the end with autoreset disabled) is ignored. With ``num_episodes > 1``
    all environments are reset together for each further episode, and the fitness is the
    mean return over the episodes.

    Actions: for a ``Discrete(n)`` action space the network outputs ``n`` scores and the
    action is their argmax (with ``n == 2`` a single output ``> 0`` also works); for a
    ``Box`` space the output is reshaped to the action shape, converted to the space's
    dtype and clipped to its bounds.

    Every evaluation resets the environments with a fresh seed derived from ``seed`` and an
    episode counter, plus the id of the first evaluated member, so results are reproducible
    and pickled problems resume exactly. With Gymnasium's per-sub-environment seeding
    (``seed + i`` for sub-environment ``i``, e.g. ``vectorization_mode="sync"``) member
    ``m`` then always starts from the same state, whichever rank of a distributed EGGROLL
    run evaluates it; an environment drawing all initial states from one generator (such
    as :class:`~evotorch_eggroll.envs.CartPole`) gives each rank's slice its own states.
    In a distributed run the interaction and episode counters and the observation
    statistics are summed over the ranks after each generation, so they are global and
    identical on every rank (within a generation each rank normalises with the statistics
    of the previous generations plus its own observations).

    Args:
        env: A Gymnasium id (built with ``gymnasium.make_vec(env, num_envs=K, **env_config)``),
            EvoTorch's ``"brax::<name>"`` for a Brax environment on the problem's device
            (:class:`~evotorch_eggroll.jax_envs.BraxVecEnv`, ``env_config`` its keywords), a
            callable ``(num_envs=K, **env_config) -> VectorEnv`` (it also gets ``device=`` when
            it accepts one and ``env_config`` has none, e.g. the
            :class:`~evotorch_eggroll.envs.CartPole` class), or a ``VectorEnv`` instance with
            at least as many environments as members (extra environments are run but
            ignored).
        network: ``nn.Module``, a callable returning one, or a network string such as
            ``"Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)"``; a callable may
            accept, and a string may use, ``obs_length``, ``act_length``, ``obs_shape``,
            ``act_shape``, ``obs_space``, ``act_space`` (and the names in ``network_args``).
        env_config: Keyword arguments for building the environment.
        num_episodes: Episodes per member and evaluation (default 1).
        episode_length: Optional cap on the steps of each episode.
        observation_normalization: Normalise observations with running statistics of all
            observations seen by active members (updated during evaluation).
        device: Device of the network (default: CUDA when available). Observations are moved
            there; torch-native environments should live there too.
        **kwargs: Further :class:`EggrollNEProblem` keywords (``include``, ``exclude``,
            ``seed``, ``network_args``, ...).

    Rollouts: each step runs the network for every member at once, steps the environments,
    and accumulates returns under an alive mask; "every environment ended" is checked
    every few steps, so a torch-native environment on the GPU is not synchronised with the
    host at every step. Under ``EGGROLL``, with a torch-native CUDA environment that keeps
    its state in place and says so (it has a ``cuda_graph_generators`` attribute listing
    the CUDA generators its step draws from, as :class:`~evotorch_eggroll.envs.CartPole`
    does) and resets itself, the steps are captured once in CUDA graphs (after two eager
    steps) and replayed in chunks, in this and later generations: the members' factors
    are drawn once per generation into fixed buffers, and nothing of the step runs on the
    host. Fitnesses are the same as those of the step-by-step loop. A capture that fails
    falls back to the step-by-step loop with one warning. ``last_rollout_steps`` holds the
    number of steps run in the latest evaluation (every environment, ended or not).
    """

    def __init__(
        self,
        env: Union[str, Callable[..., gym.vector.VectorEnv], gym.vector.VectorEnv],
        network: NetworkLike,
        *,
        env_config: Optional[Mapping[str, Any]] = None,
        num_episodes: int = 1,
        episode_length: Optional[int] = None,
        observation_normalization: bool = False,
        device: DeviceLike = None,
        **kwargs: Any,
    ) -> None:
        if int(num_episodes) < 1:
            raise ValueError(f"num_episodes must be a positive integer, got {num_episodes!r}")
        if episode_length is not None and int(episode_length) < 1:
            raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
        if observation_normalization and kwargs.get("num_actors") not in (None, 0):
            raise ValueError("observation_normalization is not supported together with num_actors")
        self._device_for_env = _resolve_device(device)
        self._env_maker = env
        self._env_config = dict(env_config or {})
        self._num_episodes = int(num_episodes)
        self._episode_length = None if episode_length is None else int(episode_length)
        self._observation_normalization = bool(observation_normalization)
        self._env: Optional[gym.vector.VectorEnv] = env if isinstance(env, gym.vector.VectorEnv) else None
        probe = self._env if self._env is not None else self._make_env(1)
        self._obs_space = probe.single_observation_space
        self._act_space = probe.single_action_space
        if probe is not self._env:
            probe.close()
        if not isinstance(self._obs_space, gym.spaces.Box):
            raise TypeError(f"only Box observation spaces are supported, got {self._obs_space}")
        if not isinstance(self._act_space, (gym.spaces.Discrete, gym.spaces.Box)):
            raise TypeError(f"only Discrete and Box action spaces are supported, got {self._act_space}")
        self._obs_stats: Optional[RunningObsNorm] = None
        self._interaction_count = 0
        self._episode_count = 0
        self._num_resets = 0
        self.last_rollout_steps = 0
        super().__init__("max", network, device=device, **kwargs)
        self.after_eval_hook.append(self._extra_status)

    # ------------------------------------------------------------------ environment

    @property
    def _network_constants(self) -> dict:
        act = self._act_space
        act_length = int(act.n) if isinstance(act, gym.spaces.Discrete) else int(np.prod(act.shape))
        return {
            "obs_length": int(np.prod(self._obs_space.shape)),
            "act_length": act_length,
            "obs_shape": tuple(self._obs_space.shape),
            "act_shape": tuple(act.shape),
            "obs_space": self._obs_space,
            "act_space": act,
        }

    def _make_env(self, num_envs: int) -> gym.vector.VectorEnv:
        maker = self._env_maker
        if isinstance(maker, str) and maker.startswith("brax::"):  # EvoTorch's Brax ids
            from .jax_envs import BraxVecEnv
            maker = functools.partial(BraxVecEnv, maker)
        if isinstance(maker, str):
            env = gym.make_vec(maker, num_envs=num_envs, **self._env_config)
        elif callable(maker):
            cfg = dict(self._env_config)
            try:
                takes_device = "device" in inspect.signature(maker).parameters
            except (TypeError, ValueError):
                takes_device = False
            if takes_device and "device" not in cfg:
                cfg["device"] = self._device_for_env
            env = maker(num_envs=num_envs, **cfg)
        else:
            raise TypeError(f"env must be a Gymnasium id, a callable or a VectorEnv, got {maker!r}")
        if not isinstance(env, gym.vector.VectorEnv):
            raise TypeError(f"the environment maker returned {type(env).__name__}, expected a gymnasium VectorEnv")
        if env.num_envs != num_envs:
            raise ValueError(f"asked for {num_envs} environments, got {env.num_envs}")
        return env

    def _get_env(self, num_members: int) -> gym.vector.VectorEnv:
        if isinstance(self._env_maker, gym.vector.VectorEnv):
            if self._env_maker.num_envs < num_members:
                raise ValueError(
                    f"the environment has {self._env_maker.num_envs} sub-environments but {num_members} "
                    "members are evaluated: give a Gymnasium id or a callable, or a larger VectorEnv"
                )
            return self._env_maker
        if self._env is None or self._env.num_envs != num_members:
            if self._env is not None:
                self._env.close()
            self._env = self._make_env(num_members)
        return self._env

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_env", "_rank_snapshot", "_captured", "_bounds_cache"]

    def get_env(self) -> Optional[gym.vector.VectorEnv]:
        """The environment of the most recent evaluation (None before the first)."""
        return self._env

    # ------------------------------------------------------------------ counters and stats

    @property
    def observation_normalization(self) -> bool:
        return self._observation_normalization

    def _ensure_obsnorm(self) -> None:
        if not self._observation_normalization:
            raise ValueError("observation statistics exist only with observation_normalization=True")

    def get_observation_stats(self) -> Optional[RunningObsNorm]:
        """The running observation statistics (None before any observation)."""
        self._ensure_obsnorm()
        return self._obs_stats

    def set_observation_stats(self, stats: Any) -> None:
        """Replace the running observation statistics, as EvoTorch's
        ``VecGymNE.set_observation_stats``: ``stats`` is a :class:`RunningObsNorm`, EvoTorch's
        ``RunningNorm`` (or anything with ``count``, ``sum`` and ``sum_of_squares``) whose
        sums have the observation shape, or None to forget them. The values are copied onto
        the network's device (normalisation keeps this package's formula: a ``RunningNorm``'s
        ``min_variance`` and ``clip`` are not carried over). Raises ValueError without
        ``observation_normalization=True`` or for a wrong shape."""
        self._ensure_obsnorm()
        if stats is None:
            self._obs_stats = None
            return
        self._obs_stats = RunningObsNorm.from_stats(stats, self._obs_space.shape, device=self.network_device)

    def update_observation_stats(self, stats: Any) -> None:
        """Add the counts of ``stats`` (what :meth:`set_observation_stats` accepts, not None)
        to the running observation statistics, as EvoTorch's ``update_observation_stats``."""
        self._ensure_obsnorm()
        extra = RunningObsNorm.from_stats(stats, self._obs_space.shape, device=self.network_device)
        if self._obs_stats is None:
            self._obs_stats = extra
            return
        current = self._obs_stats
        for name in ("count", "sum", "sum_of_squares"):
            getattr(current, name).add_(getattr(extra, name).to(getattr(current, name).device))

    def set_episode_count(self, n: int) -> None:
        """Set the number of completed episodes (as EvoTorch's ``VecGymNE``)."""
        self._episode_count = int(n)

    def set_interaction_count(self, n: int) -> None:
        """Set the number of environment steps taken (as EvoTorch's ``VecGymNE``)."""
        self._interaction_count = int(n)

    @property
    def interaction_count(self) -> int:
        """Environment steps taken by active members so far."""
        return self._interaction_count

    @property
    def episode_count(self) -> int:
        """Episodes completed so far."""
        return self._episode_count

    def _extra_status(self, batch: Any = None) -> dict:
        return {"total_interaction_count": self._interaction_count, "total_episode_count": self._episode_count}

    def _lowrank_status(self) -> dict:
        return self._extra_status()

    def to_policy(self, solution: Union[Solution, torch.Tensor, Iterable]) -> nn.Module:
        """A standalone policy module for ``solution`` (observation normalisation included)."""
        net = self.make_net(solution)
        if self._observation_normalization and self._obs_stats is not None:
            return _ObsNormPolicy(net, self._obs_stats.mean, self._obs_stats.stdev)
        return net

    def save_solution(self, solution: Union[Solution, torch.Tensor, Iterable], fname: Union[str, Path]) -> None:
        """Pickle ``solution`` into the file ``fname``, as EvoTorch's ``VecGymNE.save_solution``.

        The file holds one dict (read it back with ``pickle.load``): ``"solution"`` (the
        decision vector, a CPU tensor), ``"policy"`` (:meth:`to_policy` on the CPU,
        observation normalisation included), with observation normalisation and statistics
        ``"obs_mean"``, ``"obs_stdev"``, ``"obs_sum"``, ``"obs_sum_of_squares"``, then
        ``"interaction_count"``, ``"episode_count"``, ``"time"`` (a ``datetime``),
        ``"env"`` (when the environment was given as a Gymnasium id) and
        ``"architecture"`` (the network string when one was given, else a CPU copy of the
        network holding the initial solution).
        """
        vector = self._solution_vector(solution).detach().clone().cpu()
        result: dict[str, Any] = {"solution": vector, "policy": self.to_policy(vector).to("cpu")}
        stats = self._obs_stats
        if self._observation_normalization and stats is not None:
            result["obs_mean"] = stats.mean.cpu()
            result["obs_stdev"] = stats.stdev.cpu()
            result["obs_sum"] = stats.sum.cpu()
            result["obs_sum_of_squares"] = stats.sum_of_squares.cpu()
        result["interaction_count"] = self._interaction_count
        result["episode_count"] = self._episode_count
        result["time"] = datetime.now()
        if isinstance(self._env_maker, str):
            result["env"] = self._env_maker
        architecture = getattr(self, "_architecture", None)  # absent in problems pickled by older versions
        result["architecture"] = architecture if architecture is not None else copy.deepcopy(self._network).to("cpu")
        with open(fname, "wb") as f:
            pickle.dump(result, f)

    # ------------------------------------------------------------------ rollouts

    def _to_actions(self, out: torch.Tensor, num_envs: int, torch_env: bool) -> Any:
        k = out.shape[0]
        space = self._act_space
        if isinstance(space, gym.spaces.Discrete):
            if space.n == 2 and out.reshape(k, -1).shape[1] == 1:
                act = (out.reshape(k) > 0).to(torch.int64)
            else:
                scores = out.reshape(k, -1)
                if scores.shape[1] != space.n:
                    raise ValueError(
                        f"the network outputs {scores.shape[1]} values per member; "
                        f"the Discrete({space.n}) action space needs {space.n}"
                    )
                act = scores.argmax(dim=1)
            if space.start:
                act = act + int(space.start)
        else:
            low, high = self._box_bounds(out)  # clipped in the space's dtype: exact bounds, numpy-ready
            act = torch.maximum(torch.minimum(out.reshape(k, *space.shape).to(low.dtype), high), low)
        if num_envs > k:
            act = torch.cat([act, act[:1].expand(num_envs - k, *act.shape[1:])])
        if torch_env:
            return act
        act = act.cpu().numpy()
        return act.astype(space.dtype) if isinstance(space, gym.spaces.Box) else act

    def _box_bounds(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Box action bounds in the space's dtype on ``act``'s device (copied to the device
        once, so that a captured rollout step holds no host-to-device copy)."""
        cache = self.__dict__.setdefault("_bounds_cache", {})
        key = act.device
        if key not in cache:
            space = self._act_space
            cache[key] = (torch.as_tensor(space.low, device=act.device),
                          torch.as_tensor(space.high, device=act.device))
        return cache[key]

    def _obs_tensor(self, obs: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(obs, device=self.network_device).to(dtype)

    def _normalize(self, obs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if not self._observation_normalization:
            return obs
        if self._obs_stats is None:
            self._obs_stats = RunningObsNorm(obs.shape[1:], device=obs.device)
        self._obs_stats.update(obs, active)
        return self._obs_stats.normalize(obs)

    def _distributed_merge(self) -> None:
        """Sum this generation's interactions, episodes and observation statistics over the
        ranks (one small collective); every rank then holds the same global values."""
        from . import distributed as _dist

        snapshot = getattr(self, "_rank_snapshot", None)
        if snapshot is None:
            return
        interactions, episodes, stats = snapshot
        self._rank_snapshot = None
        parts = [torch.tensor([self._interaction_count - interactions, self._episode_count - episodes],
                              dtype=torch.float64)]
        current = self._obs_stats
        if current is not None:
            before = [torch.zeros_like(t) for t in (current.count, current.sum, current.sum_of_squares)]
            if stats is not None:
                before = [t.to(current.count.device) for t in stats]
            now = (current.count, current.sum, current.sum_of_squares)
            parts += [(a - b).reshape(-1).cpu() for a, b in zip(now, before)]
        total = _dist.sum_over_ranks(torch.cat(parts), like=self.device)
        self._interaction_count = interactions + int(total[0])
        self._episode_count = episodes + int(total[1])
        if current is not None:
            offset = 2
            for name, b in zip(("count", "sum", "sum_of_squares"), before):
                delta = total[offset : offset + b.numel()].reshape(b.shape).to(b.device)
                getattr(current, name).copy_(b + delta)  # in place: captured rollouts read these
                offset += b.numel()
        self._after_eval_status = self._lowrank_status()

    def _generation_state(self) -> dict:
        stats = self._obs_stats
        saved = None if stats is None else tuple(t.clone() for t in (stats.count, stats.sum, stats.sum_of_squares))
        return dict(super()._generation_state(), resets=self._num_resets, interactions=self._interaction_count,
                    episodes=self._episode_count, rollout_steps=self.last_rollout_steps, obs_stats=(stats, saved))

    def _restore_generation_state(self, state: dict) -> None:
        super()._restore_generation_state(state)
        self._num_resets = state["resets"]
        self._interaction_count = state["interactions"]
        self._episode_count = state["episodes"]
        self.last_rollout_steps = state["rollout_steps"]
        self._rank_snapshot = None
        stats, saved = state["obs_stats"]
        self._obs_stats = stats
        if stats is not None:
            for name, value in zip(("count", "sum", "sum_of_squares"), saved):
                getattr(stats, name).copy_(value)  # in place: captured rollouts read these

    def _rollout_step(self, buf: "_RolloutBuffers", forward: PopulationForward, env: gym.vector.VectorEnv,
                      member_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """One step of every environment; updates ``buf`` (returns, steps, alive mask and
        observations). Returns the ``(E,)`` end-of-episode flags of this step."""
        k, e = buf.num_members, buf.active.shape[0]
        x = self._normalize(self._obs_tensor(buf.obs, buf.dtype), buf.active)
        out = forward(x[:k], member_ids)
        torch_env = isinstance(buf.obs, torch.Tensor)
        obs, reward, terminated, truncated, _ = env.step(self._to_actions(out, e, torch_env))
        buf.obs = obs
        if buf.returns.is_cuda and _episode_step().supports(buf.returns, buf.alive, buf.active, reward,
                                                             terminated, truncated):
            # a torch-native GPU environment: the counters in one launch
            return _episode_step().episode_step_(buf.returns, buf.alive, buf.active, reward, terminated,
                                                 truncated)
        device = buf.returns.device
        reward = torch.as_tensor(reward, device=device).to(torch.float64)
        done = torch.as_tensor(terminated, device=device) | torch.as_tensor(truncated, device=device)
        buf.returns += torch.where(buf.active, reward, torch.zeros_like(reward))
        buf.alive += buf.active  # per environment: no reduction at every step
        buf.active &= ~done.to(torch.bool)
        return done

    def _replayable(self, env: gym.vector.VectorEnv, obs: Any, forward: PopulationForward) -> bool:
        """Whether this episode's steps can be captured in a CUDA graph and replayed: a
        torch-native environment on a CUDA device that keeps its state in place (it lists
        its generators in ``cuda_graph_generators``) and resets itself, and a forward that
        can be replayed (EGGROLL's own population slice)."""
        if not (isinstance(obs, torch.Tensor) and obs.is_cuda) or _autoreset_disabled(env):
            return False
        if getattr(self, "_replay_disabled", False) or not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return False
        if getattr(env, "cuda_graph_generators", ()) is None:  # declared not capturable (a JAX env)
            return False
        if not hasattr(env, "cuda_graph_generators"):
            if not getattr(self, "_warned_replay", False):
                self._warned_replay = True
                warnings.warn(
                    f"{type(env).__name__} runs on the GPU but does not declare that it updates its state in "
                    "place (a `cuda_graph_generators` attribute listing the CUDA generators its step draws "
                    "from), so its rollouts cannot be captured in a CUDA graph: they run step by step, bound "
                    "by host work",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        return forward.prepare_replay()

    def _episode_replayed(self, env: gym.vector.VectorEnv, obs: torch.Tensor, forward: PopulationForward,
                          buf: "_RolloutBuffers") -> bool:
        """Run one episode from ``obs`` through captured CUDA graphs (capturing them first if
        needed). False, with ``buf`` untouched, when nothing could be captured."""
        limit = self._episode_length
        chunk = min(limit, _REPLAY_CHUNK) if limit is not None else _REPLAY_CHUNK
        rollout: Optional[_CapturedRollout] = getattr(self, "_captured", None)
        t = 0
        if rollout is None or not rollout.matches(env, buf, forward, self):
            self._captured = rollout = None
            # eager steps first: they compile the kernels, create the observation statistics
            # and check the member ids (a tensor kept with the graphs) before the capture
            ids = forward.member_ids.clone()
            buf.obs = obs
            warm = min(_REPLAY_WARMUP, limit) if limit is not None else _REPLAY_WARMUP
            for _ in range(warm):
                self._rollout_step(buf, forward, env, ids)
                t += 1
            buf.executed = t
            if limit is not None and t >= limit:
                return True
            current = buf.obs
            try:
                rollout = _CapturedRollout.capture(self, env, forward, buf, chunk, ids)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager loop
                self._replay_disabled = True
                warnings.warn(
                    f"capturing the rollout in a CUDA graph failed ({type(err).__name__}: {err}); "
                    "rollouts of this problem run step by step from now on",
                    RuntimeWarning,
                    stacklevel=4,
                )
                buf.obs = current  # capturing ran nothing: the episode goes on from here
                return self._finish_eagerly(env, forward, buf, t)
            if rollout is None:
                return self._finish_eagerly(env, forward, buf, t)
            self._captured = rollout
        else:
            rollout.start(buf, obs)
        buf.executed = rollout.run(t, limit, chunk)
        buf.obs = rollout.obs
        return True

    def _finish_eagerly(self, env: gym.vector.VectorEnv, forward: PopulationForward, buf: "_RolloutBuffers",
                        t: int) -> bool:
        """Continue an episode step by step from step ``t`` (checking the alive mask every 8 steps)."""
        limit = self._episode_length
        while limit is None or t < limit:
            self._rollout_step(buf, forward, env, None)
            t += 1
            if t % 8 == 0 and not bool(buf.active.any()):
                break
        buf.executed = t
        return True

    def _evaluate_members(self, forward: PopulationForward) -> torch.Tensor:
        k = forward.num_members
        stats = self._obs_stats
        self._rank_snapshot = (
            self._interaction_count,
            self._episode_count,
            None if stats is None else tuple(t.clone() for t in (stats.count, stats.sum, stats.sum_of_squares)),
        )
        first_member = int(forward.member_ids[0]) if k else 0
        env = self._get_env(k)
        e = env.num_envs
        device = self.network_device
        dtype = next(self._network.parameters()).dtype
        returns = torch.zeros(e, dtype=torch.float64, device=device)
        steps_taken = torch.zeros((), dtype=torch.int64, device=device)
        self.last_rollout_steps = 0
        for _ in range(self._num_episodes):
            # + the first member's id: member m gets the same start on whichever rank
            # evaluates it (with per-sub-environment seeding); 0 in a single process
            seed = _mix_seed(self._seed_value, self._num_resets) + first_member
            self._num_resets += 1
            obs, _ = env.reset(seed=seed)
            buf = _RolloutBuffers(e, k, device, dtype, obs)
            if self._replayable(env, obs, forward):
                self._episode_replayed(env, obs, forward, buf)
            else:
                self._episode_eager(env, forward, buf)
            returns += buf.returns
            steps_taken += buf.alive.sum()
            self.last_rollout_steps += buf.executed
        self._interaction_count += int(steps_taken)
        self._episode_count += k * self._num_episodes
        return (returns[:k] / self._num_episodes).to(torch.float32)

    def _episode_eager(self, env: gym.vector.VectorEnv, forward: PopulationForward, buf: "_RolloutBuffers") -> None:
        """One episode step by step. A torch-native environment on a CUDA device is checked for
        "all ended" every 8 steps (one synchronisation); others every step."""
        torch_env = isinstance(buf.obs, torch.Tensor)
        manual_reset = _autoreset_disabled(env)
        check_every = 8 if (torch_env and buf.obs.device.type == "cuda") else 1
        t = 0
        while True:
            done = self._rollout_step(buf, forward, env, None)
            t += 1
            if manual_reset and bool(done.any()):
                # Without autoreset, an ended sub-environment may not be stepped again.
                mask = done if torch_env else done.cpu().numpy()
                buf.obs, _ = env.reset(options={"reset_mask": mask})
            if self._episode_length is not None and t >= self._episode_length:
                break
            if t % check_every == 0 and not bool(buf.active.any()):
                break
        buf.executed = t


# Steps captured in one CUDA graph of a rollout, and eager steps before the first capture.
_REPLAY_CHUNK = 50
_REPLAY_WARMUP = 2


def _episode_step():
    """The counters' kernel module (imported on first use, so Triton is imported only then)."""
    from .kernels import episode_step

    return episode_step


class _RolloutBuffers:
    """The per-episode state of a rollout: alive mask, returns, steps taken alive, current
    observations."""

    def __init__(self, num_envs: int, num_members: int, device: torch.device, dtype: torch.dtype, obs: Any) -> None:
        self.num_members = num_members
        self.dtype = dtype
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.alive = torch.zeros(num_envs, dtype=torch.int64, device=device)  # steps taken alive
        self.active = torch.zeros(num_envs, dtype=torch.bool, device=device)
        self.active[:num_members] = True
        self.obs = obs
        self.executed = 0  # steps run (every environment, ended or not)


class _CapturedRollout:
    """Rollout steps captured in CUDA graphs: ``chunk`` steps in one graph and one step in
    another, replayed until the episode ends. Everything the steps read and write lives at
    fixed addresses (the environment's in-place state, the drawn factors, the parameters,
    the observation statistics and the buffers here), so the graphs replay in later
    generations as long as :meth:`matches` holds."""

    def __init__(self, key: tuple, env: gym.vector.VectorEnv, buf: _RolloutBuffers, obs: torch.Tensor,
                 ids: torch.Tensor, graphs: dict[int, Any]) -> None:
        self.key = key
        self.env_ref = env
        self.buf = buf
        self.obs = obs  # the observations the next replay starts from
        self.ids = ids  # the member ids the captured forwards read
        self.graphs = graphs

    @staticmethod
    def _key(problem: "EggrollVecGymNE", env: gym.vector.VectorEnv, buf: _RolloutBuffers,
             forward: PopulationForward) -> Optional[tuple]:
        fkey = forward.replay_key()
        if fkey is None:
            return None
        stats = problem._obs_stats
        stats_key = None if stats is None else tuple(t.data_ptr() for t in (stats.count, stats.sum, stats.sum_of_squares))
        return (id(env), env.num_envs, buf.num_members, buf.dtype, problem._observation_normalization, stats_key, fkey)

    def matches(self, env: gym.vector.VectorEnv, buf: _RolloutBuffers, forward: PopulationForward,
                problem: "EggrollVecGymNE") -> bool:
        if env is not self.env_ref:
            return False
        return self._key(problem, env, buf, forward) == self.key

    @classmethod
    def capture(cls, problem: "EggrollVecGymNE", env: gym.vector.VectorEnv, forward: PopulationForward,
                buf: _RolloutBuffers, chunk: int, ids: torch.Tensor) -> Optional["_CapturedRollout"]:
        """Capture the graphs (nothing runs) from the state ``buf`` is in, the forward reading
        the member ids ``ids``, or return None when the forward cannot be replayed in later
        generations."""
        key = cls._key(problem, env, buf, forward)
        if key is None:
            return None
        obs = buf.obs.clone()  # the static observations every replay starts from
        torch.cuda.synchronize(obs.device)
        graphs: dict[int, Any] = {}
        pool = None
        for steps in sorted({chunk, 1}, reverse=True):
            graph = torch.cuda.CUDAGraph()
            for gen in env.cuda_graph_generators:
                graph.register_generator_state(gen)
            with torch.cuda.graph(graph, pool=pool):
                buf.obs = obs
                for _ in range(steps):
                    problem._rollout_step(buf, forward, env, ids)
                obs.copy_(buf.obs)
            pool = graph.pool()
            graphs[steps] = graph
        buf.obs = obs
        return cls(key, env, buf, obs, ids, graphs)

    def start(self, buf: _RolloutBuffers, obs: torch.Tensor) -> None:
        """Point at a new episode: reset the buffers and load the first observations."""
        self.buf.returns.zero_()
        self.buf.alive.zero_()
        self.buf.active.copy_(buf.active)
        self.obs.copy_(obs)
        buf.returns, buf.alive, buf.active = self.buf.returns, self.buf.alive, self.buf.active

    def run(self, t: int, limit: Optional[int], chunk: int) -> int:
        """Replay from step ``t`` until ``limit`` steps or until every environment ended
        (checked between chunks); returns the number of steps run."""
        while limit is None or t < limit:
            steps = chunk if limit is None or limit - t >= chunk else 1
            self.graphs[steps].replay()
            t += steps
            if steps == chunk and not bool(self.buf.active.any()):
                break
        return t
