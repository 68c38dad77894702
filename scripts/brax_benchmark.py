"""Env-steps/s and learning curves on a Brax environment: EGGROLL vs EvoTorch's PGPE.

EGGROLL runs through ``EggrollVecGymNE("brax::<env>")`` (the JAX environment adapter,
DLPack hand-over, one environment per member) at each ``--popsizes`` entry; EvoTorch's PGPE
runs on EvoTorch's own ``VecGymNE("brax::<env>")`` with the same network. EvoTorch 0.6's
Brax path calls JAX functions that newer JAX releases removed (``jax.tree_map``,
``jax.dlpack.to_dlpack``); where it fails, the script says so and runs PGPE on
``EggrollVecGymNE("brax::<env>")`` instead (stock EvoTorch searchers evaluate materialised
parameter vectors there), so the simulator is the same either way.

For each run it prints one line per generation (mean, best and center-free population
statistics as the searcher reports them, seconds, environment steps) and a summary:

* env-steps/s: sub-environment steps simulated per second (every member's environment,
  also after its episode ended, until all ended or ``--episode-length``), the simulator's
  throughput;
* agent-steps/s: steps of members whose episode was still running (EvoTorch's
  ``interaction_count``), what the search used.

The first generation of each run compiles the environment's JAX functions (and Triton
kernels) and is timed separately. Typical GPU command::

    python scripts/brax_benchmark.py --env ant --popsizes 4096 16384 --generations 20 \
        --pgpe-popsize 4096 --json brax_ant.json

Needs ``pip install 'evotorch-eggroll[brax]'`` and the JAX build for the GPU's CUDA
(``jax[cuda12]``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch

from evotorch_eggroll.benchmark import _synchronize as _sync


def run(label: str, searcher: Any, problem: Any, generations: int, steps_of: Callable[[], int],
        device: torch.device) -> dict:
    """Warm-up generation, then ``generations`` timed ones; returns the record."""
    _sync(device)
    t0 = time.perf_counter()
    searcher.step()
    _sync(device)
    warmup = time.perf_counter() - t0
    print(f"[{label}] generation 1 (compiles): {warmup:.1f} s, mean_eval {searcher.status['mean_eval']:.2f}")
    curve = []
    total_time = 0.0
    env_steps = 0
    agent_start = problem.interaction_count
    for gen in range(2, generations + 2):
        _sync(device)
        t = time.perf_counter()
        searcher.step()
        _sync(device)
        dt = time.perf_counter() - t
        steps = steps_of()
        total_time += dt
        env_steps += steps
        status = searcher.status
        curve.append(dict(generation=gen, mean_eval=float(status["mean_eval"]),
                          pop_best_eval=float(status["pop_best_eval"]), seconds=dt, env_steps=steps))
        print(f"[{label}] generation {gen}: mean {status['mean_eval']:.2f}  best {status['pop_best_eval']:.2f}  "
              f"{dt:.2f} s  {steps / dt:,.0f} env-steps/s")
    agent_steps = problem.interaction_count - agent_start
    record = dict(label=label, warmup_seconds=warmup, seconds=total_time, env_steps=env_steps,
                  env_steps_per_s=env_steps / total_time if total_time else float("nan"),
                  agent_steps_per_s=agent_steps / total_time if total_time else float("nan"), curve=curve)
    print(f"[{label}] {generations} generations in {total_time:.1f} s: {record['env_steps_per_s']:,.0f} "
          f"env-steps/s, {record['agent_steps_per_s']:,.0f} agent-steps/s")
    return record


def eggroll_run(args: argparse.Namespace, popsize: int, network: str, device: torch.device) -> dict:
    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(args.seed)
    problem = EggrollVecGymNE(f"brax::{args.env}", network, device=device, seed=args.seed,
                              env_config={"episode_length": args.episode_length, "backend": args.backend},
                              observation_normalization=args.obs_norm)
    searcher = EGGROLL(problem, popsize=popsize, sigma=args.sigma, lr=args.lr, rank=args.rank, seed=args.seed)
    return run(f"EGGROLL popsize {popsize}", searcher, problem, args.generations,
               lambda: problem.last_rollout_steps * popsize, device)


def pgpe_run(args: argparse.Namespace, network: str, device: torch.device) -> dict:
    from evotorch.algorithms import PGPE
    from evotorch.neuroevolution import VecGymNE

    popsize = args.pgpe_popsize
    config = {"episode_length": args.episode_length, "backend": args.backend}
    pgpe = dict(popsize=popsize, center_learning_rate=args.pgpe_center_lr, stdev_learning_rate=0.1,
                stdev_init=args.sigma, optimizer="clipup", optimizer_config={"max_speed": 2 * args.pgpe_center_lr})
    torch.manual_seed(args.seed)
    try:
        problem = VecGymNE(f"brax::{args.env}", network, env_config=config, device=device,
                           observation_normalization=args.obs_norm, num_actors=0)
        searcher = PGPE(problem, **pgpe)
        label = f"PGPE + evotorch VecGymNE popsize {popsize}"
        searcher.step()  # fails here when EvoTorch's Brax path does not work with this JAX
    except Exception as err:  # noqa: BLE001 - report and fall back to the same env through our adapter
        print(f"EvoTorch's VecGymNE('brax::{args.env}') does not run here ({type(err).__name__}: {err}); "
              "PGPE runs on EggrollVecGymNE('brax::...') instead")
        from evotorch_eggroll.neuroevolution import EggrollVecGymNE

        torch.manual_seed(args.seed)
        problem = EggrollVecGymNE(f"brax::{args.env}", network, env_config=config, device=device, seed=args.seed,
                                  observation_normalization=args.obs_norm)
        searcher = PGPE(problem, **pgpe)
        label = f"PGPE + EggrollVecGymNE popsize {popsize}"
    before = {"n": problem.interaction_count}

    def steps() -> int:
        if hasattr(problem, "last_rollout_steps"):  # our adapter: every environment's steps
            return problem.last_rollout_steps * popsize
        # EvoTorch's VecGymNE does not expose the steps of ended environments: agent-steps
        now = problem.interaction_count
        done, before["n"] = now - before["n"], now
        return done

    return run(label, searcher, problem, args.generations, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ant")
    parser.add_argument("--backend", default="generalized", help="Brax physics backend (generalized, mjx, ...)")
    parser.add_argument("--popsizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--generations", type=int, default=20, help="timed generations (after one warm-up)")
    parser.add_argument("--episode-length", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--obs-norm", action="store_true", help="observation normalisation (both searchers)")
    parser.add_argument("--pgpe-popsize", type=int, default=4096)
    parser.add_argument("--pgpe-center-lr", type=float, default=0.01)
    parser.add_argument("--skip-pgpe", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every record here")
    args = parser.parse_args()

    import jax

    device = torch.device(args.device)
    network = f"Linear(obs_length, {args.hidden}) >> Tanh() >> Linear({args.hidden}, act_length)"
    env_info = dict(torch=torch.__version__, jax=jax.__version__, python=platform.python_version(),
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                    args=vars(args))
    print(json.dumps({k: v for k, v in env_info.items() if k != "args"}))
    records = [eggroll_run(args, n, network, device) for n in args.popsizes]
    if not args.skip_pgpe:
        records.append(pgpe_run(args, network, device))
    print("\nsummary")
    for r in records:
        print(f"  {r['label']:45s} {r['env_steps_per_s']:>14,.0f} env-steps/s  "
              f"final mean_eval {r['curve'][-1]['mean_eval'] if r['curve'] else float('nan'):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env_info, records=records), f, indent=1)


if __name__ == "__main__":
    main()
