"""Fitness shaping: pure functions from raw fitnesses to the weights of the ES gradient.

Every function takes a 1-D tensor of fitnesses (higher is better), on any device and of
any real dtype, and returns a float64 tensor of the same length on the same device unless
stated otherwise. Nothing here knows about models or noise, so the strategy and the
EvoTorch searcher share these functions.

Conventions (the strategy's ``fitness_transform`` values):

* ``"normalize"``: ``(f - mean) / sqrt(var + eps)`` with the population variance
  (divide by N), in float64, finite for one element, constant input and ``|f|`` up to 1e30.
* ``"rank"`` / ``"centered_rank"``: tie-averaged ranks ``0..N-1`` mapped to ``[-0.5, 0.5]``
  by ``rank / (N - 1) - 0.5``. Both names give the same numbers; tie averaging makes equal
  fitnesses get equal weights, so an antithetic pair with equal fitness contributes
  exactly nothing.
* ``"none"``: the raw fitnesses.
* a callable ``Tensor -> Tensor``: its output is used exactly as returned.
* ``baseline="antithetic"`` subtracts the mean of each mirrored pair ``(2k, 2k+1)`` instead
  of the population mean, i.e. member ``2k`` gets ``+(f_2k - f_2k+1) / 2`` before scaling.
* ``group_size=k > 0``: the built-in transforms run within consecutive groups of ``k``
  members (several samples of one prompt, say); N must be a multiple of ``k``.

Non-finite fitnesses (NaN, +inf, -inf) are an error by default (``nonfinite="raise"``).
With ``nonfinite="worst"`` a member whose fitness is not finite has diverged and counts as
the worst member, whatever the sign of its value (+inf too): before any transform, each
such fitness is replaced by one value below every finite fitness (see
:func:`replace_nonfinite`), so every transform, the callables included, sees finite
numbers. Rank transforms then put those members last (tied among themselves); the
z-score and ``"none"`` see the replacement value itself. At least one fitness must be
finite.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

__all__ = [
    "FITNESS_TRANSFORMS",
    "BASELINES",
    "NONFINITE_POLICIES",
    "FitnessTransform",
    "check_fitness_transform",
    "check_nonfinite_policy",
    "replace_nonfinite",
    "check_baseline",
    "zscore",
    "rank_transform",
    "centered_rank",
    "antithetic_baseline",
    "shape_fitnesses",
    "antithetic_fold",
]

FITNESS_TRANSFORMS = ("normalize", "rank", "centered_rank", "none")
BASELINES = ("mean", "antithetic")
NONFINITE_POLICIES = ("raise", "worst")

FitnessTransform = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def check_fitness_transform(transform: FitnessTransform) -> FitnessTransform:
    """Return ``transform`` if it is a known name or a callable.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a string nor a callable.
    """
    if isinstance(transform, str):
        if transform not in FITNESS_TRANSFORMS:
            raise ValueError(
                f"unknown fitness_transform {transform!r}; expected one of "
                f"{', '.join(map(repr, FITNESS_TRANSFORMS))} or a callable Tensor -> Tensor"
            )
        return transform
    if callable(transform):
        return transform
    raise TypeError(
        "fitness_transform must be one of "
        f"{', '.join(map(repr, FITNESS_TRANSFORMS))} or a callable Tensor -> Tensor, "
        f"got {type(transform).__name__}"
    )


def check_baseline(baseline: str) -> str:
    """Return ``baseline`` if it is ``"mean"`` or ``"antithetic"``, else raise ValueError."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected 'mean' or 'antithetic'")
    return baseline


def check_nonfinite_policy(policy: str, name: str = "nonfinite_fitness") -> str:
    """Return ``policy`` if it is ``"raise"`` or ``"worst"``.

    Raises:
        ValueError: anything else (the message names the allowed values).
    """
    if not isinstance(policy, str) or policy not in NONFINITE_POLICIES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, "
                         f"got {policy!r}")
    return policy


def replace_nonfinite(fitnesses: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace every NaN, +inf and -inf fitness by one value below all finite fitnesses.

    The rule (``nonfinite="worst"``): with ``lo`` and ``hi`` the smallest and largest
    finite fitness, the replacement is ``lo - (hi - lo)``, one finite spread below the
    worst finite member; when all finite fitnesses are equal it is ``lo - max(|lo|, 1)``.
    Computed in float64 and rounded to the fitnesses' dtype; where that leaves the dtype's
    range, the dtype's lowest finite value is used instead (which ties with ``lo`` only
    when ``lo`` is that value itself).

    Args:
        fitnesses: ``(N,)`` real fitnesses, higher is better, any dtype and device.

    Returns:
        ``(fitnesses, count)``: a ``(N,)`` tensor of the same dtype and device with the
        non-finite entries replaced (the input itself when there are none), and the number
        of entries replaced.

    Raises:
        ValueError: every fitness is non-finite (there is nothing to rank them below), or
            ``fitnesses`` is not 1-D.
    """
    f = torch.as_tensor(fitnesses)
    _as_fitness_vector(f)  # 1-D real, else the usual error
    if not f.is_floating_point():
        return f, 0
    count = int((~torch.isfinite(f)).sum())
    if count == 0:
        return f, 0
    n = f.shape[0]
    if count == n:
        raise ValueError(f"all {n} fitnesses are NaN or inf: nonfinite_fitness='worst' ranks such "
                         f"members below the finite ones, so at least one must be finite")
    return _replace_nonfinite_unchecked(f), count


def _replace_nonfinite_unchecked(fitnesses: torch.Tensor,
                                 finite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`replace_nonfinite` computed on the fitnesses' device with no host read: the
    same values where at least one fitness is finite (the input's values where none is
    not finite), unspecified values where none is finite (the caller checks that).

    Args:
        fitnesses: ``(N,)`` real fitnesses, higher is better.
        finite: ``torch.isfinite(fitnesses)`` when the caller has it already.

    Returns:
        A new ``(N,)`` tensor of the input's dtype and device (the input itself for an
        integer dtype, which holds no non-finite values).
    """
    f = torch.as_tensor(fitnesses)
    if not f.is_floating_point():
        return f
    bad = ~(torch.isfinite(f) if finite is None else finite)
    f64 = f.to(torch.float64)
    inf = torch.full((), float("inf"), dtype=torch.float64, device=f.device)  # no copy
    lo = torch.where(bad, inf, f64).amin()
    hi = torch.where(bad, -inf, f64).amax()
    spread = torch.where(hi > lo, hi - lo, torch.clamp(lo.abs(), min=1.0))
    # lo - spread may overflow: the most negative float64 instead
    worst = torch.clamp(lo - spread, min=torch.finfo(torch.float64).min).to(f.dtype)
    worst = torch.where(torch.isfinite(worst), worst, torch.finfo(f.dtype).min)
    return torch.where(bad, worst, f)


def _as_fitness_vector(f: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(f)
    if f.dim() != 1:
        raise ValueError(f"fitnesses must be a 1-D tensor (one value per population member), "
                         f"got shape {tuple(f.shape)}")
    if f.dtype.is_complex or f.dtype == torch.bool:
        raise TypeError(f"fitnesses must be real numbers, got dtype {f.dtype}")
    return f.to(torch.float64)


def _groups(f: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``f (N,)`` as ``(N // k, k)``; ``group_size=0`` means one group of N."""
    n = f.shape[0]
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    if group_size == 0:
        return f.view(1, n)
    if n % group_size:
        raise ValueError(
            f"population size {n} is not a multiple of group_size={group_size}"
        )
    return f.view(n // group_size, group_size)


def _pair_means(f: torch.Tensor) -> torch.Tensor:
    """Mean of each mirrored pair ``(2k, 2k+1)``, repeated per member; an unpaired last
    member (odd N) is its own mean."""
    n = f.shape[0]
    out = f.clone()
    even = (n // 2) * 2
    if even:
        pairs = f[:even].view(-1, 2)
        out[:even] = pairs.mean(dim=1).repeat_interleave(2)
    return out


def zscore(f: torch.Tensor, eps: float = 1e-8, group_size: int = 0,
           center: torch.Tensor | None = None) -> torch.Tensor:
    """Z-score with the population variance: ``(f - mean) / sqrt(var + eps)``.

    Computed in float64 after dividing by ``max|f|`` (so ``|f|`` up to 1e30 neither
    overflows nor loses the ``eps`` term); a constant group gives exact zeros.

    Args:
        f: ``(N,)`` fitnesses.
        eps: added to the variance.
        group_size: 0 for the whole population, else size of consecutive groups.
        center: optional ``(N,)`` values subtracted instead of the (group) mean.

    Returns:
        ``(N,)`` float64 on ``f.device``.
    """
    f = _as_fitness_vector(f)
    if f.numel() == 0:
        return f
    g = _groups(f, group_size)  # (G, k)
    scale = g.abs().amax(dim=1, keepdim=True)  # (G, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    gs = g / scale
    mean = gs.mean(dim=1, keepdim=True)
    var = ((gs - mean) ** 2).mean(dim=1, keepdim=True)
    if center is None:
        num = gs - mean
    else:
        num = _as_fitness_vector(center).view_as(g)
        num = gs - num / scale
    out = num / torch.sqrt(var + eps / (scale * scale))
    constant = g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True)
    if center is None:
        out = torch.where(constant, torch.zeros_like(out), out)
    return out.reshape(-1)


def _tie_averaged_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..k-1`` of a 1-D float64 tensor; equal values share their average rank.

    Each sorted value's tie group is found by binary search (its first and last sorted
    positions), so every shape is known in advance: no host synchronisation, unlike
    ``unique_consecutive``, whose output size depends on the values."""
    k = v.shape[0]
    sorted_v, order = torch.sort(v, stable=True)
    first = torch.searchsorted(sorted_v, sorted_v, side="left")
    last = torch.searchsorted(sorted_v, sorted_v, side="right") - 1
    ranks = torch.empty(k, dtype=torch.float64, device=v.device)
    ranks[order] = (first + last).to(torch.float64) / 2.0
    return ranks


def rank_transform(f: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Tie-averaged ranks mapped to ``[-0.5, 0.5]``: ``rank / (k - 1) - 0.5``.

    Args:
        f: ``(N,)`` fitnesses.
        group_size: 0 for the whole population, else size of consecutive groups.

    Returns:
        ``(N,)`` float64; a group of one member gets 0.
    """
    f = _as_fitness_vector(f)
    if f.numel() == 0:
        return f
    g = _groups(f, group_size)
    k = g.shape[1]
    if k == 1:
        return torch.zeros_like(f)
    out = torch.stack([_tie_averaged_ranks(row) for row in g]) / (k - 1) - 0.5
    return out.reshape(-1)


def centered_rank(f: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """``rank / (N - 1) - 0.5`` with tie-averaged ranks (same numbers as :func:`rank_transform`).

    This is ``evotorch.tools.ranking.centered`` (the EvoTorch searcher's
    ``ranking_method="centered"``) except on ties: EvoTorch gives tied members distinct
    ranks in the order its unstable sort leaves them, here they share the mean of those
    ranks, so equal fitnesses get equal weights and give a zero update.
    """
    return rank_transform(f, group_size)


def antithetic_baseline(w: torch.Tensor) -> torch.Tensor:
    """Subtract each mirrored pair's mean: member ``2k`` gets ``(w_2k - w_2k+1) / 2`` and
    member ``2k+1`` its negative; an unpaired last member gets 0."""
    w = _as_fitness_vector(w)
    return w - _pair_means(w)


def shape_fitnesses(
    fitnesses: torch.Tensor,
    transform: FitnessTransform = "normalize",
    *,
    baseline: str = "mean",
    eps: float = 1e-8,
    group_size: int = 0,
    nonfinite: str = "raise",
) -> torch.Tensor:
    """Apply a fitness transform and baseline (see the module docstring).

    Args:
        fitnesses: ``(N,)`` raw fitnesses, any real dtype and device.
        transform: ``"normalize"``, ``"rank"``, ``"centered_rank"``, ``"none"`` or a callable.
        baseline: ``"mean"`` or ``"antithetic"``.
        eps: z-score epsilon.
        group_size: 0, or the size of consecutive groups shaped independently.
        nonfinite: ``"raise"`` (non-finite fitnesses are an error) or ``"worst"`` (they are
            first replaced by :func:`replace_nonfinite`, so the transform, a callable
            included, gets finite values in which those members are the worst).

    Returns:
        ``(N,)`` float64 on the input's device. A callable's output is returned as given
        (converted to float64).

    Raises:
        ValueError: non-finite fitnesses (all of them with ``nonfinite="worst"``), a bad
            ``group_size`` or ``nonfinite``, or a callable returning the wrong shape.
    """
    check_fitness_transform(transform)
    check_baseline(baseline)
    if check_nonfinite_policy(nonfinite, "nonfinite") == "worst":
        fitnesses, _ = replace_nonfinite(fitnesses)
    f = _as_fitness_vector(fitnesses)
    if not bool(torch.isfinite(f).all()):
        raise ValueError("fitnesses contain NaN or inf")
    return _shape_fitnesses_unchecked(fitnesses, transform, baseline=baseline, eps=eps,
                                     group_size=group_size, nonfinite="raise")


def _shape_fitnesses_unchecked(fitnesses: torch.Tensor, transform: FitnessTransform, *,
                               baseline: str, eps: float, group_size: int,
                               nonfinite: str) -> torch.Tensor:
    """:func:`shape_fitnesses` without its checks of the fitnesses' values, so that no
    built-in transform reads a value back to the host (the update can be queued on the
    device before the fitnesses exist; the caller checks them later).

    The arguments and the result are those of :func:`shape_fitnesses`. Only where it would
    raise on the values do they differ: non-finite fitnesses under ``nonfinite="raise"``
    and all of them under ``"worst"`` give unspecified weights instead of a ValueError.
    ``transform``, ``baseline``, ``nonfinite``, ``group_size`` and a callable's output
    shape are still checked (they need no values).
    """
    check_fitness_transform(transform)
    check_baseline(baseline)
    if check_nonfinite_policy(nonfinite, "nonfinite") == "worst":
        fitnesses = torch.as_tensor(fitnesses)
        _as_fitness_vector(fitnesses)  # 1-D real, else the usual error
        fitnesses = _replace_nonfinite_unchecked(fitnesses)
    f = _as_fitness_vector(fitnesses)
    if callable(transform) and not isinstance(transform, str):
        out = transform(torch.as_tensor(fitnesses))
        out = torch.as_tensor(out)
        if out.shape != f.shape:
            raise ValueError(f"fitness_transform returned shape {tuple(out.shape)}, "
                             f"expected {tuple(f.shape)} (one value per population member)")
        return out.to(device=f.device, dtype=torch.float64)
    if f.numel() == 0:
        return f
    _groups(f, group_size)  # validates group_size against N
    pairwise = baseline == "antithetic"
    if transform == "normalize":
        if pairwise:
            return zscore(f, eps, group_size, center=_pair_means(f))
        return zscore(f, eps, group_size)
    if transform in ("rank", "centered_rank"):
        r = rank_transform(f, group_size)
        return r - _pair_means(r) if pairwise else r
    # "none"
    return f - _pair_means(f) if pairwise else f.clone()


def antithetic_fold(
    weights: torch.Tensor, antithetic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold shaped fitnesses onto noise draws.

    With antithetic sampling members ``2k`` (sign +1) and ``2k+1`` (sign -1) share draw
    ``k``, so ``sum_i w_i s_i P_{k(i)} = sum_k (w_2k - w_2k+1) P_k``: the pair coefficient is
    the plain difference, exactly zero when the two weights are equal. An unpaired last
    member (odd N) keeps its own weight on draw ``N // 2``.

    Args:
        weights: ``(N,)`` shaped fitnesses.
        antithetic: whether members are mirrored pairs.

    Returns:
        ``noise_indices (K,)`` int64 and ``coeffs (K,)`` float64, on ``weights.device``.
    """
    w = _as_fitness_vector(weights)
    n = w.shape[0]
    if not antithetic:
        return torch.arange(n, device=w.device), w.clone()
    even = (n // 2) * 2
    pairs = w[:even].view(-1, 2)
    coeffs = pairs[:, 0] - pairs[:, 1]
    if n % 2:
        coeffs = torch.cat([coeffs, w[-1:]])
    return torch.arange(coeffs.shape[0], device=w.device), coeffs
