"""Continuous control through Gymnasium: Box actions (dtype and bounds) and MuJoCo's
HalfCheetah-v5 trained with EGGROLL (``pip install 'evotorch-eggroll[mujoco]'``)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from evotorch import SolutionBatch
from torch import nn

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.neuroevolution import EggrollVecGymNE, _mix_seed


class _Bounded(gym.Env):
    """Box(-0.3, 0.3, (2,)) float32 actions, each checked against the space; reward is
    minus the distance of the action from (0.1, -0.2)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    action_space = gym.spaces.Box(-0.3, 0.3, (2,), dtype=np.float32)

    def __init__(self, seen: list):
        self.seen = seen

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self.seen.append(action)
        assert self.action_space.contains(action), action
        reward = -float(np.abs(action - np.array([0.1, -0.2])).sum())
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), reward, False, False, {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_box_actions_reach_the_env_in_its_dtype_within_its_bounds(dtype):
    """Whatever the network's dtype, the environment gets actions of its space's dtype,
    clipped to exactly its bounds (bfloat16 cannot even represent 0.3)."""
    seen = []

    def make(num_envs):
        return gym.vector.SyncVectorEnv([lambda: _Bounded(seen) for _ in range(num_envs)])

    torch.manual_seed(0)
    problem = EggrollVecGymNE(make, lambda obs_length, act_length: nn.Linear(obs_length, act_length).to(dtype),
                              device="cpu", seed=0, episode_length=3)
    center = problem.parameters_to_vector(problem.network).detach().float()
    batch = SolutionBatch(problem, popsize=2, empty=True, device="cpu")
    batch.set_values(torch.stack([center * 0, center * 0 + 50]).to(dtype))  # inside, far outside
    problem.evaluate(batch)
    assert len(seen) == 2 * 3 and all(a.dtype == np.float32 and a.shape == (2,) for a in seen)
    first, big = seen[0::2], seen[1::2]
    assert all(np.array_equal(a, np.zeros(2, np.float32)) for a in first)
    assert all(np.array_equal(np.abs(a), np.full(2, np.float32(0.3))) for a in big)  # exactly the bounds
    assert batch.evals[0, 0].item() == pytest.approx(-0.3 * 3, rel=1e-6)


# ------------------------------------------------------------------------ MuJoCo

T = 40


def _halfcheetah_problem(network="Linear(obs_length, act_length)", **kwargs):
    pytest.importorskip("mujoco", reason="needs MuJoCo: pip install 'evotorch-eggroll[mujoco]'")
    torch.manual_seed(0)
    return EggrollVecGymNE("HalfCheetah-v5", network, device="cpu", seed=0, episode_length=T, **kwargs)


def _return_of(policy, seeds):
    """Mean return of ``policy`` over ``T`` steps of HalfCheetah-v5 from the given seeds,
    step by step in Gymnasium (actions clipped to [-1, 1] in float32)."""
    env = gym.make_vec("HalfCheetah-v5", num_envs=len(seeds))
    obs, _ = env.reset(seed=list(seeds))
    total = np.zeros(len(seeds))
    with torch.no_grad():
        for _ in range(T):
            act = policy(torch.as_tensor(obs, dtype=torch.float32)).clamp(-1, 1).numpy()
            obs, reward, terminated, truncated, _ = env.step(act)
            total += reward
    env.close()
    return float(total.mean())


def test_halfcheetah_fitness_is_the_episode_return():
    """Constant policies (zero weights, a bias partly outside [-1, 1]), whose actions are the
    same bits however they are computed: contacts make HalfCheetah's return change by
    percents when an action changes by 1e-6, so only exact actions give a comparable
    return."""
    problem = _halfcheetah_problem()
    assert problem._obs_space.shape == (17,) and problem._obs_space.dtype == np.float64
    assert problem._act_space.shape == (6,) and problem._act_space.dtype == np.float32
    g = torch.Generator().manual_seed(1)
    values = torch.zeros(3, problem.solution_length)
    values[:, 17 * 6:] = 1.5 * torch.randn(3, 6, generator=g)  # the bias, after the weight
    assert (values.abs() > 1).any()
    batch = SolutionBatch(problem, popsize=3, empty=True, device="cpu")
    batch.set_values(values)
    problem.evaluate(batch)
    base = _mix_seed(0, 0)  # the first evaluation's seed; sub-environment i gets base + i
    for i in range(3):
        expected = _return_of(problem.to_policy(values[i]), [base + i])
        assert batch.evals[i, 0].item() == pytest.approx(expected, rel=1e-6)
    assert problem.interaction_count == 3 * T and problem.episode_count == 3


def test_eggroll_trains_halfcheetah():
    """A linear policy from zero with observation normalisation: the center moves every
    generation and, on start states never used in training, its return goes up."""
    def zero_linear(obs_length, act_length):
        net = nn.Linear(obs_length, act_length)
        nn.init.zeros_(net.weight)
        nn.init.zeros_(net.bias)
        return net

    problem = _halfcheetah_problem(zero_linear, observation_normalization=True)
    searcher = EGGROLL(problem, popsize=32, sigma=0.05, lr=0.02, rank=1, seed=3, backend="torch")
    held_out = [10_001, 10_002, 10_003, 10_004]
    before = _return_of(problem.to_policy(searcher.status["center"]), held_out)
    centers = [searcher.status["center"].clone()]
    for _ in range(10):
        searcher.step()
        centers.append(searcher.status["center"].clone())
        assert np.isfinite(searcher.status["mean_eval"])
    assert all(not torch.equal(a, b) for a, b in zip(centers, centers[1:]))
    after = _return_of(problem.to_policy(searcher.status["center"]), held_out)
    assert after > before + 1.0
    assert problem.interaction_count == 10 * 32 * T
