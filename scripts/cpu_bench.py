"""One generation on the CPU: EGGROLL (plain-torch path or Triton's interpreter) vs PGPE.

    python scripts/cpu_bench.py                     # EGGROLL's default CPU path and PGPE
    TRITON_INTERPRET=1 python scripts/cpu_bench.py  # EGGROLL's kernels in the interpreter

Two small problems, each with the same popsize for both searchers: the demo's CartPole
(torch-native environments, 4 -> 8 -> 2 policy, episodes of up to 200 steps) and a
supervised regression (MLP 8 -> 32 -> 1, one minibatch of 64 rows per member). PGPE
materialises every solution and evaluates the population through the problem's batched
path (``torch.func.vmap`` over the solutions' parameters). Both sample with the same noise
scale per parameter (0.3) around the same center and keep it there (learning rates 0), so
every generation evaluates comparable populations (CartPole episodes end when the pole
falls: a population that learned would make later generations longer). Prints the median
time of a generation after warm-up generations, and for CartPole the time per
environment step.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from evotorch_eggroll import ops

SIGMA = 0.3  # noise scale of every parameter, for both searchers


def _cartpole(seed: int):
    from evotorch_eggroll.demo import make_policy
    from evotorch_eggroll.envs import CartPole
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(seed)
    return EggrollVecGymNE(CartPole, lambda obs_length, act_length: make_policy(obs_length, act_length, 8),
                           episode_length=200, observation_normalization=True, device="cpu", seed=seed)


def _regression(seed: int):
    from evotorch_eggroll.neuroevolution import EggrollSupervisedNE

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 8, generator=gen)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return EggrollSupervisedNE(torch.utils.data.TensorDataset(x, y), net, nn.functional.mse_loss,
                               minibatch_size=64, device="cpu", seed=seed)


def _searcher(name: str, problem, popsize: int):
    if name == "pgpe":
        from evotorch.algorithms import PGPE

        return PGPE(problem, popsize=popsize, center_learning_rate=0.0, stdev_learning_rate=0.0,
                    stdev_init=SIGMA, ranking_method="centered")
    from evotorch_eggroll.algorithms import EGGROLL

    return EGGROLL(problem, popsize=popsize, sigma=SIGMA, lr=0.0, rank=1, seed=0)


def _time(searcher, warmup: int, generations: int) -> tuple[float, float]:
    """Median seconds per generation and seconds per environment step (nan if none)."""
    for _ in range(warmup):
        searcher.step()
    times, steps = [], []
    for _ in range(generations):
        before = searcher.status.get("total_interaction_count", 0)
        start = time.perf_counter()
        searcher.step()
        times.append(time.perf_counter() - start)
        steps.append(searcher.status.get("total_interaction_count", 0) - before)
    per_step = sum(times) / sum(steps) if sum(steps) else float("nan")
    return statistics.median(times), per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=256)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("eggroll", "pgpe"), default=None)
    parser.add_argument("--problem", choices=("cartpole", "regression"), default=None)
    args = parser.parse_args()
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    path = "interpreter" if ops.interpreter_active() else "plain torch"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, popsize {args.popsize}")
    problems = {"cartpole": ("CartPole (200 steps)", _cartpole),
                "regression": ("regression MLP", _regression)}
    for key, (label, make) in problems.items():
        if args.problem not in (None, key):
            continue
        for name in ("eggroll", "pgpe"):
            if args.only not in (None, name):
                continue
            searcher = _searcher(name, make(0), args.popsize)
            gen, per_step = _time(searcher, args.warmup, args.generations)
            what = f"EGGROLL ({path})" if name == "eggroll" else "PGPE"
            extra = f", {per_step * 1e6:.1f} us per env step" if per_step == per_step else ""
            print(f"{label:22s} {what:26s} {gen * 1e3:9.1f} ms per generation{extra}", flush=True)


if __name__ == "__main__":
    main()
