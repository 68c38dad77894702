"""Reliability of the EGGROLL searcher: a failing evaluation leaves the searcher exactly as
before (same center, optimizer state, epoch and step count) and it continues as if the
failure never happened; a pickled searcher resumes bit-identically in a fresh process; a
PicklingLogger checkpoint holds the exact center of its generation."""

import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
from evotorch import Problem
from evotorch.logging import PicklingLogger
from torch import nn

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.neuroevolution import EggrollNEProblem


class FailOnce:
    """A fitness function that raises on its ``fail_at``-th call (once), else ``fn``."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("evaluation failed")
        return self.fn(*args)


def _sphere(x):
    return (x**2).sum(-1)


def _dense(fail_at=None):
    problem = Problem("min", FailOnce(_sphere, fail_at), solution_length=6, initial_bounds=(-3, 3),
                      vectorized=True, seed=0)
    return EGGROLL(problem, popsize=8, sigma=0.3, lr=0.1, seed=4)


def _lowrank(device, fail_at=None):
    x = torch.linspace(-1, 1, 4, device=device)[:, None]

    def loss(forward):
        return (forward.shared(x)[..., 0] - 2 * x[:, 0]).pow(2).mean(dim=1)

    torch.manual_seed(0)
    problem = EggrollNEProblem("min", nn.Linear(1, 1), batched_eval_func=FailOnce(loss, fail_at),
                               device=device)
    return EGGROLL(problem, popsize=4, sigma=0.1, lr=0.05, rank=1, seed=4)


def _supervised(device, fail_at=None):
    from evotorch_eggroll.neuroevolution import EggrollSupervisedNE

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))
    torch.manual_seed(0)
    problem = EggrollSupervisedNE(data, nn.Linear(3, 1), FailOnce(nn.functional.mse_loss, fail_at),
                                  minibatch_size=4, device=device, seed=1)
    return EGGROLL(problem, popsize=4, sigma=0.1, lr=0.05, rank=1, seed=4)


def _searcher_state(searcher):
    opt = searcher.optimizer.state_dict()
    return dict(center=searcher.status["center"].clone(), epoch=searcher.epoch,
                steps=searcher.step_count, opt=pickle.dumps(opt))


def _assert_unchanged(searcher, before: dict) -> None:
    """The searcher is as :func:`_searcher_state` found it, with no perturb context open."""
    after = _searcher_state(searcher)
    assert torch.equal(after["center"], before["center"])
    assert (after["epoch"], after["steps"], after["opt"]) == (before["epoch"], before["steps"],
                                                               before["opt"])
    if searcher.strategy is not None:
        assert searcher.strategy._active is None


@pytest.mark.parametrize("mode", ["dense", "lowrank", "supervised"])
def test_searcher_survives_a_failing_evaluation(device, mode):
    """A generation whose evaluation raises changes nothing, in the searcher nor in our
    problems' running state (the supervised adapter's position in the data: the generation
    evaluated again sees the minibatch it would have seen), so the run continues as one in
    which it never failed."""
    build = {"dense": _dense, "lowrank": lambda fail_at=None: _lowrank(device, fail_at),
             "supervised": lambda fail_at=None: _supervised(device, fail_at)}[mode]
    straight = build()
    straight.run(3)
    flaky = build(fail_at=2)  # the second generation's evaluation raises
    flaky.step()
    before = _searcher_state(flaky)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        flaky.step()
    _assert_unchanged(flaky, before)
    flaky.step()
    flaky.step()
    assert flaky.step_count == straight.step_count == 3
    assert torch.equal(flaky.status["center"], straight.status["center"])
    assert flaky.status["mean_eval"] == straight.status["mean_eval"]


def test_pickled_searcher_and_pickling_logger_resume_in_a_fresh_process(tmp_path):
    """A pickled searcher continues bit-identically in another process. A PicklingLogger
    file holds only status items (the exact center, no optimizer state or epoch): with a
    stateless optimizer and noise_reuse=0 a searcher started from that center in another
    process also continues bit-identically."""
    def build(center_init=None, **kw):
        problem = Problem("min", _sphere, solution_length=6, initial_bounds=(-3, 3),
                          vectorized=True, seed=0)
        return EGGROLL(problem, popsize=8, sigma=0.3, lr=0.1, seed=4, center_init=center_init,
                       **kw)

    straight = build()
    straight.run(4)
    first = build()
    first.run(2)
    with open(tmp_path / "searcher.pkl", "wb") as f:
        pickle.dump(first, f)

    stateless = dict(optimizer="sgd", noise_reuse=0)
    logged = build(**stateless)
    PicklingLogger(logged, interval=2, directory=str(tmp_path / "log"), prefix="run", verbose=False)
    logged.run(2)
    center_at_2 = logged.status["center"].clone()
    logged.run(2)
    files = sorted((tmp_path / "log").iterdir())
    assert files, "PicklingLogger wrote nothing"

    script = f"""
import pickle, sys, torch
from evotorch import Problem
from evotorch_eggroll.algorithms import EGGROLL
def _sphere(x):
    return (x**2).sum(-1)
with open(sys.argv[1] + "/searcher.pkl", "rb") as f:
    searcher = pickle.load(f)
searcher.run(2)
with open({str(files[0])!r}, "rb") as f:
    logged = pickle.load(f)
problem = Problem("min", _sphere, solution_length=6, initial_bounds=(-3, 3), vectorized=True,
                  seed=0)
again = EGGROLL(problem, popsize=8, sigma=0.3, lr=0.1, seed=4, optimizer="sgd", noise_reuse=0,
                center_init=logged["center"])
again.run(2)
plain = lambda t: torch.as_tensor(t).as_subclass(torch.Tensor).clone()
torch.save(dict(center=plain(searcher.status["center"]), steps=searcher.step_count,
                logged_center=plain(logged["center"]), again=plain(again.status["center"])),
           sys.argv[1] + "/out.pt")
"""
    # the tests folder goes first on the path (for pickles that refer to test modules); the
    # existing PYTHONPATH is kept, since the packages may come from there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True, timeout=300,
                   capture_output=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(out["center"], straight.status["center"]) and out["steps"] == 4
    assert torch.equal(out["logged_center"], center_at_2)
    assert torch.equal(out["again"], logged.status["center"])


# -- non-finite fitnesses --------------------------------------------------------------------

class Diverging:
    """Fitnesses of ``fn`` with members ``bad`` (positions within each evaluated batch)
    replaced by ``value``."""

    def __init__(self, fn, bad, value=float("nan")):
        self.fn, self.bad, self.value = fn, bad if isinstance(bad, slice) else list(bad), value

    def __call__(self, *args):
        out = self.fn(*args).as_subclass(torch.Tensor).clone()
        out[self.bad] = self.value
        return out


def _dense_diverging(bad=(), value=float("nan"), **kwargs):
    # EvoTorch's own best/worst tracking of a plain problem fails on NaN evaluations before
    # the searcher sees them; "worst" needs it off, "raise" is tested without it
    problem = Problem("min", Diverging(_sphere, bad, value), solution_length=6,
                      initial_bounds=(-3, 3), vectorized=True, seed=0, store_solution_stats=False)
    return EGGROLL(problem, popsize=8, sigma=0.3, lr=0.1, seed=4, **kwargs)


def _lowrank_diverging(device, bad=(), value=float("nan"), **kwargs):
    x = torch.linspace(-1, 1, 4, device=device)[:, None]

    def loss(forward):
        return (forward.shared(x)[..., 0] - 2 * x[:, 0]).pow(2).mean(dim=1)

    torch.manual_seed(0)
    problem = EggrollNEProblem("min", nn.Linear(1, 1), batched_eval_func=Diverging(loss, bad, value),
                               device=device)
    return EGGROLL(problem, popsize=6, sigma=0.1, lr=0.05, rank=1, seed=4, **kwargs)


@pytest.mark.parametrize("mode", ["dense", "lowrank"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_worst_ranks_diverged_members_last(device, mode, value):
    """With nonfinite_fitness="worst" a member with a NaN or infinite loss ranks last (a
    loss of -inf too: diverged, not best), exactly as a member with a huge finite loss."""
    build = _dense_diverging if mode == "dense" else (lambda *a, **k: _lowrank_diverging(device, *a, **k))
    diverging = build(bad=[1], value=value, nonfinite_fitness="worst")
    huge = build(bad=[1], value=1e30)  # finite and the worst: the same centered ranks
    for _ in range(2):
        diverging.step()
        huge.step()
    assert torch.isfinite(diverging.status["center"]).all()
    assert torch.equal(diverging.status["center"], huge.status["center"])
    assert diverging.status["nonfinite_count"] == 1 and huge.status["nonfinite_count"] == 0
    # the status values describe the finite members
    finite = diverging._last["fitnesses"][torch.isfinite(diverging._last["fitnesses"])]
    assert diverging.status["mean_eval"] == pytest.approx(float(finite.double().mean()))
    assert diverging.status["pop_best_eval"] == float(finite.min())
    assert math.isfinite(diverging.status["best_eval"])
    assert diverging._last["member"] != 1


@pytest.mark.parametrize("mode", ["dense", "lowrank"])
def test_nonfinite_fitnesses_raise_by_default_and_all_nonfinite_always(device, mode):
    build = _dense_diverging if mode == "dense" else (lambda *a, **k: _lowrank_diverging(device, *a, **k))
    default = build(bad=[1])
    before = _searcher_state(default)
    with pytest.raises(ValueError, match="NaN or inf") as err:
        default.step()
    assert "nonfinite_fitness='worst'" in str(err.value)
    every = build(bad=slice(None), nonfinite_fitness="worst")
    with pytest.raises(ValueError, match="all .* fitnesses are NaN or inf; the center was not updated"):
        every.step()
    for searcher in (default, every):
        _assert_unchanged(searcher, before)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "lowrank"])
@pytest.mark.parametrize("policy", ["raise", "worst"])
def test_the_graphed_fitness_stage_ranks_checks_and_refuses_as_the_eager_one(mode, policy):
    """From its second generation on, a searcher on the GPU ranks and checks the fitnesses
    by replaying a captured graph: every center is bit-identical to a searcher that never
    captures, diverged members count the same, and a replayed generation with a NaN is
    refused under "raise" (nothing changed) or ranked last under "worst", as eagerly."""
    from cuda_graphs import Eager  # tests/ is on sys.path (not in the subprocesses that import this module)

    runs = []
    for graphed in (True, False):
        if mode == "dense":
            evaluator = Diverging(_sphere, [])
            problem = Problem("min", evaluator, solution_length=6, initial_bounds=(-3, 3), vectorized=True,
                              seed=0, store_solution_stats=False, device="cuda")
            searcher = EGGROLL(problem, popsize=8, sigma=0.3, lr=0.1, seed=4, nonfinite_fitness=policy)
        else:
            searcher = _lowrank_diverging("cuda", bad=[], nonfinite_fitness=policy)
            evaluator = searcher.problem._batched_eval_func
        if not graphed:
            searcher._graphed_fitness = Eager()
        centers = []
        for generation in range(6):
            evaluator.bad = [1] if generation == 3 else []
            if generation == 3 and policy == "raise":
                center = searcher.status["center"].clone()
                opt = {k: {name: v.clone() for name, v in state.items()}  # the live tensors change
                       for k, state in searcher.optimizer.state_dict()["state"].items()}
                with pytest.raises(ValueError, match="NaN or inf"):
                    searcher.step()
                assert torch.equal(searcher.status["center"], center) and searcher.step_count == 3
                after = searcher.optimizer.state_dict()["state"]
                assert after.keys() == opt.keys() and all(
                    torch.equal(after[k][name], opt[k][name]) for k in opt for name in opt[k])
            else:
                searcher.step()
            centers.append((searcher.status["center"].clone(), searcher.status["nonfinite_count"]))
        if graphed:
            assert searcher._graphed_fitness._graph is not None  # replayed, not eager
        runs.append(centers)
    for (a, count_a), (b, count_b) in zip(*runs):
        assert torch.equal(a, b) and count_a == count_b
    assert runs[0][3][1] == (1 if policy == "worst" else 0)


def test_worst_refuses_a_plain_problem_that_keeps_evotorchs_solution_stats():
    """EvoTorch's best/worst tracking fails on NaN evaluations: a plain problem that keeps it
    is refused with nonfinite_fitness="worst", before anything is built, and says how to
    build it; with "raise", or built with store_solution_stats=False, it is accepted."""
    tracking = Problem("min", Diverging(_sphere, [1], float("nan")), solution_length=6,
                       initial_bounds=(-3, 3), vectorized=True, seed=0)
    with pytest.raises(ValueError, match="construct the Problem with store_solution_stats=False"):
        EGGROLL(tracking, popsize=8, nonfinite_fitness="worst")
    assert tracking.stores_solution_stats is None  # untouched
    assert EGGROLL(tracking, popsize=8).strategy is None
    assert _dense_diverging(nonfinite_fitness="worst").problem.stores_solution_stats is False


def test_nan_on_a_problem_that_keeps_evotorchs_solution_stats_is_a_clear_error():
    """With "raise", a NaN evaluation on a problem that keeps EvoTorch's best/worst tracking
    (whose own failure is an AttributeError) is the searcher's ValueError, naming the way
    out, and changes nothing."""
    tracking = Problem("min", Diverging(_sphere, [1], float("nan")), solution_length=6,
                       initial_bounds=(-3, 3), vectorized=True, seed=0)
    searcher = EGGROLL(tracking, popsize=8, sigma=0.3, lr=0.1, seed=4)
    before = _searcher_state(searcher)
    with pytest.raises(ValueError, match="returned NaN or inf for 1 of 8 members") as err:
        searcher.step()
    assert "store_solution_stats=False" in str(err.value) and "nonfinite_fitness='worst'" in str(err.value)
    _assert_unchanged(searcher, before)


def test_nonfinite_option_is_checked_and_survives_pickling():
    with pytest.raises(ValueError, match="nonfinite_fitness must be one of 'raise', 'worst'"):
        _dense_diverging(nonfinite_fitness="skip")
    searcher = _dense_diverging(bad=[2], nonfinite_fitness="worst")
    assert searcher.status["nonfinite_count"] is None  # no generation yet
    searcher.step()
    copy = pickle.loads(pickle.dumps(searcher))
    searcher.step()
    copy.step()
    assert copy.status["nonfinite_count"] == 1
    assert torch.equal(copy.status["center"], searcher.status["center"])


def test_rank_fitnesses_nonfinite_worst_in_both_senses():
    from evotorch_eggroll.algorithms import rank_fitnesses

    f = torch.tensor([3.0, float("inf"), 1.0, float("nan"), 2.0, -float("inf")])
    high = rank_fitnesses(f, "centered", higher_is_better=True, nonfinite="worst")
    low = rank_fitnesses(f, "centered", higher_is_better=False, nonfinite="worst")
    for w in (high, low):  # the three diverged members tie for last place
        assert torch.isfinite(w).all() and bool((w[[1, 3, 5]] == w.min()).all())
        assert w[[0, 2, 4]].min() > w.min()
    assert high[0] == high.max() and low[2] == low.max()
    for method in ("linear", "nes", "normalized", "raw"):
        assert torch.isfinite(rank_fitnesses(f, method, higher_is_better=False, nonfinite="worst")).all()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        rank_fitnesses(f, "centered", higher_is_better=True, nonfinite="drop")
