"""Generation time of EGGROLL on the torch CartPole over 1..k GPUs (population sharded).

Strong scaling (the whole population fixed) and weak scaling (the population per rank
fixed), one process per GPU::

    torchrun --standalone --nproc_per_node=1 scripts/scaling_rollout.py --population 1048576
    torchrun --standalone --nproc_per_node=8 scripts/scaling_rollout.py --population 1048576
    torchrun --standalone --nproc_per_node=8 scripts/scaling_rollout.py --per-rank 262144

Each rank evaluates its slice of the population on its own GPU (NCCL; only fitness values
are communicated); the policy is the rollout benchmark's 4 -> 64 -> 64 -> 2 tanh MLP,
rank 1, 200-step episodes. After ``--warmup`` generations (compilation, drawing, capture;
two by default), rank 0 prints the median generation time and env-steps/s. Then
``--phases`` more generations run with the device synchronised around the fitness
all-gather and the update, and rank 0 prints the median time of each phase, the largest
over the ranks: the rollout (from the generation's start to the all-gather), the
all-gather (with any wait for a slower rank), the update (the step's device work and its
read), and the rest (the fitness ranking between them, EvoTorch's bookkeeping). These
synchronisations stall the queue, so the phase times add up to more than the generation
time above. ``--distributed`` takes the distributed path with a single rank (a one-rank
process group, ``EGGROLL(distributed=True)``): what that path costs beyond the plain
one-process run, with no other GPU to wait for.

Without a GPU the ranks run on the CPU with Gloo and Triton's interpreter (a smoke test at
tiny sizes; by default 8 members, 3 steps, no warm-up, one generation of each kind).
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
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch.distributed as dist  # noqa: E402

from evotorch_eggroll import distributed as eggroll_dist  # noqa: E402
from evotorch_eggroll.algorithms import EGGROLL  # noqa: E402
from evotorch_eggroll.envs import CartPole  # noqa: E402
from evotorch_eggroll.neuroevolution import EggrollVecGymNE  # noqa: E402
from evotorch_eggroll.rollout_benchmark import cartpole_policy  # noqa: E402

PHASES = ("rollout", "all-gather", "update", "rest")


class PhaseClock:
    """Wall-clock marks of one generation's phases: wraps the all-gather of the fitnesses
    and the searcher's update so that each starts and ends with the device synchronised
    (``sync``). Undone by :meth:`close`."""

    def __init__(self, searcher: EGGROLL, sync: Callable[[], None]) -> None:
        self.marks: dict[str, float] = {}
        self._sync = sync
        self._gather = eggroll_dist.all_gather_population_deferred
        self._mode = searcher._mode
        eggroll_dist.all_gather_population_deferred = self._timed("gather", self._gather)
        self._mode.update = self._timed("update", self._mode.update)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            self.marks[name + "0"] = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.marks[name + "1"] = time.perf_counter()
            return out

        return timed

    def generation(self, step: Callable[[], None]) -> list[float]:
        """Run ``step`` once: the seconds of each of :data:`PHASES`."""
        self.marks.clear()
        self._sync()
        start = time.perf_counter()
        step()
        self._sync()
        end = time.perf_counter()
        m = self.marks
        gather = m.get("gather1", m["update0"]) - m.get("gather0", m["update0"])
        rollout = m.get("gather0", m["update0"]) - start
        update = m["update1"] - m["update0"]
        return [rollout, gather, update, end - start - rollout - gather - update]

    def close(self) -> None:
        eggroll_dist.all_gather_population_deferred = self._gather
        del self._mode.update  # the instance attribute; the method shows again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--population", type=int, default=None,
                      help="members in all (strong scaling; default 262144, 8 on the CPU)")
    size.add_argument("--per-rank", type=int, default=None,
                      help="members per rank (weak scaling)")
    parser.add_argument("--steps", type=int, default=3 if _CPU_MODE else 200)
    parser.add_argument("--warmup", type=int, default=0 if _CPU_MODE else 2)
    parser.add_argument("--generations", type=int, default=1 if _CPU_MODE else 7)
    parser.add_argument("--phases", type=int, default=1 if _CPU_MODE else 3,
                        help="generations timed phase by phase after the others (0: none)")
    parser.add_argument("--distributed", action="store_true",
                        help="take the distributed path (a process group, EGGROLL(distributed=True)) "
                             "even with one rank, to measure what it costs beyond the one-process path")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    distributed = world > 1 or args.distributed
    if _CPU_MODE:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        if distributed:
            dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        if distributed:
            dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank() if distributed else 0
    if args.per_rank is not None:
        population = args.per_rank * world
    else:
        population = args.population if args.population is not None else (8 if _CPU_MODE else 262144)
    if population % world:
        raise SystemExit(f"the population ({population}) must split evenly over {world} ranks")

    def sync() -> None:
        if not _CPU_MODE:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    problem = EggrollVecGymNE(CartPole, cartpole_policy, episode_length=args.steps, device=device)
    searcher = EGGROLL(problem, popsize=population, rank=1, distributed=distributed)
    times = []
    for g in range(args.warmup + args.generations):
        sync()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        searcher.step()
        sync()
        if g >= args.warmup:
            times.append(time.perf_counter() - t0)
    phases = []
    if args.phases > 0:
        clock = PhaseClock(searcher, sync)
        try:
            for _ in range(args.phases):
                if world > 1:
                    dist.barrier()
                phases.append(clock.generation(searcher.step))
        finally:
            clock.close()
    ms = statistics.median(times) * 1e3
    steps = problem.last_rollout_steps
    # every rank's phase medians; rank 0 prints the largest of each
    mine = [statistics.median(p[i] for p in phases) * 1e3 for i in range(len(PHASES))] if phases else []
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if rank == 0:
        path = " (distributed path)" if distributed and world == 1 else ""
        print(f"ranks={world}{path} device={device.type} N={population} per rank={population // world} "
              f"steps={steps} generation {ms:.2f} ms ({population * steps / ms / 1e3:.1f} M env-steps/s)",
              flush=True)
        if phases:
            worst = [max(r[i] for r in everyone) for i in range(len(PHASES))]
            print("phases, ms (median of " + str(len(phases)) + ", largest over the ranks): "
                  + ", ".join(f"{name} {v:.2f}" for name, v in zip(PHASES, worst)), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
