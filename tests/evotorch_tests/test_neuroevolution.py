"""EvoTorch problem adapters: decision vectors, materialised evaluation, rollouts."""

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from evotorch import SolutionBatch
from evotorch.algorithms import PGPE, SNES
from torch import nn

from evotorch_eggroll._host import start_read
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import (
    EggrollNEProblem,
    EggrollSupervisedNE,
    EggrollVecGymNE,
    PopulationForward,
    _mix_seed,
)


def _policy(obs_length, act_length):
    return nn.Sequential(nn.Linear(obs_length, 4), nn.Tanh(), nn.Linear(4, act_length))


def _regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return torch.utils.data.TensorDataset(x, y)


def _batch(problem, vectors):
    batch = SolutionBatch(problem, popsize=len(vectors), empty=True, device=problem.device)
    batch.set_values(torch.stack(list(vectors)))
    return batch


def _assert_same_evals(a, b, members: int) -> None:
    """Problems ``a`` and ``b`` (same solution length) evaluate ``members`` random decision
    vectors to the same fitnesses."""
    vectors = [torch.randn(a.solution_length) for _ in range(members)]
    ba, bb = _batch(a, vectors), _batch(b, vectors)
    a.evaluate(ba)
    b.evaluate(bb)
    torch.testing.assert_close(ba.evals, bb.evals)


def test_decision_vector_layout_and_roundtrip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    net[2].bias.requires_grad_(False)
    problem = EggrollNEProblem("max", net, batched_eval_func=lambda fwd: torch.zeros(fwd.num_members), device="cpu")
    assert problem.evolved_parameter_names == ["0.weight", "0.bias", "2.weight"]
    assert problem.solution_length == 15 + 5 + 10
    v = torch.arange(30, dtype=torch.float32)
    copy = problem.make_net(v)
    assert torch.equal(problem.parameters_to_vector(copy), v)
    assert torch.equal(copy[2].bias, net[2].bias)  # frozen parameters keep their values
    # The initial solution is the network's own parameters.
    assert torch.equal(problem.generate_values(2)[1], problem.parameters_to_vector(net))

    excl = EggrollNEProblem("max", net, network_eval_func=lambda n: 0.0, exclude=["0.bias"], device="cpu")
    assert excl.evolved_parameter_names == ["0.weight", "2.weight"]
    incl = EggrollNEProblem("max", net, network_eval_func=lambda n: 0.0, include=["2.weight"], device="cpu")
    assert incl.solution_length == 10


def test_constructor_errors():
    with pytest.raises(TypeError, match="batched_eval_func"):
        EggrollNEProblem("max", nn.Linear(2, 2), device="cpu")
    with pytest.raises(ValueError, match="does not have"):
        EggrollNEProblem("max", nn.Linear(2, 2), network_eval_func=lambda n: 0.0, exclude=["nope"], device="cpu")
    with pytest.raises(TypeError, match="loss_func"):
        EggrollSupervisedNE(_regression_data(), nn.Linear(3, 1), device="cpu")
    with pytest.raises(ValueError, match="num_episodes"):
        EggrollVecGymNE(CartPole, _policy, num_episodes=0, device="cpu")


def test_batched_and_per_network_evaluation_agree():
    torch.manual_seed(0)
    x = torch.randn(7, 2)

    def batched(fwd: PopulationForward):
        return fwd.shared(x).pow(2).mean(dim=(1, 2))

    def single(net):
        return net(x).pow(2).mean()

    net = nn.Linear(2, 3)
    a = EggrollNEProblem("min", net, batched_eval_func=batched, device="cpu")
    b = EggrollNEProblem("min", net, network_eval_func=single, device="cpu")
    _assert_same_evals(a, b, 5)


def test_population_forward_modes():
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    problem = EggrollNEProblem("min", net, batched_eval_func=lambda f: torch.zeros(f.num_members), device="cpu")
    values = torch.randn(3, problem.solution_length)
    fwd = problem._materialised_forward(net, values)
    nets = [problem.make_net(v) for v in values]
    x = torch.randn(3, 2)
    torch.testing.assert_close(fwd(x), torch.cat([nets[i](x[i : i + 1]) for i in range(3)]))
    xs = torch.randn(4, 2)
    torch.testing.assert_close(fwd.shared(xs), torch.stack([n(xs) for n in nets]))
    xm = torch.randn(3, 4, 2)
    torch.testing.assert_close(fwd.per_member(xm), torch.stack([nets[i](xm[i]) for i in range(3)]))
    ids = torch.tensor([2, 2, 0])
    torch.testing.assert_close(fwd(x, ids), torch.cat([nets[j](x[i : i + 1]) for i, j in enumerate([2, 2, 0])]))
    with pytest.raises(ValueError, match="one row per member"):
        fwd(torch.randn(2, 2))


def test_supervised_fitness_is_the_loss():
    data = _regression_data()
    torch.manual_seed(0)
    problem = EggrollSupervisedNE(data, nn.Linear(3, 1), nn.functional.mse_loss, device="cpu", seed=0)
    vectors = [torch.randn(problem.solution_length) for _ in range(4)]
    batch = _batch(problem, vectors)
    problem.evaluate(batch)
    x, y = data.tensors
    expected = torch.stack([nn.functional.mse_loss(problem.make_net(v)(x), y) for v in vectors])
    torch.testing.assert_close(batch.evals[:, 0], expected)
    assert problem.objective_sense == "min"


@pytest.mark.parametrize("common", [True, False])
def test_supervised_minibatches_are_reproducible(common):
    data = _regression_data(50)
    make = lambda: EggrollSupervisedNE(  # noqa: E731
        data, nn.Linear(3, 1), nn.functional.mse_loss, minibatch_size=8, num_minibatches=2,
        common_minibatch=common, device="cpu", seed=3,
    )
    p1, p2 = make(), make()
    torch.manual_seed(1)
    vectors = [torch.randn(p1.solution_length) for _ in range(6)]
    for _ in range(5):  # crosses dataset epochs (50 rows, 8 per minibatch)
        b1, b2 = _batch(p1, vectors), _batch(p2, vectors)
        p1.evaluate(b1)
        p2.evaluate(b2)
        assert torch.equal(b1.evals, b2.evals)
    p3 = pickle.loads(pickle.dumps(p1))
    b1, b3 = _batch(p1, vectors), _batch(p3, vectors)
    p1.evaluate(b1)
    p3.evaluate(b3)
    assert torch.equal(b1.evals, b3.evals)
    if common:  # every member on the same minibatch: equal vectors give equal losses
        b = _batch(p1, [vectors[0]] * 3)
        p1.evaluate(b)
        assert len(set(b.evals[:, 0].tolist())) == 1


def test_stock_pgpe_improves_supervised():
    problem = EggrollSupervisedNE(
        _regression_data(), nn.Linear(3, 1), nn.functional.mse_loss, minibatch_size=32, device="cpu", seed=0
    )
    searcher = PGPE(problem, popsize=16, center_learning_rate=0.1, stdev_learning_rate=0.1, stdev_init=0.2)
    searcher.step()
    first = searcher.status["mean_eval"]
    searcher.run(40)
    assert searcher.status["mean_eval"] < 0.5 * first


def _constant_policy_vector(problem, action):
    """A policy that always picks ``action`` (zero weights, a bias on that action)."""
    net = problem.make_net(torch.zeros(problem.solution_length))
    with torch.no_grad():
        net[-1].bias[action] = 1.0
    return problem.parameters_to_vector(net)


def _first_episode_lengths(env_id, config, seed, actions):
    """Reference: each sub-environment's first-episode length under constant ``actions``."""
    env = gym.make_vec(env_id, num_envs=len(actions), **config)
    env.reset(seed=seed)
    lengths = [None] * len(actions)
    t = 0
    while any(v is None for v in lengths):
        t += 1
        _, _, term, trunc, _ = env.step(np.array(actions))
        for i in np.flatnonzero(term | trunc):
            if lengths[i] is None:
                lengths[i] = t
        if (term | trunc).any() and str(env.metadata.get("autoreset_mode")).lower().endswith("disabled"):
            env.reset(options={"reset_mask": term | trunc})
    env.close()
    return lengths


def _autoreset_modes():
    modes = [("CartPole-v1", {})]
    try:
        from gymnasium.vector import AutoresetMode

        modes += [
            ("CartPole-v1", {"vectorization_mode": "sync", "vector_kwargs": {"autoreset_mode": AutoresetMode.NEXT_STEP}}),
            ("CartPole-v1", {"vectorization_mode": "sync", "vector_kwargs": {"autoreset_mode": AutoresetMode.SAME_STEP}}),
            ("CartPole-v1", {"vectorization_mode": "sync", "vector_kwargs": {"autoreset_mode": AutoresetMode.DISABLED}}),
        ]
    except ImportError:
        pass
    return modes


@pytest.mark.parametrize("env_id,config", _autoreset_modes())
def test_episode_end_stops_accumulating(env_id, config):
    """Members whose episode ends early get exactly that episode's return, whatever the
    environment does afterwards (autoreset), while others keep running."""
    problem = EggrollVecGymNE(env_id, _policy, env_config=config, device="cpu", seed=7)
    right = _constant_policy_vector(problem, 1)
    left = _constant_policy_vector(problem, 0)
    batch = _batch(problem, [right, left, right, left, right])
    problem.evaluate(batch)
    expected = _first_episode_lengths(env_id, config, _mix_seed(7, 0), [1, 0, 1, 0, 1])
    assert len(set(expected)) > 1
    assert batch.evals[:, 0].tolist() == [float(e) for e in expected]
    assert problem.interaction_count == sum(expected)
    assert problem.status["total_episode_count"] == 5


def test_torch_and_gymnasium_cartpole_returns_stay_in_range_over_multiple_episodes():
    """Both environments run through the adapter with two episodes per member; their
    returns lie in CartPole's range of episode lengths, 8..500 (the initial states come from
    different generators, so the values differ), and the torch one counts 12 episodes.
    test_envs.py compares the torch CartPole with Gymnasium's step for step from the same
    states."""
    problem = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=1, num_episodes=2)
    problem_gym = EggrollVecGymNE("CartPole-v1", _policy, device="cpu", seed=1, num_episodes=2)
    torch.manual_seed(0)
    vectors = [torch.randn(problem.solution_length) for _ in range(6)]
    b1, b2 = _batch(problem, vectors), _batch(problem_gym, vectors)
    problem.evaluate(b1)
    problem_gym.evaluate(b2)
    # Different initial-state generators, same physics: both returns are episode lengths.
    for b in (b1, b2):
        assert ((b.evals >= 8) & (b.evals <= 500)).all()
    assert problem.episode_count == 12


def test_the_return_over_episodes_is_the_mean_of_each_episodes_return():
    """With two episodes per evaluation, each member's fitness is exactly the mean of its
    returns in the two episodes that a one-episode problem runs in two evaluations from the
    same starts (the episodes' buffers restart in place between episodes), and the counts
    agree."""
    two = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=3, num_episodes=2, episode_length=60)
    one = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=3, episode_length=60)
    torch.manual_seed(1)
    vectors = [torch.randn(two.solution_length) for _ in range(5)]
    batch = _batch(two, vectors)
    two.evaluate(batch)
    each = []
    for _ in range(2):
        b = _batch(one, vectors)
        one.evaluate(b)
        each.append(b.evals[:, 0].double())
    assert len(set(each[0].tolist() + each[1].tolist())) > 2  # the members and episodes differ
    assert torch.equal(batch.evals[:, 0], ((each[0] + each[1]) / 2).float())
    assert two.episode_count == one.episode_count == 10
    assert two.status["total_interaction_count"] == one.status["total_interaction_count"]


def test_episode_length_cap_and_observation_normalization():
    problem = EggrollVecGymNE(
        CartPole, _policy, device="cpu", seed=0, episode_length=5, observation_normalization=True
    )
    right = _constant_policy_vector(problem, 1)
    batch = _batch(problem, [right, right, right])
    problem.evaluate(batch)
    assert batch.evals[:, 0].tolist() == [5.0, 5.0, 5.0]
    stats = problem.get_observation_stats()
    assert float(stats.count) == 15.0
    policy = problem.to_policy(batch[0])
    out = policy(torch.zeros(1, 4))
    assert out.shape == (1, 2)
    assert problem.status["total_interaction_count"] == 15


def test_env_instance_with_spare_environments():
    env = CartPole(6, device="cpu")
    problem = EggrollVecGymNE(env, _policy, device="cpu", seed=0, episode_length=20)
    torch.manual_seed(0)
    batch = _batch(problem, [torch.randn(problem.solution_length) for _ in range(4)])
    problem.evaluate(batch)
    assert problem.interaction_count == int(batch.evals.sum())
    with pytest.raises(ValueError, match="sub-environments"):
        problem.evaluate(_batch(problem, [torch.randn(problem.solution_length) for _ in range(7)]))


@pytest.mark.parametrize("module", ["supervisedne", "vecgymne"])
def test_pickles_naming_the_single_module_load(module):
    """Pickles of the time when the adapters lived in one module name their classes
    ``evotorch_eggroll.neuroevolution.<class>``: they load through the package's names."""
    if module == "supervisedne":
        problem = EggrollSupervisedNE(_regression_data(16), nn.Linear(3, 1), nn.functional.mse_loss, device="cpu",
                                      seed=1)
    else:
        problem = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=1, episode_length=5)
    data = pickle.dumps(problem, protocol=2)  # names classes as text lines
    path = f"evotorch_eggroll.neuroevolution.{module}\n".encode()
    assert path in data
    loaded = pickle.loads(data.replace(path, b"evotorch_eggroll.neuroevolution\n"))
    assert type(loaded) is type(problem)
    assert torch.equal(loaded.parameters_to_vector(loaded.network), problem.parameters_to_vector(problem.network))


def test_stock_searchers_run_on_rl_adapter_and_pickle():
    problem = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=0, episode_length=30)
    searcher = SNES(problem, popsize=8, stdev_init=0.3)
    searcher.run(2)
    assert isinstance(searcher.status["mean_eval"], float)
    clone = pickle.loads(pickle.dumps(problem))
    torch.manual_seed(0)
    vectors = [torch.randn(problem.solution_length) for _ in range(4)]
    b1, b2 = _batch(problem, vectors), _batch(clone, vectors)
    problem.evaluate(b1)
    clone.evaluate(b2)
    assert torch.equal(b1.evals, b2.evals)


def test_torch_cartpole_autoreset_modes_give_the_same_returns():
    torch.manual_seed(0)
    problems = [
        EggrollVecGymNE(CartPole, _policy, env_config={"autoreset_mode": mode}, device="cpu", seed=4)
        for mode in ("next_step", "disabled")
    ]
    vectors = [torch.randn(problems[0].solution_length) for _ in range(6)]
    evals = []
    for p in problems:
        b = _batch(p, vectors)
        p.evaluate(b)
        evals.append(b.evals)
    assert torch.equal(evals[0], evals[1])
    assert len(set(evals[0][:, 0].tolist())) > 1


def test_loss_without_vmap_support_falls_back_to_a_loop():
    data = _regression_data(16)

    def eager_loss(y_hat, y):  # float() cannot run under torch.func.vmap
        return torch.tensor(float(((y_hat - y) ** 2).mean()))

    torch.manual_seed(0)
    a = EggrollSupervisedNE(data, nn.Linear(3, 1), eager_loss, device="cpu", seed=0)
    b = EggrollSupervisedNE(data, nn.Linear(3, 1), nn.functional.mse_loss, device="cpu", seed=0)
    _assert_same_evals(a, b, 3)


def test_box_action_space_is_clipped():
    torch.manual_seed(0)
    problem = EggrollVecGymNE("Pendulum-v1", _policy, device="cpu", seed=0, episode_length=5)
    assert problem._network_constants["act_length"] == 1
    big = torch.full((problem.solution_length,), 50.0)  # actions far outside [-2, 2]
    batch = _batch(problem, [big, torch.zeros(problem.solution_length)])
    problem.evaluate(batch)
    assert torch.isfinite(batch.evals).all() and (batch.evals < 0).all()
    assert problem.interaction_count == 10


# ---------------------------------------------------------------- materialised forward (vmap)


class _FrozenAndBuffer(nn.Module):
    """A small MLP with a frozen (non-evolved) bias and a buffer, both used in forward."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([0.7, -1.3]))
        self.out.bias.requires_grad_(False)
        self.register_buffer("scale", torch.tensor([2.0, -0.5]))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) * self.scale


class _SignBranch(nn.Module):
    """Data-dependent Python control flow, which torch.func.vmap cannot trace; counts calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.lin(x)
        if y.sum() > 0:
            return y
        return -2.0 * y


def _materialised(net, popsize, dtype=torch.float32, seed=0):
    net = net.to(dtype)
    problem = EggrollNEProblem("max", net, batched_eval_func=lambda f: torch.zeros(f.num_members), device="cpu")
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(popsize, problem.solution_length, generator=g, dtype=dtype)
    fwd = problem._materialised_forward(problem.network, values)
    looped = problem._materialised_forward(problem.network, values)
    looped._fn.vmap_ok = False  # forces one functional_call per member
    nets = [problem.make_net(v) for v in values]
    return fwd, looped, nets


def _reference(nets, x, ids):
    """Row j through its own materialised network ``nets[ids[j]]``."""
    return torch.cat([nets[m](x[j : j + 1]) for j, m in enumerate(ids.tolist())])


def _grouped_reference(nets, x, ids):
    """Each member's rows through its own network in one call (as the member loop does)."""
    out = torch.empty(x.shape[0], 2, dtype=x.dtype)
    for m in ids.unique().tolist():
        out[ids == m] = nets[m](x[ids == m])
    return out


def _assert_same(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    # batched and per-member products may round differently (a few float32 ulps, e.g.
    # cuBLAS picks another kernel); a wrong member or row order differs by O(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_materialised_forward_vmaps_one_row_per_member_in_shuffled_order(dtype):
    fwd, looped, nets = _materialised(_FrozenAndBuffer(), 6, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=dtype)
    ids = torch.randperm(6, generator=g)
    assert not torch.equal(ids, torch.arange(6))
    out = fwd(x, ids)
    assert fwd._fn.vmap_ok is True  # the batched path ran
    _assert_same(out, looped(x, ids), dtype)
    _assert_same(out, _reference(nets, x, ids), dtype)
    # Default ids (row j is member j) take the unsorted fast path.
    _assert_same(fwd(x), _reference(nets, x, torch.arange(6)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_materialised_forward_vmaps_several_equal_rows_per_member(dtype):
    fwd, looped, nets = _materialised(_FrozenAndBuffer(), 5, dtype)
    g = torch.Generator().manual_seed(2)
    # All members, three rows each, rows interleaved in a shuffled order.
    ids = torch.arange(5).repeat(3)[torch.randperm(15, generator=g)]
    x = torch.randn(15, 3, generator=g, dtype=dtype)
    out = fwd(x, ids)
    assert fwd._fn.vmap_ok is True
    _assert_same(out, looped(x, ids), dtype)
    _assert_same(out, _reference(nets, x, ids), dtype)
    # Only some members (their parameters are gathered), two rows each.
    ids = torch.tensor([4, 1, 4, 3, 1, 3])
    x = torch.randn(6, 3, generator=g, dtype=dtype)
    _assert_same(fwd(x, ids), _reference(nets, x, ids), dtype)
    # shared / per_member go through the same path.
    xs = torch.randn(4, 3, generator=g, dtype=dtype)
    _assert_same(fwd.shared(xs), torch.stack([n(xs) for n in nets]), dtype)
    xm = torch.randn(5, 4, 3, generator=g, dtype=dtype)
    _assert_same(fwd.per_member(xm), torch.stack([n(xm[k]) for k, n in enumerate(nets)]), dtype)


def test_materialised_forward_unequal_row_counts_use_the_loop():
    fwd, looped, nets = _materialised(_FrozenAndBuffer(), 4)
    ids = torch.tensor([2, 0, 2, 3, 2, 0])
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    out = fwd(x, ids)
    assert fwd._fn.vmap_ok is None  # vmap was not tried
    _assert_same(out, _reference(nets, x, ids), torch.float32)
    _assert_same(out, looped(x, ids), torch.float32)


def test_materialised_forward_falls_back_when_vmap_cannot_run_the_network():
    fwd, looped, nets = _materialised(_SignBranch(), 4)
    net = fwd._fn.net
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([3, 0, 1, 2, 0, 3, 2, 1])
    expected = _grouped_reference(nets, x, ids)
    _assert_same(looped(x, ids), expected, torch.float32)
    branches = {bool(n.lin(x[ids == m]).sum() > 0) for m, n in enumerate(nets)}
    assert branches == {True, False}  # members take different branches on their rows
    _assert_same(fwd(x, ids), expected, torch.float32)
    assert fwd._fn.vmap_ok is False
    # The failure is remembered: the next call runs once per member, without a vmap attempt.
    calls = net.calls
    _assert_same(fwd(x, ids), expected, torch.float32)
    assert net.calls - calls == 4


def test_stock_pgpe_on_rl_adapter_uses_the_vmapped_forward(monkeypatch):
    from evotorch_eggroll import neuroevolution as ne

    problem = EggrollVecGymNE(CartPole, _policy, device="cpu", seed=0, episode_length=20)
    forwards = []
    original = EggrollNEProblem._materialised_forward

    def recording(self, net, values):
        fwd = original(self, net, values)
        forwards.append(fwd)
        return fwd

    monkeypatch.setattr(EggrollNEProblem, "_materialised_forward", recording)
    searcher = PGPE(problem, popsize=8, center_learning_rate=0.1, stdev_learning_rate=0.1, stdev_init=0.3)
    searcher.step()
    before = pickle.loads(pickle.dumps(problem))  # same reset seeds as the next generation
    searcher.step()
    assert len(forwards) == 2 and all(f._fn.vmap_ok is True for f in forwards)
    assert problem.interaction_count > 0 and np.isfinite(searcher.status["mean_eval"])
    # The generation's fitnesses equal a member-by-member evaluation of the same population.
    monkeypatch.setattr(ne._MaterialisedMembers, "_vmapped", lambda self, params, xs: None)
    pop = searcher.population
    batch = _batch(before, list(pop.values.clone()))
    before.evaluate(batch)
    assert torch.equal(batch.evals, pop.evals)


def _rl_run(replay, generations=3, **kwargs):
    """EGGROLL on the torch CartPole (CUDA): per generation, the fitnesses and the center."""
    import warnings

    from evotorch_eggroll.algorithms import EGGROLL

    def policy(obs_length, act_length):
        return nn.Sequential(nn.Linear(obs_length, 32), nn.Tanh(), nn.Linear(32, act_length))

    torch.manual_seed(0)  # the same initial network for both runs
    problem = EggrollVecGymNE(CartPole, policy, device="cuda", seed=3, **kwargs)
    if not replay:
        problem._replay_disabled = True
    searcher = EGGROLL(problem, popsize=256, sigma=0.3, lr=0.05, rank=1)
    history, captured = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning may fire
        for _ in range(generations):
            searcher.step()
            history.append((searcher.status["mean_eval"], searcher.status["center"].clone(),
                            problem.interaction_count))
            captured.append(getattr(problem, "_captured", None))
    return history, captured


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{"episode_length": 57}, {"episode_length": 50, "observation_normalization": True},
                                    {}])
def test_replayed_rollouts_equal_the_step_by_step_loop(kwargs):
    """Under EGGROLL, torch CartPole rollouts on the GPU are captured once in CUDA graphs and
    replayed in later generations; fitnesses, centers and interaction counts are bit-equal
    to the step-by-step loop (episode caps that are and are not a multiple of the chunk,
    observation normalisation, no cap)."""
    replayed, graphs = _rl_run(True, **kwargs)
    stepped, none = _rl_run(False, **kwargs)
    # captured once: the problem keeps one set of buffers on "cuda" (that is, cuda:N)
    assert graphs[0] is not None and all(g is graphs[0] for g in graphs)
    assert all(g is None for g in none)
    for (fa, ca, ia), (fb, cb, ib) in zip(replayed, stepped):
        assert fa == fb and torch.equal(ca, cb) and ia == ib


def _counting_run(device, monkeypatch, counting, maker, **kwargs):
    """EGGROLL generations on CartPole with the counters in CartPole's step launch or in
    their own (``CartPole._step_counting`` declining): per generation the mean fitness, the
    center and the interaction count, and the counting steps taken."""
    import warnings

    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.kernels import cartpole as cartpole_kernels

    calls, history = [], []
    popsize = kwargs.pop("popsize", 16)
    real = cartpole_kernels.cartpole_step_counting_
    with monkeypatch.context() as m:
        m.setattr(cartpole_kernels, "cartpole_step_counting_",
                  lambda *a: calls.append(1) or real(*a))
        if not counting:
            m.setattr(CartPole, "_step_counting", lambda self, *a: None)
        torch.manual_seed(0)
        problem = EggrollVecGymNE(maker, _policy, device=device, seed=3, **kwargs)
        searcher = EGGROLL(problem, popsize=popsize, sigma=0.3, lr=0.05, rank=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                searcher.step()
                history.append((searcher.status["mean_eval"], searcher.status["center"].clone(),
                                problem.interaction_count))
    return history, len(calls)


def _kernel_cartpole(num_envs, device=None):
    env = CartPole(num_envs, device=device)
    env._use_kernel = True  # the CUDA float64 default; on the CPU through the interpreter
    return env


@pytest.mark.parametrize("kwargs", [{"episode_length": 20, "popsize": 8},
                                    {"episode_length": 16, "popsize": 8, "observation_normalization": True}])
def test_counters_in_cartpoles_step_launch_change_nothing(device, monkeypatch, kwargs):
    """The rollout's counters updated in CartPole's step kernel give the same fitnesses,
    centers and interaction counts, bit for bit, as the counters' own launch."""
    fused, fused_calls = _counting_run(device, monkeypatch, True, _kernel_cartpole, **kwargs)
    plain, plain_calls = _counting_run(device, monkeypatch, False, _kernel_cartpole, **kwargs)
    assert fused_calls > 0 and plain_calls == 0
    for (fa, ca, ia), (fb, cb, ib) in zip(fused, plain):
        assert fa == fb and torch.equal(ca, cb) and ia == ib
    assert not torch.equal(fused[0][1], fused[1][1])  # the center moved between the generations


def test_a_cartpole_subclass_with_its_own_step_is_stepped_through_it(device, monkeypatch):
    """A subclass that overrides ``step`` is never bypassed by the counting step."""
    stepped = []

    class Logged(CartPole):
        def step(self, actions):
            stepped.append(1)
            return super().step(actions)

    def maker(num_envs, device=None):
        env = Logged(num_envs, device=device)
        env._use_kernel = True
        return env

    _, calls = _counting_run(device, monkeypatch, True, maker, episode_length=5, popsize=4)
    # two generations of 5 steps; on a GPU the steps are captured in a CUDA graph and
    # replayed, and the subclass's Python runs only while they are captured
    assert calls == 0 and len(stepped) >= (10 if torch.device(device).type == "cpu" else 5)


@pytest.mark.gpu
def test_counters_in_cartpoles_step_launch_change_nothing_at_real_size(monkeypatch):
    """4,096 members on the GPU, rollouts captured in CUDA graphs: the same results with
    the counters in CartPole's step launch as in their own."""
    kw = dict(episode_length=200, popsize=4096)
    fused, fused_calls = _counting_run("cuda", monkeypatch, True, CartPole, **kw)
    plain, plain_calls = _counting_run("cuda", monkeypatch, False, CartPole, **kw)
    assert fused_calls > 0 and plain_calls == 0
    for (fa, ca, ia), (fb, cb, ib) in zip(fused, plain):
        assert fa == fb and torch.equal(ca, cb) and ia == ib


@pytest.mark.gpu
def test_env_without_in_place_declaration_runs_step_by_step_with_one_warning():
    from evotorch_eggroll.algorithms import EGGROLL

    class Undeclared(CartPole):
        @property
        def cuda_graph_generators(self):
            raise AttributeError("not declared")

    torch.manual_seed(0)
    problem = EggrollVecGymNE(Undeclared, _policy, device="cuda", seed=0, episode_length=20)
    searcher = EGGROLL(problem, popsize=64, rank=1)
    with pytest.warns(RuntimeWarning, match="cuda_graph_generators"):
        searcher.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        searcher.step()  # warned once
    assert getattr(problem, "_captured", None) is None


# ---------------------------------------------------------------------------- EvoTorch habits

_NET_STRING = "Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)"


def _cartpole(device, network=_NET_STRING, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("episode_length", 5)
    return EggrollVecGymNE(CartPole, network, device=device, seed=0, **kwargs)


def _evaluate_materialised(problem, popsize=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    center = problem.parameters_to_vector(problem.network).cpu()
    values = center + 0.1 * torch.randn(popsize, problem.solution_length, generator=g)
    batch = _batch(problem, values.to(problem.device))
    problem.evaluate(batch)
    return batch


def test_network_string_builds_the_same_architecture_as_the_module(device):
    from evotorch_eggroll.algorithms import EGGROLL

    by_string = _cartpole(device)
    by_module = _cartpole(device, network=nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    shapes = [tuple(p.shape) for p in by_string.network.parameters()]
    assert shapes == [tuple(p.shape) for p in by_module.network.parameters()] == [(8, 4), (8,), (2, 8), (2,)]
    assert by_string.solution_length == by_module.solution_length == 58
    v = torch.linspace(-1, 1, 58, device=device)
    x = torch.randn(5, 4, device=device)
    torch.testing.assert_close(by_string.make_net(v)(x), by_module.make_net(v)(x))

    by_string = _cartpole(device, episode_length=40)  # long enough for returns to differ
    searcher = EGGROLL(by_string, popsize=8, rank=1, sigma=0.5, lr=0.1)
    before = searcher.status["center"].clone()
    searcher.step()
    assert searcher.status["mean_eval"] > 0
    assert not torch.equal(searcher.status["center"], before)


def test_network_string_names_come_from_network_args_in_every_adapter():
    data = _regression_data(16)
    sup = EggrollSupervisedNE(
        data, "Linear(3, hidden) >> Tanh() >> Linear(hidden, 1)", nn.functional.mse_loss,
        network_args={"hidden": 5}, device="cpu", seed=0,
    )
    assert sup.solution_length == 3 * 5 + 5 + 5 + 1
    base = EggrollNEProblem(
        "max", "Linear(2, width) >> ReLU()", batched_eval_func=lambda fwd: torch.zeros(fwd.num_members),
        network_args={"width": 3}, device="cpu",
    )
    assert base.solution_length == 2 * 3 + 3
    assert base.network_constants() == {"width": 3}
    with pytest.raises(TypeError, match="network string"):
        EggrollNEProblem("max", 42, network_eval_func=lambda n: 0.0, device="cpu")


def test_parameterize_net_fills_and_returns_the_working_network():
    problem = _cartpole("cpu")
    initial = problem.parameters_to_vector(problem.network).clone()
    v = torch.arange(58, dtype=torch.float32) / 58
    net = problem.parameterize_net(v)
    assert torch.equal(problem.parameters_to_vector(net), v)
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), problem.make_net(v)(x))
    # As in EvoTorch: the same network object each call, refilled; make_net is the copy.
    w = -v
    batch = _batch(problem, [w])
    assert problem.parameterize_net(batch[0]) is net
    assert torch.equal(problem.parameters_to_vector(net), w)
    assert torch.equal(problem.parameters_to_vector(problem.network), initial)
    with pytest.raises(ValueError, match="length 58"):
        problem.parameterize_net(torch.zeros(57))


@pytest.mark.parametrize("normalise", [False, True])
def test_save_solution_writes_evotorchs_pickled_dict(tmp_path, normalise):
    problem = _cartpole("cpu", observation_normalization=normalise)
    batch = _evaluate_materialised(problem)
    solution = batch[1]
    fname = tmp_path / "solution.pickle"
    problem.save_solution(solution, fname)
    with open(fname, "rb") as f:
        saved = pickle.load(f)
    expected = {"solution", "policy", "interaction_count", "episode_count", "time", "architecture"}
    if normalise:
        expected |= {"obs_mean", "obs_stdev", "obs_sum", "obs_sum_of_squares"}
    assert set(saved) == expected
    assert type(saved["solution"]) is torch.Tensor and saved["solution"].device.type == "cpu"
    assert torch.equal(saved["solution"], solution.values.as_subclass(torch.Tensor).cpu())
    assert saved["architecture"] == _NET_STRING
    assert saved["interaction_count"] == problem.interaction_count > 0
    assert saved["episode_count"] == problem.episode_count == 4
    x = torch.randn(6, 4) * 2
    torch.testing.assert_close(saved["policy"](x), problem.to_policy(solution)(x))
    if normalise:
        stats = problem.get_observation_stats()
        torch.testing.assert_close(saved["obs_mean"], stats.mean)
        torch.testing.assert_close(saved["obs_sum_of_squares"], stats.sum_of_squares)
        plain = problem.make_net(solution)
        torch.testing.assert_close(saved["policy"](x), plain(((x - stats.mean) / stats.stdev).float()))


def test_save_solution_records_a_gymnasium_id_and_a_module_architecture(tmp_path):
    problem = EggrollVecGymNE("CartPole-v1", _policy, device="cpu", seed=0, episode_length=3)
    problem.save_solution(torch.zeros(problem.solution_length), tmp_path / "s.pkl")
    with open(tmp_path / "s.pkl", "rb") as f:
        saved = pickle.load(f)
    assert saved["env"] == "CartPole-v1"
    assert isinstance(saved["architecture"], nn.Module)
    assert torch.equal(saved["policy"](torch.ones(2, 4)), problem.make_net(torch.zeros(problem.solution_length))(torch.ones(2, 4)))


def test_observation_stats_set_get_update_round_trip():
    from evotorch.neuroevolution.net.runningnorm import RunningNorm

    source = _cartpole("cpu", observation_normalization=True)
    _evaluate_materialised(source)
    stats = source.get_observation_stats()
    target = _cartpole("cpu", observation_normalization=True)
    assert target.get_observation_stats() is None
    target.set_observation_stats(stats)
    got = target.get_observation_stats()
    assert got is not stats  # a copy: the two problems' statistics evolve separately
    for name in ("count", "sum", "sum_of_squares", "mean", "stdev"):
        assert torch.equal(getattr(got, name), getattr(stats, name)), name

    target.update_observation_stats(stats)
    assert float(target.get_observation_stats().count) == 2 * float(stats.count)
    torch.testing.assert_close(target.get_observation_stats().mean, stats.mean)

    # EvoTorch's own RunningNorm is accepted too.
    rows = torch.randn(50, 4, dtype=torch.float64) * 3 + 1
    rn = RunningNorm(shape=4, dtype=torch.float64)
    rn.update(rows)
    target.set_observation_stats(rn)
    torch.testing.assert_close(target.get_observation_stats().mean, rows.mean(0))
    target.set_observation_stats(RunningNorm(shape=4, dtype=torch.float32))  # empty
    assert float(target.get_observation_stats().count) == 0
    target.set_observation_stats(None)
    assert target.get_observation_stats() is None


def test_observation_stats_errors():
    from evotorch.neuroevolution.net.runningnorm import RunningNorm

    from evotorch_eggroll.neuroevolution import RunningObsNorm

    problem = _cartpole("cpu", observation_normalization=True)
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(4,\)"):
        problem.set_observation_stats(RunningObsNorm((3,)))
    wrong = RunningNorm(shape=5, dtype=torch.float32)
    wrong.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        problem.update_observation_stats(wrong)
    with pytest.raises(TypeError, match="RunningNorm"):
        problem.set_observation_stats({"mean": torch.zeros(4)})
    plain = _cartpole("cpu")
    for call in (plain.get_observation_stats, lambda: plain.set_observation_stats(RunningObsNorm((4,)))):
        with pytest.raises(ValueError, match="observation_normalization=True"):
            call()


def test_episode_and_interaction_counters_can_be_set():
    problem = _cartpole("cpu")
    problem.set_episode_count(7)
    problem.set_interaction_count(70)
    assert (problem.episode_count, problem.interaction_count) == (7, 70)


def test_unusable_device_gets_the_package_message():
    with pytest.raises(ValueError, match="not a torch device"):
        EggrollVecGymNE(CartPole, _policy, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            EggrollVecGymNE(CartPole, _policy, device="cuda")
    else:
        with pytest.raises(RuntimeError, match="CUDA device"):
            EggrollVecGymNE(CartPole, _policy, device=f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("e", [1, 37, 2050])
def test_episode_step_kernel_equals_the_torch_counters(device, reward_dtype, e):
    """The one-launch counter update equals the torch expressions it replaces, bit for bit."""
    from evotorch_eggroll.kernels import episode_step

    g = torch.Generator().manual_seed(e)
    returns = (torch.randn(e, generator=g, dtype=torch.float64) * 100).to(device)
    alive = torch.randint(0, 500, (e,), generator=g).to(device)
    active = (torch.rand(e, generator=g) < 0.7).to(device)
    reward = (torch.randn(e, generator=g, dtype=torch.float64) / 3).to(device, reward_dtype)
    terminated = (torch.rand(e, generator=g) < 0.2).to(device)
    truncated = (torch.rand(e, generator=g) < 0.1).to(device)
    want_returns = returns + torch.where(active, reward.to(torch.float64), 0.0)
    want_alive = alive + active
    want_done = terminated | truncated
    want_active = active & ~want_done
    assert episode_step.supports(returns, alive, active, reward, terminated, truncated)
    done = episode_step.episode_step_(returns, alive, active, reward, terminated, truncated)
    assert torch.equal(done, want_done)
    assert torch.equal(returns, want_returns) and torch.equal(alive, want_alive)
    assert torch.equal(active, want_active)
    assert not episode_step.supports(returns, alive, active, reward.to(torch.float16), terminated, truncated)
    assert not episode_step.supports(returns, alive, active, reward[:-1], terminated, truncated)


class _FakeGraph:
    """A captured chunk of ``steps`` steps: replaying it advances a step counter and ends
    every environment once the counter reaches ``end``."""

    def __init__(self, clock: dict, steps: int, active: torch.Tensor, end) -> None:
        self.clock, self.steps, self.active, self.end = clock, steps, active, end

    def replay(self) -> None:
        self.clock["replays"].append(self.steps)
        self.clock["t"] += self.steps
        if self.end is not None and self.clock["t"] >= self.end:
            self.active.zero_()


class _HostEvent:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _fake_rollout(end, chunk):
    """A ``_CapturedRollout`` whose graphs are :class:`_FakeGraph` (the replay loop's logic
    without a GPU) and the clock its replays advance."""
    from evotorch_eggroll.neuroevolution.rollout import _CapturedRollout, _RolloutBuffers

    buf = _RolloutBuffers(4, 4, torch.device("cpu"), torch.float32, None)
    clock = {"t": 0, "replays": []}
    rollout = object.__new__(_CapturedRollout)
    rollout.buf = buf
    rollout.graphs = {n: _FakeGraph(clock, n, buf.active, end) for n in {chunk, 1}}
    rollout._any_active = torch.zeros((), dtype=torch.bool)
    rollout._any_active_host = torch.zeros(2, dtype=torch.bool)
    rollout._any_active_ready = [_HostEvent(), _HostEvent()]
    rollout.lag = 1
    rollout._unread = None
    return rollout, clock


def test_a_captured_rollout_serves_only_the_buffers_it_was_captured_with():
    """Its graphs read and write one set of buffers at fixed addresses: another set, even of
    the same shape, does not match (the rollout is captured again), and a new episode in the
    same, restarted buffers only loads the first observations."""
    from evotorch_eggroll.neuroevolution.rollout import _RolloutBuffers

    rollout, _ = _fake_rollout(None, 50)
    rollout.env_ref = env = object()
    other = _RolloutBuffers(4, 4, torch.device("cpu"), torch.float32, None)
    assert not rollout.matches(env, other, None, None)
    rollout.obs = torch.zeros(4, 4)
    rollout.buf.returns.fill_(3.0)
    rollout.buf.restart(torch.ones(4, 4))
    rollout.start(rollout.buf.obs)
    assert torch.equal(rollout.obs, torch.ones(4, 4)) and not bool(rollout.buf.returns.any())
    assert bool(rollout.buf.active.all())


def test_the_rollout_buffers_fit_a_cuda_device_named_without_its_index(monkeypatch):
    """A problem on ``"cuda"`` keeps one set of buffers, allocated on ``cuda:N``: the
    evaluation resolves its device to the current CUDA device before asking the buffers
    whether they fit (else every generation would allocate new buffers and capture its
    rollout again)."""
    from evotorch_eggroll.neuroevolution import rollout as rollout_module
    from evotorch_eggroll.neuroevolution.baseneproblem import _indexed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _indexed(torch.device("cuda")) == torch.device("cuda", 1)
    assert _indexed("cuda:0") == torch.device("cuda", 0)
    assert _indexed(torch.device("cpu")) == torch.device("cpu")
    buf = rollout_module._RolloutBuffers(4, 4, torch.device("cpu"), torch.float32, None)
    assert buf.fits(4, 4, torch.device("cpu"), torch.float32) and buf.fits(4, 4, "cpu", torch.float32)
    assert not buf.fits(4, 4, torch.device("cuda"), torch.float32)
    assert not buf.fits(4, 3, "cpu", torch.float32) and not buf.fits(4, 4, "cpu", torch.float64)


@pytest.mark.parametrize("start, limit, end, replays", [
    (2, 200, None, [50, 50, 50] + [1] * 48),  # capped: full chunks, then single steps
    (2, 200, 70, [50, 50, 50]),  # all ended in chunk 2: read after chunk 3 was queued
    (0, 200, 120, [50, 50, 50, 50]),  # ended in chunk 3: its flag could stop nothing more
    (0, None, 60, [50, 50, 50]),  # no cap: ended in chunk 2, read after chunk 3
    (0, 100, 10, [50, 50]),  # the cap ends it; no flag is computed after the last chunk
])
def test_replay_loop_reads_the_all_ended_flag_one_chunk_late(start, limit, end, replays):
    """The captured rollout's loop queues the next chunk before it reads whether every
    environment ended after the previous one; it stops at the first chunk queued after the
    flag says so, never waits for a flag once the last chunk is queued, and returns the
    steps run. The next rollout starts without a lag after one that ran to its cap (read
    from its newest flag then), else with a lag of one chunk."""
    rollout, clock = _fake_rollout(end, 50)
    clock["t"] = start
    t = rollout.run(start, limit, 50)
    assert clock["replays"] == replays
    assert t == start + sum(replays) == clock["t"]
    rollout._settle_lag()
    assert rollout.lag == (None if limit is not None and (end is None or end >= limit) else 1)


class _CountingEvent(_HostEvent):
    def __init__(self, waits: list) -> None:
        self.waits = waits

    def synchronize(self) -> None:
        self.waits.append(1)


@pytest.mark.parametrize("limit, end, replays, lag_after", [
    (200, None, [50, 50, 50, 50], None),  # ran to the cap again: still no lag
    (200, 70, [50, 50, 50, 50], 1),  # all ended in chunk 2: the newest flag (chunk 3) says so
    (200, 20, [50, 50, 50, 50], 1),
    (120, 20, [50, 50] + [1] * 20, 1),
    (300, 20, [50] * 6, 1),
])
def test_after_a_rollout_that_ran_to_its_cap_no_flag_is_waited_for(limit, end, replays, lag_after):
    """A capped rollout that ran to its cap drops the lag: the next rollout queues all its
    chunks without waiting for the device (the host is free at once for the update). Its
    newest flag, read when the rollout after it starts, sets the lag back to one chunk if
    every environment had ended before the last chunk. An uncapped rollout always reads
    one chunk late (nothing else would end it)."""
    rollout, clock = _fake_rollout(None, 50)
    rollout.run(0, 200, 50)  # ran to its cap
    rollout._settle_lag()
    assert rollout.lag is None
    rollout, clock = _fake_rollout(end, 50)
    waits = []
    rollout._any_active_ready = [_CountingEvent(waits), _CountingEvent(waits)]
    rollout.lag = None
    t = rollout.run(0, limit, 50)
    assert clock["replays"] == replays and t == sum(replays)
    assert waits == []  # nothing waited for during the rollout
    rollout._settle_lag()
    assert waits == [1] and rollout.lag == lag_after
    rollout, clock = _fake_rollout(60, 50)
    rollout.lag = None
    assert rollout.run(0, None, 50) == 150 and rollout.lag == 1


def test_interaction_count_kept_on_the_device_is_read_when_asked_for(device):
    """An evaluation leaves its step count on the device (nothing after the rollout waits
    for it); the count, the status, a pickle and a restored generation state all see it."""
    from evotorch_eggroll.algorithms import EGGROLL

    problem = _cartpole(device, episode_length=6)
    searcher = EGGROLL(problem, popsize=8, rank=1, sigma=0.5, lr=0.1)
    searcher.step()
    state = problem.generation_state()
    first = problem.interaction_count
    assert 8 <= first <= 48 and state["interactions"] == first
    assert searcher.status["total_interaction_count"] == first
    searcher.step()  # its status (read by the searcher at the end of the step) settles it
    second = problem.interaction_count
    assert second > first and problem.status["total_interaction_count"] == second
    # a count still being copied (as EGGROLL's evaluation leaves it until the status is
    # read) is settled by a pickle, which then holds the plain count
    count = torch.tensor([5], dtype=torch.int64, device=device)
    problem._pending_interactions = [(start_read(count), count)]
    clone = pickle.loads(pickle.dumps(problem))
    assert problem._pending_interactions is None and clone._pending_interactions is None
    assert type(clone._interaction_count) is int
    assert clone.interaction_count == problem.interaction_count == second + 5
    problem.restore_generation_state(state)
    assert problem.interaction_count == first and problem.status["total_interaction_count"] == first


def test_step_counts_waiting_for_a_read_are_bounded(device, monkeypatch):
    """Evaluations whose interaction count nobody reads keep at most a bounded number of
    counts being copied (the older ones are added up), and the count stays exact."""
    from evotorch_eggroll import EggrollStrategy
    from evotorch_eggroll.neuroevolution import vecgymne

    monkeypatch.setattr(vecgymne, "_MAX_PENDING_COUNTS", 3)
    counts = []
    for read_each_time in (True, False):
        problem = _cartpole(device, episode_length=30)
        network = problem.network.to(device)
        strategy = EggrollStrategy(sigma=0.5, rank=1, seed=1).setup(network)
        for _ in range(7):
            with torch.no_grad(), strategy.perturb(4) as pop:
                problem.evaluate_population(pop, network)
            if read_each_time:
                assert problem.interaction_count > 0 and problem._pending_interactions is None
            else:
                assert 1 <= len(problem._pending_interactions) <= 3
        counts.append(problem.interaction_count)
    assert counts[0] == counts[1] > 7 * 4


@pytest.mark.gpu
def test_the_update_is_queued_without_reading_the_rollout_back():
    """After the rollout is queued, nothing reads a device value back to the host before
    the step's one read of its checks and metrics: the whole update is queued behind the
    rollout (CUDA's synchronisation debug mode turns any other read into an error)."""
    from evotorch_eggroll import strategy as strategy_module
    from evotorch_eggroll.algorithms import EGGROLL

    torch.manual_seed(0)
    problem = EggrollVecGymNE(CartPole, _policy, device="cuda", seed=3, episode_length=60)
    searcher = EGGROLL(problem, popsize=512, rank=1, sigma=0.3, lr=0.05, optimizer="adam")
    searcher.step()  # compiles the kernels and captures the rollout
    reads = []
    host_values, evaluate = strategy_module._host_values, searcher._mode.evaluate

    def read(values):
        torch.cuda.set_sync_debug_mode(0)
        reads.append(values)
        return host_values(values)

    def evaluated(*args):
        out = evaluate(*args)
        torch.cuda.set_sync_debug_mode("error")
        return out

    strategy_module._host_values, searcher._mode.evaluate = read, evaluated
    try:
        searcher.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        strategy_module._host_values = host_values
        del searcher._mode.evaluate
    assert len(reads) == 1
    assert problem.interaction_count > 0 and searcher.status["mean_eval"] > 0


@pytest.mark.parametrize("outputs", [2, 1])
def test_discrete_actions_from_the_policys_own_argmax_equal_those_from_its_outputs(device, monkeypatch,
                                                                                     outputs):
    """Under EGGROLL a Discrete space's actions come from the forward's own argmax (for a
    plain MLP, the policy kernel's last step): the same fitnesses and center as actions
    taken by ``argmax`` of the outputs. A two-action policy with one output (its sign) is
    noticed at the first step and remembered."""
    import warnings

    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.kernels import drawn_mlp

    def run(fused):
        torch.manual_seed(0)
        def policy(obs_length, act_length):
            return nn.Sequential(nn.Linear(obs_length, 8), nn.Tanh(), nn.Linear(8, outputs))

        problem = EggrollVecGymNE(CartPole, policy, episode_length=30, seed=1, device=device)
        searcher = EGGROLL(problem, popsize=16, sigma=0.3, lr=0.05, rank=1)
        launches = []
        with monkeypatch.context() as m:
            real = drawn_mlp.drawn_mlp
            m.setattr(drawn_mlp, "drawn_mlp", lambda *a, **k: launches.append(k.get("argmax")) or real(*a, **k))
            if not fused:
                def from_outputs(self, x, member_ids=None):
                    scores = self(x, member_ids).reshape(x.shape[0], -1)
                    return scores.argmax(dim=1), scores.shape[1]

                m.setattr(PopulationForward, "_argmax", from_outputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):
                    searcher.step()
        return searcher.status["mean_eval"], searcher.status["center"].clone(), launches, problem

    mean_f, center_f, launches_f, problem_f = run(True)
    mean_o, center_o, launches_o, _ = run(False)
    assert mean_f == mean_o and torch.equal(center_f, center_o)
    assert not any(launches_o)
    if outputs == 2:
        assert launches_f and all(launches_f)  # every policy launch returned the actions
        assert not problem_f.__dict__.get("_sign_actions")
    else:
        assert launches_f[0] is True and not any(launches_f[1:])  # tried once, then remembered
        assert problem_f._sign_actions is True


@pytest.mark.gpu
def test_dependent_launches_change_no_result(monkeypatch):
    """On compute capability 9.0 and later, a rollout step's policy and CartPole kernels are
    programmatic dependent launches (each waits for the kernel before it before its first
    memory access): the centers after generations of captured rollouts are bit-identical
    to those of ordinary launches."""
    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.kernels import compat
    from evotorch_eggroll.rollout_benchmark import cartpole_policy

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    centers = []
    for dependent in (True, False):
        monkeypatch.setattr(compat, "_dependent", {})
        monkeypatch.setattr(compat, "_HAS_PDL", dependent and compat._HAS_PDL)
        assert bool(compat.dependent_launch(torch.device("cuda"))) == dependent
        torch.manual_seed(0)
        problem = EggrollVecGymNE(CartPole, cartpole_policy, device="cuda", seed=2, episode_length=120)
        searcher = EGGROLL(problem, popsize=2048, rank=1)
        for _ in range(4):
            searcher.step()
        assert problem._captured is not None  # the rollouts were replayed
        centers.append(searcher.status["center"].clone())
    assert torch.equal(*centers)
