"""Checks of a strategy's ``state_dict`` before it is loaded.

:meth:`EvolutionStrategy.load_state_dict <evotorch_eggroll.strategy.EvolutionStrategy.
load_state_dict>` promises that a bad state changes nothing, so everything that could fail
part-way through a load, or later in a ``step``, is checked here first: the keys, the
algorithm and noise stream version that wrote the state, the types and ranges of the
settings, the names, shapes, dtypes and values of the evolved parameters, and the optimizer
state (rehearsed on a scratch optimizer). The functions read the state and build nothing
that the strategy keeps, except the checked values they return.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from . import noise as _noise
from ._validation import check_int, check_real, check_seed
from .evolved import EvolvedSet
from .shaping import check_nonfinite_policy

__all__ = ["STATE_KEYS", "CheckedState", "check_state_dict", "rehearse_optimizer_state"]

# The keys every state_dict holds (``nonfinite_fitness`` is optional: states saved before
# that setting existed do not have it).
STATE_KEYS = ("algorithm", "noise_stream_version", "sigma", "lr", "epoch", "total_steps",
              "seed", "rank", "antithetic", "noise_reuse", "optimizer", "parameters")


@dataclasses.dataclass(frozen=True)
class CheckedState:
    """The values of a state_dict that passed :func:`check_state_dict`, as plain Python
    values (the tensors are the state's own, not copies)."""

    sigma: float
    lr: float
    epoch: int
    total_steps: int
    seed: int
    rank: int
    antithetic: bool
    noise_reuse: int
    nonfinite_fitness: str
    optimizer: Mapping
    parameters: dict[str, torch.Tensor]


def _check_origin(state: Mapping, algorithm: str) -> None:
    """The state holds every key and was written by ``algorithm`` with this library's
    noise stream."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise KeyError(f"state_dict misses {missing}")
    if state["algorithm"] != algorithm:
        raise ValueError(f"state_dict is from {state['algorithm']!r}, this strategy is "
                         f"{algorithm!r}")
    if state["noise_stream_version"] != _noise.STREAM_VERSION:
        raise ValueError(f"state_dict uses noise stream version "
                         f"{state['noise_stream_version']}, this library "
                         f"{_noise.STREAM_VERSION}")


def _check_parameter_values(values: Any, evolved: EvolvedSet) -> dict[str, torch.Tensor]:
    """The state's parameter values by name: exactly the evolved parameters' names."""
    names = [e.name for e in evolved]
    if not isinstance(values, Mapping) or sorted(values) != sorted(names):
        got = sorted(values) if isinstance(values, Mapping) else type(values).__name__
        raise ValueError(f"state_dict parameters {got} do not match the evolved "
                         f"parameters {sorted(names)}")
    return {e.name: values[e.name] for e in evolved}


def _check_parameter_tensors(values: dict[str, torch.Tensor], evolved: EvolvedSet) -> None:
    """Each value is a finite floating tensor, not on ``meta``, of its parameter's shape."""
    for e in evolved:
        v = values[e.name]
        if not isinstance(v, torch.Tensor) or v.shape != e.param.shape:
            raise ValueError(f"state_dict value of {e.name!r} has shape "
                             f"{getattr(v, 'shape', None)}, expected {tuple(e.param.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"state_dict value of {e.name!r} has dtype {v.dtype}; parameter "
                            f"values must be floating point")
        if v.device.type == "meta":
            raise RuntimeError(f"state_dict value of {e.name!r} is a meta tensor, which "
                               f"holds no values")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"state_dict value of {e.name!r} contains NaN or inf")


def check_state_dict(state: Any, *, algorithm: str, full_rank: bool, evolved: EvolvedSet,
                     nonfinite_fitness: str) -> CheckedState:
    """Check a state_dict against a strategy and return its values.

    Args:
        state: what ``state_dict()`` returned (possibly after ``torch.save``/``load``).
        algorithm: the loading strategy's algorithm name (``"eggroll"``/``"openes"``).
        full_rank: whether the loading strategy has dense noise (then ``rank`` may be 0).
        evolved: the loading strategy's evolved parameters.
        nonfinite_fitness: the policy to keep when the state has none (saved before that
            setting existed).

    Returns:
        The checked values. The optimizer state is not checked here (see
        :func:`rehearse_optimizer_state`).

    Raises:
        TypeError: a state that is not a mapping; values of the wrong type.
        KeyError: missing keys.
        ValueError: another algorithm or noise stream, values out of range, another
            architecture, shapes that differ, non-finite parameter values.
        RuntimeError: meta tensors among the parameter values.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    _check_origin(state, algorithm)
    sigma = check_real("sigma", state["sigma"])
    lr = check_real("lr", state["lr"])
    epoch = check_int("epoch", state["epoch"], 0)
    total_steps = check_int("total_steps", state["total_steps"], 0)
    seed = check_seed(state["seed"])
    rank = check_int("rank", state["rank"], 0)
    if not full_rank and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    noise_reuse = check_int("noise_reuse", state["noise_reuse"], 0)
    policy = check_nonfinite_policy(state.get("nonfinite_fitness", nonfinite_fitness),
                                    "state_dict nonfinite_fitness")
    parameters = _check_parameter_values(state["parameters"], evolved)
    if not isinstance(state["antithetic"], bool):
        raise TypeError(f"state_dict antithetic must be a bool, got "
                        f"{type(state['antithetic']).__name__}")
    _check_parameter_tensors(parameters, evolved)
    return CheckedState(sigma=sigma, lr=lr, epoch=epoch, total_steps=total_steps, seed=seed,
                        rank=rank, antithetic=state["antithetic"], noise_reuse=noise_reuse,
                        nonfinite_fitness=policy, optimizer=state["optimizer"],
                        parameters=parameters)


def rehearse_optimizer_state(optimizer: torch.optim.Optimizer, optimizer_cls: type, lr: float,
                             optimizer_kwargs: Mapping, optimizer_state: Any) -> None:
    """Check that ``optimizer_state`` fits ``optimizer`` without touching it.

    Loads the state into a scratch optimizer of the same class and param-group layout over
    scratch copies of the parameters and runs one step with zero gradients, so that a
    corrupted or foreign optimizer state (missing buffers, wrong shapes, another optimizer's
    hyperparameters) fails here, before anything changes, and not part-way through a later
    ``step``.

    Raises:
        ValueError: not an optimizer state_dict, or one that does not fit (naming the cause).
    """
    if not isinstance(optimizer_state, Mapping) or not {"state", "param_groups"} <= set(
            optimizer_state):
        raise ValueError("state_dict optimizer entry must be a torch optimizer state_dict "
                         "(a mapping with 'state' and 'param_groups')")
    with torch.no_grad():
        groups = []
        for group in optimizer.param_groups:
            scratch = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": scratch})
    try:
        trial = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
        trial.load_state_dict(copy.deepcopy(dict(optimizer_state)))
        for group in trial.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        trial.step()
    except Exception as err:
        raise ValueError(f"state_dict optimizer state does not fit this strategy's "
                         f"{type(optimizer).__name__} over the evolved parameters "
                         f"({type(err).__name__}: {err}); nothing was loaded") from err
