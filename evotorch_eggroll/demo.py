"""Train a CartPole policy with EGGROLL through EvoTorch: ``python -m evotorch_eggroll.demo``.

With a CUDA GPU the whole population (4096 members by default) runs as one batch of
torch-native CartPoles on the GPU, and training stops once the population's mean return
reaches 475 (of 500) or after the generation cap. Without a GPU the searcher runs its
plain-torch CPU path (the same noise stream and the same perturbed forward and update as
the kernels, as batched matrix products on the CPU; its default ``backend="auto"``), says
so on its first line, and trains a smaller population on shorter episodes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from evotorch_eggroll.envs import CartPole, evaluate_policy

_CPU_MODE = not torch.cuda.is_available()

TARGET = 475.0


def make_policy(obs_length: int, act_length: int, hidden: int = 16) -> nn.Module:
    """A small MLP: observation -> hidden -> tanh -> action scores."""
    return nn.Sequential(nn.Linear(obs_length, hidden), nn.Tanh(), nn.Linear(hidden, act_length))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=None, help="generation cap")
    parser.add_argument("--popsize", type=int, default=None, help="population size")
    parser.add_argument("--episode-length", type=int, default=None, help="steps per training episode")
    parser.add_argument("--sigma", type=float, default=0.3, help="noise scale")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    parser.add_argument("--rank", type=int, default=1, help="rank of the weight perturbations")
    parser.add_argument("--seed", type=int, default=0, help="noise and environment seed")
    parser.add_argument(
        "--algorithm",
        choices=("eggroll", "pgpe"),
        default="eggroll",
        help="search algorithm: EGGROLL, or EvoTorch's PGPE on the same problem as a baseline",
    )
    args = parser.parse_args(argv)

    if _CPU_MODE:
        print(
            "No CUDA GPU found: running on the CPU through EGGROLL's plain-torch path (the same "
            "noise and the same perturbed forward and update as the GPU kernels, as batched "
            "matrix products). The population and the policy are smaller than on a GPU.",
            flush=True,
        )
        device = torch.device("cpu")
        # a policy this small computes fastest on one thread: more only wait for each other
        torch.set_num_threads(1)
        defaults = dict(generations=100, popsize=256, episode_length=500, hidden=8, interval=5)
    else:
        device = torch.device("cuda")
        print(f"CUDA GPU: {torch.cuda.get_device_name(device)}", flush=True)
        defaults = dict(generations=300, popsize=4096, episode_length=500, hidden=16, interval=5)
    generations = args.generations if args.generations is not None else defaults["generations"]
    popsize = args.popsize if args.popsize is not None else defaults["popsize"]
    episode_length = args.episode_length if args.episode_length is not None else defaults["episode_length"]

    import logging

    from evotorch.logging import StdOutLogger

    logging.getLogger("evotorch").setLevel(logging.WARNING)  # keep the output to the training log

    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(args.seed)
    problem = EggrollVecGymNE(
        CartPole,
        lambda obs_length, act_length: make_policy(obs_length, act_length, defaults["hidden"]),
        episode_length=None if episode_length >= 500 else episode_length,
        observation_normalization=True,
        device=device,
        seed=args.seed,
    )
    if args.algorithm == "pgpe":
        from evotorch.algorithms import PGPE

        # EvoTorch's usual CartPole settings (ClipUp, centered ranks, symmetric sampling);
        # every solution is materialised, and each policy call of the problem's batched path
        # runs the whole population at once (torch.func.vmap over the solutions' parameters).
        searcher = PGPE(
            problem,
            popsize=popsize,
            center_learning_rate=0.075,
            stdev_learning_rate=0.1,
            radius_init=0.27,
            optimizer="clipup",
            optimizer_config={"max_speed": 0.15},
            ranking_method="centered",
        )
    else:
        searcher = EGGROLL(problem, popsize=popsize, sigma=args.sigma, lr=args.lr, rank=args.rank, seed=args.seed)
    StdOutLogger(searcher, interval=defaults["interval"])
    target = TARGET if episode_length >= 500 else TARGET * episode_length / 500.0
    print(
        f"{args.algorithm.upper()} on CartPole: popsize={popsize}, {problem.solution_length} parameters, "
        f"episodes of up to {min(episode_length, 500)} steps, at most {generations} generations, "
        f"stopping at a mean return of {target:g}",
        flush=True,
    )

    start = time.perf_counter()
    first_generation = float("nan")
    mean_return = float("nan")
    for _ in range(generations):
        searcher.step()
        mean_return = float(searcher.status["mean_eval"])
        if searcher.step_count == 1:
            first_generation = time.perf_counter() - start
        if mean_return >= target:
            break
    elapsed = time.perf_counter() - start

    center_return = evaluate_policy(problem.to_policy(searcher.status["center"]).to(device), device)
    reached = "reached" if mean_return >= target else "not reached"
    print(
        f"Done after {searcher.step_count} generation{'' if searcher.step_count == 1 else 's'} "
        f"in {elapsed:.1f} s (the first took "
        f"{first_generation:.1f} s, including one-time set-up such as compiling kernels): "
        f"final population mean "
        f"return {mean_return:.1f} (target {target:g} {reached}); the center policy scores "
        f"{center_return:.1f} on full 500-step episodes.",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
