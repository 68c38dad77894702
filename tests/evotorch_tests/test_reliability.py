"""Reliability of the EGGROLL searcher: a failing evaluation leaves the searcher exactly as
before (same center, optimizer state, epoch and step count) and it continues as if the
failure never happened; a pickled searcher resumes bit-identically in a fresh process; a
PicklingLogger checkpoint holds the exact center of its generation."""

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


def _searcher_state(searcher):
    opt = searcher.optimizer.state_dict()
    return dict(center=searcher.status["center"].clone(), epoch=searcher.epoch,
                steps=searcher.step_count, opt=pickle.dumps(opt))


@pytest.mark.parametrize("mode", ["dense", "lowrank"])
def test_searcher_survives_a_failing_evaluation(device, mode):
    build = _dense if mode == "dense" else (lambda fail_at=None: _lowrank(device, fail_at))
    straight = build()
    straight.run(3)
    flaky = build(fail_at=2)  # the second generation's evaluation raises
    flaky.step()
    before = _searcher_state(flaky)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        flaky.step()
    after = _searcher_state(flaky)
    assert torch.equal(after["center"], before["center"])
    assert (after["epoch"], after["steps"], after["opt"]) == (before["epoch"], before["steps"],
                                                               before["opt"])
    if flaky.strategy is not None:
        assert flaky.strategy._active is None
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
