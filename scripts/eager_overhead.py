"""Host time of eager ``pop.batched_forward`` calls of the RL MLP, against the plain forward.

    python scripts/eager_overhead.py [--populations 2048,16384] [--rounds 9] [--calls 400]

Needs a CUDA device. For the RL policy of the rollout benchmark (17 -> 256 -> 256 -> 6,
tanh, float32) at each population size N (N rows, one per member, rank 4), in one
process, it times back-to-back eager calls of:

- ``plain``: ``model(x)`` under ``torch.no_grad()`` (cuBLAS and elementwise launches);
- ``ours``: ``pop.batched_forward(model, x)`` inside ``with strategy.perturb(N) as pop``
  (the factors drawn at the first call, so every call is one drawn-MLP launch);
- ``ours+ids``: the same with ``member_ids`` given (one unchanged tensor, as an
  evaluation loop passes it);
- ``launch``: the drawn-MLP launcher alone (``kernels.drawn_mlp.drawn_mlp`` with the
  layers prepared once): our launch wrapper and Triton's launcher, without the checks
  of ``batched_forward`` and of the fused path.

Each variant runs ``--calls`` calls without waiting for the device in between, then
synchronises once: ``wall`` is that elapsed time per call (the host's rate while the
device keeps up, or the device's when it cannot), ``host`` the time until the last call
returned (before the synchronisation). Rounds interleave the variants, and the figures are
medians over the rounds (this host's speed drifts between rounds). ``device`` is the
device time per call of ``ours`` and ``plain`` (CUDA events around replays of a CUDA graph
of 20 calls), the floor that host time alone cannot go below. The last column is the ratio
to ``plain``'s wall time. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from evotorch_eggroll import EggrollStrategy, fused_mlp
from evotorch_eggroll.kernels import drawn_mlp
from evotorch_eggroll.rollout_benchmark import rl_mlp_policy
from sweep_drawn_mlp import timed as _device_time  # device µs per call of a captured loop

OBS, ACT, RANK = 17, 6, 4


def _loop(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """``(host, wall)`` microseconds per call of ``calls`` back-to-back calls."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return (host - start) * 1e6 / calls, (end - start) * 1e6 / calls


def measure(n: int, rounds: int, calls: int) -> None:
    torch.manual_seed(0)
    model = rl_mlp_policy(OBS, ACT).cuda()
    strategy = EggrollStrategy(sigma=0.1, rank=RANK).setup(model)
    x = torch.randn(n, OBS, device="cuda")
    ids = torch.arange(n, device="cuda")
    with torch.no_grad(), strategy.perturb(n) as pop:
        if not pop.cache_factors():
            sys.exit("the factors were not drawn (factor cache budget too small?)")
        evolved, coords, cache = pop._evolved, pop.coords, pop._cache
        layers: list = []
        real = drawn_mlp.drawn_mlp
        drawn_mlp.drawn_mlp = lambda x, specs, *a, **k: layers.extend(specs) or real(
            x, specs, *a, **k)
        try:
            if fused_mlp.try_forward(model, x, ids, evolved, coords, cache) is None:
                sys.exit("batched_forward does not take the one-launch path for this model")
        finally:
            drawn_mlp.drawn_mlp = real
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        variants: dict[str, Callable[[], object]] = {
            "plain": lambda: model(x),
            "ours": lambda: pop.batched_forward(model, x),
            "ours+ids": lambda: pop.batched_forward(model, x, member_ids=ids),
            "launch": lambda: drawn_mlp.drawn_mlp(
                x, layers, ids, rank=coords.rank, scale=coords.lowrank_scale,
                bias_scale=coords.sigma, antithetic=coords.antithetic, precision=precision),
        }
        for fn in variants.values():  # compile, warm the allocator and the caches
            _loop(fn, 20)
        host: dict[str, list[float]] = {k: [] for k in variants}
        wall: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                h, w = _loop(fn, calls)
                host[name].append(h)
                wall[name].append(w)
        device = {k: _device_time(variants[k], reps=20) for k in ("plain", "ours")}
    base = statistics.median(wall["plain"])
    print(f"RL MLP {OBS}->256->256->{ACT}, N = {n}, rank {RANK}: per call, medians of "
          f"{rounds} rounds x {calls} calls")
    print(f"  {'variant':<9} {'wall us':>9} {'host us':>9} {'device us':>10} {'/ plain':>8}")
    for name in variants:
        w, h = statistics.median(wall[name]), statistics.median(host[name])
        d = f"{device[name]:10.1f}" if name in device else f"{'':>10}"
        print(f"  {name:<9} {w:9.1f} {h:9.1f} {d} {w / base:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="2048,16384",
                        help="comma-separated population sizes (rows per call)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=400, help="calls per variant and round")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("eager_overhead.py needs a CUDA device")
    for n in (int(v) for v in args.populations.split(",")):
        measure(n, args.rounds, args.calls)


if __name__ == "__main__":
    main()
