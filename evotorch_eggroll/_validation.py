"""Checks of scalar arguments, shared by the strategies, the EvoTorch searcher, the problem
adapters and the kernel launchers, so that one bad value gets one exception and one message
wherever it is passed.

The rules:

* Counts (population sizes, ranks, epochs, seeds, chunk and batch sizes) are integers:
  ``int`` and integer scalars of numpy or torch (anything with ``__index__``) are accepted;
  ``bool`` (``True`` is no population size), floats (even ``2.0``), strings and
  everything else are refused with :class:`ArgumentTypeError`.
* Real settings (``sigma``, ``lr``, epsilons, norms) are real numbers: ``int``, ``float``
  and numpy real scalars; ``bool``, tensors (a value that may live on a GPU is not read back
  silently) and everything else are refused with :class:`ArgumentTypeError`. They must be
  finite.
* A value of the right type outside its range is a ``ValueError``.

Both kinds of message name the argument, what it must be and the value given.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional

import torch

__all__ = ["ArgumentTypeError", "MAX_POPULATION", "as_value_tensor", "check_int",
           "check_optional_int", "check_population_size", "check_real", "check_seed",
           "optimizer_class"]

MAX_POPULATION = 1 << 32  # member ids are 32-bit noise counters
_SEED_LIMIT = 1 << 64


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a float or a bool where an integer is needed, a
    string where a number is needed).

    A ``TypeError``; also a ``ValueError``, because some of these checks once raised
    ``ValueError`` for a wrong type (``perturb(2.5)``, ``EGGROLL(problem, popsize=2.5)``)
    and code catching that keeps working.
    """


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _count_requirement(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """Return ``value`` as a Python ``int`` if it is an integer ``>= minimum``.

    Args:
        name: the argument's name, used in the messages.
        value: ``int`` or a numpy/torch integer scalar (``bool`` is refused).
        minimum: the smallest allowed value.

    Raises:
        ArgumentTypeError: not an integer (a bool, a float, a string, ...).
        ValueError: an integer below ``minimum``.
    """
    requirement = _count_requirement(minimum)
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ArgumentTypeError(f"{name} must be {requirement}, got {_describe(value)}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be {requirement}, got {_describe(value)}") from None
    if n < minimum:
        raise ValueError(f"{name} must be {requirement}, got {n}")
    return n


def check_population_size(name: str, value: Any) -> int:
    """A population size: an integer in ``[1, 2**32]`` (member ids are 32-bit noise
    counters).

    Raises:
        ArgumentTypeError: not an integer.
        ValueError: ``< 1`` or ``> 2**32``.
    """
    n = check_int(name, value, 1)
    if n > MAX_POPULATION:
        raise ValueError(f"{name} must be at most 2**32 (member ids are 32-bit noise counters), "
                         f"got {n}")
    return n


def check_seed(value: Any, name: str = "seed") -> int:
    """The key of all noise: an integer in ``[0, 2**64)``.

    Raises:
        ArgumentTypeError: not an integer.
        ValueError: negative or ``>= 2**64``.
    """
    seed = check_int(name, value, 0)
    if seed >= _SEED_LIMIT:
        raise ValueError(f"{name} must be < 2**64, got {seed}")
    return seed


def check_real(name: str, value: Any, *, allow_zero: bool = True) -> float:
    """Return ``value`` as a Python ``float`` if it is a finite real number ``>= 0``
    (``> 0`` when ``allow_zero`` is False).

    Args:
        name: the argument's name, used in the messages.
        value: a real number (``int``, ``float``, a numpy real scalar; not bool, not a
            tensor).
        allow_zero: whether 0 is allowed.

    Raises:
        ArgumentTypeError: not a real number.
        ValueError: NaN, infinite, negative, or zero when not allowed.
    """
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a finite number {bound}, got {_describe(value)}")
    x = float(value)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {bound}, got {x}")
    return x


def check_optional_int(name: str, value: Optional[Any], minimum: int = 0) -> Optional[int]:
    """:func:`check_int` for an argument whose ``None`` means "not set"."""
    return None if value is None else check_int(name, value, minimum)


def as_value_tensor(value: Any, *, type_message: str, meta_message: str) -> torch.Tensor:
    """``torch.as_tensor(value)`` for an argument whose values are read (fitnesses, member
    ids): a ``TypeError`` with ``type_message`` (followed by ``, got <type>``) when it cannot
    be made a tensor, a ``RuntimeError`` with ``meta_message`` for a ``meta`` tensor, which
    holds no values."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{type_message}, got {type(value).__name__}") from None
    if t.device.type == "meta":
        raise RuntimeError(meta_message)
    return t


_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def optimizer_class(optimizer: Any) -> type:
    """The optimizer class an ``optimizer=`` argument names: ``'sgd'``, ``'adam'``,
    ``'adamw'`` (any case) or a ``torch.optim.Optimizer`` subclass, which is returned as is."""
    if isinstance(optimizer, str):
        cls = _OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd', 'adam', 'adamw' "
                             f"or a torch.optim.Optimizer subclass")
        return cls
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"optimizer must be 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer "
                    f"subclass, got {optimizer!r}")
