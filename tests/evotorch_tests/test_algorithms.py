"""The EvoTorch searcher EGGROLL: plain problems (dense mode) and our adapters (low-rank)."""

import pickle

import pytest
import torch
from evotorch import Problem, Solution
from evotorch.logging import PandasLogger, PicklingLogger, StdOutLogger
from torch import nn

from evotorch_eggroll import noise, ops
from evotorch_eggroll.algorithms import EGGROLL, rank_fitnesses
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.neuroevolution import EggrollNEProblem, EggrollSupervisedNE, EggrollVecGymNE

STATUS_KEYS = ("center", "sigma", "stdev", "mean_eval", "median_eval", "pop_best_eval", "best_eval", "pop_best", "best")


def _sphere(x):
    return (x**2).sum(-1)


def _negated_sphere(x):
    return -(x**2).sum(-1)


def _sphere_problem(sense="min", seed=0, length=8):
    return Problem(
        sense, _sphere if sense == "min" else _negated_sphere, solution_length=length, initial_bounds=(-3, 3),
        vectorized=True, seed=seed,
    )


def _regression_problem(device, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(seed)
    kwargs.setdefault("minibatch_size", 8)
    problem = EggrollSupervisedNE(data, nn.Linear(3, 1), nn.functional.mse_loss, device=device, seed=seed, **kwargs)
    return problem, x.to(device), y.to(device)


def _policy(obs_length, act_length):
    return nn.Sequential(nn.Linear(obs_length, 4), nn.Tanh(), nn.Linear(4, act_length))


def _rl_problem(device, **kwargs):
    torch.manual_seed(0)
    return EggrollVecGymNE(CartPole, _policy, device=device, seed=0, episode_length=8, **kwargs)


def _check_status(searcher, problem):
    status = dict(searcher.status)
    for key in STATUS_KEYS:
        assert key in status, key
    assert isinstance(status["center"], torch.Tensor) and status["center"].shape == (problem.solution_length,)
    for key in ("sigma", "stdev", "mean_eval", "median_eval", "pop_best_eval", "best_eval"):
        assert isinstance(status[key], float), key
    for key in ("pop_best", "best"):
        assert isinstance(status[key], Solution), key
        assert status[key].values.shape == (problem.solution_length,)
        assert status[key].is_evaluated
    assert status["iter"] == searcher.step_count
    return status


# ---------------------------------------------------------------------------- ranking


def test_rank_fitnesses_methods():
    f = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert rank_fitnesses(f, "centered", higher_is_better=True).tolist() == [0.5, -0.5, 0.0, 0.0]
    assert rank_fitnesses(f, "centered", higher_is_better=False).tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert rank_fitnesses(f, "linear", higher_is_better=True).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert rank_fitnesses(f, "raw", higher_is_better=False).tolist() == [-3.0, -1.0, -2.0, -2.0]
    assert rank_fitnesses(f, None, higher_is_better=True).tolist() == f.tolist()
    z = rank_fitnesses(f, "normalized", higher_is_better=True)
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std(unbiased=False)) - 1) < 1e-6
    nes = rank_fitnesses(torch.tensor([1.0, 4.0, 2.0, 3.0]), "nes", higher_is_better=True)
    assert abs(float(nes.sum())) < 1e-12 and int(nes.argmax()) == 1 and nes[2] == nes[0]
    assert torch.equal(rank_fitnesses(f, "rank", higher_is_better=True), rank_fitnesses(f, "centered", higher_is_better=True))
    with pytest.raises(ValueError, match="ranking_method"):
        rank_fitnesses(f, "bogus", higher_is_better=True)
    with pytest.raises(ValueError, match="NaN"):
        rank_fitnesses(torch.tensor([1.0, float("nan")]), "centered", higher_is_better=True)


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("method", ["centered", "linear", "nes"])
def test_rank_methods_are_evotorchs_with_ties_sharing_their_mean_weight(method, higher_is_better):
    """Without ties the weights are EvoTorch's; each tie gets the mean of the weights
    EvoTorch gives its members (a set that does not depend on EvoTorch's order within it)."""
    from evotorch.tools import ranking

    evotorch_rank = getattr(ranking, method)
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 16, 40, 301):
        distinct = torch.randperm(n, generator=g).double()
        ours = rank_fitnesses(distinct, method, higher_is_better=higher_is_better)
        torch.testing.assert_close(ours, evotorch_rank(distinct, higher_is_better=higher_is_better),
                                   rtol=1e-12, atol=1e-12)
        tied = torch.randint(0, max(2, n // 4), (n,), generator=g).double()  # many ties
        ours = rank_fitnesses(tied, method, higher_is_better=higher_is_better)
        theirs = evotorch_rank(tied, higher_is_better=higher_is_better)
        for value in tied.unique():
            tie = tied == value
            expected = theirs[tie].mean().expand(int(tie.sum()))
            torch.testing.assert_close(ours[tie], expected, rtol=1e-12, atol=1e-12)
            assert bool((ours[tie] == ours[tie][0]).all())  # equal fitness, equal weight


# ---------------------------------------------------------------------------- dense mode


@pytest.mark.parametrize("sense", ["min", "max"])
def test_sphere_improves_in_both_senses(sense):
    # the plain-torch path: the same noise stream, without Triton's interpreter on the CPU
    problem = _sphere_problem(sense)
    searcher = EGGROLL(problem, popsize=20, sigma=0.3, lr=0.1, backend="torch")
    searcher.step()
    first = searcher.status["mean_eval"]
    searcher.run(40)  # the mean reaches about 0.03 of its start, the center's norm² 0.17
    last = searcher.status["mean_eval"]
    if sense == "min":
        assert last < 0.2 * first
    else:
        assert last > 0.2 * first  # fitness is negative: closer to 0 is better
    assert float((searcher.status["center"] ** 2).sum()) < 0.5
    _check_status(searcher, problem)


def test_min_equals_max_of_negation():
    a = EGGROLL(_sphere_problem("min"), popsize=10, sigma=0.3, lr=0.1)
    b = EGGROLL(_sphere_problem("max"), popsize=10, sigma=0.3, lr=0.1)
    a.run(5)
    b.run(5)
    assert torch.equal(a.status["center"], b.status["center"])
    assert a.status["best_eval"] == -b.status["best_eval"]


@pytest.mark.parametrize("method", ["centered", "linear", "nes", "normalized", "raw"])
def test_every_ranking_method_runs(method):
    searcher = EGGROLL(_sphere_problem(), popsize=12, sigma=0.3, lr=0.05, ranking_method=method)
    searcher.run(3)
    assert torch.isfinite(searcher.status["center"]).all()


def test_dense_best_solutions_are_the_evaluated_members():
    problem = _sphere_problem()
    searcher = EGGROLL(problem, popsize=10, sigma=0.3, lr=0.1, optimizer="sgd")
    searcher.run(4)
    for key in ("pop_best", "best"):
        sol = searcher.status[key]
        value = float((sol.values**2).sum())
        assert value == pytest.approx(float(sol.evals[0]), rel=1e-5)
    assert searcher.status["best_eval"] <= searcher.status["pop_best_eval"]
    assert searcher.status["best_eval"] == pytest.approx(float(searcher.status["best"].evals[0]))


def test_equal_fitness_leaves_center_unchanged():
    problem = Problem("max", lambda x: torch.zeros(x.shape[0]), solution_length=5, initial_bounds=(-1, 1), vectorized=True, seed=0)
    searcher = EGGROLL(problem, popsize=8, sigma=0.5, lr=0.5)
    before = searcher.status["center"].clone()
    searcher.run(3)
    assert torch.equal(searcher.status["center"], before)


def test_loggers_and_quiet_run(capsys, tmp_path):
    problem = _sphere_problem()
    searcher = EGGROLL(problem, popsize=10, sigma=0.3, lr=0.1)
    capsys.readouterr()
    searcher.run(2)
    assert capsys.readouterr().out == ""
    pandas_logger = PandasLogger(searcher)
    StdOutLogger(searcher)
    PicklingLogger(searcher, interval=1, directory=str(tmp_path))
    searcher.run(3)
    out = capsys.readouterr().out
    assert "mean_eval" in out and "best_eval" in out
    frame = pandas_logger.to_dataframe()
    assert len(frame) == 3
    for column in ("sigma", "stdev", "mean_eval", "median_eval", "pop_best_eval", "best_eval"):
        assert column in frame.columns
    assert "center" not in frame.columns and "pop_best" not in frame.columns
    assert len(list(tmp_path.iterdir())) == 3


def _pickled_resume_matches_straight(make, generations: int, logger=None) -> EGGROLL:
    """``make()`` run ``generations`` straight, and another ``make()`` run half of them,
    pickled, unpickled and run the other half: the same center and mean evaluation, bit for
    bit. Returns the resumed searcher."""
    straight = make()
    straight.run(generations)
    first = make()
    if logger is not None:
        logger(first)  # hooks are dropped when pickling
    first.run(generations // 2)
    resumed = pickle.loads(pickle.dumps(first))
    resumed.run(generations - generations // 2)
    assert torch.equal(resumed.status["center"], straight.status["center"])
    assert resumed.status["mean_eval"] == straight.status["mean_eval"]
    return resumed


def test_dense_pickle_resumes_bit_identically():
    resumed = _pickled_resume_matches_straight(
        lambda: EGGROLL(_sphere_problem(), popsize=10, sigma=0.3, lr=0.1), 6, logger=PandasLogger)
    assert resumed.step_count == 6


def test_dense_chunks_and_noise_reuse():
    whole = EGGROLL(_sphere_problem(), popsize=12, sigma=0.3, lr=0.1)
    chunked = EGGROLL(_sphere_problem(), popsize=12, sigma=0.3, lr=0.1, chunk_size=5)
    whole.run(3)
    chunked.run(3)
    torch.testing.assert_close(whole.status["center"], chunked.status["center"])
    assert whole.status["mean_eval"] == pytest.approx(chunked.status["mean_eval"])

    fixed = EGGROLL(_sphere_problem(), popsize=6, sigma=0.3, lr=0.0, noise_reuse=0)
    fixed.step()
    a = fixed.status["pop_best"].values.clone()
    fixed.step()
    assert torch.equal(fixed.status["pop_best"].values, a)  # same noise, unchanged center


def test_constructor_validation():
    problem = _sphere_problem()
    with pytest.raises(ValueError, match="popsize"):
        EGGROLL(problem, popsize=0)
    with pytest.raises(ValueError, match="sigma"):
        EGGROLL(problem, popsize=4, sigma=-1.0)
    with pytest.raises(ValueError, match="ranking_method"):
        EGGROLL(problem, popsize=4, ranking_method="best")
    with pytest.raises(ValueError, match="optimizer"):
        EGGROLL(problem, popsize=4, optimizer="clipup")
    with pytest.raises(RuntimeError, match="init_process_group"):
        EGGROLL(problem, popsize=4, distributed=True)  # no process group in this process
    with pytest.raises(ValueError):
        EGGROLL(Problem(["min", "max"], lambda x: x[:, :2], solution_length=3, initial_bounds=(-1, 1), vectorized=True), popsize=4)


# ---------------------------------------------------------------------------- low-rank mode


def test_supervised_loss_decreases(device):
    problem, x, y = _regression_problem(device)
    searcher = EGGROLL(problem, popsize=8, sigma=0.1, lr=0.1, rank=1)
    assert searcher.strategy is not None

    @torch.no_grad()
    def center_loss():
        return float(nn.functional.mse_loss(problem.make_net(searcher.status["center"])(x), y))

    before = center_loss()
    searcher.run(25)
    assert center_loss() < 0.3 * before
    _check_status(searcher, problem)


def test_lowrank_members_match_materialised_evaluation(device):
    """pop_best is the member the low-rank path evaluated: re-evaluating its materialised
    vector through the EvoTorch path gives the same fitness."""
    problem, x, y = _regression_problem(device, minibatch_size=None)
    searcher = EGGROLL(problem, popsize=6, sigma=0.2, lr=0.05, rank=1)
    searcher.step()
    sol = searcher.status["pop_best"]
    with torch.no_grad():
        loss = float(nn.functional.mse_loss(problem.make_net(sol.values)(x), y))
    assert loss == pytest.approx(searcher.status["pop_best_eval"], rel=1e-4, abs=1e-6)
    assert searcher.status["best"].values.shape == sol.values.shape


def test_lowrank_min_equals_max_of_negation(device):
    x = torch.linspace(-1, 1, 4, device=device)[:, None]

    def loss(forward):
        return (forward.shared(x)[..., 0] - x[:, 0]).pow(2).mean(dim=1)

    torch.manual_seed(0)
    net = nn.Linear(1, 1)
    a = EggrollNEProblem("min", net, batched_eval_func=loss, device=device)
    b = EggrollNEProblem("max", net, batched_eval_func=lambda f: -loss(f), device=device)
    sa = EGGROLL(a, popsize=4, sigma=0.1, lr=0.05, rank=1)
    sb = EGGROLL(b, popsize=4, sigma=0.1, lr=0.05, rank=1)
    sa.run(2)
    sb.run(2)
    assert torch.equal(sa.status["center"], sb.status["center"])
    assert sa.status["mean_eval"] == -sb.status["mean_eval"]


def test_lowrank_pickle_resumes_bit_identically(device):
    resumed = _pickled_resume_matches_straight(
        lambda: EGGROLL(_regression_problem(device)[0], popsize=6, sigma=0.1, lr=0.05, rank=1), 4)
    assert resumed.epoch == 4


def test_rl_adapter_status_and_loggers(device, tmp_path):
    problem = _rl_problem(device, observation_normalization=True)
    searcher = EGGROLL(problem, popsize=6, sigma=0.1, lr=0.05, rank=1)
    pandas_logger = PandasLogger(searcher)
    PicklingLogger(searcher, interval=2, directory=str(tmp_path))
    searcher.run(2)
    status = _check_status(searcher, problem)
    assert status["total_episode_count"] == 12
    assert 6 <= status["total_interaction_count"] <= 96
    assert all(1.0 <= v <= 8.0 for v in (status["mean_eval"], status["pop_best_eval"]))
    frame = pandas_logger.to_dataframe()
    assert "total_interaction_count" in frame.columns and len(frame) == 2
    saved = pickle.loads(next(tmp_path.iterdir()).read_bytes())
    assert isinstance(saved["policy"], nn.Module)
    assert saved["policy"](torch.zeros(1, 4)).shape == (1, 2)
    assert saved["center"].shape == (problem.solution_length,)


def test_center_init(device):
    problem, _, _ = _regression_problem(device)
    init = torch.arange(problem.solution_length, dtype=torch.float32, device=device)
    searcher = EGGROLL(problem, popsize=4, sigma=0.1, lr=0.0, rank=1, center_init=init)
    assert torch.equal(searcher.status["center"], init)
    searcher.step()
    assert torch.equal(searcher.status["center"], init)  # lr = 0 leaves the center alone


def test_esmodule_network_and_frozen_parameters(device):
    from evotorch_eggroll import ESModule

    torch.manual_seed(0)
    wrapped = ESModule(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    wrapped.freeze_parameter("2.bias")
    x = torch.randn(3, 2, device=device)
    problem = EggrollNEProblem("min", wrapped, batched_eval_func=lambda f: f.shared(x).pow(2).mean(dim=(1, 2)), device=device)
    assert problem.evolved_parameter_names == ["0.weight", "0.bias", "2.weight"]
    searcher = EGGROLL(problem, popsize=4, sigma=0.1, lr=0.05, rank=1)
    searcher.step()
    assert [n for n, _ in searcher.strategy.named_parameters()] == problem.evolved_parameter_names


@pytest.mark.parametrize("problem_on", ["cpu", "device"])
def test_dense_mode_draws_its_noise_with_the_kernels(device, monkeypatch, problem_on):
    """The dense population comes from the Triton kernels (on the GPU when there is one, for
    a problem on the CPU too; without a GPU through Triton's interpreter, as every other
    path) and follows the reference stream: member i evaluates center + s_i sigma
    eps_(i // 2), eps the dense noise of a parameter named "center"."""
    kernel_devices = []
    real_normal_block = ops.normal_block

    def recording_normal_block(seed, key, epoch, noise_indices, numel, **kwargs):
        backend = ops.resolve_backend(kwargs.get("backend", "triton"), noise_indices.device)
        kernel_devices.append((noise_indices.device.type, backend))
        return real_normal_block(seed, key, epoch, noise_indices, numel, **kwargs)

    monkeypatch.setattr(ops, "normal_block", recording_normal_block)
    evaluated = []

    def recording_sphere(x):
        evaluated.append(x.detach().cpu().clone())
        return _sphere(x)

    n, length, sigma, seed = 10, 8, 0.3, 11
    problem = Problem("min", recording_sphere, solution_length=length, initial_bounds=(-3, 3),
                      vectorized=True, seed=0, device=device if problem_on == "device" else "cpu")
    center = torch.linspace(-2, 2, length)
    searcher = EGGROLL(problem, popsize=n, sigma=sigma, lr=0.1, seed=seed, center_init=center)
    searcher.step()
    assert kernel_devices and set(kernel_devices) == {(device.type, "triton")}
    members = torch.arange(n)
    eps = noise.normal_stream(seed, noise.param_key("center"), 0, members // 2, length)
    sign = (1 - 2 * (members % 2)).float()[:, None]
    torch.testing.assert_close(torch.cat(evaluated) - center, sign * sigma * eps,
                               atol=1e-5, rtol=1e-5)


def test_dense_mode_without_gpu_or_interpreter(monkeypatch):
    """With neither a GPU nor Triton's interpreter the default backend draws the population
    in plain torch on the CPU, from the same stream; asking for the kernels only is refused
    at construction, with the message that says why they need a GPU and names the
    plain-torch opt-in."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU") as info:
        EGGROLL(_sphere_problem(), popsize=4, backend="triton")
    assert 'backend="torch"' in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        EGGROLL(_sphere_problem(), popsize=4, backend="cuda")
    evaluated = []

    def recording_sphere(x):
        evaluated.append(x.detach().clone())
        return _sphere(x)

    n, length, sigma, seed = 6, 8, 0.3, 5
    problem = Problem("min", recording_sphere, solution_length=length, initial_bounds=(-3, 3),
                      vectorized=True, seed=0, device="cpu")
    center = torch.linspace(-2, 2, length)
    searcher = EGGROLL(problem, popsize=n, sigma=sigma, lr=0.1, seed=seed, center_init=center)
    searcher.step()
    members = torch.arange(n)
    eps = noise.normal_stream(seed, noise.param_key("center"), 0, members // 2, length)
    sign = (1 - 2 * (members % 2)).float()[:, None]
    torch.testing.assert_close(torch.cat(evaluated) - center, sign * sigma * eps,
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- EvoTorch's names


def test_evotorch_names_are_accepted_for_identical_settings():
    evotorch_style = EGGROLL(_sphere_problem(), popsize=4, stdev_init=0.3, center_learning_rate=0.05, symmetric=False)
    eggroll_style = EGGROLL(_sphere_problem(), popsize=4, sigma=0.3, lr=0.05, antithetic=False)
    assert evotorch_style.sigma == eggroll_style.sigma == 0.3
    assert evotorch_style.optimizer.param_groups[0]["lr"] == 0.05
    assert evotorch_style._antithetic is False
    evotorch_style.step()
    eggroll_style.step()
    assert torch.equal(evotorch_style.status["center"], eggroll_style.status["center"])
    # a one-element tensor is one scale too
    assert EGGROLL(_sphere_problem(), popsize=4, stdev_init=torch.tensor([0.25])).sigma == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stdev_init=0.2, sigma=0.1), "stdev_init is EvoTorch's name for EGGROLL's sigma"),
        (dict(center_learning_rate=0.2, lr=0.1), "center_learning_rate is EvoTorch's name for EGGROLL's lr"),
        (dict(symmetric=True, antithetic=True), "EGGROLL's antithetic"),
        (dict(stdev_init=[0.1, 0.2]), "one noise scale for all parameters"),
        (dict(radius_init=2.0), r"sigma=radius_init / sqrt\(solution_length\) \(here sigma=0.707107\)"),
        (dict(stdev_learning_rate=0.1), "fixed.*choose sigma"),
        (dict(stdev_min=0.01), "fixed.*choose sigma"),
        (dict(stdev_max=1.0), "fixed.*choose sigma"),
        (dict(stdev_max_change=0.2), "fixed.*choose sigma"),
        (dict(scale_learning_rate=True), "fixed.*choose sigma"),
        (dict(popsize_max=100), "choose popsize"),
        (dict(num_interactions=1000), "choose popsize"),
        (dict(ensure_even_popsize=True), "pass an even popsize"),
        (dict(obj_index=0), "single-objective"),
        (dict(no_such_setting=1), "unexpected keyword argument 'no_such_setting'"),
    ],
)
def test_evotorch_names_without_an_equivalent_say_what_to_use(kwargs, match):
    with pytest.raises(TypeError, match=match):
        EGGROLL(_sphere_problem(), popsize=4, **kwargs)


def test_optimizer_config_errors_name_optimizer_config():
    with pytest.raises(ValueError, match="not in optimizer_config"):
        EGGROLL(_sphere_problem(), popsize=4, optimizer_config={"lr": 0.1})
    with pytest.raises(TypeError, match="optimizer_config must be a mapping"):
        EGGROLL(_sphere_problem(), popsize=4, optimizer_config=[("betas", (0.9, 0.99))])
    with pytest.raises(ValueError, match="popsize must be at most 2\\*\\*32"):
        EGGROLL(_sphere_problem(), popsize=(1 << 32) + 2)


@pytest.mark.parametrize("mode", ["lowrank", "dense"])
def test_odd_popsize_warning_names_popsize(device, mode):
    problem = _regression_problem(device)[0] if mode == "lowrank" else _sphere_problem()
    searcher = EGGROLL(problem, popsize=5, rank=1)
    with pytest.warns(UserWarning) as record:
        searcher.step()
    messages = [str(w.message) for w in record]
    assert any("odd popsize (5)" in m for m in messages), messages
    assert not any("population_size" in m for m in messages), messages


@pytest.mark.parametrize("mode", ["lowrank", "dense"])
def test_equal_fitnesses_warning_names_the_fitness_once(device, mode):
    """Constant fitnesses: one warning in EGGROLL's terms with the raw value (not the
    ranks the strategy receives), and the center stays put."""
    if mode == "dense":
        problem = Problem("min", lambda x: torch.full((x.shape[0],), 3.5), solution_length=4,
                          initial_bounds=(-1, 1), vectorized=True)
        value = "3.5"
    else:  # two CartPole steps: every member survives them, return 2.0
        from evotorch_eggroll.envs import CartPole
        from evotorch_eggroll.neuroevolution import EggrollVecGymNE

        problem = EggrollVecGymNE(CartPole, "Linear(obs_length, act_length)", episode_length=2,
                                  device=device)
        value = "2.0"
    searcher = EGGROLL(problem, popsize=6, rank=1)
    center = searcher.status["center"].clone()
    with pytest.warns(UserWarning) as record:
        searcher.step()
        searcher.step()
    messages = [str(w.message) for w in record if "equal" in str(w.message)]
    assert len(messages) == 1 and f"all 6 fitnesses are equal ({value})" in messages[0], messages
    assert torch.equal(searcher.status["center"], center)


def test_steps_skip_the_metrics_eggroll_does_not_read_and_move_the_center_alike(device):
    """EGGROLL does not read its strategy's step metrics, so its steps compute only what
    their checks need (no fitness statistics, no norms unless clipping needs one); the
    center moves exactly as when the metrics are computed, which an ``on_step`` callback on
    the searcher's strategy asks for (and gets)."""
    centers, seen = [], []
    for callback in (False, True):
        torch.manual_seed(0)
        searcher = EGGROLL(_regression_problem(device)[0], popsize=8, rank=1, sigma=0.1, lr=0.05,
                           optimizer="adam")
        if callback:
            searcher.strategy.register_callback("on_step", seen.append)
        for _ in range(3):
            searcher.step()
        centers.append(searcher.status["center"].clone())
    assert torch.equal(centers[0], centers[1])
    assert len(seen) == 3 and seen[0]["population_size"] == 8 and seen[0]["grad_norm"] > 0


def test_graphs_dropped_during_a_capture_are_freed_after_it(monkeypatch):
    """A package graph whose last reference goes while this thread captures a stream is
    kept (destroying it would invalidate the capture) and freed at the next call outside
    any capture; outside a capture it is freed at once."""
    import gc
    import weakref

    from evotorch_eggroll import _graphs

    class Graph(_graphs._ReleasedOutsideCaptures):  # the mixin, without a CUDA graph
        pass

    capturing = [True]
    monkeypatch.setattr(_graphs, "_capturing", lambda: capturing[0])
    monkeypatch.setattr(_graphs, "_HELD", [])
    graph = Graph()
    ref = weakref.ref(graph)
    del graph
    gc.collect()
    assert ref() is not None and _graphs._HELD == [ref()]
    _graphs.release_held_graphs()  # still capturing: kept
    assert ref() is not None
    capturing[0] = False
    _graphs.release_held_graphs()
    gc.collect()
    assert ref() is None and _graphs._HELD == []
    other = weakref.ref(Graph())
    assert other() is None and _graphs._HELD == []


@pytest.mark.gpu
def test_a_dropped_searchers_graphs_leave_a_users_capture_intact():
    """The garbage collector may free a dropped searcher's captured stages in the middle of
    a user's own ``torch.cuda.graph`` block; that capture still succeeds and replays."""
    import gc

    from evotorch_eggroll import _graphs
    from evotorch_eggroll._graphs import GraphedCall

    graphed = GraphedCall("the test function")
    for _ in range(3):
        graphed(lambda x: x * 2, None, torch.ones(4, device="cuda"))
    assert graphed._graph is not None
    cycle = [graphed]
    cycle.append(cycle)  # freed only by the collector
    del graphed, cycle
    x = torch.ones(8, device="cuda")
    user = torch.cuda.CUDAGraph()
    with torch.cuda.graph(user):
        y = x + 1
        gc.collect()  # frees the graph above during the capture
    assert len(_graphs._HELD) == 1
    x.fill_(2.0)
    user.replay()
    assert torch.equal(y, torch.full((8,), 3.0, device="cuda"))
    _graphs.release_held_graphs()
    assert _graphs._HELD == []


@pytest.mark.gpu
def test_graphed_call_replays_what_the_eager_call_computes():
    """GraphedCall runs a signature eagerly first, captures it the second time and replays
    it after that, with each call's own inputs; a new signature starts over; a function
    whose capture raises warns once and stays eager, with the right values."""
    from evotorch_eggroll._graphs import GraphedCall

    def fn(x):
        return torch.sort(x).values * 2, x.sum()

    graphed = GraphedCall("the test function")
    for n in (7, 7, 7, 7, 300, 300, 300, 7, 7):
        x = torch.randn(n, device="cuda")
        got = graphed(fn, "key", x)
        want = fn(x)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), n
    assert graphed._graph is not None and graphed._graph[0][1][0][0] == (7,)
    replayed = graphed(fn, "key", torch.zeros(7, device="cuda"))
    assert replayed is graphed._graph[3]  # the graph's own outputs
    assert graphed(fn, "other key", torch.ones(7, device="cuda"))[1].item() == 7  # eager again

    def refuses_capture(x):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return x * 3

    stubborn = GraphedCall("the stubborn function")
    with pytest.warns(RuntimeWarning, match="capturing the stubborn function in a CUDA graph failed"):
        for _ in range(3):
            x = torch.randn(5, device="cuda")
            assert torch.equal(stubborn(refuses_capture, None, x), x * 3)
    assert stubborn._disabled and stubborn._graph is None
