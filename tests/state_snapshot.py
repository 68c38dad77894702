"""Bit-exact snapshots of everything a strategy (and its model) holds, for the tests that
prove "an error changes nothing": every model parameter and its ``.grad``, the optimizer's
state and param groups, the counters and settings, and the pending perturb context.

Usage::

    before = capture(strategy)
    with pytest.raises(ValueError):
        strategy.step(bad)
    assert_unchanged(strategy, before)
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_SETTINGS = ("epoch", "total_steps", "sigma", "lr", "seed", "antithetic", "noise_reuse")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that compares bit for bit (NaN payloads and signed zeros included)."""
    return t.detach().cpu().clone().reshape(-1).view(torch.uint8)


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), _bits(value))
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    return copy.deepcopy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 4 and a and a[0] == "tensor":
        return (isinstance(b, tuple) and len(b) == 4 and b[0] == "tensor" and a[1] == b[1]
                and a[2] == b[2] and torch.equal(a[3], b[3]))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN settings compare equal to themselves


def capture(strategy) -> dict:
    """Everything observable about ``strategy`` and its model, as comparable CPU values."""
    model = strategy.model
    snap = {name: getattr(strategy, name) for name in _SETTINGS}
    snap["rank"] = getattr(strategy, "rank", None)
    snap["pending"] = copy.deepcopy(strategy._last)
    snap["active"] = strategy._active is not None
    snap["evolved"] = [n for n, _ in strategy.named_parameters()] if model is not None else []
    if model is not None:
        snap["parameters"] = {n: _freeze(p) for n, p in model.named_parameters()}
        snap["grads"] = {n: None if p.grad is None else _freeze(p.grad)
                         for n, p in model.named_parameters()}
        snap["buffers"] = {n: _freeze(b) for n, b in model.named_buffers()}
        snap["optimizer"] = _freeze(strategy.optimizer.state_dict())
        snap["optimizer_lrs"] = [g["lr"] for g in strategy.optimizer.param_groups]
    return snap


def differences(strategy, before: dict) -> list[str]:
    """Names of the entries of :func:`capture` that differ from ``before``."""
    after = capture(strategy)
    return [k for k in before if not _same(before[k], after.get(k))]


def assert_unchanged(strategy, before: dict) -> None:
    """Assert that nothing in :func:`capture` changed since ``before`` was taken."""
    diff = differences(strategy, before)
    assert not diff, f"state changed: {diff}"
