"""The protocol between EGGROLL and its problems: a problem of one's own that implements
:class:`~evotorch_eggroll.protocol.LowRankProblem` (and nothing of our adapters) runs in
EGGROLL's low-rank mode, with its running state rolled back when a generation fails, also
over two Gloo ranks (this file is also their rank script, see ``tests/distributed_harness.py``)."""

import pickle
import sys
from pathlib import Path

import pytest
import torch
from evotorch import Problem
from torch import nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the tests folder: the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_harness import launch, worker_main  # noqa: E402

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import EggrollNEProblem, EggrollSupervisedNE, EggrollVecGymNE
from evotorch_eggroll.protocol import LowRankProblem

INPUTS = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
TARGET = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])


def _fitness(outputs: torch.Tensor) -> torch.Tensor:
    """Fitness of ``(K, 4, 2)`` outputs: minus the squared error to the target map's outputs."""
    return -((outputs - INPUTS @ TARGET.T) ** 2).sum(dim=(1, 2))


class LinearFit(Problem):
    """A problem of one's own: fit a linear layer to a fixed linear map, evaluated through
    the perturbation context's ``batched_forward``. It counts its evaluations (running state
    that a failed generation must not advance) and records the protocol calls."""

    def __init__(self, fail_at=None):
        self._net = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self._net.weight.zero_()
        super().__init__("max", solution_length=6, device="cpu", dtype=torch.float32)
        self.evaluations = 0
        self.attempts = 0  # evaluations tried, failed ones included (not rolled back)
        self.fail_at = fail_at
        self.calls: list = []

    @property
    def network(self) -> nn.Module:
        return self._net

    @property
    def evolved_parameter_names(self) -> list:
        return ["weight"]

    def parameters_to_vector(self, net: nn.Module) -> torch.Tensor:
        return net.weight.detach().reshape(-1)

    @torch.no_grad()
    def vector_to_parameters(self, vector: torch.Tensor, net: nn.Module) -> None:
        net.weight.copy_(torch.as_tensor(vector).reshape(net.weight.shape))

    def evaluate_population(self, pop, network, member_ids=None):
        ids = pop.local_member_ids() if member_ids is None else torch.as_tensor(member_ids)
        self.attempts += 1
        if self.attempts == self.fail_at:
            self.evaluations += 1  # advanced before it failed: the rollback must undo it
            raise RuntimeError("evaluation failed")
        self.evaluations += 1
        rows = INPUTS.repeat(ids.shape[0], 1)
        with torch.no_grad():
            out = pop.batched_forward(network, rows, member_ids=ids.repeat_interleave(INPUTS.shape[0]))
        return _fitness(out.reshape(ids.shape[0], INPUTS.shape[0], 2)).float()

    def generation_state(self):
        self.calls.append("generation_state")
        return self.evaluations

    def restore_generation_state(self, state):
        self.calls.append("restore_generation_state")
        self.evaluations = state

    def distributed_setup(self):
        self.calls.append("distributed_setup")

    def distributed_merge(self, state):
        self.calls.append("distributed_merge")

    def _evaluate_batch(self, batch):  # the materialised path (stock EvoTorch searchers)
        weights = batch.values.reshape(-1, 2, 3)
        batch.set_evals(_fitness(torch.einsum("bi,koi->kbo", INPUTS, weights)))


def _searcher(problem, **kwargs):
    return EGGROLL(problem, popsize=16, sigma=0.2, lr=0.1, rank=1, seed=3, backend="torch", **kwargs)


def test_our_adapters_implement_the_protocol_and_plain_problems_do_not():
    net = nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, 2))
    assert isinstance(EggrollNEProblem("max", net, batched_eval_func=lambda f: torch.zeros(f.num_members),
                                       device="cpu"), LowRankProblem)
    assert isinstance(EggrollSupervisedNE(data, net, nn.functional.mse_loss, device="cpu"), LowRankProblem)
    assert isinstance(EggrollVecGymNE(CartPole, "Linear(obs_length, act_length)", device="cpu"), LowRankProblem)
    plain = Problem("max", lambda x: x.sum(-1), solution_length=3, initial_bounds=(-1, 1), vectorized=True)
    assert not isinstance(plain, LowRankProblem)
    assert _searcher(plain).strategy is None  # the dense mode


def test_a_problem_of_ones_own_runs_in_low_rank_mode():
    problem = LinearFit()
    assert isinstance(problem, LowRankProblem)
    searcher = _searcher(problem)
    assert searcher.strategy is not None and searcher.network is not problem.network
    start = float(_fitness(INPUTS @ problem.network.weight.detach().T.unsqueeze(0))[0])
    searcher.run(30)
    assert problem.evaluations == 30
    assert problem.calls == ["generation_state"] * 30  # no rollback, no distributed calls
    center = searcher.status["center"].reshape(2, 3)
    assert float(_fitness((INPUTS @ center.T).unsqueeze(0))[0]) > 0.5 * start  # closer to the target
    assert torch.equal(problem.network.weight, torch.zeros(2, 3))  # the searcher evolves its own copy
    # The reported best member, rebuilt from the noise stream, is the member the problem evaluated.
    best = searcher.status["pop_best"]
    batch = best.to_batch()
    problem.evaluate(batch)
    assert float(batch.evals[0, 0]) == pytest.approx(searcher.status["pop_best_eval"], rel=1e-4, abs=1e-5)


def test_a_failed_generation_restores_the_problems_snapshot_and_changes_nothing():
    reference, problem = _searcher(LinearFit()), LinearFit(fail_at=3)
    searcher = _searcher(problem)
    reference.run(2)
    searcher.run(2)
    center = searcher.status["center"].clone()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        searcher.step()
    assert problem.calls[-2:] == ["generation_state", "restore_generation_state"]
    assert problem.evaluations == 2 and searcher.step_count == 2 and searcher.epoch == 2
    assert torch.equal(searcher.status["center"], center)
    # It continues as if the failure never happened.
    reference.step()
    searcher.step()
    assert torch.equal(searcher.status["center"], reference.status["center"])


def test_a_searcher_over_a_problem_of_ones_own_pickles_and_resumes():
    searcher = _searcher(LinearFit())
    searcher.run(2)
    copy = pickle.loads(pickle.dumps(searcher))
    searcher.run(2)
    copy.run(2)
    assert torch.equal(copy.status["center"], searcher.status["center"])
    assert copy.problem.evaluations == 4


def test_a_partial_implementation_is_refused_with_the_missing_methods():
    class NoRollback(LinearFit):
        restore_generation_state = None  # not callable: the problem does not offer it

    with pytest.raises(TypeError, match="restore_generation_state"):
        _searcher(NoRollback())


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain-tensor copy of a status tensor (EvoTorch hands out read-only ones)."""
    return t.as_subclass(torch.Tensor).clone()


def scenario_distributed(rank, world, device):
    """Two generations, one in which rank 1's evaluation fails, and one more; then the same
    three successful generations in a single process."""
    problem = LinearFit(fail_at=3 if rank == 1 else None)
    searcher = _searcher(problem, distributed=True)
    searcher.run(2)
    before = _plain(searcher.status["center"])
    try:
        searcher.step()
        failure = ""
    except RuntimeError as err:  # RankFailedError on the rank that did not fail
        failure = type(err).__name__
    after_failure = _plain(searcher.status["center"])
    searcher.step()
    single = _searcher(LinearFit())
    single.run(3)
    return dict(calls=problem.calls, evaluations=problem.evaluations, failure=failure, before=before,
                after_failure=after_failure, center=_plain(searcher.status["center"]),
                single=_plain(single.status["center"]), best_eval=float(searcher.status["best_eval"]))


def test_the_protocol_over_two_gloo_ranks(tmp_path):
    r0, r1 = launch(Path(__file__).resolve(), "distributed", 2, "gloo", tmp_path, 300)
    generation = ["generation_state", "distributed_merge"]
    for r in (r0, r1):
        assert r["calls"] == ["distributed_setup"] + generation * 2 + ["generation_state",
                                                                       "restore_generation_state"] + generation
        assert r["evaluations"] == 3  # the failed generation is not counted
        assert torch.equal(r["after_failure"], r["before"])
    assert (r0["failure"], r1["failure"]) == ("RankFailedError", "RuntimeError")
    assert torch.equal(r0["center"], r1["center"]) and r0["best_eval"] == r1["best_eval"]
    torch.testing.assert_close(r0["center"], r0["single"], rtol=1e-5, atol=1e-6)


SCENARIOS = {"distributed": scenario_distributed}

if __name__ == "__main__":
    worker_main(SCENARIOS)
