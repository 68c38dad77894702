"""The base problem adapter: an EvoTorch problem over a network's evolved parameters with
EGGROLL's low-rank side channel, and the helpers every adapter shares."""

from __future__ import annotations

import copy
import inspect
import os
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from evotorch import Solution, SolutionBatch
from evotorch.neuroevolution.baseneproblem import BaseNEProblem
from evotorch.neuroevolution.net import str_to_net
from torch import nn

from ..module import ESModule
from .forward import PopulationForward, _MaterialisedMembers

__all__ = ["EggrollNEProblem", "NetworkLike", "DeviceLike"]

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


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index: a CUDA device without one is the current CUDA device (the
    device of tensors allocated on it), so that it compares equal to their ``.device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


class EggrollNEProblem(BaseNEProblem):
    """Base EvoTorch problem over a network's evolved parameters, with a low-rank side channel.

    The decision vector concatenates the evolved parameters (``requires_grad=True``, in
    ``named_parameters()`` order, filtered by ``include``/``exclude``), flattened row-major,
    so ``solution_length`` is their total number of elements. Frozen parameters and
    buffers keep the network's values.

    The problem implements :class:`~evotorch_eggroll.protocol.LowRankProblem`, what the
    EGGROLL searcher's low-rank mode asks of a problem (:meth:`evaluate_population`,
    :meth:`generation_state`/:meth:`restore_generation_state`, :meth:`distributed_setup`/
    :meth:`distributed_merge`); subclasses with running state extend those methods.

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

    @property
    def status(self) -> dict:
        """The status after the last evaluation (as EvoTorch's ``Problem.status``). After a
        low-rank population evaluation it is formed when first read, so that counters the
        evaluation kept on the device are read back only then (after the update that
        follows the evaluation is queued), not when the evaluation returns."""
        if getattr(self, "_lowrank_status_due", False):
            self._lowrank_status_due = False
            self._after_eval_status = self._lowrank_status()
        return self._after_eval_status

    # ------------------------------------------------------------------ EGGROLL's low-rank protocol

    def distributed_setup(self) -> None:
        """Distributed EGGROLL, once on every rank at the searcher's construction: adopt
        rank 0's seed for the problem's own randomness (data order, environment resets), so
        that a seed drawn per process (``seed=None``) cannot make the ranks' members see
        different data. Subclasses with more shared state extend this."""
        from .. import distributed as _dist

        seed = torch.tensor([self._seed_value], dtype=torch.int64)
        self._seed_value = int(_dist.broadcast_from_rank0(seed, like=self.device)[0])

    def distributed_merge(self, state: dict) -> None:
        """Distributed EGGROLL, on every rank after each rank evaluated its slice of a
        population: make the problem's running state (counters, statistics) global, the same
        on every rank, from what changed since ``state`` (this generation's
        :meth:`generation_state`). The base class keeps no such state."""

    def generation_state(self) -> dict:
        """What evaluating one population advances in the problem, taken by the EGGROLL
        searcher before each evaluation: a generation whose evaluation raises (on any rank,
        when distributed) is undone with :meth:`restore_generation_state`, so that every
        rank continues as if it had not been evaluated. Subclasses with running state
        (data position, counters, statistics) extend both methods."""
        status = self.status if hasattr(self, "_after_eval_status") else None
        return {"after_eval_status": dict(status or {})}

    def restore_generation_state(self, state: dict) -> None:
        """Put back what :meth:`generation_state` took."""
        self._lowrank_status_due = False
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
        device = _indexed(self.network_device)
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
        device = next(network.parameters()).device
        span = pop._local
        first: Optional[int] = span.start if len(span) else None
        if member_ids is None:
            # the context's own slice (the usual case; it can be captured and replayed), made on
            # the device: no copy from the host that would wait for the work queued before it
            ids = torch.arange(span.start, span.stop, dtype=torch.int64, device=device)
            own_slice = True
        else:
            ids = torch.as_tensor(list(member_ids) if not isinstance(member_ids, torch.Tensor) else member_ids)
            on_cpu = ids.device.type == "cpu"
            own_slice = on_cpu and torch.equal(ids.to(torch.int64), pop.local_member_ids())
            first = int(ids[0]) if on_cpu and ids.numel() else None
            ids = ids.to(device=device, dtype=torch.int64)
        with torch.no_grad():
            if self._has_batched_evaluation():
                fwd = PopulationForward(
                    lambda x, rid: pop.batched_forward(network, x, member_ids=rid), ids, pop.population_size,
                    replay=(pop._prepare_replay, pop._replay_key) if own_slice else None,
                    argmax=lambda x, rid: pop._batched_argmax(network, x, member_ids=rid),
                    first_member=first,
                )
                fit = self._as_fitness(self._evaluate_members(fwd), ids.shape[0])
            else:
                wanted = {int(i): j for j, i in enumerate(ids.tolist())}
                values: list = [None] * len(wanted)
                for k in pop.iterate():
                    if k in wanted:
                        values[wanted[k]] = torch.as_tensor(self._evaluate_network(network), dtype=torch.float64)
                fit = torch.stack(values)
        self._lowrank_status_due = True  # formed when read: see status
        return fit.to(device=device, dtype=torch.float32)

