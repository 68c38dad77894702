"""The EvoTorch searcher EGGROLL with ``distributed=True`` over real process groups.

This file is also the rank script (see ``tests/distributed_harness.py``): two Gloo ranks on
the CPU (Triton's interpreter), or two NCCL ranks with one GPU each in the ``gpu`` variant,
run every scenario below in one launch and save what they observed; the tests compare the
ranks with each other (bit for bit) and with single-process runs of the same seed and
population size (computed inside the launch, shared out over the ranks; equal up to float32
rounding, see ``_close_status``). Nothing runs a model in the test process itself: on a
CUDA machine it has no Triton interpreter, so the kernels would refuse the CPU models of
the Gloo ranks.

Covered: low-rank mode on the supervised adapter (common and per-member minibatches) and
on the RL adapter (Gymnasium sub-environments seeded per member, so the same episodes as in one
process; torch-native CartPole with observation normalisation, whose counters and
statistics must be global), dense mode on a plain vector problem (sharded SolutionBatch
evaluation), global status values identical on every rank, rank-0-only loggers
(``log_all_ranks`` to opt out), the world-size and seed checks, and unpickling a
distributed searcher where no process group exists. Failing ranks, each in a launch of its
own with the process group's timeout at 300 s: a rank whose evaluation raises (every rank
raises within seconds, nothing is updated, the run continues as if that generation had
never been evaluated) and a rank whose process dies (the other raises within seconds).
With one rank (Gloo, and NCCL in the ``gpu`` variant): the all-gather's checks are read with
the step's, before the problem's merge, and on a GPU nothing between the evaluation and
that read, or in the merge, reads a device value back.
"""

from __future__ import annotations

import pickle
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the tests folder: the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_harness import expect_error, launch, worker_main  # noqa: E402

HERE = Path(__file__).resolve()
WORLD = 2
PER_RANK = 4
GENERATIONS = 2
TIMEOUT_S = 300
EVALS = ("mean_eval", "median_eval", "pop_best_eval", "best_eval", "sigma", "stdev", "iter")


# -- problems ----------------------------------------------------------------------------

def _supervised(device, *, common: bool, seed, init_seed: int):
    from evotorch_eggroll.neuroevolution import EggrollSupervisedNE

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    data = torch.utils.data.TensorDataset(x, y)

    def network():
        torch.manual_seed(init_seed)  # a different initialisation on every rank
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    return EggrollSupervisedNE(data, network, nn.functional.mse_loss, minibatch_size=4,
                               common_minibatch=common, device=device, seed=seed)


def _policy(obs_length, act_length):
    return nn.Sequential(nn.Linear(obs_length, 4), nn.Tanh(), nn.Linear(4, act_length))


def _gym_rl(device):
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(0)
    return EggrollVecGymNE("CartPole-v1", _policy, env_config={"vectorization_mode": "sync"},
                           episode_length=4, device=device, seed=3)


def _torch_rl(device):
    from evotorch_eggroll.envs import CartPole
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(0)
    return EggrollVecGymNE(CartPole, _policy, episode_length=4, observation_normalization=True,
                           device=device, seed=4)


def _sphere(x):
    return (x**2).sum(-1)


def _dense(device, seed):
    from evotorch import Problem

    return Problem("min", _sphere, solution_length=6, initial_bounds=(-3, 3), vectorized=True,
                   seed=seed, device=device)


# -- the scenario run on every rank ------------------------------------------------------

def _status(searcher) -> dict:
    st = searcher.status
    out = {k: st[k] for k in EVALS}
    out["center"] = st["center"].detach().cpu().clone()
    for k in ("pop_best", "best"):
        out[k] = st[k].values.as_subclass(torch.Tensor).detach().cpu().clone()
    for k in ("total_interaction_count", "total_episode_count"):
        if k in st:
            out[k] = int(st[k])
    out["keys"] = sorted(st.keys())
    return out


def _run(searcher, generations: int = GENERATIONS) -> dict:
    calls = []
    searcher.log_hook.append(lambda status: calls.append(int(status["iter"])))
    searcher.run(generations)
    return dict(_status(searcher), log_calls=calls)


def scenario_searcher(rank: int, world: int, device: torch.device) -> dict:
    from evotorch.logging import StdOutLogger

    from evotorch_eggroll.algorithms import EGGROLL

    n = world * PER_RANK
    kw = dict(popsize=n, sigma=0.1, lr=0.05, rank=1, seed=5)
    res = {}
    jobs = []  # single-process references, shared out over the ranks

    # supervised, low-rank: a seed drawn per process and a different initialisation per
    # rank; the searcher adopts rank 0's problem seed and center
    for common in (True, False):
        name = f"supervised_{'common' if common else 'own'}"
        problem = _supervised(device, common=common, seed=None, init_seed=rank)
        searcher = EGGROLL(problem, distributed=True, **kw)
        if common:
            StdOutLogger(searcher)  # attached on every rank, prints on rank 0 only
        res[name] = _run(searcher)
        if common:
            res["pickled"] = torch.frombuffer(bytearray(pickle.dumps(searcher)), dtype=torch.uint8)
        seed0 = problem._seed_value
        jobs.append((name, lambda c=common, s=seed0: EGGROLL(
            _supervised(device, common=c, seed=s, init_seed=0), **kw)))

    # RL, low-rank, Gymnasium sub-environments seeded per member; loggers on every rank
    res["gym"] = _run(EGGROLL(_gym_rl(device), distributed=True, log_all_ranks=True, **kw))
    jobs.append(("gym", lambda: EGGROLL(_gym_rl(device), **kw)))

    # RL with observation normalisation: counters and statistics summed over the ranks
    problem = _torch_rl(device)
    res["obsnorm"] = _run(EGGROLL(problem, distributed=True, **kw), generations=1)
    stats = problem.get_observation_stats()
    res["obsnorm_stats"] = [t.detach().cpu().clone() for t in (stats.count, stats.sum, stats.sum_of_squares)]

    # dense mode, a plain problem: a different initial center per rank before the broadcast
    searcher = EGGROLL(_dense(device, seed=rank), distributed=True, chunk_size=3, **kw)
    center0 = searcher.status["center"].detach().clone()
    res["dense"] = _run(searcher)
    jobs.append(("dense", lambda: EGGROLL(_dense(device, seed=0), center_init=center0,
                                          chunk_size=3, **kw)))

    owner = {"supervised_common": 0, "supervised_own": 0, "gym": 1, "dense": 1}  # balanced
    for name, build in jobs:
        if owner[name] % world == rank:
            res[name + "_single"] = _run(build())

    # errors: the same on every rank, raised at construction, no hang
    res["popsize_msg"] = expect_error(
        lambda: EGGROLL(_dense(device, 0), popsize=n + 1, distributed=True), ValueError)
    res["seed_msg"] = expect_error(
        lambda: EGGROLL(_dense(device, 0), popsize=n, seed=rank, distributed=True), ValueError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res["lowrank_seed_msg"] = expect_error(
            lambda: EGGROLL(_gym_rl(device), popsize=n, seed=10 + rank, distributed=True), ValueError)
    return res


def after_searcher(rank: int, world: int, device: torch.device, results: dict) -> dict:
    """Once the process group is destroyed: rank 0 unpickles its distributed searcher, which
    must continue as a single-process searcher (on the rank's device, with its interpreter
    when on the CPU)."""
    from evotorch_eggroll.algorithms import EGGROLL  # noqa: F401  (the pickle refers to it)

    data = bytes(results.pop("pickled").numpy())  # not sent back
    if rank != 0:
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher = pickle.loads(data)
    out = dict(unpickled_warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
               unpickled_distributed=bool(searcher.distributed),
               unpickled_center=searcher.status["center"].detach().cpu().clone())
    searcher.step()
    out["unpickled_steps"] = searcher.step_count
    out["unpickled_center_after"] = searcher.status["center"].detach().cpu().clone()
    return out


# -- failing ranks --------------------------------------------------------------------------

def _flaky_cartpole():
    from evotorch_eggroll.envs import CartPole

    class FlakyCartPole(CartPole):
        """CartPole whose ``step`` raises once ``steps_left`` (when set) runs out. It does not
        declare in-place state, so on a GPU its steps run one by one instead of replaying a
        captured graph (a replay would not call ``step``)."""

        steps_left = None

        def __getattribute__(self, name):
            if name == "cuda_graph_generators":
                raise AttributeError(name)
            return super().__getattribute__(name)

        def step(self, actions):
            if FlakyCartPole.steps_left is not None:
                FlakyCartPole.steps_left -= 1
                if FlakyCartPole.steps_left < 0:
                    raise RuntimeError("the simulator crashed")
            return super().step(actions)

    return FlakyCartPole


def _flaky_rl(device, env):
    from evotorch_eggroll.neuroevolution import EggrollVecGymNE

    torch.manual_seed(0)
    return EggrollVecGymNE(env, _policy, episode_length=4, observation_normalization=True,
                           device=device, seed=4)


_SPHERE_FAILS = {"rank": None, "exit": False}


def _flaky_sphere(x):
    import os

    import torch.distributed as dist

    if _SPHERE_FAILS["rank"] in (dist.get_rank(), "all"):
        if _SPHERE_FAILS["exit"]:
            os._exit(17)  # as if killed: no exception, no clean-up
        raise FloatingPointError("the evaluation diverged")
    return (x**2).sum(-1)


def _flaky_dense(device):
    from evotorch import Problem

    return Problem("min", _flaky_sphere, solution_length=6, initial_bounds=(-3, 3), vectorized=True,
                   seed=0, device=device)


def _attempt(fn) -> dict:
    """Call ``fn``; what it raised (type, message, failures of a RankFailedError) and how
    long it took."""
    from evotorch_eggroll import RankFailedError

    start = time.monotonic()
    try:
        fn()
        out = dict(type=None, msg="", failures=None)
    except Exception as err:
        out = dict(type=type(err).__name__, msg=str(err),
                   failures=err.failures if isinstance(err, RankFailedError) else None)
    out["seconds"] = time.monotonic() - start
    return out


def _state(searcher) -> dict:
    """Everything a generation changes: center, counters, optimizer state and the problem's
    running state."""
    problem = searcher.problem
    out = dict(center=searcher.status["center"].detach().cpu().clone(), epoch=searcher.epoch,
               steps=searcher.step_count)
    for i, st in searcher.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    if hasattr(problem, "interaction_count"):
        stats = problem.get_observation_stats()
        out.update(interactions=problem.interaction_count, episodes=problem.episode_count,
                   resets=problem._num_resets,
                   stats=[t.detach().cpu().clone() for t in (stats.count, stats.sum, stats.sum_of_squares)])
    return out


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, list):
            if not all(torch.equal(x, y) for x, y in zip(v, w)):
                return False
        elif isinstance(v, torch.Tensor):
            if not torch.equal(v, w):
                return False
        elif v != w:
            return False
    return True


def scenario_failure(rank: int, world: int, device: torch.device) -> dict:
    from evotorch_eggroll.algorithms import EGGROLL

    n = world * PER_RANK
    kw = dict(popsize=n, sigma=0.1, lr=0.05, rank=1, seed=5)
    res = {}

    # RL with observation normalisation: rank 1's simulator crashes mid-episode in the second
    # generation; every rank raises, nothing changes (center, optimizer, epoch, counters,
    # statistics), and the run continues as one in which that generation never failed
    env = _flaky_cartpole()
    searcher = EGGROLL(_flaky_rl(device, env), distributed=True, **kw)
    searcher.step()
    before = _state(searcher)
    if rank == 1:
        env.steps_left = 2
    res["rl"] = _attempt(searcher.step)
    env.steps_left = None
    res["rl_untouched"] = _same_state(before, _state(searcher))
    searcher.step()
    searcher.step()
    res["rl_state"] = _state(searcher)
    reference = EGGROLL(_flaky_rl(device, env), distributed=True, **kw)
    for _ in range(3):
        reference.step()
    res["rl_reference"] = _state(reference)

    # dense mode, a plain problem: rank 0's evaluation raises
    searcher = EGGROLL(_flaky_dense(device), distributed=True, chunk_size=3, **kw)
    searcher.step()
    before = _state(searcher)
    _SPHERE_FAILS["rank"] = 0
    res["dense"] = _attempt(searcher.step)
    _SPHERE_FAILS["rank"] = "all"  # ... and then on every rank: each raises its own error
    res["dense_all"] = _attempt(searcher.step)
    _SPHERE_FAILS["rank"] = None
    res["dense_untouched"] = _same_state(before, _state(searcher))
    searcher.step()
    res["dense_state"] = _state(searcher)
    return res


def scenario_exit(rank: int, world: int, device: torch.device) -> dict:
    """Rank 1's process dies while it evaluates the second generation."""
    from evotorch_eggroll.algorithms import EGGROLL

    searcher = EGGROLL(_flaky_dense(device), popsize=world * PER_RANK, sigma=0.1, lr=0.05, seed=5,
                       distributed=True)
    searcher.step()
    _SPHERE_FAILS.update(rank=1, exit=True)
    res = dict(exit=_attempt(searcher.step), epoch=searcher.epoch)
    _SPHERE_FAILS.update(rank=None, exit=False)
    return res


def scenario_no_reads(rank: int, world: int, device: torch.device) -> dict:
    """A generation on the torch CartPole with observation normalisation, in which the
    step's one read (the all-gather's checks travel in it) comes before the problem's
    merge; on CUDA checked by the synchronisation debug mode (which turns any read of a
    device value into an error) from the end of the evaluation to that read, and again
    through the merge."""
    from evotorch_eggroll import strategy as strategy_module
    from evotorch_eggroll.algorithms import EGGROLL

    problem = _torch_rl(device)
    popsize = world * (256 if device.type == "cuda" else 8)
    searcher = EGGROLL(problem, popsize=popsize, rank=1, sigma=0.3, lr=0.05, optimizer="adam",
                       distributed=True)
    searcher.step()
    searcher.step()  # kernels compiled, rollout and stages captured
    reads = []
    host_values, evaluate, merge = strategy_module._host_values, problem.evaluate_population, problem.distributed_merge
    sync_debug = torch.cuda.set_sync_debug_mode if device.type == "cuda" else (lambda mode: None)

    def read(values):
        sync_debug(0)
        reads.append("step")
        return host_values(values)

    def evaluated(*args, **kwargs):
        out = evaluate(*args, **kwargs)
        sync_debug("error")
        return out

    def merged(state):
        sync_debug("error")
        try:
            merge(state)
        finally:
            sync_debug(0)
        reads.append("merge")

    strategy_module._host_values = read
    problem.evaluate_population, problem.distributed_merge = evaluated, merged
    try:
        searcher.step()
    finally:
        sync_debug(0)
        strategy_module._host_values = host_values
        del problem.evaluate_population, problem.distributed_merge
    return dict(reads=reads, interactions=problem.interaction_count, episodes=problem.episode_count,
                count=float(problem.get_observation_stats().count), epoch=searcher.epoch, popsize=popsize)


SCENARIOS = {"searcher": scenario_searcher, "failure": scenario_failure, "exit": scenario_exit,
             "no_reads": scenario_no_reads}
AFTER_GROUP = {"searcher": after_searcher}


# -- the tests ---------------------------------------------------------------------------

def _same_status(a: dict, b: dict, what: str) -> None:
    for k in EVALS:
        assert a[k] == b[k], (what, k, a[k], b[k])
    for k in ("center", "pop_best", "best"):
        assert torch.equal(a[k], b[k]), (what, k)


def _close_status(a: dict, b: dict, what: str) -> None:
    """A distributed run vs one process: equal up to float32 rounding. A rank evaluates its
    PER_RANK members, the single process all N; the base products of the forward pass come
    from BLAS (MKL, OpenBLAS, cuBLAS), whose rounding may depend on the batch size, so the
    fitnesses - and through them the statistics and, slightly, the update - may differ in
    the last bits on some machines. (Across ranks everything is bit-identical:
    ``_same_status``.)"""
    for k in EVALS:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (what, k, a[k], b[k])
    for k in ("center", "pop_best", "best"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


def _check(results: list[dict], tmp_path: Path) -> None:
    n = WORLD * PER_RANK
    r0, r1 = results
    for name in ("supervised_common", "supervised_own", "gym", "obsnorm", "dense"):
        # every status value is global: identical on every rank
        _same_status(r0[name], r1[name], name)
        assert r0[name]["keys"] == r1[name]["keys"]
        assert r0[name]["iter"] == (1 if name == "obsnorm" else GENERATIONS)
    for name in ("supervised_common", "supervised_own", "gym", "dense"):
        # ... and equal to a single-process run of the same seed and population size, up to
        # float32 rounding
        single = next(r[name + "_single"] for r in results if name + "_single" in r)
        _close_status(r0[name], single, f"{name} vs one process")
        # dense mode leaves out the problem's per-rank worst-member tracking
        assert r0[name]["keys"] == [k for k in single["keys"] if not k.startswith("worst")]

    # RL counters and observation statistics are summed over the ranks
    assert r0["obsnorm"]["total_episode_count"] == n
    assert r0["obsnorm"]["total_interaction_count"] == r1["obsnorm"]["total_interaction_count"]
    assert r0["obsnorm"]["total_interaction_count"] >= n
    for a, b in zip(r0["obsnorm_stats"], r1["obsnorm_stats"]):
        assert torch.equal(a, b)
    assert float(r0["obsnorm_stats"][0]) == r0["obsnorm"]["total_interaction_count"]

    # dense mode: the problem's per-rank best/worst tracking is off
    assert "worst" not in r0["dense"]["keys"]

    # loggers: rank 0 only, unless log_all_ranks=True
    assert r0["supervised_common"]["log_calls"] == list(range(1, GENERATIONS + 1))
    assert r1["supervised_common"]["log_calls"] == []
    assert r0["gym"]["log_calls"] == r1["gym"]["log_calls"] == list(range(1, GENERATIONS + 1))
    assert "mean_eval" in (tmp_path / "log_0.txt").read_text()
    assert "mean_eval" not in (tmp_path / "log_1.txt").read_text()

    for res in results:
        assert "popsize 9 must be divisible by the world size 2" in res["popsize_msg"]
        assert "seed differs across ranks (rank 0: seed=0, rank 1: seed=1)" in res["seed_msg"]
        assert "seed differs across ranks (rank 0: seed=10, rank 1: seed=11)" in res["lowrank_seed_msg"]

    # a distributed searcher unpickled without a process group (in rank 0, once the group
    # is destroyed) continues in one process
    assert any(w.startswith("UserWarning") and "single-process" in w
               for w in r0["unpickled_warnings"]), r0["unpickled_warnings"]
    assert not r0["unpickled_distributed"]
    assert torch.equal(r0["unpickled_center"], r0["supervised_common"]["center"])
    assert r0["unpickled_steps"] == GENERATIONS + 1
    assert torch.isfinite(r0["unpickled_center_after"]).all()
    assert not torch.equal(r0["unpickled_center_after"], r0["unpickled_center"])
    assert "unpickled_steps" not in r1 and "pickled" not in r0 and "pickled" not in r1


def test_two_gloo_ranks(tmp_path):
    """Two Gloo ranks on the CPU: global, identical status on every rank, equal to one
    process; rank-0 loggers; construction errors on every rank."""
    _check(launch(HERE, "searcher", WORLD, "gloo", tmp_path, TIMEOUT_S), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL test needs at least 2 CUDA GPUs")
def test_two_nccl_ranks(tmp_path):
    """The same checks with NCCL, one GPU per rank."""
    _check(launch(HERE, "searcher", WORLD, "nccl", tmp_path, TIMEOUT_S), tmp_path)


def _check_failure(r0: dict, r1: dict) -> None:
    """A rank whose evaluation raised: every rank raised within seconds, the others naming
    it and its exception; nothing was updated, and the later generations ran as if the
    failed one had never been evaluated (RL counters and observation statistics included)."""
    assert r1["rl"]["type"] == "RuntimeError" and r1["rl"]["msg"] == "the simulator crashed"
    assert r0["rl"]["type"] == "RankFailedError"
    assert "rank 1 failed during evaluation: RuntimeError: the simulator crashed" in r0["rl"]["msg"]
    assert "no rank applied an update for this generation (epoch 1)" in r0["rl"]["msg"]
    assert r0["rl"]["failures"] == {1: "RuntimeError: the simulator crashed"}

    assert r0["dense"]["type"] == "FloatingPointError"
    assert r1["dense"]["type"] == "RankFailedError"
    assert "rank 0 failed during evaluation: FloatingPointError: the evaluation diverged" in r1["dense"]["msg"]
    assert r0["dense_all"]["type"] == r1["dense_all"]["type"] == "FloatingPointError"
    for res in (r0, r1):
        for key in ("rl", "dense", "dense_all"):
            assert res[key]["seconds"] < 60, (key, res[key])
        assert res["rl_untouched"] and res["dense_untouched"]
        assert _same_state(res["rl_state"], res["rl_reference"])
        assert _same_state(res["rl_state"], r0["rl_state"])
        assert res["rl_state"]["epoch"] == 3 and res["rl_state"]["episodes"] == 3 * WORLD * PER_RANK
        assert _same_state(res["dense_state"], r0["dense_state"])
        assert res["dense_state"]["epoch"] == 2


def test_a_rank_failing_in_evaluation_ends_the_generation_on_every_rank(tmp_path):
    """Two Gloo ranks, the process group's timeout 300 s: see :func:`_check_failure`."""
    _check_failure(*launch(HERE, "failure", WORLD, "gloo", tmp_path, TIMEOUT_S, pg_timeout=300))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL test needs at least 2 CUDA GPUs")
def test_a_rank_failing_in_evaluation_ends_the_generation_on_every_rank_nccl(tmp_path):
    """The same with NCCL, one GPU per rank, the process group's timeout 300 s."""
    _check_failure(*launch(HERE, "failure", WORLD, "nccl", tmp_path, TIMEOUT_S, pg_timeout=300))


def test_a_rank_that_exits_ends_the_job_within_seconds(tmp_path):
    """Rank 1's process dies in the second generation: with Gloo, rank 0's step raises a
    clear error within seconds (the process group's timeout is 300 s), nothing updated."""
    r0, r1 = launch(HERE, "exit", WORLD, "gloo", tmp_path, TIMEOUT_S, exits={1: 17}, pg_timeout=300)
    assert r1 is None
    assert r0["exit"]["type"] == "RuntimeError", r0["exit"]
    assert "another rank has probably exited" in r0["exit"]["msg"]
    assert r0["exit"]["seconds"] < 60
    assert r0["epoch"] == 1


def _check_no_reads(r0: dict) -> None:
    n = r0["popsize"]
    assert r0["reads"] == ["step", "merge"] and r0["epoch"] == 3
    assert r0["episodes"] == 3 * n
    assert 3 * n <= r0["interactions"] <= 3 * n * 4 and r0["count"] == r0["interactions"]


def test_one_gloo_rank_reads_the_all_gathers_checks_with_the_step(tmp_path):
    """One Gloo rank: the step's one read comes before the problem's merge (see
    :func:`scenario_no_reads`), and the global counters come out right."""
    _check_no_reads(launch(HERE, "no_reads", 1, "gloo", tmp_path, TIMEOUT_S)[0])


@pytest.mark.gpu
def test_a_distributed_generation_queues_its_update_without_reading_back(tmp_path):
    """One NCCL rank: from the end of the evaluation to the step's one read, and in the
    problem's merge after it, nothing reads a device value back to the host (see
    :func:`scenario_no_reads`); the global counters come out right all the same."""
    _check_no_reads(launch(HERE, "no_reads", 1, "nccl", tmp_path, TIMEOUT_S)[0])


def test_distributed_needs_a_process_group():
    from evotorch_eggroll.algorithms import EGGROLL

    with pytest.raises(RuntimeError, match="init_process_group"):
        EGGROLL(_dense("cpu", 0), popsize=4, distributed=True)


if __name__ == "__main__":
    worker_main(SCENARIOS, AFTER_GROUP)


def _torchrun_on_cpu(script: str, args: list[str], cwd) -> str:
    """Run the repository's ``script`` under ``torchrun --nproc_per_node=2`` on the CPU (Gloo;
    the scripts switch Triton's interpreter on themselves); its output, after checking that
    it succeeded."""
    import os
    import subprocess

    repo = HERE.parents[2]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / script), *args]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def test_example_script_runs_under_torchrun(tmp_path):
    """``examples/distributed_cartpole.py`` under ``torchrun --nproc_per_node=2`` on the CPU
    (Gloo; the script switches Triton's interpreter on itself), a tiny run."""
    out = _torchrun_on_cpu("examples/distributed_cartpole.py",
                           ["--generations", "1", "--popsize", "4", "--episode-length", "4",
                            "--hidden", "4"], tmp_path)
    assert "rank 0/2 on cpu: members 0..1" in out and "rank 1/2 on cpu: members 2..3" in out
    assert out.count("mean_eval") == 1  # rank 0's logger only
    assert "Done after 1 generations" in out


def test_scaling_script_runs_under_torchrun(tmp_path):
    """``scripts/scaling_rollout.py`` (the multi-GPU scaling run) under ``torchrun
    --nproc_per_node=2`` on the CPU (Gloo, Triton's interpreter), weak scaling at a tiny
    size: rank 0 prints the generation time and the phases' times, the ranks' largest."""
    import re

    out = _torchrun_on_cpu("scripts/scaling_rollout.py", ["--per-rank", "4", "--steps", "3"],
                           tmp_path)
    assert out.count("ranks=2 device=cpu N=8 per rank=4 steps=3 generation") == 1, out[-3000:]
    phases = re.search(r"rollout ([0-9.]+), all-gather ([0-9.]+), update ([0-9.]+), rest (-?[0-9.]+)", out)
    assert phases is not None, out[-3000:]
    rollout, gather, update, _ = map(float, phases.groups())
    assert rollout > 0 and gather > 0 and update > 0


_FAULTY_EXAMPLE = """
import importlib.util
import os
import sys

# the example, with process rank {rank} exiting abruptly (no cleanup, no exception: as if
# killed) when generation {generation} starts
spec = importlib.util.spec_from_file_location("distributed_cartpole", {example!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
step = example.EGGROLL.step


def dying_step(searcher):
    if int(os.environ["RANK"]) == {rank} and searcher.step_count + 1 == {generation}:
        os._exit(17)
    return step(searcher)


example.EGGROLL.step = dying_step
sys.exit(example.main(sys.argv[1:]))
"""


def test_example_checkpoint_resumes_bit_identically_after_a_rank_dies(tmp_path):
    """``--checkpoint PATH --checkpoint-every K``: rank 1 dies abruptly in generation 4, the
    job ends, and ``--resume`` from the checkpoint of generation 2 finishes the run with the
    very parameters, optimizer state, counters and observation statistics of a run that
    never stopped."""
    import os
    import subprocess

    repo = HERE.parents[2]
    example = repo / "examples" / "distributed_cartpole.py"
    (tmp_path / "faulty.py").write_text(_FAULTY_EXAMPLE.format(rank=1, generation=4, example=str(example)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))
    common = ["--generations", "5", "--popsize", "4", "--episode-length", "16", "--hidden", "4",
              "--observation-normalization"]

    def torchrun(script, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), *common, *args]
        return subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def finish(proc):
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{proc.communicate()[0][-6000:]}")
        return proc.returncode, out

    straight_path, path = tmp_path / "straight.pt", tmp_path / "run.pt"
    straight = torchrun(example, "--checkpoint", str(straight_path))  # both at once: 2 x 2 ranks
    faulty = torchrun(tmp_path / "faulty.py", "--checkpoint", str(path), "--checkpoint-every", "2")
    code, out = finish(straight)
    assert code == 0, out[-6000:]
    code, faulty_out = finish(faulty)
    assert code != 0 and "Done after" not in faulty_out, faulty_out[-6000:]
    saved = torch.load(path, weights_only=True)
    assert saved["generation"] == 2 and saved["strategy"]["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    code, out = finish(torchrun(example, "--checkpoint", str(path), "--checkpoint-every", "2", "--resume"))
    assert code == 0, out[-6000:]
    assert f"resumed from {path} after generation 2" in out and "Done after 5 generations" in out

    a, b = torch.load(straight_path, weights_only=True), torch.load(path, weights_only=True)
    assert a["generation"] == b["generation"] == 5
    assert a["strategy"]["epoch"] == b["strategy"]["epoch"] == 5
    for name, value in a["strategy"]["parameters"].items():
        assert torch.equal(b["strategy"]["parameters"][name], value), name
    for i, state in a["strategy"]["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(b["strategy"]["optimizer"]["state"][i][key], value), (i, key)
    assert {k: v for k, v in a["problem"].items() if k != "obs_stats"} == \
        {k: v for k, v in b["problem"].items() if k != "obs_stats"}
    for name, value in a["problem"]["obs_stats"].items():
        assert torch.equal(b["problem"]["obs_stats"][name], value), name
    assert a["problem"]["obs_stats"]["count"] > 0
    assert a["searcher"]["best"]["eval"] == b["searcher"]["best"]["eval"]
    assert torch.equal(a["searcher"]["last"]["fitnesses"], b["searcher"]["last"]["fitnesses"])


def test_example_checkpoint_flags_are_checked(tmp_path, monkeypatch, capsys):
    """Bad checkpoint flags stop the example with a usage error (exit status 2) before it
    starts a process group (in this process: the example's ``main``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "distributed_cartpole_flags", HERE.parents[2] / "examples" / "distributed_cartpole.py")
    example = importlib.util.module_from_spec(spec)
    if not torch.cuda.is_available():  # else importing it would restart this process with it set
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "init_distributed",
                        lambda: pytest.fail("the flags were accepted"))
    monkeypatch.chdir(tmp_path)
    for args, message in ((["--resume"], "need --checkpoint PATH"),
                          (["--checkpoint-every", "2"], "need --checkpoint PATH"),
                          (["--checkpoint", "x.pt", "--checkpoint-every", "0"], "must be >= 1"),
                          (["--checkpoint", str(tmp_path / "none.pt"), "--resume"], "no checkpoint at")):
        with pytest.raises(SystemExit) as stopped:
            example.main(args)
        assert stopped.value.code == 2 and message in capsys.readouterr().err, args
