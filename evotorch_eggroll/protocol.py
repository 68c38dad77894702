"""What the EGGROLL searcher asks of a problem in its low-rank mode.

:class:`~evotorch_eggroll.algorithms.EGGROLL` runs a problem in low-rank mode when the
problem is an ``evotorch.Problem`` that also implements :class:`LowRankProblem`: the
searcher then evolves a copy of the problem's network with an
:class:`~evotorch_eggroll.strategy.EggrollStrategy` and evaluates each generation through
:meth:`LowRankProblem.evaluate_population`, inside one perturbation context. Any other
numeric, single-objective EvoTorch problem runs in the dense mode (materialised solution
vectors evaluated with ``problem.evaluate``), which asks nothing beyond EvoTorch's
``Problem``.

The adapters of :mod:`evotorch_eggroll.neuroevolution` implement the protocol; a problem of
one's own may implement it too (subclass ``evotorch.Problem`` and add the methods below).

A generation of the low-rank mode, as the searcher calls the methods::

    state = problem.generation_state()          # before anything is evaluated
    try:
        fitnesses = problem.evaluate_population(pop, network)   # inside strategy.perturb(N)
    except Exception:
        problem.restore_generation_state(state)  # and the generation is not counted
        raise
    # distributed: the N fitnesses are all-gathered and the update is queued; a rank that
    # failed is reported, and every rank then rolls the update back and restores the state
    # as above; otherwise, on every rank (after the update was queued):
    problem.distributed_merge(state)
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

__all__ = ["LowRankProblem", "missing_members"]


@runtime_checkable
class LowRankProblem(Protocol):
    """The methods EGGROLL's low-rank mode calls on a problem (besides EvoTorch's ``Problem``).

    ``isinstance(problem, LowRankProblem)`` is True for an object that has all of them; it
    does not check their signatures.
    """

    @property
    def network(self) -> nn.Module:
        """The network whose evolved parameters make up the decision vector (its values are
        the default initial center). The searcher evolves a deep copy of it."""
        ...

    @property
    def evolved_parameter_names(self) -> list[str]:
        """Dotted names of the evolved parameters, in decision-vector order."""
        ...

    def parameters_to_vector(self, net: nn.Module) -> torch.Tensor:
        """The evolved parameters of ``net`` (same architecture) as one ``(L,)`` vector."""
        ...

    def vector_to_parameters(self, vector: torch.Tensor, net: nn.Module) -> None:
        """Copy ``vector (L,)`` into the evolved parameters of ``net``, in place."""
        ...

    def evaluate_population(
        self, pop: Any, network: nn.Module, member_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None
    ) -> torch.Tensor:
        """Fitnesses of population members, in the problem's own objective sense.

        Args:
            pop: The open context of ``strategy.perturb(N)`` of a strategy set up on
                ``network``; its ``local_member_ids()`` are the members this process
                evaluates (all ``N``, or a distributed rank's slice).
            network: The network the strategy evolves; it holds the search center.
            member_ids: Members to evaluate (default: ``pop.local_member_ids()``).

        Returns:
            ``(K,)`` float32 fitnesses on the network's device, one per member id.
        """
        ...

    def generation_state(self) -> Any:
        """A snapshot of the running state a population evaluation advances (data
        position, counters, statistics), taken before each generation's evaluation."""
        ...

    def restore_generation_state(self, state: Any) -> None:
        """Put back a snapshot of :meth:`generation_state`: called when the generation's
        evaluation raised (on any rank, when distributed), so that the problem continues
        as if that generation had not been evaluated."""
        ...

    def distributed_setup(self) -> None:
        """Distributed runs: called once on every rank at the searcher's construction
        (inside an initialized ``torch.distributed`` group) to make the problem's own
        randomness (e.g. its seed) the same on every rank."""
        ...

    def distributed_merge(self, state: Any) -> None:
        """Distributed runs: called on every rank after the ranks evaluated their slices,
        the fitnesses were all-gathered and the update was queued. ``state`` is the snapshot
        :meth:`generation_state` took before this generation's evaluation; the problem
        makes its running state global (the same on every rank) from what changed since."""
        ...


_MEMBERS = (
    "network",
    "evolved_parameter_names",
    "parameters_to_vector",
    "vector_to_parameters",
    "evaluate_population",
    "generation_state",
    "restore_generation_state",
    "distributed_setup",
    "distributed_merge",
)


def missing_members(problem: Any) -> list[str]:
    """The members of :class:`LowRankProblem` that ``problem`` lacks (or has set to None)."""
    return [name for name in _MEMBERS if getattr(problem, name, None) is None]
