"""Long-run checks on a GPU: memory stays flat and equal seeds give equal results.

    python scripts/soak.py                      # 1,000 generations / steps per part
    python scripts/soak.py --generations 100    # a shorter pass

Three parts, each run twice with the same seed:

* ``captured``: ``EGGROLL`` + ``EggrollVecGymNE`` on the torch CartPole (4 -> 64 -> 64 -> 2
  tanh policy, rank 1), whose steps are captured in CUDA graphs and replayed;
* ``eager``: the same with an environment that does not declare in-place state, so every
  step runs eagerly (shorter episodes: the eager loop is bound by host work);
* ``native-bf16``: the native API on a bfloat16 MLP (``EggrollStrategy``, Adam, rank 4),
  regressing a fixed random target.

For each part: allocated GPU memory after the warm-up and at the end (``torch.cuda.
memory_allocated``: live tensors, so it must not grow) and the growth in bytes (the larger
of the two runs), the peak, the process's resident
host memory after the warm-up and at the end, and whether the two runs ended bit-identical.
The test suite runs a short version (tests/evotorch_tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

WARMUP = 10  # generations/steps before the baseline is taken (compilation, capture, caches)


@dataclass
class SoakResult:
    part: str
    iterations: int
    seconds: float
    allocated_warm: int  # bytes of live tensors after the warm-up
    allocated_end: int
    peak: int
    rss_warm: int  # resident host bytes after the warm-up
    rss_end: int
    final: torch.Tensor  # the parameters at the end, for comparing runs


def rss_bytes() -> int:
    """Resident set size of this process (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _settled(device: torch.device) -> None:
    """The device idle and unreachable objects collected, so that objects left by earlier
    runs in this process (a dropped searcher's CUDA graphs and buffers, in reference
    cycles) are not freed between this run's two measurements and counted against it."""
    gc.collect()
    torch.cuda.synchronize(device)


def _measure(part: str, iterations: int, device: torch.device, step: Callable[[], None],
             final: Callable[[], torch.Tensor]) -> SoakResult:
    _settled(device)
    t0 = time.perf_counter()
    warm_alloc = warm_rss = 0
    for i in range(iterations):
        step()
        if i + 1 == min(WARMUP, iterations):
            _settled(device)
            warm_alloc, warm_rss = torch.cuda.memory_allocated(device), rss_bytes()
            torch.cuda.reset_peak_memory_stats(device)
    _settled(device)
    return SoakResult(part, iterations, time.perf_counter() - t0, warm_alloc,
                      torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
                      warm_rss, rss_bytes(), final().detach().clone().cpu())


def rollout_soak(generations: int, popsize: int, steps: int, captured: bool,
                 device: torch.device, seed: int = 0) -> SoakResult:
    """``generations`` EGGROLL generations on the torch CartPole, captured or eager."""
    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.envs import CartPole
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE
    from evotorch_eggroll.rollout_benchmark import cartpole_policy

    env_class = CartPole if captured else _eager_cartpole()
    torch.manual_seed(seed)
    problem = EggrollVecGymNE(env_class, cartpole_policy, episode_length=steps, device=device,
                              seed=seed)
    searcher = EGGROLL(problem, popsize=popsize, rank=1, seed=seed)
    part = "captured" if captured else "eager"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "runs on the GPU but does not declare", RuntimeWarning)
        return _measure(part, generations, device, searcher.step,
                        lambda: searcher.status["center"])


def native_bf16_soak(steps: int, popsize: int, device: torch.device, seed: int = 0) -> SoakResult:
    """``steps`` native-API updates of a bfloat16 MLP regressing a fixed random target."""
    from evotorch_eggroll import EggrollStrategy

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8)).to(device,
                                                                             torch.bfloat16)
    strategy = EggrollStrategy(sigma=0.05, lr=0.01, rank=4, optimizer="adam",
                               seed=seed).setup(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(popsize, 32, device=device, generator=gen).to(torch.bfloat16)
    target = torch.randn(popsize, 8, device=device, generator=gen)

    def step() -> None:
        with torch.no_grad(), strategy.perturb(popsize) as pop:
            out = pop.batched_forward(model, x)
            fitness = -(out.float() - target).pow(2).mean(-1)
        strategy.step(fitness)

    return _measure("native-bf16", steps, device, step,
                    lambda: torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]))


@functools.cache
def _eager_cartpole() -> type:
    """The torch CartPole without its declaration of in-place state: steps run eagerly."""
    from evotorch_eggroll.envs import CartPole

    class EagerCartPole(CartPole):
        def __getattribute__(self, name: str):
            if name == "cuda_graph_generators":
                raise AttributeError(name)
            return super().__getattribute__(name)

    return EagerCartPole


def run_part(part: str, iterations: int, device: torch.device, *, popsize: int,
             steps: int) -> SoakResult:
    """One run of ``part`` (``captured``, ``eager`` or ``native-bf16``)."""
    if part == "native-bf16":
        return native_bf16_soak(iterations, popsize, device)
    if part not in ("captured", "eager"):
        raise ValueError(f"unknown part {part!r}: captured, eager or native-bf16")
    return rollout_soak(iterations, popsize, steps, part == "captured", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--popsize", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200, help="episode length, captured part")
    parser.add_argument("--eager-steps", type=int, default=20, help="episode length, eager part")
    parser.add_argument("--parts", default="captured,eager,native-bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the soak runs on a CUDA GPU")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"{'part':<12} {'iters':>6} {'s':>7} {'alloc warm MiB':>15} {'alloc end MiB':>14} "
          f"{'growth B':>9} {'peak MiB':>9} {'rss warm MiB':>13} {'rss end MiB':>12} {'repeatable':>10}")
    mib = 1 << 20
    for part in args.parts.split(","):
        steps = args.eager_steps if part == "eager" else args.steps
        popsize = 1024 if part == "native-bf16" else args.popsize
        a = run_part(part, args.generations, device, popsize=popsize, steps=steps)
        b = run_part(part, args.generations, device, popsize=popsize, steps=steps)
        same = torch.equal(a.final, b.final)
        print(f"{part:<12} {a.iterations:>6} {a.seconds:>7.1f} {a.allocated_warm / mib:>15.2f} "
              f"{a.allocated_end / mib:>14.2f} "
              f"{max(a.allocated_end - a.allocated_warm, b.allocated_end - b.allocated_warm):>9d} "
              f"{a.peak / mib:>9.1f} {a.rss_warm / mib:>13.1f} "
              f"{b.rss_end / mib:>12.1f} {str(same):>10}", flush=True)


if __name__ == "__main__":
    main()
