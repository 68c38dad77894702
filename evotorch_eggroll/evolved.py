"""What is evolved and where its noise comes from.

An :class:`EvolvedParam` pairs a parameter with its stream coordinates (the CRC-32 key of
its dotted name) and its noise kind: low-rank for weights (dim >= 2, viewed as a matrix
``(m, n) = (shape[0], numel // shape[0])``) under EGGROLL, dense for 1-D parameters and for
every parameter under OpenES. :class:`NoiseCoords` holds the rest of a draw's coordinates.
All noise is regenerated through :mod:`evotorch_eggroll.ops`, so inspection, forward and
update see the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from . import noise as _noise
from . import ops
from .noise import member_noise  # noqa: F401  (re-exported: its home is noise.py)

__all__ = ["NoiseCoords", "EvolvedParam", "EvolvedSet", "member_noise"]


@dataclass(frozen=True)
class NoiseCoords:
    """Coordinates shared by every parameter's noise in one perturbation context.

    Attributes:
        seed: integer key of all noise.
        epoch: the effective epoch (``epoch // noise_reuse``, or 0).
        sigma: noise scale.
        rank: low-rank r (unused for dense noise).
        antithetic: mirrored pairs ``(2k, 2k+1)`` share draw ``k``.
        backend: which implementation of the ops computes with this noise (``"triton"``,
            ``"torch"`` or ``"auto"``; see :mod:`evotorch_eggroll.ops`).
    """

    seed: int
    epoch: int
    sigma: float
    rank: int
    antithetic: bool
    backend: str = "triton"

    @property
    def lowrank_scale(self) -> float:
        """``sigma / sqrt(r)``, the scale of ``A0 @ B0.T``."""
        return self.sigma / math.sqrt(self.rank)


class EvolvedParam:
    """One evolved parameter and the kind of its noise (the factor block's layout and the
    member -> noise index rule are :mod:`evotorch_eggroll.noise`'s).

    Attributes:
        name: dotted name (keys the noise stream).
        param: the Parameter object itself.
        key: ``noise.param_key(name)``.
        lowrank: True for low-rank weight noise, False for dense noise.
        m, n: the matrix view ``(shape[0], numel // shape[0])`` (``(numel, 1)`` when 1-D).
    """

    __slots__ = ("name", "param", "key", "lowrank", "m", "n")

    def __init__(self, name: str, param: torch.nn.Parameter, lowrank: bool):
        self.name = name
        self.param = param
        self.key = _noise.param_key(name)
        self.lowrank = bool(lowrank and param.dim() >= 2)
        numel = param.numel()
        self.m = int(param.shape[0]) if param.dim() >= 1 else 1
        self.n = numel // max(self.m, 1)

    def layout(self, rank: int) -> _noise.FactorLayout:
        """The factor-block layout of this weight's ``(m, n)`` matrix view at ``rank``."""
        return _noise.FactorLayout(self.m, self.n, rank)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def __repr__(self) -> str:
        kind = "low-rank" if self.lowrank else "dense"
        return f"EvolvedParam({self.name!r}, shape={tuple(self.shape)}, {kind})"

    # -- noise of given members -------------------------------------------------------

    def factors(
        self, coords: NoiseCoords, member_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled factors of a low-rank weight for each member.

        Args:
            coords: stream coordinates.
            member_ids: ``(K,)`` int64 member ids on the parameter's device.

        Returns:
            ``A (K, m, r)`` with sign and ``sigma / sqrt(r)`` folded in, ``B (K, n, r)``;
            float32.
        """
        assert self.lowrank
        idx, sign = member_noise(member_ids, coords.antithetic)
        a0, b0 = ops.lowrank_factors(coords.seed, self.key, coords.epoch, idx, self.m, self.n,
                                     coords.rank, backend=coords.backend)
        a = a0 * (sign * coords.lowrank_scale).view(-1, 1, 1)
        return a, b0

    def dense(self, coords: NoiseCoords, member_ids: torch.Tensor) -> torch.Tensor:
        """Dense noise ``s * sigma * eps`` of each member: ``(K, *shape)`` float32."""
        assert not self.lowrank
        idx, sign = member_noise(member_ids, coords.antithetic)
        eps = ops.normal_block(coords.seed, self.key, coords.epoch, idx, self.param.numel(),
                               backend=coords.backend)
        return (eps * (sign * coords.sigma)[:, None]).view(-1, *self.shape)

    def perturbations(self, coords: NoiseCoords, member_ids: torch.Tensor) -> torch.Tensor:
        """Materialised perturbations ``(K, *shape)`` float32 (small parameters, ``iterate``)."""
        if not self.lowrank:
            return self.dense(coords, member_ids)
        a, b = self.factors(coords, member_ids)
        return torch.bmm(a, b.transpose(1, 2)).view(-1, *self.shape)

    def row_deltas(self, coords: NoiseCoords, member_ids: torch.Tensor) -> torch.Tensor:
        """Per-row perturbation ``(rows, *shape)`` float32 for rows mapped to ``member_ids``.

        Dense noise is written by ``ops.dense_noise_add_`` directly per row; low-rank noise
        is materialised once per distinct member and gathered.
        """
        rows = member_ids.shape[0]
        if not self.lowrank:
            out = torch.zeros(rows, self.param.numel(), dtype=torch.float32,
                              device=member_ids.device)
            ops.dense_noise_add_(out, member_ids, seed=coords.seed, key=self.key,
                                 epoch=coords.epoch, scale=coords.sigma,
                                 antithetic=coords.antithetic, backend=coords.backend)
            return out.view(rows, *self.shape)
        uniq, inv = torch.unique(member_ids, return_inverse=True)
        return self.perturbations(coords, uniq)[inv]

    # -- the update ---------------------------------------------------------------------

    def noise_scale(self, coords: NoiseCoords) -> float:
        """The factor between this parameter's perturbation and its unscaled noise:
        ``sigma / sqrt(rank)`` for a low-rank weight, ``sigma`` otherwise."""
        return coords.lowrank_scale if self.lowrank else coords.sigma

    def gradient(
        self, coords: NoiseCoords, noise_indices: torch.Tensor, coeffs: torch.Tensor,
        scaled: bool = False, epoch: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``sum_k coeffs[k] * P0_k`` with ``P0_k`` draw k's unsigned perturbation.

        Args:
            coords: stream coordinates.
            noise_indices: ``(K,)`` int64 draws on the parameter's device.
            coeffs: ``(K,)`` float32 coefficients (signs already folded in).
            scaled: ``coeffs`` already include :meth:`noise_scale` (callers updating many
                parameters multiply once per scale).
            epoch: ``coords.epoch`` as a one-element int64 tensor on the parameter's CUDA
                device, read by the Triton kernels when they run (a captured update replays
                with the epoch that tensor holds); the inputs are not checked again.

        Returns:
            float32 tensor of the parameter's shape.
        """
        if not scaled:
            coeffs = coeffs * self.noise_scale(coords)
        if epoch is not None:
            kernels = ops._kernels()
            if self.lowrank:
                g = kernels.lowrank_update.lowrank_update(
                    self.m, self.n, seed=coords.seed, key=self.key, epoch=epoch, rank=coords.rank,
                    noise_indices=noise_indices, coeffs=coeffs, precision=ops.update_precision(self.param))
            else:
                g = kernels.dense_noise.dense_update(self.param.numel(), seed=coords.seed, key=self.key,
                                                     epoch=epoch, noise_indices=noise_indices, coeffs=coeffs)
        elif self.lowrank:
            g = ops.lowrank_update(self.m, self.n, seed=coords.seed, key=self.key,
                                   epoch=coords.epoch, rank=coords.rank,
                                   noise_indices=noise_indices, coeffs=coeffs,
                                   precision=ops.update_precision(self.param),
                                   backend=coords.backend)
        else:
            g = ops.dense_update(self.param.numel(), seed=coords.seed, key=self.key,
                                 epoch=coords.epoch, noise_indices=noise_indices,
                                 coeffs=coeffs, backend=coords.backend)
        shape = self.param.shape
        return g if g.shape == shape else g.reshape(shape)


class EvolvedSet:
    """The evolved parameters of one strategy, in ``named_parameters()`` order, with
    lookups by identity and by name."""

    def __init__(self, entries: Iterable[EvolvedParam]):
        self.entries: list[EvolvedParam] = list(entries)
        self.by_id: dict[int, EvolvedParam] = {id(e.param): e for e in self.entries}
        self.by_name: dict[str, EvolvedParam] = {e.name: e for e in self.entries}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.by_id = {id(e.param): e for e in self.entries}  # a copy's parameters are new objects

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, obj: object) -> Optional[EvolvedParam]:
        """The entry of a Parameter object (by identity), else None."""
        return self.by_id.get(id(obj))

    def without(self, name: str) -> "EvolvedSet":
        return EvolvedSet(e for e in self.entries if e.name != name)
