"""RL patterns (SEED "Reinforcement Learning Integration"): Gymnasium 1.x vector envs through
``gym.make_vec`` with ``batched_forward``, a natively batched torch environment, sequential
evaluation with ``iterate()``, and learning that measurably improves returns.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy


class TargetTrackingEnv:
    """A natively batched torch environment (SEED's ``MyBatchedEnv`` pattern).

    Each step shows an observation ``o (batch, 3)`` and pays ``-||a - o @ M||^2`` for the
    action ``a (batch, 2)``; episodes last ``horizon`` steps. Everything stays on ``device``.
    All environments of the batch see the same observations (common random numbers, so
    members differ only by their perturbations).
    """

    def __init__(self, batch_size: int, device, horizon: int = 4, seed: int = 0):
        self.batch_size, self.device, self.horizon = batch_size, device, horizon
        self.gen = torch.Generator().manual_seed(seed)
        self.target = torch.tensor([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.25]], device=device)
        self.t = 0

    def _obs(self) -> torch.Tensor:
        return torch.randn(1, 3, generator=self.gen).to(self.device).expand(self.batch_size, 3)

    def reset(self) -> torch.Tensor:
        self.t = 0
        self.obs = self._obs()
        return self.obs

    def step(self, actions: torch.Tensor):
        rewards = -((actions - self.obs @ self.target) ** 2).sum(dim=1)
        self.t += 1
        self.obs = self._obs()
        dones = torch.full((self.batch_size,), self.t >= self.horizon, device=self.device)
        return self.obs, rewards, dones


def run_episodes(strategy, policy, env, population_size, epoch=None) -> torch.Tensor:
    obs = env.reset()
    returns = torch.zeros(population_size, device=env.device)
    dones = torch.zeros(population_size, dtype=torch.bool, device=env.device)
    with strategy.perturb(population_size=population_size, epoch=epoch) as pop:
        while not dones.all():
            with torch.no_grad():
                actions = pop.batched_forward(policy, obs)
            obs, rewards, done = env.step(actions)
            returns += rewards * (~dones).float()
            dones = dones | done
    return returns


def test_batched_torch_env_learns(device):
    """Evolving a linear policy on the batched env: the expected per-step loss of the base
    policy, ``||W - M^T||^2 + ||b||^2`` for standard normal observations, falls clearly."""
    torch.manual_seed(0)
    policy = nn.Linear(3, 2).to(device)
    strategy = EggrollStrategy(sigma=0.2, lr=0.1, rank=1, seed=0).setup(policy)
    env = TargetTrackingEnv(batch_size=8, device=device, horizon=2, seed=0)

    def expected_loss() -> float:
        with torch.no_grad():
            return float(((policy.weight - env.target.T) ** 2).sum() + (policy.bias ** 2).sum())

    start = expected_loss()
    for _ in range(12):
        returns = run_episodes(strategy, policy, env, population_size=8)
        metrics = strategy.step(returns)
        assert metrics["fitness_max"] <= 0.0 and metrics["population_size"] == 8
    assert expected_loss() < 0.6 * start


def test_gym_make_vec_quick_start_runs(device):
    """SEED's vectorised Gym quick start with the Gymnasium 1.x API (``gym.make_vec``),
    episodes capped so that it stays small."""
    population_size = 4
    envs = gym.make_vec("CartPole-v1", num_envs=population_size, vectorization_mode="sync",
                        max_episode_steps=10)
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)
    strategy = EggrollStrategy(sigma=0.1, lr=0.01, rank=4)
    strategy.setup(policy)
    for epoch in range(2):
        obs, _ = envs.reset(seed=epoch)
        episode_returns = torch.zeros(population_size, device=device)
        dones = torch.zeros(population_size, dtype=torch.bool, device=device)
        with strategy.perturb(population_size=population_size, epoch=epoch) as pop:
            while not dones.all():
                obs_tensor = torch.as_tensor(obs, dtype=torch.float32, device=device)
                with torch.no_grad():
                    action_logits = pop.batched_forward(policy, obs_tensor)
                actions = action_logits.argmax(dim=-1).cpu().numpy()
                obs, rewards, terminated, truncated, _ = envs.step(actions)
                episode_returns += torch.as_tensor(rewards, device=device) * (~dones).float()
                dones = dones | torch.as_tensor(terminated | truncated, device=device)
        metrics = strategy.step(episode_returns)
        assert 1.0 <= metrics["fitness_min"] <= metrics["fitness_max"] <= 10.0
    envs.close()
    assert strategy.epoch == 2


def test_torch_native_cartpole_with_batched_forward(device):
    """The package's torch CartPole keeps observations on the device: no host round trip."""
    from evotorch_eggroll.envs import CartPole

    env = CartPole(num_envs=4, device=device)
    torch.manual_seed(0)
    policy = nn.Linear(4, 2).to(device)
    strategy = EggrollStrategy(sigma=0.2, rank=1).setup(policy)
    obs, _ = env.reset(seed=0)
    returns = torch.zeros(4, device=device)
    with strategy.perturb(4) as pop:
        for _ in range(5):
            with torch.no_grad():
                actions = pop.batched_forward(policy, obs).argmax(-1)
            obs, rewards, terminated, truncated, _ = env.step(actions)
            returns += torch.as_tensor(rewards, device=device, dtype=torch.float32)
    assert obs.device.type == device.type
    metrics = strategy.step(returns)
    assert metrics["population_size"] == 4


def _greedy_return(policy, env, seed: int) -> float:
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            action = policy(torch.as_tensor(obs, dtype=torch.float32,
                                            device=policy.weight.device)).argmax().item()
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        done = terminated or truncated
    return total


def test_sequential_cartpole_with_iterate_learns(device):
    """SEED's sequential example (one Gym env, ``pop.iterate()``): the greedy policy's
    return on fixed evaluation seeds rises clearly."""
    env = gym.make("CartPole-v1", max_episode_steps=200)
    torch.manual_seed(0)
    policy = nn.Linear(4, 2).to(device)
    # on the CPU the plain-torch path (the same noise stream) instead of Triton's interpreter
    backend = "triton" if device.type == "cuda" else "torch"
    strategy = EggrollStrategy(sigma=0.5, lr=0.1, rank=1, seed=0, backend=backend).setup(policy)

    def evaluate() -> float:
        return float(np.mean([_greedy_return(policy, env, 99999 + s) for s in range(5)]))

    before = evaluate()
    for epoch in range(12):
        fitnesses = []
        with strategy.perturb(population_size=16, epoch=epoch) as pop:
            for member_id in pop.iterate():
                fitnesses.append(_greedy_return(policy, env, 1000 * epoch + member_id))
        strategy.step(torch.tensor(fitnesses, device=device))
    after = evaluate()
    env.close()
    assert after > 1.5 * before and after >= 75.0


@pytest.mark.gpu
def test_gym_make_vec_cartpole_learns_with_batched_forward(device):
    """GPU tier: the vectorised quick start at its real population size improves returns."""
    population_size = 64
    envs = gym.make_vec("CartPole-v1", num_envs=population_size, vectorization_mode="sync",
                        max_episode_steps=200)
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)
    strategy = EggrollStrategy(sigma=0.3, lr=0.05, rank=4, seed=0).setup(policy)
    means = []
    for epoch in range(25):
        obs, _ = envs.reset(seed=epoch)
        returns = torch.zeros(population_size, device=device)
        dones = torch.zeros(population_size, dtype=torch.bool, device=device)
        with strategy.perturb(population_size) as pop:
            while not dones.all():
                with torch.no_grad():
                    logits = pop.batched_forward(
                        policy, torch.as_tensor(obs, dtype=torch.float32, device=device))
                obs, rewards, terminated, truncated, _ = envs.step(
                    logits.argmax(-1).cpu().numpy())
                returns += torch.as_tensor(rewards, device=device) * (~dones).float()
                dones = dones | torch.as_tensor(terminated | truncated, device=device)
        means.append(strategy.step(returns)["fitness_mean"])
    envs.close()
    assert np.mean(means[-3:]) > 2 * np.mean(means[:3])
