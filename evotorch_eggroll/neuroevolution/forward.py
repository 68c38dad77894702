"""Running a network for many population members at once.

:class:`PopulationForward` is the callable an adapter's evaluation is written against (see
:meth:`~evotorch_eggroll.neuroevolution.EggrollNEProblem._evaluate_members`); under the
EGGROLL searcher it is backed by low-rank perturbations, for stock EvoTorch searchers by
:class:`_MaterialisedMembers`, the members' materialised parameter vectors.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..fused_mlp import argmax_rows

__all__ = ["PopulationForward"]


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
        argmax: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]] = None,
        first_member: Optional[int] = None,
    ):
        self._fn = fn
        self.member_ids = member_ids
        self._first_member = first_member
        self.population_size = int(member_ids.shape[0]) if population_size is None else int(population_size)
        self._replay = replay
        self._argmax_fn = argmax

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

    @property
    def first_member(self) -> int:
        """``member_ids[0]`` as a Python int: given at construction by a caller that knows it
        on the host, else read from the ids (one device-to-host copy, then kept)."""
        if self._first_member is None:
            self._first_member = int(self.member_ids[0])
        return self._first_member

    def __call__(self, x: torch.Tensor, member_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward ``x`` with row ``j`` computed by member ``member_ids[j]``.

        Args:
            x: ``(rows, *in)`` network input.
            member_ids: ``(rows,)`` ids taken from :attr:`member_ids`; default: row ``j`` is
                member ``self.member_ids[j]`` (then ``rows`` must equal ``num_members``).

        Returns:
            ``(rows, *out)`` network output.
        """
        return self._fn(x, self._ids(x, member_ids))

    def _argmax(self, x: torch.Tensor, member_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
        """``(indices, width)``: the ``(rows,)`` int64 index of each row's largest output of
        ``self(x, member_ids)`` (as ``torch.argmax`` picks it: the first of equal values, NaN
        above everything) and the outputs per row; computed in the network's own launch
        where the forward can (EGGROLL's one-launch MLP)."""
        ids = self._ids(x, member_ids)
        if self._argmax_fn is not None:
            return self._argmax_fn(x, ids)
        return argmax_rows(self._fn(x, ids))

    def _ids(self, x: torch.Tensor, member_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The ids of a call's rows, checked (see :meth:`__call__`)."""
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
        return member_ids

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
