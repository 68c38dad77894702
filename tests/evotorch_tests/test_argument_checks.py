"""One rule for scalar arguments: the strategies, the EvoTorch searcher, the problem adapters
and the kernel launchers refuse the same values with the same exception and message."""

import numpy as np
import pytest
import torch
from evotorch import Problem
from torch import nn

from evotorch_eggroll import EggrollStrategy, OpenESStrategy, ops
from evotorch_eggroll._validation import ArgumentTypeError
from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import EggrollSupervisedNE, EggrollVecGymNE


def _problem():
    return Problem("min", lambda x: (x ** 2).sum(dim=-1), solution_length=4, initial_bounds=(-1, 1),
                   vectorized=True, seed=0)


def _data():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, x[:, :1])


def _policy(obs_length, act_length):
    return nn.Linear(obs_length, act_length)


def _raised(build):
    with pytest.raises(Exception) as info:
        build()
    return type(info.value), str(info.value)


# Every place a positive count is passed: (the argument's name, a call taking the value).
POSITIVE_COUNTS = {
    "EggrollStrategy rank": ("rank", lambda v: EggrollStrategy(rank=v)),
    "EGGROLL rank": ("rank", lambda v: EGGROLL(_problem(), popsize=4, rank=v)),
    "EGGROLL popsize": ("popsize", lambda v: EGGROLL(_problem(), popsize=v)),
    "EGGROLL chunk_size": ("chunk_size", lambda v: EGGROLL(_problem(), popsize=4, chunk_size=v)),
    "EggrollSupervisedNE num_minibatches": (
        "num_minibatches",
        lambda v: EggrollSupervisedNE(_data(), nn.Linear(3, 1), nn.functional.mse_loss, num_minibatches=v,
                                      device="cpu")),
    "EggrollSupervisedNE minibatch_size": (
        "minibatch_size",
        lambda v: EggrollSupervisedNE(_data(), nn.Linear(3, 1), nn.functional.mse_loss, minibatch_size=v,
                                      device="cpu")),
    "EggrollVecGymNE num_episodes": (
        "num_episodes", lambda v: EggrollVecGymNE(CartPole, _policy, num_episodes=v, device="cpu")),
    "EggrollVecGymNE episode_length": (
        "episode_length", lambda v: EggrollVecGymNE(CartPole, _policy, episode_length=v, device="cpu")),
    "ops.lowrank_factors rank": ("rank", lambda v: ops.lowrank_factors(
        0, 0, 0, torch.arange(2), 3, 2, v, backend="torch")),
}

# Every place a non-negative count is passed.
NONNEGATIVE_COUNTS = {
    "EggrollStrategy noise_reuse": ("noise_reuse", lambda v: EggrollStrategy(noise_reuse=v)),
    "OpenESStrategy noise_reuse": ("noise_reuse", lambda v: OpenESStrategy(noise_reuse=v)),
    "EGGROLL noise_reuse": ("noise_reuse", lambda v: EGGROLL(_problem(), popsize=4, noise_reuse=v)),
    "EggrollStrategy seed": ("seed", lambda v: EggrollStrategy(seed=v)),
    "OpenESStrategy seed": ("seed", lambda v: OpenESStrategy(seed=v)),
    "EGGROLL seed": ("seed", lambda v: EGGROLL(_problem(), popsize=4, seed=v)),
}

REALS = {
    "EggrollStrategy": lambda name, v: EggrollStrategy(**{name: v}),
    "OpenESStrategy": lambda name, v: OpenESStrategy(**{name: v}),
    "EGGROLL": lambda name, v: EGGROLL(_problem(), popsize=4, **{name: v}),
}


def _same_everywhere(sites, value):
    """The (type, message) every site raises for ``value``, with the argument's own name
    replaced by a placeholder; asserts they are all equal and returns the one outcome."""
    outcomes = {}
    for label, (name, build) in sites.items():
        kind, message = _raised(lambda: build(value))
        assert name in message, (label, message)
        outcomes[label] = (kind, message.replace(name, "<arg>", 1))
    assert len(set(outcomes.values())) == 1, outcomes
    return next(iter(outcomes.values()))


@pytest.mark.parametrize("bad", [2.0, True, "2", 2.5, np.float64(3.0), torch.tensor(True)])
def test_a_non_integer_count_is_refused_alike_everywhere(bad):
    kind, message = _same_everywhere(POSITIVE_COUNTS, bad)
    assert kind is ArgumentTypeError and issubclass(kind, TypeError)
    assert message == f"<arg> must be a positive integer, got {bad!r} ({type(bad).__name__})"
    kind, message = _same_everywhere(NONNEGATIVE_COUNTS, bad)
    assert kind is ArgumentTypeError
    assert message == f"<arg> must be a non-negative integer, got {bad!r} ({type(bad).__name__})"


@pytest.mark.parametrize("bad", [0, -3, np.int64(-1)])
def test_a_count_out_of_range_is_refused_alike_everywhere(bad):
    if bad == 0:
        sites, requirement = POSITIVE_COUNTS, "a positive integer"
    else:
        sites = {**POSITIVE_COUNTS, **NONNEGATIVE_COUNTS}
        requirement = None
    outcomes = {label: _raised(lambda: build(bad)) for label, (_, build) in sites.items()}
    for label, (kind, message) in outcomes.items():
        name = sites[label][0]
        assert kind is ValueError, (label, kind)
        expected = requirement or ("a positive integer" if label in POSITIVE_COUNTS else "a non-negative integer")
        assert message == f"{name} must be {expected}, got {int(bad)}", label


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int16)])
def test_integer_scalars_of_numpy_and_torch_are_counts(value):
    strategy = EggrollStrategy(rank=value, noise_reuse=value, seed=value)
    assert (strategy.rank, strategy.noise_reuse, strategy.seed) == (3, 3, 3)
    assert type(strategy.rank) is int and type(strategy.seed) is int
    searcher = EGGROLL(_problem(), popsize=value * 2, rank=value, seed=value)
    assert searcher.popsize == 6 and type(searcher.popsize) is int


def test_seed_range_is_the_same_for_strategy_and_searcher():
    for build in (lambda: EggrollStrategy(seed=1 << 64), lambda: OpenESStrategy(seed=1 << 64),
                  lambda: EGGROLL(_problem(), popsize=4, seed=1 << 64)):
        assert _raised(build) == (ValueError, f"seed must be < 2**64, got {1 << 64}")


@pytest.mark.parametrize("name", ["sigma", "lr"])
@pytest.mark.parametrize("bad,kind", [
    (-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("0.1", ArgumentTypeError), (True, ArgumentTypeError), ([0.1], ArgumentTypeError),
    (torch.tensor(0.1), ArgumentTypeError),
])
def test_a_bad_real_setting_is_refused_alike_everywhere(name, bad, kind):
    outcomes = {label: _raised(lambda: build(name, bad)) for label, build in REALS.items()}
    assert len(set(outcomes.values())) == 1, outcomes
    got_kind, message = next(iter(outcomes.values()))
    assert got_kind is kind and message.startswith(f"{name} must be a finite number >= 0, got ")


def test_population_size_of_perturb_and_popsize_share_the_bound():
    big = (1 << 32) + 1
    strategy = EggrollStrategy(backend="torch").setup(nn.Linear(2, 2))
    _, perturb_message = _raised(lambda: strategy.perturb(big))
    _, popsize_message = _raised(lambda: EGGROLL(_problem(), popsize=big))
    assert perturb_message.replace("population_size", "popsize") == popsize_message
    assert "at most 2**32" in popsize_message
