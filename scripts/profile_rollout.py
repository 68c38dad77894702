"""Where one EGGROLL generation on the torch CartPole spends its time (CUDA only).

    python scripts/profile_rollout.py --population 65536 --steps 200

Runs two generations (compilation, drawing, capture), then profiles a third with
``torch.profiler`` and prints the kernels by total device time, the wall-clock time and
the summed device time; with ``--host``, a fourth generation under cProfile (host time);
with ``--timeline``, when each stage of a generation starts on the host and how long it
takes; with ``--syncs``, the places in the package where a generation makes the host wait for the
device (``torch.cuda.set_sync_debug_mode``), with their counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import EggrollVecGymNE
from evotorch_eggroll.rollout_benchmark import cartpole_policy


@contextlib.contextmanager
def _wrapped(patches, wrap):
    """Replaces each ``owner.name`` of ``patches`` by ``wrap("Owner.name", original)`` and
    puts the originals back on exit."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
    for owner, name, fn in saved:
        setattr(owner, name, wrap(f"{owner.__name__.rsplit('.', 1)[-1]}.{name}", fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _generation(searcher) -> float:
    """One generation synchronised at both ends; its wall-clock seconds."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    searcher.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def phases(searcher, problem) -> None:
    """Host wall-clock of a generation's phases: every graph replay call, every wait for the
    device between chunks, the strategy's update (``_step``: it queues the update behind
    the rollout, so its one read of the checks and metrics waits for the rollout's last
    chunks), and the rest."""
    from evotorch_eggroll import neuroevolution, strategy

    spans: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans.setdefault(name, []).append(time.perf_counter() - t0)
        return wrapper

    patches = [(torch.cuda.CUDAGraph, "replay"), (neuroevolution._CapturedRollout, "run"),
               (strategy.EvolutionStrategy, "_step"), (type(problem), "_evaluate_members")]
    with _wrapped(patches, timed):
        for _ in range(3):
            spans.clear()
            wall = _generation(searcher)
            print(f"generation {wall * 1e3:.2f} ms: " + ", ".join(
                f"{k} {len(v)}x {sum(v) * 1e3:.2f} ms" for k, v in spans.items()))


def timeline(searcher, problem) -> None:
    """The host's timeline of one generation: when each stage starts and how long it takes
    (milliseconds from the generation's start; nested stages indented). What runs after the
    step's one read of its checks and metrics, and before the next generation's first
    graph replay, is time in which the device has nothing queued."""
    from evotorch_eggroll import context, strategy
    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.neuroevolution import _CapturedRollout

    events: list[tuple[float, float, int, str]] = []
    depth = [0]

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                events.append((t0, time.perf_counter() - t0, depth[0], name))
        return wrapper

    patches = [(EGGROLL, "_step"), (EGGROLL, "_fitness_stage"), (EGGROLL, "_warn_if_equal"),
               (EGGROLL, "_remember"), (strategy.EvolutionStrategy, "perturb"),
               (strategy.EvolutionStrategy, "_step"), (strategy.EvolutionStrategy, "_step_weights"),
               (strategy.EvolutionStrategy, "_negative_gradients"),
               (strategy.EvolutionStrategy, "_apply_update"), (strategy, "_host_values"),
               (context.PerturbationContext, "cache_factors"), (type(problem), "_evaluate_members"),
               (type(problem), "_replayable"), (_CapturedRollout, "start"), (_CapturedRollout, "run"),
               (torch.cuda.CUDAGraph, "replay")]
    with _wrapped(patches, timed):
        for _ in range(2):
            events.clear()
            t0 = time.perf_counter()
            wall = _generation(searcher)
    print(f"host timeline of one generation ({wall * 1e3:.2f} ms, synchronised at both ends):")
    for start, span, level, name in sorted(events):
        print(f"  {(start - t0) * 1e3:8.3f} ms  {'  ' * level}{name} {span * 1e3:.3f} ms")


def syncs(searcher) -> None:
    """One generation with PyTorch's synchronisation debug mode on: every operation that
    makes the host wait for the device, counted by the innermost line of this package
    (or of EvoTorch) that led to it. Explicit ``torch.cuda.synchronize`` calls and graph
    replays are not reported by the debug mode."""
    places: collections.Counter = collections.Counter()

    def where() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "evotorch_eggroll" in frame.filename or "/evotorch/" in frame.filename:
                name = frame.filename.split("site-packages/")[-1].split("/work/")[-1]
                return f"{name}:{frame.lineno} {frame.name}: {frame.line}"
        return "elsewhere"

    def show(message, category, filename, lineno, file=None, line=None):
        places[where()] += 1

    torch.cuda.synchronize()
    saved = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            searcher.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved
    print(f"host waits for the device in one generation: {sum(places.values())}")
    for place, count in places.most_common():
        print(f"{count:6d}  {place}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--population", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--phases", action="store_true",
                        help="also time the host phases of a generation (no profiler)")
    parser.add_argument("--syncs", action="store_true",
                        help="also count where a generation makes the host wait for the device")
    parser.add_argument("--timeline", action="store_true",
                        help="also print the host's timeline of one generation's stages")
    parser.add_argument("--host", action="store_true",
                        help="also profile a generation's Python with cProfile (host time)")
    args = parser.parse_args()
    problem = EggrollVecGymNE(CartPole, cartpole_policy, episode_length=args.steps, device="cuda")
    searcher = EGGROLL(problem, popsize=args.population, rank=1)
    for _ in range(2):
        searcher.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        searcher.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    print(f"N={args.population} steps run={problem.last_rollout_steps} wall={wall * 1e3:.2f} ms "
          f"device (sum of kernels)={device_us / 1e3:.2f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.phases:
        phases(searcher, problem)
    if args.timeline:
        timeline(searcher, problem)
    if args.syncs:
        syncs(searcher)
    if args.host:
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        searcher.step()
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.rows * 2)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
