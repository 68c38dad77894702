"""Generation time of EGGROLL on the torch CartPole over 1..k GPUs (population sharded).

    torchrun --standalone --nproc_per_node=1 scripts/scaling_rollout.py --population 262144
    torchrun --standalone --nproc_per_node=2 scripts/scaling_rollout.py --population 262144

Each rank evaluates its slice of the population on its own GPU (NCCL; only fitness values
are communicated); the policy is the rollout benchmark's 4 -> 64 -> 64 -> 2 tanh MLP,
rank 1, 200-step episodes. After two warm-up generations (compilation, drawing, capture),
rank 0 prints the median generation time and env-steps/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import EggrollVecGymNE
from evotorch_eggroll.rollout_benchmark import cartpole_policy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--population", type=int, default=262144)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--generations", type=int, default=7)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    problem = EggrollVecGymNE(CartPole, cartpole_policy, episode_length=args.steps, device=device)
    searcher = EGGROLL(problem, popsize=args.population, rank=1, distributed=world > 1)
    times = []
    for g in range(2 + args.generations):
        torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        searcher.step()
        torch.cuda.synchronize()
        if g >= 2:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    if rank == 0:
        print(f"GPUs={world} N={args.population} per GPU={args.population // world} "
              f"steps={problem.last_rollout_steps} generation {ms:.2f} ms "
              f"({args.population * problem.last_rollout_steps / ms / 1e3:.1f} M env-steps/s)",
              flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
