"""Train a HalfCheetah-v5 policy (MuJoCo through Gymnasium) with EGGROLL.

The population's environments are Gymnasium's ``HalfCheetah-v5`` in one
``gymnasium.make_vec`` (numpy, on the CPU); the policy and the EGGROLL update run on the
GPU when there is one, else in plain torch on the CPU. Needs the ``mujoco`` extra::

    pip install 'evotorch-eggroll[mujoco]'
    python examples/halfcheetah.py                          # 64 members, 100 generations
    python examples/halfcheetah.py --popsize 16 --generations 5 --episode-length 100   # a quick look

Observations are normalised with running statistics; actions are the network's outputs
clipped to the action space's bounds ([-1, 1]) in its dtype (float32). At the end the
center policy is evaluated on fresh start states and saved with ``--save PATH`` (EvoTorch's
pickled dict: ``solution``, ``policy``, observation statistics, ...).
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from evotorch.logging import StdOutLogger
from torch import nn

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.neuroevolution import EggrollVecGymNE


def policy(obs_length: int, act_length: int, hidden: int) -> nn.Module:
    """A tanh MLP whose output layer starts at zero (the first policy stands still)."""
    net = nn.Sequential(nn.Linear(obs_length, hidden), nn.Tanh(), nn.Linear(hidden, act_length))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


@torch.no_grad()
def evaluate(module: nn.Module, episodes: int, episode_length: int, seed: int) -> float:
    """Mean return of ``module`` (a plain policy) over ``episodes`` fresh HalfCheetah episodes."""
    env = gym.make_vec("HalfCheetah-v5", num_envs=episodes)
    obs, _ = env.reset(seed=seed)
    device = next(module.parameters()).device
    total = np.zeros(episodes)
    for _ in range(episode_length):
        act = module(torch.as_tensor(obs, dtype=torch.float32, device=device)).clamp(-1, 1)
        obs, reward, terminated, truncated, _ = env.step(act.cpu().numpy())
        total += reward
    env.close()
    return float(total.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=64)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--episode-length", type=int, default=1000, help="steps per episode (1000 in v5)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rank", type=int, default=1, help="rank of the low-rank perturbations")
    parser.add_argument("--device", default=None, help="device of the policy (default: CUDA if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="pickle the final center here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    problem = EggrollVecGymNE(
        "HalfCheetah-v5",
        lambda obs_length, act_length: policy(obs_length, act_length, args.hidden),
        episode_length=args.episode_length,
        observation_normalization=True,
        device=args.device,
        seed=args.seed,
    )
    searcher = EGGROLL(problem, popsize=args.popsize, sigma=args.sigma, lr=args.lr, rank=args.rank,
                       seed=args.seed)
    StdOutLogger(searcher, interval=max(1, args.generations // 20))
    start = time.perf_counter()
    searcher.run(args.generations)
    elapsed = time.perf_counter() - start
    steps = problem.interaction_count
    print(f"{args.generations} generations, {steps} environment steps in {elapsed:.1f} s "
          f"({steps / elapsed:.0f} steps/s)")
    center = problem.to_policy(searcher.status["center"])
    score = evaluate(center, episodes=8, episode_length=args.episode_length, seed=args.seed + 10_000)
    print(f"center policy: mean return {score:.1f} over 8 fresh episodes of {args.episode_length} steps")
    if args.save:
        problem.save_solution(searcher.status["center"], args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
