"""Immutable views of one member's perturbation of one parameter.

These objects are for inspection: the strategy builds them from the same noise stream the
batched forward and the update use. A weight's perturbation is kept factored as
``A @ B.T`` (sign and ``sigma / sqrt(r)`` folded into ``A``); a 1-D parameter's (and every
OpenES parameter's) is dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union, overload

import torch

__all__ = ["Perturbation", "PerturbationSequence"]


@dataclass(frozen=True, repr=False, eq=False)
class Perturbation:
    """The additive perturbation of one parameter for one population member.

    Attributes:
        param_name: dotted name of the parameter.
        shape: shape of the parameter.
        factors: ``(A, B)`` with ``A (m, r)`` and ``B (n, r)`` for a low-rank weight, where
            ``m = shape[0]`` and ``n`` is the product of the other dims; for dense noise the
            perturbation tensor itself (shape of the parameter). Parameter dtype and device.
        rank: the rank ``r`` of low-rank noise, None for dense noise.
        member_id: population member.
        epoch: the requested epoch (not the effective one).
        sign: +1 or -1 (antithetic mirror).
    """

    param_name: str
    shape: tuple
    factors: Union[tuple, torch.Tensor]
    rank: Optional[int]
    member_id: int
    epoch: int
    sign: int

    @property
    def is_low_rank(self) -> bool:
        """True when ``factors`` is a pair ``(A, B)``."""
        return isinstance(self.factors, tuple)

    def as_matrix(self) -> torch.Tensor:
        """The perturbation as a tensor of the parameter's shape (``A @ B.T`` reshaped)."""
        if self.is_low_rank:
            a, b = self.factors
            return (a @ b.T).reshape(self.shape)
        return self.factors.reshape(self.shape)

    def storage_stats(self) -> dict:
        """Element counts of the dense and the factored form.

        Returns:
            ``full_rank_elements = m * n``, ``low_rank_elements = r * (m + n)`` (equal to
            ``m * n`` for dense noise) and ``savings_ratio = full / low``.
        """
        numel = 1
        for s in self.shape:
            numel *= int(s)
        if self.is_low_rank:
            m = int(self.shape[0])
            n = numel // max(m, 1)
            low = int(self.rank) * (m + n)
        else:
            low = numel
        return {
            "full_rank_elements": numel,
            "low_rank_elements": low,
            "savings_ratio": float(numel) / float(low) if low else 1.0,
        }

    def __repr__(self) -> str:
        sign = "+" if self.sign > 0 else "-"
        rank = f"rank={self.rank}" if self.rank is not None else "dense"
        return (f"Perturbation(param={self.param_name!r}, shape={tuple(self.shape)}, {rank}, "
                f"member={self.member_id}, epoch={self.epoch}, sign={sign})")


class PerturbationSequence(Sequence):
    """Lazy sequence of the perturbations of members ``0..N-1``: supports ``len``,
    indexing (negative too), slicing (a list) and iteration. Each item is built on access.
    """

    def __init__(self, make: Callable[[int], Perturbation], population_size: int):
        self._make = make
        self._n = int(population_size)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> Perturbation: ...

    @overload
    def __getitem__(self, index: slice) -> list: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._n))]
        i = int(index)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"member {index} out of range for population size {self._n}")
        return self._make(i)

    def __iter__(self) -> Iterator[Perturbation]:
        for i in range(self._n):
            yield self._make(i)

    def __repr__(self) -> str:
        return f"PerturbationSequence(population_size={self._n})"
