"""Train a CartPole policy with EGGROLL on several GPUs (or CPU processes) with torchrun.

Each rank evaluates its contiguous slice of the population on its own device; after every
generation the ranks all-gather the N fitness values (one small collective) and apply the
same update from regenerated noise, so no weights, gradients or noise are communicated.

On GPUs (NCCL, one GPU per rank, chosen by ``LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node=8 examples/distributed_cartpole.py

On the CPU (Gloo; the Triton kernels run in Triton's interpreter, slowly, so the run is
small)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_cartpole.py

Every rank must run the same command line: the seed, population size and the rest must
agree (the searcher checks this once at start-up and raises on every rank otherwise).
Only rank 0 prints the log.
"""

from __future__ import annotations

import os
import sys

import torch

_CPU_MODE = not torch.cuda.is_available()
if _CPU_MODE and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    # Triton's interpreter must be chosen before Triton is imported; if importing torch
    # already loaded it, start this process over with the variable set.
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import time  # noqa: E402

import torch.distributed as dist  # noqa: E402
from evotorch.logging import StdOutLogger  # noqa: E402
from torch import nn  # noqa: E402

from evotorch_eggroll.algorithms import EGGROLL  # noqa: E402
from evotorch_eggroll.envs import CartPole, evaluate_policy  # noqa: E402
from evotorch_eggroll.neuroevolution import EggrollVecGymNE  # noqa: E402

TARGET = 475.0  # mean return (of 500) at which training stops


def make_policy(obs_length: int, act_length: int, hidden: int) -> nn.Module:
    """A small MLP: observation -> hidden -> tanh -> action scores."""
    return nn.Sequential(nn.Linear(obs_length, hidden), nn.Tanh(), nn.Linear(hidden, act_length))


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` in the environment); returns ``(rank, world, device)``.

    GPUs: NCCL, rank ``r`` on ``cuda:LOCAL_RANK``. CPU: Gloo.
    """
    if "RANK" not in os.environ:
        raise SystemExit("launch this script with torchrun, e.g. "
                         "`torchrun --standalone --nproc_per_node=2 examples/distributed_cartpole.py`")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if _CPU_MODE:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    else:
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                             f"use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=None,
                        help="whole population over all ranks (a multiple of the world size); "
                             "default 4096 per GPU, 8 per CPU process")
    parser.add_argument("--generations", type=int, default=None, help="generation cap")
    parser.add_argument("--episode-length", type=int, default=None, help="steps per training episode")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units of the policy")
    parser.add_argument("--seed", type=int, default=0, help="noise, initialisation and environment seed")
    args = parser.parse_args(argv)

    rank, world, device = init_distributed()
    if _CPU_MODE:
        defaults = dict(per_rank=8, generations=5, episode_length=20, hidden=8, interval=1)
    else:
        defaults = dict(per_rank=4096, generations=200, episode_length=500, hidden=16, interval=5)
    popsize = args.popsize if args.popsize is not None else defaults["per_rank"] * world
    generations = args.generations if args.generations is not None else defaults["generations"]
    episode_length = args.episode_length if args.episode_length is not None else defaults["episode_length"]
    hidden = args.hidden if args.hidden is not None else defaults["hidden"]

    try:
        torch.manual_seed(args.seed)
        problem = EggrollVecGymNE(
            CartPole,
            lambda obs_length, act_length: make_policy(obs_length, act_length, hidden),
            episode_length=None if episode_length >= 500 else episode_length,
            device=device,
            seed=args.seed,
        )
        searcher = EGGROLL(problem, popsize=popsize, sigma=0.1, lr=0.05, rank=1, seed=args.seed,
                           distributed=True)
        StdOutLogger(searcher, interval=defaults["interval"])  # prints on rank 0 only
        target = TARGET if episode_length >= 500 else TARGET * episode_length / 500.0
        per = popsize // world
        print(f"rank {rank}/{world} on {device}: members {rank * per}..{(rank + 1) * per - 1}", flush=True)
        dist.barrier()
        if rank == 0:
            where = "CPU (Gloo, Triton interpreter)" if _CPU_MODE else f"{world} x {torch.cuda.get_device_name(device)} (NCCL)"
            print(f"EGGROLL on CartPole over {where}: popsize={popsize} ({per} per rank), "
                  f"{problem.solution_length} parameters, at most {generations} generations, "
                  f"stopping at a mean return of {target:g}", flush=True)

        start = time.perf_counter()
        mean_return = float("nan")
        for _ in range(generations):
            searcher.step()
            # a global status value: every rank sees the same number and stops together
            mean_return = float(searcher.status["mean_eval"])
            if mean_return >= target:
                break
        elapsed = time.perf_counter() - start

        if rank == 0:
            center_return = evaluate_policy(searcher.network, device)
            print(f"Done after {searcher.step_count} generations in {elapsed:.1f} s: population mean return "
                  f"{mean_return:.1f} (target {target:g}); the center policy scores {center_return:.1f} "
                  f"on full 500-step episodes.", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
