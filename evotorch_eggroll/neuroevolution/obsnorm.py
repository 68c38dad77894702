"""Running observation statistics, and a policy preceded by fixed observation normalisation."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .baseneproblem import DeviceLike

__all__ = ["RunningObsNorm"]


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

