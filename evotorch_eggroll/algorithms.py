"""EGGROLL as an EvoTorch search algorithm.

EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025) is an evolution
strategy whose weight perturbations are low-rank products ``A @ B.T`` that are never
materialised: noise is regenerated from a counter-based Philox stream inside the batched
forward and again for the update.

:class:`EGGROLL` plugs into EvoTorch through ``SearchAlgorithm._step``, so EvoTorch's
loggers (``StdOutLogger``, ``PandasLogger``, ``PicklingLogger``) and status keys work as
with PGPE or SNES. It runs in one of two modes, chosen from the problem:

* **low-rank** (a problem implementing :class:`~evotorch_eggroll.protocol.LowRankProblem`,
  such as the adapters of :mod:`evotorch_eggroll.neuroevolution`): an internal
  :class:`~evotorch_eggroll.strategy.EggrollStrategy` evolves a copy of the problem's
  network, and each generation is evaluated through the problem's
  ``evaluate_population`` inside one perturbation context (each network call is one
  ``batched_forward`` for all members).
* **dense** (any other EvoTorch ``Problem`` with a numeric decision vector): the center is a
  1-D vector; the population is materialised in chunks as ``SolutionBatch`` objects with
  full-rank noise from the same Philox stream (the dense noise of a 1-D parameter named
  ``"center"``) and evaluated with ``problem.evaluate``, so EvoTorch's Ray actors
  (``num_actors``) spread the work as usual.

Each mode is a small object of its own (:class:`_LowRankMode`, :class:`_DenseMode`) chosen
at construction; :class:`EGGROLL` holds what both share: settings, fitness shaping, the
distributed all-gather and its failure protocol, status and pickling.

In both modes a generation is: sample ``popsize`` members around the center, evaluate them,
shape the fitnesses with ``ranking_method`` (better is larger, whatever the objective
sense), and hand the ES gradient ``g = (1/sqrt(N)) sum_i w_i P_i`` (``P_i`` the member's
perturbation) to a torch optimizer as ``-g``. Status values after a step describe the
population just evaluated (sampled around the center before the update); ``center`` is the
updated center.

With ``distributed=True`` (an initialized ``torch.distributed`` group, e.g. under
``torchrun``) each rank evaluates the contiguous slice ``rank * N/W .. (rank+1) * N/W - 1``
of the population (low-rank mode through the side channel, dense mode as SolutionBatch
chunks), the N fitnesses are all-gathered (one collective of N floats), and every rank
ranks them and applies the identical update from regenerated noise. Status values are
global and identical on every rank; attached loggers run on rank 0 only unless
``log_all_ranks=True``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from evotorch import Problem, Solution, SolutionBatch
from evotorch.algorithms import SearchAlgorithm
from evotorch.tools.hook import Hook

from . import distributed as _dist
from . import noise as _noise
from . import ops, shaping
from ._graphs import GraphedCall
from ._validation import check_int, check_population_size, check_real, check_seed, optimizer_class
from .protocol import LowRankProblem, missing_members
from .strategy import StepRefusal

__all__ = ["EGGROLL", "RANKING_METHODS", "rank_fitnesses"]

RANKING_METHODS = ("centered", "linear", "nes", "normalized", "raw")
_ALIASES = {
    None: "raw",
    "centered_rank": "centered",
    "rank": "centered",
    "normalize": "normalized",
    "none": "raw",
}
CENTER_NAME = "center"  # the name that keys the dense noise of plain vector problems


def _nes_utilities(f: torch.Tensor) -> torch.Tensor:
    """NES utilities (Wierstra et al., 2014) of ``f (N,)``, larger is better; ties averaged."""
    n = f.shape[0]
    order = torch.argsort(f, stable=True)  # ascending: position n-1 is the best
    k = torch.arange(n, 0, -1, dtype=torch.float64, device=f.device)  # 1 = best
    u = torch.clamp(math.log(n / 2.0 + 1.0) - torch.log(k), min=0.0)
    u = u / u.sum() - 1.0 / n
    # ties averaged: each sorted value's tie group found by binary search (no host read);
    # a group of one keeps its own utility exactly
    sorted_f = f[order]
    first = torch.searchsorted(sorted_f, sorted_f, side="left")
    last = torch.searchsorted(sorted_f, sorted_f, side="right")
    sums = torch.cat([u.new_zeros(1), torch.cumsum(u, 0)])
    tied = (sums[last] - sums[first]) / (last - first).to(torch.float64)
    u = torch.where(last - first > 1, tied, u)
    out = torch.empty_like(u)
    out[order] = u
    return out


def rank_fitnesses(
    fitnesses: torch.Tensor, ranking_method: Optional[str], *, higher_is_better: bool, nonfinite: str = "raise"
) -> torch.Tensor:
    """Shape raw fitnesses into ES weights; better members get larger weights.

    Args:
        fitnesses: ``(N,)`` raw fitnesses.
        ranking_method: EvoTorch's names: ``"centered"`` (ranks in [-0.5, 0.5]),
            ``"linear"`` (ranks in [0, 1]), ``"nes"`` (NES log utilities),
            ``"normalized"`` (z-score with the population variance), ``"raw"`` or None
            (the fitnesses, negated when lower is better). Our strategy's names
            ``"centered_rank"``, ``"rank"``, ``"normalize"`` and ``"none"`` are accepted too.
            The rank methods give the weights of ``evotorch.tools.ranking`` except on
            ties: EvoTorch gives tied members distinct weights in the order its unstable
            sort leaves them, here every member of a tie gets the mean of those weights, so
            equal fitnesses get equal weights (constant fitnesses, or an antithetic pair
            with equal fitness, contribute nothing to the update).
        higher_is_better: False for minimisation.
        nonfinite: ``"raise"`` (default): NaN or inf fitnesses are a ValueError.
            ``"worst"``: such members rank below every finite one, whatever the sign of
            their value and the objective sense: in "higher is better" terms (the
            fitnesses negated for minimisation) each is replaced by one finite spread below
            the worst finite value (:func:`evotorch_eggroll.shaping.replace_nonfinite`)
            before ranking; every method then sees finite values.

    Returns:
        ``(N,)`` float64 weights on the input's device.

    Raises:
        ValueError: an unknown method or ``nonfinite``; non-finite fitnesses with
            ``"raise"``, or all of them with ``"worst"``.
    """
    method = _ranking_method(ranking_method)
    shaping.check_nonfinite_policy(nonfinite, "nonfinite")
    f = _higher_is_better_values(fitnesses, higher_is_better)
    if nonfinite == "worst":
        f, _ = shaping.replace_nonfinite(f)
    elif not bool(torch.isfinite(f).all()):
        raise ValueError(_NONFINITE_MESSAGE)
    return _ranked(f, method)


_NONFINITE_MESSAGE = "fitnesses contain NaN or inf (nonfinite_fitness='worst' ranks such members below every finite one)"


def _ranking_method(ranking_method: Optional[str]) -> str:
    """The canonical name of ``ranking_method``; ValueError for an unknown one."""
    method = _ALIASES.get(ranking_method, ranking_method)
    if method not in RANKING_METHODS:
        raise ValueError(f"unknown ranking_method {ranking_method!r}; expected one of {RANKING_METHODS} or None")
    return method


def _higher_is_better_values(fitnesses: Any, higher_is_better: bool) -> torch.Tensor:
    """``(N,)`` float64 fitnesses, negated for minimisation."""
    f = torch.as_tensor(fitnesses).reshape(-1).to(torch.float64)
    return f if higher_is_better else -f


def _ranked(f: torch.Tensor, method: str) -> torch.Tensor:
    """The weights of ``f`` (float64, higher is better) under a canonical ranking method, on
    ``f``'s device with no host read (the values are not checked)."""
    if method == "centered":
        return shaping.centered_rank(f)
    if method == "linear":
        return shaping.rank_transform(f) + 0.5
    if method == "nes":
        return _nes_utilities(f)
    if method == "normalized":
        return shaping.zscore(f)
    return f


class _RankZeroHook(Hook):
    """A Hook whose callables run on process rank 0 only (elsewhere a call does nothing).

    Installed as the searcher's ``log_hook`` and ``end_of_run_hook`` in a distributed run,
    so that loggers attached on every rank print and save once.
    """

    def __init__(self, rank: int, callables: Optional[list] = None) -> None:
        super().__init__(callables)
        self._rank = int(rank)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._rank != 0:
            return None
        return super().__call__(*args, **kwargs)


# Settings of EvoTorch's distribution-based searchers (PGPE, SNES, XNES, CEM) that mean
# exactly what an EGGROLL argument means: accepted under EvoTorch's name.
_EVOTORCH_ALIASES = {"center_learning_rate": "lr", "stdev_init": "sigma", "symmetric": "antithetic"}

_FIXED_SIGMA = "EGGROLL keeps its noise scale fixed (it does not learn it): leave out {name} and choose sigma"
_FIXED_POPSIZE = "EGGROLL's population size does not adapt: leave out {name} and choose popsize"
# Settings of those searchers that have no EGGROLL equivalent: what to do instead.
_EVOTORCH_REFUSED = {
    "stdev_learning_rate": _FIXED_SIGMA,
    "scale_learning_rate": _FIXED_SIGMA,
    "stdev_min": _FIXED_SIGMA,
    "stdev_max": _FIXED_SIGMA,
    "stdev_max_change": _FIXED_SIGMA,
    "num_interactions": _FIXED_POPSIZE,
    "popsize_max": _FIXED_POPSIZE,
    "ensure_even_popsize": "EGGROLL does not change popsize: pass an even popsize (with antithetic sampling "
    "an odd one leaves the last member without a mirror)",
    "obj_index": "EGGROLL optimises single-objective problems only: leave out obj_index",
    "popsize_weighted_grad_avg": "EGGROLL does not average gradients of Ray actors: leave out {name} (with "
    "distributed=True the ranks of torch.distributed share one population)",
    "parenthood_ratio": "EGGROLL is a gradient estimator, not a cross-entropy method: leave out {name}",
}


def _evotorch_settings(given: dict, problem: Problem, explicit: dict) -> dict:
    """EGGROLL's values for settings given under EvoTorch's names (``given``): the aliases
    translated, everything else refused with a TypeError that names what to use instead.
    ``explicit`` holds the EGGROLL arguments that were passed (not None)."""
    out: dict = {}
    for name, value in given.items():
        target = _EVOTORCH_ALIASES.get(name)
        if target is None:
            if name == "radius_init":
                length = int(problem.solution_length)
                hint = f" (here sigma={float(value) / math.sqrt(length):.6g})" if isinstance(value, (int, float)) else ""
                raise TypeError(
                    "EGGROLL has no radius_init: its noise has one scale for every parameter; pass "
                    f"sigma=radius_init / sqrt(solution_length){hint}"
                )
            if name in _EVOTORCH_REFUSED:
                raise TypeError(_EVOTORCH_REFUSED[name].format(name=name))
            raise TypeError(f"EGGROLL got an unexpected keyword argument {name!r}")
        if target in explicit or target in out:
            raise TypeError(f"{name} is EvoTorch's name for EGGROLL's {target}: pass only one of them")
        if value is None:
            continue
        if name == "stdev_init":
            scale = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
            if scale.numel() != 1:
                raise TypeError(
                    "EGGROLL's sigma is one noise scale for all parameters: a stdev_init per "
                    "parameter has no equivalent; pass a single number"
                )
            value = float(scale.reshape(()))
        out[target] = value
    return out


def _make_optimizer(params: list, optimizer: Any, lr: float, config: Optional[dict]) -> torch.optim.Optimizer:
    return optimizer_class(optimizer)(params, lr=lr, **dict(config or {}))


# What the strategy says about a generation that the searcher reports in its own terms.
_STRATEGY_ODD_POPSIZE = "antithetic sampling with an odd population_size"
_STRATEGY_TIED_WEIGHTS = r"all \d+ prenormalized weights are equal"
# Status keys of EvoTorch's best/worst tracking in Problem.evaluate.
_SOLUTION_STATS = ("best", "worst", "best_eval", "worst_eval")


def _keeps_solution_stats(problem: Problem) -> bool:
    """Whether ``problem.evaluate`` runs EvoTorch's best/worst tracking on batches on the
    problem's device (``store_solution_stats=None`` decides by the first batch: on for the CPU)."""
    stores = problem.stores_solution_stats
    if stores is None:
        return torch.device(problem.device).type == "cpu"
    return bool(stores)


def _evaluate_batch(problem: Problem, batch: SolutionBatch) -> None:
    """``problem.evaluate(batch)``, with EvoTorch's failure on non-finite evaluations (its
    best/worst tracking raises an ``AttributeError``) turned into an error that says what
    happened and what to do."""
    try:
        problem.evaluate(batch)
    except AttributeError as err:
        evals = batch.evals
        if evals is None or bool(torch.isfinite(evals.as_subclass(torch.Tensor)).all()):
            raise
        bad = int((~torch.isfinite(evals.as_subclass(torch.Tensor))).any(dim=-1).sum())
        raise ValueError(
            f"{type(problem).__name__}'s evaluation returned NaN or inf for {bad} of {len(batch)} members, "
            "and EvoTorch's best/worst tracking of the problem fails on them; nothing was updated. "
            "To rank such members last instead, construct the problem with store_solution_stats=False "
            "and pass nonfinite_fitness='worst' to EGGROLL"
        ) from err


class _LowRankMode:
    """EGGROLL's low-rank mode, for a problem implementing
    :class:`~evotorch_eggroll.protocol.LowRankProblem`: an internal
    :class:`~evotorch_eggroll.strategy.EggrollStrategy` evolves a copy of the problem's
    network, and a generation is one perturbation context in which the problem evaluates
    this process's members.

    Both modes offer :class:`EGGROLL` the same interface: :meth:`evaluate` (this
    generation's N fitnesses and the record of the population they describe),
    :meth:`update` (the ES step from the N weights), :meth:`member_vector` (one member of a
    recorded generation), :meth:`center`, the properties ``epoch``, ``sigma``,
    ``optimizer``, ``strategy`` and ``network``, and :meth:`resume`
    (after unpickling).
    """

    def __init__(self, problem: Problem, center_init: Optional[Any], popsize: int, strategy_kwargs: dict) -> None:
        self._problem = problem
        self._popsize = popsize
        self._strategy_kwargs = dict(strategy_kwargs)
        self._network = copy.deepcopy(problem.network).to(problem.device)
        if center_init is not None:
            center = problem.ensure_tensor_length_and_dtype(center_init, allow_scalar=False, about="center_init")
            problem.vector_to_parameters(center, self._network)
        if self._strategy_kwargs["distributed"]:
            # One-time agreement: rank 0's starting center and problem seed everywhere.
            with torch.no_grad():
                center = _dist.broadcast_from_rank0(problem.parameters_to_vector(self._network))
            problem.vector_to_parameters(center, self._network)
            problem.distributed_setup()
        self._strategy = self._build_strategy()

    def _build_strategy(self) -> Any:
        from .strategy import EggrollStrategy

        optimizer_class(self._strategy_kwargs["optimizer"])  # a clear error before anything is built
        strategy = EggrollStrategy(**self._strategy_kwargs)
        names = self._problem.evolved_parameter_names
        strategy.setup(self._network, include=names)
        got = [n for n, _ in strategy.named_parameters()]
        if got != names:
            raise RuntimeError(
                f"the strategy evolves {got} but the problem's decision vector is made of {names}; "
                "use the problem's include/exclude to choose the evolved parameters"
            )
        return strategy

    @property
    def epoch(self) -> int:
        return int(self._strategy.epoch)

    @property
    def sigma(self) -> float:
        return self._strategy.sigma

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._strategy.optimizer

    @property
    def strategy(self) -> Any:
        return self._strategy

    @property
    def network(self) -> torch.nn.Module:
        return self._network

    def center(self) -> torch.Tensor:
        """A copy of the current center ``(L,)``."""
        with torch.no_grad():
            return self._problem.parameters_to_vector(self._network).clone()

    def evaluate(self, gather: Callable, local: range) -> tuple[torch.Tensor, dict]:
        """The N fitnesses of this generation (``gather`` evaluates this process's members,
        the perturbation context's own slice, and all-gathers) and the record of the population."""
        strategy = self._strategy
        problem = self._problem
        record = dict(epoch=int(strategy.epoch), sigma=float(strategy.sigma))
        state = problem.generation_state()

        def evaluate() -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _STRATEGY_ODD_POPSIZE, UserWarning)
                context = strategy.perturb(self._popsize)
            with context as pop:
                return problem.evaluate_population(pop, self._network)

        device = next(self._network.parameters()).device
        fitnesses = gather(evaluate, record["epoch"], device, lambda: problem.restore_generation_state(state))
        # taken after the evaluation (which leaves the center as it was), so that its launches
        # are queued behind the rollout rather than before it
        record["center"] = self.center()
        if self._strategy_kwargs["distributed"]:
            self._merge_state = state
        return fitnesses, record

    def merge(self, apply: bool) -> None:
        """Distributed, at the end of a generation's step: with ``apply``, the problem's
        ``distributed_merge`` of the generation just evaluated (the searcher calls it once
        the all-gather is known to have succeeded on every rank, after the update was
        queued, so that a merge that reads values back does not hold up the update);
        without, the generation's state is dropped."""
        state = self.__dict__.pop("_merge_state", None)
        if apply and state is not None:
            self._problem.distributed_merge(state)

    def update(self, weights: torch.Tensor, refusals: tuple, extra: torch.Tensor) -> list:
        """One strategy step from the N weights (the same on every rank), queued on the
        device before the ``refusals`` (:class:`StepRefusal`, the first that is set wins)
        and ``extra`` are read (with the step's checks, in a copy that does not wait for
        the update); a refused step is rolled back and raises. Returns the values of
        ``extra``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _STRATEGY_TIED_WEIGHTS, UserWarning)
            return self._strategy._step(weights, True, tuple(refusals), metrics=False, extra=extra)[1]

    def member_vector(self, record: dict) -> torch.Tensor:
        """The decision vector of ``record["member"]`` in the generation ``record`` describes."""
        strategy = self._strategy
        parts = []
        for _, param in strategy.named_parameters():
            pert = strategy.member_perturbation(param, record["member"], record["epoch"], sigma=record["sigma"])
            parts.append(pert.as_matrix().reshape(-1).to(record["center"].dtype))
        return record["center"] + torch.cat(parts).to(record["center"].device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_strategy"] = None
        state["_strategy_state"] = self._strategy.state_dict()
        return state

    def resume(self, distributed: bool) -> None:
        """After unpickling: rebuild the strategy for the searcher's (possibly changed)
        ``distributed`` setting and load its pickled state."""
        strategy_state = self.__dict__.pop("_strategy_state")
        self._strategy_kwargs["distributed"] = distributed
        self._strategy = self._build_strategy()
        self._strategy.load_state_dict(strategy_state)


class _DenseMode:
    """EGGROLL's dense (materialised) mode, for any other numeric EvoTorch problem: the
    center is a 1-D vector, members are materialised in chunks as ``SolutionBatch`` objects
    with full-rank noise from the Philox stream (the dense noise of a 1-D parameter named
    ``"center"``) and evaluated with ``problem.evaluate``. Same interface as
    :class:`_LowRankMode`."""

    strategy = None
    network = None

    def __init__(
        self,
        problem: Problem,
        center_init: Optional[Any],
        *,
        popsize: int,
        sigma: float,
        lr: float,
        optimizer: Union[str, type],
        optimizer_config: dict,
        antithetic: bool,
        noise_reuse: int,
        seed: int,
        backend: str,
        chunk_size: Optional[int],
        distributed: bool,
    ) -> None:
        self._problem = problem
        self._popsize = popsize
        self._sigma = sigma
        self._antithetic = antithetic
        self._noise_reuse = noise_reuse
        self._seed = seed
        self._backend = backend
        if center_init is None:
            center = problem.generate_values(1).reshape(-1)
        else:
            center = problem.ensure_tensor_length_and_dtype(center_init, allow_scalar=False, about="center_init")
        if type(center) is not torch.Tensor:
            center = center.as_subclass(torch.Tensor)
        if distributed:
            center = _dist.broadcast_from_rank0(center.detach().to(problem.device))
        self._center = torch.nn.Parameter(center.detach().clone().to(problem.device), requires_grad=True)
        self._noise_device()  # a clear error now when no kernel can draw the noise
        self._optimizer = _make_optimizer([self._center], optimizer, lr, optimizer_config)
        self._epoch = 0
        length = int(problem.solution_length)
        if chunk_size is None:
            chunk_size = max(1, min(self._popsize, (1 << 24) // max(length, 1)))
        self._chunk_size = check_int("chunk_size", chunk_size, 1)
        self._center_key = _noise.param_key(CENTER_NAME)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def sigma(self) -> float:
        return self._sigma

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def center(self) -> torch.Tensor:
        """A copy of the current center ``(L,)``."""
        return self._center.detach().clone()

    def _dense_normals(self, noise_indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Standard normals ``(K, L)`` float32 of the center's noise draws, on its device."""
        idx = noise_indices.to(self._noise_device())
        out = ops.normal_block(self._seed, self._center_key, epoch, idx, self._center.numel(),
                               backend=self._backend)
        return out.to(self._center.device)

    def _noise_device(self) -> torch.device:
        """Where the dense noise is drawn: the center's device; for a center on the CPU
        with the kernels (``backend="triton"``, or ``"auto"`` without the interpreter),
        the GPU when there is one. Otherwise a CPU center gets plain torch (``"auto"``,
        ``"torch"``), the kernels in Triton's interpreter, or, with ``"triton"`` and
        neither, the error that says why a GPU is needed."""
        device = self._center.device
        if (device.type == "cpu" and self._backend != "torch" and not ops.interpreter_active()
                and torch.cuda.is_available()):
            return torch.device("cuda")
        ops.check_kernel_device(self._center, "the problem's decision vector", self._backend)
        return device

    def _dense_member_noise(self, member_ids: torch.Tensor, epoch: int, sigma: float) -> torch.Tensor:
        """Perturbations ``s_i * sigma * eps_i``: ``(K, L)`` float32."""
        idx, sign = _noise.member_noise(member_ids, self._antithetic)
        return self._dense_normals(idx, epoch) * (sign * sigma)[:, None]

    def evaluate(self, gather: Callable, local: range) -> tuple[torch.Tensor, dict]:
        """The N fitnesses of this generation (``gather`` evaluates the members ``local`` in
        chunks with ``problem.evaluate`` and all-gathers) and the record of the population."""
        problem = self._problem
        epoch = _noise.effective_epoch(self._epoch, self._noise_reuse)
        center = self._center.detach()
        record = dict(center=center.clone(), epoch=self._epoch, sigma=self._sigma)
        device = center.device

        def evaluate() -> torch.Tensor:
            parts = []
            for start in range(local.start, local.stop, self._chunk_size):
                ids = torch.arange(start, min(local.stop, start + self._chunk_size), device=device)
                values = (center.float() + self._dense_member_noise(ids, epoch, self._sigma)).to(center.dtype)
                batch = SolutionBatch(problem, popsize=int(ids.shape[0]), device=problem.device, empty=True)
                batch.set_values(values.to(problem.device))
                _evaluate_batch(problem, batch)
                evals = batch.evals[:, 0]
                parts.append(evals.as_subclass(torch.Tensor).clone().to(device))
            return torch.cat(parts).float()

        return gather(evaluate, self._epoch, device), record

    def merge(self, apply: bool) -> None:
        """Nothing: the dense mode's problems keep no state that ranks share."""

    def update(self, weights: torch.Tensor, refusals: tuple, extra: torch.Tensor) -> list:
        """The ES step from the N weights: the gradient from regenerated noise, in chunks
        (the ``refusals`` are read first, with ``extra``: a refused generation changes
        nothing; the first that is set wins). Returns the values of ``extra``."""
        k = len(refusals)
        read = torch.cat([*(r.flag.reshape(1).to(extra) for r in refusals), extra.reshape(-1)]).tolist()
        for refusal, flag in zip(refusals, read[:k]):
            if flag:
                raise refusal.error()
        values = read[k:]
        n = self._popsize
        epoch = _noise.effective_epoch(self._epoch, self._noise_reuse)
        device = self._center.device
        noise_indices, coeffs = shaping.antithetic_fold(weights, self._antithetic)
        grad = torch.zeros(self._center.numel(), dtype=torch.float32, device=device)
        for start in range(0, noise_indices.shape[0], self._chunk_size):
            idx = noise_indices[start : start + self._chunk_size].to(device)
            grad += coeffs[start : start + self._chunk_size].to(device, torch.float32) @ self._dense_normals(idx, epoch)
        grad *= self._sigma / math.sqrt(n)

        self._optimizer.zero_grad(set_to_none=True)
        self._center.grad = (-grad).to(self._center.dtype)
        self._optimizer.step()
        self._center.grad = None
        self._epoch += 1
        return values

    def member_vector(self, record: dict) -> torch.Tensor:
        """The decision vector of ``record["member"]`` in the generation ``record`` describes."""
        epoch = _noise.effective_epoch(record["epoch"], self._noise_reuse)
        ids = torch.tensor([record["member"]], device=record["center"].device)
        delta = self._dense_member_noise(ids, epoch, record["sigma"])[0]
        return (record["center"].float() + delta).to(record["center"].dtype)

    def resume(self, distributed: bool) -> None:
        """After unpickling: nothing to rebuild."""


class EGGROLL(SearchAlgorithm):
    """EGGROLL: evolution strategies with low-rank perturbations, for EvoTorch problems.

    Example:
        >>> problem = EggrollVecGymNE(CartPole, policy, episode_length=200)
        >>> searcher = EGGROLL(problem, popsize=2048, sigma=0.05, lr=0.03, rank=1)
        >>> StdOutLogger(searcher, interval=10)
        >>> searcher.run(100)
        >>> searcher.status["center"]          # the evolved parameters as one vector

    Status keys: ``center`` (``(L,)`` tensor), ``sigma`` and ``stdev`` (the noise scale,
    a float), ``mean_eval``, ``median_eval``, ``pop_best_eval``, ``best_eval`` (floats, in
    the problem's own units), ``pop_best`` and ``best`` (EvoTorch ``Solution`` objects,
    built on first read for that one member only), ``nonfinite_count`` (members of the
    latest generation whose fitness was NaN or inf, see ``nonfinite_fitness``), plus
    EvoTorch's ``iter`` and whatever the problem reports.

    Pickling: the searcher pickles (problem, center, optimizer and strategy state
    included) and a loaded copy continues bit-identically. Hooks, and so attached loggers,
    are not pickled: attach new ones after loading.

    Args:
        problem: An EvoTorch ``Problem`` implementing
            :class:`~evotorch_eggroll.protocol.LowRankProblem`, such as an
            :class:`~evotorch_eggroll.neuroevolution.EggrollNEProblem` (low-rank mode), or
            any other single-objective, numeric, unbounded EvoTorch ``Problem`` (dense mode).
        popsize: Population size N.
        sigma: Noise scale, the standard deviation of every perturbed parameter entry
            (default 0.1). EvoTorch's scalar ``stdev_init`` is accepted in its place.
        lr: Learning rate of the optimizer that moves the center (default 0.01). EvoTorch's
            ``center_learning_rate`` is accepted in its place (EGGROLL's gradient is scaled
            as described above, so a good value may differ from PGPE's).
        rank: Rank of the weight perturbations (default 4; low-rank mode only).
        optimizer: ``"adam"`` (default), ``"sgd"``, ``"adamw"`` or a
            ``torch.optim.Optimizer`` subclass.
        optimizer_config: Keyword arguments for the optimizer (``lr`` is given separately).
        ranking_method: ``"centered"`` (default), ``"linear"``, ``"nes"``,
            ``"normalized"``, ``"raw"`` (see :func:`rank_fitnesses`).
        antithetic: Mirrored sampling: members ``2k`` and ``2k+1`` share noise with
            opposite signs (default True). EvoTorch's ``symmetric`` is accepted in its place.
        noise_reuse: 0 = one fixed noise draw for every generation; n >= 1 = fresh noise
            every n generations (default 1).
        seed: Integer key of all noise (default 0).
        center_init: Initial center ``(L,)``; default: the network's own parameters
            (low-rank mode) or ``problem.generate_values(1)`` (dense mode).
        distributed: Shard the population over the ranks of the initialized
            ``torch.distributed`` default group (every rank builds the same problem and
            searcher and calls ``step``/``run`` in lockstep). ``popsize`` must be a multiple
            of the world size. Each rank evaluates its contiguous slice of members; the
            fitnesses are all-gathered and every rank applies the same update, so no
            weights or noise cross the wire after construction. At construction, rank 0's
            initial center (and, for our adapters, the problem's seed for data order and
            environment resets) is broadcast to all ranks, and the ranks are checked to
            agree on seed, popsize and the other settings (raising the same ValueError on
            every rank otherwise). Dense mode (plain problems)
            evaluates each rank's slice with ``problem.evaluate``; the best/worst statistics
            of the problem's own tracking are left out of the status because they see one
            slice only (``best``, ``best_eval``, ``pop_best`` come from the searcher and are
            global).
        log_all_ranks: Distributed only: run attached loggers (``log_hook`` and
            ``end_of_run_hook``) on every rank. Default False: only rank 0's loggers run,
            so loggers may be attached on every rank unconditionally.
        chunk_size: Dense mode: members materialised per ``SolutionBatch`` (default: as
            many as fit in 2**24 values, at most ``popsize``).
        backend: Which implementation generates the noise and runs the batched forward and
            the update (see :func:`evotorch_eggroll.ops.resolve_backend`). ``"auto"``
            (default): the Triton kernels on a CUDA device; on the CPU the plain-torch path
            (the same noise stream and computation as batched matrix products, fast on a
            CPU), or the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` is
            set. ``"torch"``: the plain-torch path on every device. ``"triton"``: the
            kernels only (a CPU problem then needs the interpreter, or is refused with the
            error that says why).
        nonfinite_fitness: What a generation does with NaN, +inf or -inf fitnesses.
            ``"raise"`` (default): a ValueError before the center changes. ``"worst"``:
            such a member has diverged and ranks below every finite member, whatever the
            sign of its value and the objective sense (see :func:`rank_fitnesses`); all
            members non-finite is still a ValueError before anything changes. The count
            is the status key ``nonfinite_count``; ``mean_eval``, ``median_eval``,
            ``pop_best``/``pop_best_eval`` and ``best``/``best_eval`` describe the finite
            members. Distributed, every rank applies the rule to the same all-gathered
            fitnesses. A plain problem (dense mode) with ``"worst"`` must be built with
            EvoTorch's ``store_solution_stats=False`` (EvoTorch's own best/worst tracking
            fails on NaN evaluations); one that keeps the statistics is a ValueError.
        **evotorch_names: EvoTorch's names of the settings above (``stdev_init``,
            ``center_learning_rate``, ``symmetric``). Other settings of EvoTorch's
            searchers raise a TypeError that says what to do instead: ``radius_init``
            (pass ``sigma = radius_init / sqrt(solution_length)``), ``stdev_learning_rate``,
            ``stdev_min``/``stdev_max``/``stdev_max_change`` (sigma is fixed),
            ``popsize_max``/``num_interactions`` (popsize is fixed), ``obj_index``,
            ``ensure_even_popsize``.

    Raises:
        TypeError: an unknown keyword, or an EvoTorch setting without an EGGROLL
            equivalent (the message names what to use), or a setting passed under both
            names.
        RuntimeError: ``distributed=True`` without an initialized process group.
        ValueError: bad arguments; ``popsize`` not a multiple of the world size; ranks
            that disagree on seed or settings (raised on every rank).
    """

    def __init__(
        self,
        problem: Problem,
        *,
        popsize: int,
        sigma: Optional[float] = None,
        lr: Optional[float] = None,
        rank: int = 4,
        optimizer: Union[str, type] = "adam",
        optimizer_config: Optional[dict] = None,
        ranking_method: Optional[str] = "centered",
        antithetic: Optional[bool] = None,
        noise_reuse: int = 1,
        seed: int = 0,
        center_init: Optional[Any] = None,
        distributed: bool = False,
        log_all_ranks: bool = False,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        nonfinite_fitness: str = "raise",
        **evotorch_names: Any,
    ) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be an evotorch Problem, got {type(problem).__name__}")
        self._backend = ops.check_backend(backend)
        self._nonfinite_fitness = shaping.check_nonfinite_policy(nonfinite_fitness)
        explicit = {k: v for k, v in (("sigma", sigma), ("lr", lr), ("antithetic", antithetic)) if v is not None}
        settings = {"sigma": 0.1, "lr": 0.01, "antithetic": True, **explicit}
        settings.update(_evotorch_settings(evotorch_names, problem, explicit))
        sigma, lr, antithetic = settings["sigma"], settings["lr"], settings["antithetic"]
        if optimizer_config is not None:
            if not isinstance(optimizer_config, Mapping):
                raise TypeError(f"optimizer_config must be a mapping, got {type(optimizer_config).__name__}")
            if "lr" in optimizer_config:
                raise ValueError("pass the learning rate as lr=..., not in optimizer_config")
        problem.ensure_single_objective()
        problem.ensure_numeric()
        problem.ensure_unbounded()
        lowrank = isinstance(problem, LowRankProblem)
        if not lowrank and getattr(problem, "evaluate_population", None) is not None:
            raise TypeError(
                f"{type(problem).__name__} has evaluate_population but not {missing_members(problem)} of "
                "evotorch_eggroll.protocol.LowRankProblem: implement them all for the low-rank mode"
            )
        if not lowrank and self._nonfinite_fitness == "worst" and _keeps_solution_stats(problem):
            raise ValueError(
                "nonfinite_fitness='worst' needs a problem without EvoTorch's best/worst solution "
                f"tracking, which fails on NaN evaluations: construct the {type(problem).__name__} with "
                "store_solution_stats=False"
            )
        self._popsize = check_population_size("popsize", popsize)
        self._sigma = check_real("sigma", sigma)
        self._lr = check_real("lr", lr)
        self._rank = check_int("rank", rank, 1)
        self._noise_reuse = check_int("noise_reuse", noise_reuse, 0)
        self._seed = check_seed(seed)
        self._antithetic = bool(antithetic)
        rank_fitnesses(torch.zeros(2), ranking_method, higher_is_better=True)  # validates the name
        self._ranking_method = ranking_method
        self._optimizer_spec = optimizer
        self._optimizer_config = dict(optimizer_config or {})
        self._higher_is_better = problem.senses[0] == "max"
        self._distributed = bool(distributed)
        self._log_all_ranks = bool(log_all_ranks)
        self._proc_rank, self._world = _dist.process_group_info() if self._distributed else (0, 1)
        if self._popsize % self._world:
            raise ValueError(
                f"popsize {self._popsize} must be divisible by the world size {self._world} "
                "(every rank evaluates an equal slice of the population)"
            )
        if self._distributed:
            self._check_ranks_agree(problem)

        SearchAlgorithm.__init__(
            self,
            problem,
            center=self._get_center,
            sigma=self._get_sigma,
            stdev=self._get_sigma,
            mean_eval=self._get_mean_eval,
            median_eval=self._get_median_eval,
            pop_best_eval=self._get_pop_best_eval,
            best_eval=self._get_best_eval,
            pop_best=self._get_pop_best,
            best=self._get_best,
            nonfinite_count=self._get_nonfinite_count,
        )

        # What the latest generation and the best member so far need to be rebuilt lazily.
        self._last: Optional[dict] = None
        self._best_record: Optional[dict] = None
        self._best_solution: Optional[Solution] = None
        self._install_log_filter()

        # The mode: how a generation is sampled, evaluated and turned into an update.
        self._mode: Union[_LowRankMode, _DenseMode]
        if lowrank:
            self._mode = _LowRankMode(problem, center_init, self._popsize, self._strategy_kwargs())
        else:
            self._mode = _DenseMode(
                problem,
                center_init,
                popsize=self._popsize,
                sigma=self._sigma,
                lr=self._lr,
                optimizer=self._optimizer_spec,
                optimizer_config=self._optimizer_config,
                antithetic=self._antithetic,
                noise_reuse=self._noise_reuse,
                seed=self._seed,
                backend=self._backend,
                chunk_size=chunk_size,
                distributed=self._distributed,
            )

    # ------------------------------------------------------------------ set-up

    def _strategy_kwargs(self) -> dict:
        return dict(
            sigma=self._sigma,
            lr=self._lr,
            rank=self._rank,
            optimizer=self._optimizer_spec,
            optimizer_kwargs=dict(self._optimizer_config) or None,
            antithetic=self._antithetic,
            noise_reuse=self._noise_reuse,
            seed=self._seed,
            fitness_transform="none",
            distributed=self._distributed,
            backend=self._backend,
        )

    # ------------------------------------------------------------------ properties

    @property
    def popsize(self) -> int:
        """Population size."""
        return self._popsize

    @property
    def sigma(self) -> float:
        """Noise scale."""
        return self._mode.sigma

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that moves the center."""
        return self._mode.optimizer

    @property
    def strategy(self) -> Any:
        """The internal ``EggrollStrategy`` (low-rank mode), else None."""
        return self._mode.strategy

    @property
    def network(self) -> Optional[torch.nn.Module]:
        """Low-rank mode: the network holding the current center (updated in place)."""
        return self._mode.network

    @property
    def distributed(self) -> bool:
        """Whether the population is sharded over ``torch.distributed`` ranks."""
        return self._distributed

    def _local_members(self) -> range:
        """This rank's contiguous slice of member ids (all members when not distributed)."""
        per = self._popsize // self._world
        return range(self._proc_rank * per, (self._proc_rank + 1) * per)

    def _check_ranks_agree(self, problem: Problem) -> None:
        """One tiny collective: every rank must build the same searcher (raises the same
        ValueError on every rank, naming each rank's value, when they differ)."""
        optimizer = self._optimizer_spec
        settings = {
            "seed": self._seed,
            "popsize": self._popsize,
            "sigma": self._sigma,
            "lr": self._lr,
            "noise rank": self._rank if isinstance(problem, LowRankProblem) else 0,
            "antithetic": self._antithetic,
            "noise_reuse": self._noise_reuse,
            "ranking_method": self._ranking_method,
            "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", str(optimizer)),
            "problem": f"{type(problem).__module__}.{type(problem).__qualname__}",
            "solution_length": int(problem.solution_length),
            "objective_sense": problem.senses[0],
            "nonfinite_fitness": self._nonfinite_fitness,
        }
        _dist.check_ranks_agree(
            settings,
            like=problem.device,
            owner="EGGROLL",
            hints={"seed": "Pass the same seed on every rank: the ranks regenerate each other's noise from it."},
        )

    def _install_log_filter(self) -> None:
        """Distributed without ``log_all_ranks``: loggers run on rank 0 only."""
        if self._distributed and not self._log_all_ranks:
            self._log_hook = _RankZeroHook(self._proc_rank, list(self._log_hook))
            self._end_of_run_hook = _RankZeroHook(self._proc_rank, list(self._end_of_run_hook))

    @property
    def epoch(self) -> int:
        """Generations completed (the noise epoch of the next generation)."""
        return self._mode.epoch

    # ------------------------------------------------------------------ the step

    def _step(self) -> None:
        self._warn_if_odd_popsize()
        fitnesses, record = self._mode.evaluate(self._gather, self._local_members())
        gathered: Optional[_dist.GatherChecks] = self.__dict__.pop("_gathered", None)  # distributed
        # all N weights, identical on every rank: the update needs no communication
        # nothing below reads the fitnesses back to the host before the update is queued:
        # what can refuse the generation (distributed: first the all-gather's checks), and
        # what the warning and the record need, are computed on the device and read in one
        # copy with the step's checks
        done = False
        try:
            weights, refusal, summary = self._fitness_stage(fitnesses)
            refusals = (refusal,) if gathered is None else (gathered, refusal)
            values = self._mode.update(weights.to(fitnesses.device), refusals, summary)
            done = True
        finally:
            if gathered is not None:
                # every rank decides alike from the same gathered headers: the problem's
                # merge (which may hold collectives of its own) runs unless a rank failed
                self._mode.merge(done or gathered.succeeded())
        all_equal, first, nonfinite, member, value = values
        self._warn_if_equal(fitnesses.numel(), bool(all_equal), first)
        self._remember(fitnesses, record, int(nonfinite), int(member), value)

    def _fitness_stage(self, fitnesses: torch.Tensor) -> tuple[torch.Tensor, StepRefusal, torch.Tensor]:
        """:meth:`_weights` and :meth:`_summary` of the N fitnesses, on CUDA replayed from a
        CUDA graph from the second generation of a population size on (some twenty small
        launches become one copy and one graph launch; the values are the same, bit for bit)."""
        graphed = self.__dict__.get("_graphed_fitness")
        if graphed is None:
            graphed = self._graphed_fitness = GraphedCall("the fitness ranking")

        def stage(f: torch.Tensor) -> tuple[torch.Tensor, StepRefusal, torch.Tensor]:
            weights, refusal = self._weights(f)
            return weights, refusal, self._summary(f)

        key = (self._nonfinite_fitness, self._ranking_method, self._higher_is_better)
        return graphed(stage, key, fitnesses)

    def _gather(self, evaluate: Any, epoch: int, device: Any, restore: Any = None) -> torch.Tensor:
        """``evaluate()`` (this rank's fitnesses) and, distributed, the N fitnesses of all ranks
        (one all-gather). When the evaluation raises on any rank, ``restore()`` (if given)
        runs on every rank, a rank that raised reports its exception through the all-gather
        and re-raises it, and the other ranks raise ``RankFailedError`` naming it: no rank
        updates anything, and nobody waits for the process group's timeout. ``restore()``
        also runs when the all-gather raises for another reason (e.g. a rank exited).

        Distributed, the all-gather's checks are not read here: they are left in
        ``self._gathered``, a refusal that :meth:`_step` reads with the step's own checks
        after the update is queued (a failure then rolls the update back, runs
        ``restore()`` and raises), so that on a GPU the host does not wait for the
        evaluation to finish before it queues the update."""
        try:
            fitnesses = evaluate()
        except Exception as err:
            if restore is not None:
                restore()
            if self._distributed:
                _dist.report_failure(err, self._popsize, like=device, epoch=epoch)
            raise
        if not self._distributed:
            return fitnesses
        try:
            values, self._gathered = _dist.all_gather_population_deferred(
                fitnesses, self._popsize, epoch=epoch, on_failure=restore)
        except Exception:  # the collective failed (a rank exited): nothing is updated here either
            if restore is not None:
                restore()
            raise
        return values

    def _weights(self, fitnesses: torch.Tensor) -> tuple[torch.Tensor, StepRefusal]:
        """The ES weights of the N fitnesses (the same on every rank) under the
        ``nonfinite_fitness`` policy, and the condition that refuses the generation
        (non-finite fitnesses under ``"raise"``, all of them under ``"worst"``), both
        computed on the fitnesses' device with no host read."""
        n = fitnesses.numel()
        f = _higher_is_better_values(fitnesses, self._higher_is_better)
        finite = torch.isfinite(f)
        if self._nonfinite_fitness == "worst":
            refusal = StepRefusal(~finite.any(), lambda: ValueError(
                f"all {n} fitnesses are NaN or inf; the center was not updated (nonfinite_fitness='worst' "
                "needs at least one finite fitness to rank them below)"))
            f = shaping._replace_nonfinite_unchecked(f, finite)
        else:
            refusal = StepRefusal(~finite.all(), lambda: ValueError(_NONFINITE_MESSAGE))
        return _ranked(f, _ranking_method(self._ranking_method)), refusal

    def _summary(self, fitnesses: torch.Tensor) -> torch.Tensor:
        """What the equal-fitness warning and the generation's record need, computed on the
        fitnesses' device with no host read (the step reads it with its checks): a float64
        vector of whether all fitnesses are equal, the first one, the count of non-finite
        ones, the best member (a finite one: a diverged member is the worst, whatever its
        value) and its fitness."""
        f = fitnesses.detach()
        finite = torch.isfinite(f)
        worst = float("-inf") if self._higher_is_better else float("inf")
        ranked = torch.where(finite, f, worst)
        best = torch.argmax(ranked) if self._higher_is_better else torch.argmin(ranked)
        parts = [(f == f[0]).all(), f[0], f.numel() - finite.sum(), best, f.take(best)]
        return torch.stack([p.to(torch.float64) for p in parts])

    def _warn_if_equal(self, n: int, all_equal: bool, first: float) -> None:
        """Warn once per searcher when every fitness of a generation is the same (the ranks
        are then all tied and the center does not move), naming the fitness itself."""
        if getattr(self, "_warned_equal", False) or n < 2 or not all_equal:
            return
        self._warned_equal = True
        warnings.warn(
            f"all {n} fitnesses are equal ({first!r}): the ES gradient is zero and the "
            f"center does not change (warned once per searcher)",
            UserWarning,
            stacklevel=3,
        )

    def _warn_if_odd_popsize(self) -> bool:
        """Warn (in EGGROLL's terms) when antithetic sampling meets an odd popsize; True then."""
        n = self._popsize
        if not (self._antithetic and n % 2):
            return False
        warnings.warn(
            f"antithetic sampling with an odd popsize ({n}): the last member has no mirror", UserWarning, stacklevel=4
        )
        return True

    def _better(self, a: float, b: float) -> bool:
        return a > b if self._higher_is_better else a < b

    def _remember(self, fitnesses: torch.Tensor, record: dict, nonfinite: int, i: int, value: float) -> None:
        """Records the generation: its fitnesses, the count of non-finite ones and its best
        member ``i`` with fitness ``value`` (see :meth:`_summary`)."""
        fitnesses = fitnesses.detach()
        self._last = dict(record, fitnesses=fitnesses, member=i, eval=value, nonfinite=nonfinite)
        if self._best_record is None or self._better(value, self._best_record["eval"]):
            self._best_record = self._last
            self._best_solution = None

    # ------------------------------------------------------------------ materialising one member

    def _solution(self, values: torch.Tensor, evaluation: float) -> Solution:
        problem = self._problem
        batch = SolutionBatch(problem, popsize=1, device=problem.device, empty=True)
        batch.set_values(values.reshape(1, -1).to(problem.device, problem.dtype))
        batch.set_evals(torch.tensor([evaluation], dtype=problem.eval_dtype, device=problem.device))
        return batch[0]

    # ------------------------------------------------------------------ status getters

    def _get_center(self) -> torch.Tensor:
        return self._mode.center()

    def _get_sigma(self) -> float:
        return float(self.sigma)

    def _finite_fitnesses(self) -> torch.Tensor:
        """The latest generation's finite fitnesses (all of them unless some diverged)."""
        f = self._last["fitnesses"]
        return f[torch.isfinite(f)] if self._last.get("nonfinite") else f

    def _get_mean_eval(self) -> Optional[float]:
        return None if self._last is None else float(self._finite_fitnesses().double().mean())

    def _get_median_eval(self) -> Optional[float]:
        return None if self._last is None else float(torch.median(self._finite_fitnesses()))

    def _get_nonfinite_count(self) -> Optional[int]:
        return None if self._last is None else int(self._last.get("nonfinite", 0))

    def _get_pop_best_eval(self) -> Optional[float]:
        return None if self._last is None else self._last["eval"]

    def _get_best_eval(self) -> Optional[float]:
        return None if self._best_record is None else self._best_record["eval"]

    def _get_pop_best(self) -> Optional[Solution]:
        if self._last is None:
            return None
        if self._last is self._best_record:
            return self._get_best()
        return self._solution(self._mode.member_vector(self._last), self._last["eval"])

    def _get_best(self) -> Optional[Solution]:
        if self._best_record is None:
            return None
        if self._best_solution is None:
            self._best_solution = self._solution(self._mode.member_vector(self._best_record), self._best_record["eval"])
        return self._best_solution

    def update_status(self, additional_status: Mapping) -> None:
        """As EvoTorch's, except that a distributed searcher leaves out the best/worst
        solution statistics of a plain problem's own tracking (they describe this rank's
        slice only): ``best``, ``best_eval`` and ``pop_best`` come from the searcher and are
        global."""
        if getattr(self, "_distributed", False) and additional_status is self._problem.status:
            additional_status = {k: v for k, v in additional_status.items() if k not in _SOLUTION_STATS}
        super().update_status(additional_status)

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_before_step_hook", "_after_step_hook", "_log_hook", "_end_of_run_hook"):
            state[name] = Hook()
        state.pop("_graphed_fitness", None)  # a CUDA graph neither pickles nor copies: captured again
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_backend", "auto")  # pickled before the backend choice existed
        state.setdefault("_nonfinite_fitness", "raise")  # ... or the non-finite policy
        self.__dict__.update(state)
        if "_mode" not in state:  # ... or before the two modes were objects of their own
            self._mode = self._legacy_mode()
        if self._distributed and not _dist.is_initialized():
            warnings.warn(
                "this EGGROLL searcher was pickled with distributed=True, but no torch.distributed "
                "process group is initialized here: it continues as a single-process searcher",
                UserWarning,
            )
            self._distributed, self._proc_rank, self._world = False, 0, 1
        elif self._distributed:
            self._proc_rank, self._world = _dist.process_group_info()
            if self._popsize % self._world:
                raise ValueError(
                    f"this searcher's popsize {self._popsize} is not divisible by the world size "
                    f"{self._world} of the current process group"
                )
        self._install_log_filter()
        self._mode.resume(self._distributed)

    def _legacy_mode(self) -> Union[_LowRankMode, _DenseMode]:
        """The mode of a searcher pickled when both modes kept their state in the searcher's
        own attributes (which move into the mode)."""
        attrs = self.__dict__
        shared = dict(_problem=self._problem, _popsize=self._popsize)
        if attrs.pop("_lowrank"):
            mode: Union[_LowRankMode, _DenseMode] = _LowRankMode.__new__(_LowRankMode)
            attrs.pop("_strategy", None)
            mode.__dict__.update(shared, _network=attrs.pop("_network"), _strategy_kwargs=self._strategy_kwargs(),
                                 _strategy_state=attrs.pop("_strategy_state"))
            return mode
        mode = _DenseMode.__new__(_DenseMode)
        mode.__dict__.update(shared, **{name: attrs.pop(name) for name in
                                        ("_center", "_optimizer", "_epoch", "_chunk_size", "_center_key")})
        mode.__dict__.update({name: attrs[name] for name in
                              ("_sigma", "_antithetic", "_noise_reuse", "_seed", "_backend")})
        return mode
