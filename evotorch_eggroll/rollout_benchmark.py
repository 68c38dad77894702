"""Rollout throughput: env-steps per second of whole RL generations.

``python -m evotorch_eggroll.rollout_benchmark`` (also ``python -m
evotorch_eggroll.benchmark --rollout``) times, on one device and in one process:

* ``eggroll``: a generation as users run it, ``EGGROLL(EggrollVecGymNE(env, policy))``
  with default settings and rank 1: rollout (fixed episode cap, alive masks) plus update.
  The first generation (kernel compilation, factor drawing, graph capture) is reported
  apart; the rest are the median of the timed generations. Env-steps per generation are
  ``N × steps run`` (every environment, ended or not, as in the JAX loop).
* ``plain eager`` / ``plain graph``: the unperturbed policy (shared weights) on the same
  environment and the same steps, step by step, and with the whole episode in one CUDA
  graph: the limit.
* ``jax``: the JAX reference rollout (when ``jax`` is importable): ``jit`` of one
  generation — factors drawn once (antithetic pairs, bias noise), ``lax.scan`` over the
  steps with ``vmap`` over members, the same dynamics in float32, then the same z-score
  and gradient update — timed wall-clock after warm-up like ours, with float32 matrix
  products in full precision (as ours without the TF32 switch).

Environments: the package's torch-native CartPole (4 → 64 → 64 → 2 tanh policy) and, for
the RL MLP 17 → 256 → 256 → 6, a linear point-mass task with a 17-D state and 6-D
continuous actions (no termination; a benchmark fixture, defined here for torch and JAX).
All times are wall-clock from a synchronised start.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
import torch
from torch import nn

__all__ = ["PointMass", "cartpole_policy", "rl_mlp_policy", "run", "main"]


class PointMass(gym.vector.VectorEnv):
    """A benchmark task: ``num_envs`` points in 17-D pushed by 6-D actions.

    ``s' = 0.95 s + 0.05 tanh(a) M`` with a fixed ``(6, 17)`` matrix ``M``; reward
    ``-mean(s'^2)``; never terminates, truncates after ``max_episode_steps``. Torch-native,
    state updated in place (no random draws after reset).
    """

    metadata = {"autoreset_mode": None}

    def __init__(self, num_envs: int, *, device: Any = None, max_episode_steps: int = 1000) -> None:
        from gymnasium.vector.utils import batch_space

        self.num_envs = int(num_envs)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_episode_steps = int(max_episode_steps)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        g = torch.Generator().manual_seed(7)
        self.mixing = torch.randn(6, 17, generator=g).to(self.device)
        self.state = torch.zeros(self.num_envs, 17, device=self.device)
        self.steps = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self.cuda_graph_generators: list = []

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.state.copy_(torch.randn(self.num_envs, 17, generator=g))
        self.steps.zero_()
        return self.state.clone(), {}

    def step(self, actions):
        a = torch.as_tensor(actions, device=self.device, dtype=torch.float32).reshape(self.num_envs, 6)
        self.state.mul_(0.95).add_(0.05 * torch.tanh(a) @ self.mixing)
        self.steps += 1
        reward = -(self.state * self.state).mean(dim=1)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        truncated = self.steps >= self.max_episode_steps
        return self.state.clone(), reward, terminated, truncated, {}


def cartpole_policy(obs_length: int, act_length: int) -> nn.Module:
    return nn.Sequential(nn.Linear(obs_length, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, act_length))


def rl_mlp_policy(obs_length: int, act_length: int) -> nn.Module:
    return nn.Sequential(nn.Linear(obs_length, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, act_length))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eggroll(env_fn: Callable, policy: Callable, n: int, steps: int, generations: int,
                 device: torch.device) -> dict:
    """Time ``generations`` EGGROLL generations (after a first one, reported apart)."""
    from .algorithms import EGGROLL
    from .neuroevolution import EggrollVecGymNE

    problem = EggrollVecGymNE(env_fn, policy, episode_length=steps, device=device)
    searcher = EGGROLL(problem, popsize=n, rank=1)
    _sync(device)
    t0 = time.perf_counter()
    searcher.step()
    _sync(device)
    first = time.perf_counter() - t0
    times, run_steps = [], []
    for _ in range(generations):
        _sync(device)
        t0 = time.perf_counter()
        searcher.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        run_steps.append(problem.last_rollout_steps)
    gen = statistics.median(times)
    steps_run = statistics.median(run_steps)
    return {"first_s": first, "gen_s": gen, "steps": steps_run, "rate": n * steps_run / gen,
            "replayed": getattr(problem, "_captured", None) is not None}


def time_plain(env_fn: Callable, policy_fn: Callable, n: int, steps: int, device: torch.device,
               reps: int) -> dict:
    """The unperturbed policy on the same environment: ``steps`` steps eager, and the whole
    episode captured in one CUDA graph (GPU only)."""
    env = env_fn(num_envs=n, device=device)
    obs_len = int(np.prod(env.single_observation_space.shape))
    act_space = env.single_action_space
    discrete = isinstance(act_space, gym.spaces.Discrete)
    act_len = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    net = policy_fn(obs_len, act_len).to(device)
    obs0, _ = env.reset(seed=0)
    obs = obs0.clone()
    returns = torch.zeros(n, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)

    @torch.no_grad()
    def episode() -> None:
        for _ in range(steps):
            out = net(obs)
            act = out.argmax(dim=1) if discrete else out
            o, r, te, tr, _ = env.step(act)
            returns.add_(r * alive)
            alive.logical_and_(~(te | tr))
            obs.copy_(o)

    def start() -> None:
        env.reset(seed=0)
        obs.copy_(obs0)
        returns.zero_()
        alive.fill_(True)

    result = {}
    start()
    episode()  # warm-up
    samples = []
    for _ in range(reps):
        start()
        _sync(device)
        t0 = time.perf_counter()
        episode()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    result["eager_rate"] = n * steps / statistics.median(samples)
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        for gen in getattr(env, "cuda_graph_generators", []):
            graph.register_generator_state(gen)
        start()
        with torch.cuda.graph(graph):
            episode()
        samples = []
        for _ in range(reps):
            start()
            _sync(device)
            t0 = time.perf_counter()
            graph.replay()
            _sync(device)
            samples.append(time.perf_counter() - t0)
        result["graph_rate"] = n * steps / statistics.median(samples)
    return result


def time_jax(task: str, n: int, steps: int, reps: int, sigma: float = 0.1, lr: float = 0.01) -> Optional[float]:
    """Env-steps/s of the JAX reference generation (rollout + update), or None without jax."""
    # JAX would otherwise take 75% of the GPU's memory when it starts, out of reach of the
    # torch cases measured after it in the same process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    sizes = (4, 64, 64, 2) if task == "cartpole" else (17, 256, 256, 6)
    key = jax.random.PRNGKey(0)
    params = []
    for i in range(3):
        key, k1 = jax.random.split(key)
        bound = 1.0 / math.sqrt(sizes[i])
        params.append((jax.random.uniform(k1, (sizes[i + 1], sizes[i]), minval=-bound, maxval=bound),
                       jnp.zeros((sizes[i + 1],))))
    half = n // 2
    sign = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    pair = jnp.arange(n) // 2
    mixing = jax.random.normal(jax.random.PRNGKey(7), (6, 17))

    def policy(ps, noise, obs, member):
        h = obs
        s = sign[member] * sigma
        for i, ((w, b), (a0, b0, eb)) in enumerate(zip(ps, noise)):
            k = pair[member]
            h = h @ w.T + b + s * (h @ b0[k]) @ a0[k].T + s * eb[k]
            if i < 2:
                h = jnp.tanh(h)
        return h

    def env_step(state, out):
        if task == "cartpole":
            x, x_dot, th, th_dot = state
            force = jnp.where(jnp.argmax(out) > 0, 10.0, -10.0)
            c, sn = jnp.cos(th), jnp.sin(th)
            temp = (force + 0.05 * th_dot * th_dot * sn) / 1.1
            thacc = (9.8 * sn - c * temp) / (0.5 * (4.0 / 3.0 - 0.1 * c * c / 1.1))
            xacc = temp - 0.05 * thacc * c / 1.1
            new = jnp.stack([x + 0.02 * x_dot, x_dot + 0.02 * xacc, th + 0.02 * th_dot, th_dot + 0.02 * thacc])
            done = (jnp.abs(new[0]) > 2.4) | (jnp.abs(new[2]) > 12 * 2 * math.pi / 360)
            return new, 1.0, done
        new = 0.95 * state + 0.05 * jnp.tanh(out) @ mixing
        return new, -jnp.mean(new * new), False

    def member_rollout(ps, noise, state0, member):
        def body(carry, _):
            state, alive, ret = carry
            out = policy(ps, noise, state if task == "cartpole" else state, member)
            state, r, done = env_step(state, out)
            ret = ret + jnp.where(alive, r, 0.0)
            return (state, alive & ~jnp.asarray(done, dtype=bool), ret), None

        (_, _, ret), _ = jax.lax.scan(body, (state0, jnp.asarray(True), jnp.asarray(0.0)), None,
                                      length=steps)
        return ret

    @jax.jit
    def generation(ps, key):
        keys = jax.random.split(key, 4)
        noise = []
        for i, (w, _) in enumerate(ps):
            ka, kb, ke = jax.random.split(jax.random.fold_in(keys[0], i), 3)
            m, nn_ = w.shape
            noise.append((jax.random.normal(ka, (half, m, 1)), jax.random.normal(kb, (half, nn_, 1)),
                          jax.random.normal(ke, (half, m))))
        dim = 4 if task == "cartpole" else 17
        states = jax.random.uniform(keys[1], (n, dim), minval=-0.05, maxval=0.05)
        fit = jax.vmap(member_rollout, in_axes=(None, None, 0, 0))(ps, noise, states, jnp.arange(n))
        shaped = (fit - fit.mean()) / jnp.sqrt(fit.var() + 1e-8)
        pair_w = shaped[0::2] - shaped[1::2]  # antithetic pairs share one draw
        new = []
        for (w, b), (a0, b0, eb) in zip(ps, noise):
            gw = sigma * jnp.einsum("k,kmr,knr->mn", pair_w, a0, b0) / math.sqrt(n)
            gb = sigma * jnp.einsum("k,km->m", pair_w, eb) / math.sqrt(n)
            new.append((w + lr * gw, b + lr * gb))
        return new, fit

    ps = params
    samples = []
    # float32 products in full precision, like the package's default (TF32 off)
    with jax.default_matmul_precision("float32"):
        for _ in range(2):
            ps, fit = generation(ps, key)
            fit.block_until_ready()
        for i in range(reps):
            t0 = time.perf_counter()
            ps, fit = generation(ps, jax.random.fold_in(key, i))
            fit.block_until_ready()
            samples.append(time.perf_counter() - t0)
    return n * steps / statistics.median(samples)


def run(populations: list[int], tasks: list[str], steps: int, generations: int, jax_reps: int,
        device: torch.device) -> list[dict]:
    from .envs import CartPole

    rows = []
    for task in tasks:
        env_fn, policy = (CartPole, cartpole_policy) if task == "cartpole" else (PointMass, rl_mlp_policy)
        for n in populations:
            row = {"task": task, "N": n}
            row.update(time_eggroll(env_fn, policy, n, steps, generations, device))
            row.update(time_plain(env_fn, policy, n, steps, device, reps=max(3, generations)))
            row["jax_rate"] = time_jax(task, n, steps, jax_reps) if device.type == "cuda" and jax_reps else None
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _run_quietly(populations: list[int], tasks: list[str], steps: int, generations: int,
                 jax_reps: int, device: str) -> list[dict]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return run(populations, tasks, steps, generations, jax_reps, torch.device(device))


def run_isolated(populations: list[int], tasks: list[str], steps: int, generations: int,
                 jax_reps: int, device: torch.device) -> list[dict]:
    """:func:`run` in a freshly spawned process, its rows printed here: the measurement gets
    its own CUDA context and memory pools, untouched by whatever the calling process holds
    (cached blocks of torch and JAX, captured graphs), as in ``python -m`` runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = pool.submit(_run_quietly, list(populations), list(tasks), steps, generations,
                           jax_reps, str(device)).result()
    for row in rows:
        print(_format_row(row), flush=True)
    return rows


def _m(rate: Optional[float]) -> str:
    return "-" if rate is None else f"{rate / 1e6:9.1f}"


HEADER = (f"{'task':9} {'N':>7} {'eggroll M/s':>11} {'gen ms':>8} {'steps':>5} {'first s':>7} "
          f"{'plain eager':>11} {'plain graph':>11} {'jax M/s':>9} replayed")


def _format_row(r: dict) -> str:
    return (f"{r['task']:9} {r['N']:>7} {_m(r['rate']):>11} {r['gen_s'] * 1e3:8.2f} {r['steps']:>5.0f} "
            f"{r['first_s']:7.2f} {_m(r.get('eager_rate')):>11} {_m(r.get('graph_rate')):>11} "
            f"{_m(r.get('jax_rate')):>9} {r['replayed']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--populations", default="4096,65536,262144" if cuda else "8",
                        help="comma-separated population sizes")
    parser.add_argument("--tasks", default="cartpole,rl_mlp", help="cartpole and/or rl_mlp")
    parser.add_argument("--steps", type=int, default=200 if cuda else 3, help="episode cap (steps)")
    parser.add_argument("--generations", type=int, default=5 if cuda else 1, help="timed generations")
    parser.add_argument("--jax-reps", type=int, default=5, help="timed JAX generations (0: no JAX)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        print("# no GPU: tiny sizes through Triton's interpreter; the numbers only show that it runs")
    print("# env-steps/s in millions, wall-clock; eggroll = rollout + update per generation", flush=True)
    print(HEADER, flush=True)
    run([int(v) for v in args.populations.split(",")], args.tasks.split(","), args.steps,
        args.generations, args.jax_reps, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
