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

Checkpoints: ``--checkpoint PATH --checkpoint-every K`` makes rank 0 save everything the
run depends on after every K-th generation and at the end (the strategy's parameters,
optimizer state and epoch, the generation count, the environments' reset counter, episode
and interaction counts, observation statistics, the searcher's best member so far and the
torch RNG state). Each save goes to a temporary file in the same directory, is flushed and
fsynced, and then renamed over ``PATH`` (``os.replace``), so a crash at any moment leaves
the previous checkpoint intact. After a failure, run the same command with ``--resume``:
every rank loads ``PATH`` (it must be readable by every rank, e.g. on a shared filesystem)
and the run continues bit-identically to one that never stopped, up to ``--generations``
generations in all::

    torchrun --standalone --nproc_per_node=8 examples/distributed_cartpole.py \
        --checkpoint run.pt --checkpoint-every 10
    # ... a rank fails; then
    torchrun --standalone --nproc_per_node=8 examples/distributed_cartpole.py \
        --checkpoint run.pt --checkpoint-every 10 --resume
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
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

import torch.distributed as dist  # noqa: E402
from evotorch.logging import StdOutLogger  # noqa: E402
from torch import nn  # noqa: E402

from evotorch_eggroll.algorithms import EGGROLL  # noqa: E402
from evotorch_eggroll.envs import CartPole, evaluate_policy  # noqa: E402
from evotorch_eggroll.neuroevolution import EggrollVecGymNE  # noqa: E402

TARGET = 475.0  # mean return (of 500) at which training stops
CHECKPOINT_FORMAT = 1
# the settings a checkpoint must have been written with to be resumed
RUN_SETTINGS = ("popsize", "seed", "hidden", "episode_length", "observation_normalization", "world")


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


def save_atomically(state: dict, path: str) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` always holds a complete file: a
    temporary file in the same directory, flushed and fsynced, then renamed over ``path``
    (``os.replace`` is atomic on POSIX and Windows), then the directory fsynced."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def checkpoint_state(searcher: EGGROLL, problem: EggrollVecGymNE, settings: dict) -> dict:
    """Everything the run depends on, as tensors, numbers, strings, lists and dicts
    (``torch.load(..., weights_only=True)`` reads it back). Identical on every rank."""
    stats = problem.get_observation_stats() if settings["observation_normalization"] else None
    return {
        "format": CHECKPOINT_FORMAT,
        "settings": dict(settings),
        "generation": int(searcher.step_count),
        "strategy": searcher.strategy.state_dict(),  # parameters, optimizer state, epoch
        "problem": {
            "num_resets": int(problem._num_resets),  # keys the environments' reset seeds
            "interaction_count": int(problem.interaction_count),
            "episode_count": int(problem.episode_count),
            "obs_stats": None if stats is None else {
                name: getattr(stats, name).detach().cpu().clone()
                for name in ("count", "sum", "sum_of_squares")},
        },
        # status values: the latest generation and the best member so far
        "searcher": {"last": _to_cpu(searcher._last), "best": _to_cpu(searcher._best_record)},
        "torch_rng": torch.get_rng_state(),
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def restore_checkpoint(state: dict, searcher: EGGROLL, problem: EggrollVecGymNE, settings: dict,
                       device: torch.device) -> None:
    """Load :func:`checkpoint_state`'s dict into a freshly built searcher and problem (on
    every rank: the strategy's ``load_state_dict`` is collective and checks that the ranks
    agree). Raises SystemExit when the checkpoint was written with other settings."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    differing = {k: (state["settings"].get(k), settings[k]) for k in RUN_SETTINGS
                 if state["settings"].get(k) != settings[k]}
    if differing:
        raise SystemExit("the checkpoint was written by a run with other settings (saved, now): "
                         + ", ".join(f"{k}={a!r}, {b!r}" for k, (a, b) in differing.items()))
    searcher.strategy.load_state_dict(state["strategy"])
    p = state["problem"]
    problem._num_resets = int(p["num_resets"])
    problem.set_interaction_count(p["interaction_count"])
    problem.set_episode_count(p["episode_count"])
    if p["obs_stats"] is not None:
        problem.set_observation_stats(types.SimpleNamespace(**p["obs_stats"]))
    searcher._steps_count = int(state["generation"])
    searcher._last = _to_device(state["searcher"]["last"], device)
    searcher._best_record = _to_device(state["searcher"]["best"], device)
    searcher._best_solution = None
    torch.set_rng_state(state["torch_rng"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=None,
                        help="whole population over all ranks (a multiple of the world size); "
                             "default 4096 per GPU, 8 per CPU process")
    parser.add_argument("--generations", type=int, default=None, help="generation cap")
    parser.add_argument("--episode-length", type=int, default=None, help="steps per training episode")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units of the policy")
    parser.add_argument("--seed", type=int, default=0, help="noise, initialisation and environment seed")
    parser.add_argument("--observation-normalization", action="store_true",
                        help="normalise observations with running statistics (summed over the ranks)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="checkpoint file, written atomically by rank 0")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                        help="save the checkpoint after every K-th generation (and at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --checkpoint (every rank reads it)")
    args = parser.parse_args(argv)
    if (args.checkpoint_every is not None or args.resume) and args.checkpoint is None:
        parser.error("--checkpoint-every and --resume need --checkpoint PATH")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.resume and not os.path.isfile(args.checkpoint):
        parser.error(f"--resume: no checkpoint at {args.checkpoint!r}")

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
            observation_normalization=args.observation_normalization,
        )
        searcher = EGGROLL(problem, popsize=popsize, sigma=0.1, lr=0.05, rank=1, seed=args.seed,
                           distributed=True)
        settings = dict(popsize=popsize, seed=args.seed, hidden=hidden, episode_length=episode_length,
                        observation_normalization=bool(args.observation_normalization), world=world)
        if args.resume:
            restore_checkpoint(torch.load(args.checkpoint, map_location="cpu", weights_only=True),
                               searcher, problem, settings, device)
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
            if args.resume:
                print(f"resumed from {args.checkpoint} after generation {searcher.step_count}", flush=True)

        def save() -> None:
            if rank == 0:
                save_atomically(checkpoint_state(searcher, problem, settings), args.checkpoint)

        start = time.perf_counter()
        mean_return = float("nan") if searcher.status["mean_eval"] is None else float(searcher.status["mean_eval"])
        while searcher.step_count < generations and not mean_return >= target:
            searcher.step()
            # a global status value: every rank sees the same number and stops together
            mean_return = float(searcher.status["mean_eval"])
            if args.checkpoint_every and searcher.step_count % args.checkpoint_every == 0:
                save()
        if args.checkpoint is not None:
            save()
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
