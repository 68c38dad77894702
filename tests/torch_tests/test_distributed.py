"""Distribution over ranks (torch.distributed).

In one process: the sharding of members over ranks, the world-size check, and the
all-gathered update, with the process group faked through the strategy's ``_world_info`` /
``_all_gather_fitnesses`` hooks.

With real process groups (``tests/distributed_harness.py``): this very file is run as a
script by ``WORLD`` subprocesses (``python test_distributed.py --worker ...``) that
rendezvous through a ``file://`` store in the test's temporary directory. On the CPU they
use the Gloo backend with Triton's interpreter; the ``gpu`` variant uses NCCL with one GPU
per rank. Each run has a timeout, so a rank left waiting in a collective fails the test
instead of stalling it. All checks of one backend share one run (process start-up
dominates on the CPU); each rank writes what it observed to ``result_<rank>.pt`` and the
test compares the ranks with each other and with single-process runs of the same seed and
population size (computed inside the launch, shared out over the ranks).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the tests folder: the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_harness import expect_error, launch, worker_main  # noqa: E402


def make_model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)


def fake_world(monkeypatch, strategy, rank: int, world: int, gathered=None) -> None:
    """Pretend to be ``rank`` of ``world``: the group query, the cross-rank agreement check
    and the fitness all-gather are replaced (the collectives are tested with real process
    groups elsewhere)."""
    monkeypatch.setattr(strategy, "_world_info", lambda: (rank, world))
    monkeypatch.setattr(strategy, "_check_ranks_agree", lambda *a, **k: None, raising=False)
    if gathered is not None:
        monkeypatch.setattr(strategy, "_all_gather_fitnesses",
                            lambda local, *a: (gathered.to(local.device, local.dtype), None))


def test_without_distribution_the_whole_population_is_local(device):
    s = EggrollStrategy().setup(make_model(device))
    with s.perturb(6) as pop:
        assert pop.population_size == 6 and pop.local_population_size == 6
        assert pop.local_member_ids().tolist() == list(range(6))


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_ranks_get_contiguous_equal_slices_covering_the_population(device, monkeypatch, world):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 0, world)
    s.setup(make_model(device))
    seen = []
    for rank in range(world):
        fake_world(monkeypatch, s, rank, world)
        with s.perturb(12) as pop:
            ids = pop.local_member_ids().tolist()
            assert pop.local_population_size == 12 // world == len(ids)
            assert ids == list(range(rank * (12 // world), (rank + 1) * (12 // world)))
            assert list(pop.iterate()) == ids
        seen += ids
    assert seen == list(range(12))


def test_world_size_must_divide_the_population(device, monkeypatch):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 1, 4)
    s.setup(make_model(device))
    with pytest.raises(ValueError, match="world size"):
        s.perturb(6)
    with s.perturb(8) as pop:
        assert pop.local_member_ids().tolist() == [2, 3]


def test_distributed_needs_an_initialized_process_group(device):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        EggrollStrategy(distributed=True).setup(make_model(device))


def test_local_rows_default_to_this_ranks_members(device, monkeypatch):
    model = make_model(device)
    s = EggrollStrategy(distributed=True, sigma=0.3)
    fake_world(monkeypatch, s, 1, 2)
    s.setup(model)
    x = torch.randn(3, 3, device=device)
    with s.perturb(6) as pop:
        local = pop.batched_forward(model, x)
        explicit = pop.batched_forward(model, x, member_ids=pop.local_member_ids())
    assert torch.equal(local, explicit)
    plain = EggrollStrategy(sigma=0.3).setup(model)
    with plain.perturb(6) as pop:
        full = pop.batched_forward(model, torch.cat([torch.zeros_like(x), x]))
    assert torch.equal(local, full[3:])


def test_every_rank_computes_the_update_of_the_whole_population(device, monkeypatch):
    fitness = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.75])
    x = torch.randn(6, 3, device=device)

    def run(rank=None, world=None):
        model = make_model(device)
        s = EggrollStrategy(sigma=0.2, lr=0.1, seed=3, distributed=world is not None)
        if world is not None:
            fake_world(monkeypatch, s, rank, world, gathered=fitness)
        s.setup(model)
        with s.perturb(6) as pop:
            ids = pop.local_member_ids()
            pop.batched_forward(model, x[ids.to(device)])
            local = fitness[ids]
        metrics = s.step(local.to(device))
        return [p.detach().clone() for p in model.parameters()], metrics

    reference, ref_metrics = run()
    for rank in range(3):
        params, metrics = run(rank, 3)
        assert all(torch.equal(p, q) for p, q in zip(params, reference))
        assert metrics == ref_metrics


def test_all_values_on_every_rank_need_no_gather(device, monkeypatch):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 0, 2)

    def no_gather(*args):
        raise AssertionError("all N fitnesses were given: nothing to gather")

    monkeypatch.setattr(s, "_all_gather_fitnesses", no_gather)
    s.setup(make_model(device))
    with s.perturb(4):
        pass
    assert s.step(torch.arange(4.0))["population_size"] == 4


def test_report_failure_without_distribution_discards_the_population(device):
    s = EggrollStrategy().setup(make_model(device))
    with s.perturb(4):
        pass
    s.report_failure(ValueError("boom"))
    with pytest.raises(RuntimeError, match="needs a preceding perturb context"):
        s.step(torch.arange(4.0))
    assert s.epoch == 0


def test_report_failure_sends_the_population_size_and_epoch(device, monkeypatch):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 1, 2)
    sent = []
    monkeypatch.setattr(s, "_report_failure_to_ranks",
                        lambda err, n, epoch, during: sent.append((str(err), n, epoch, during)))
    s.setup(make_model(device))
    with pytest.raises(RuntimeError, match="pass population_size=N"):
        s.report_failure(ValueError("first perturb failed"))
    s.report_failure(ValueError("first perturb failed"), population_size=6)
    with s.perturb(8, epoch=3):
        pass
    s.report_failure(KeyError("x"))
    assert s._last is None
    assert sent == [("first perturb failed", 6, 0, "evaluation"), ("'x'", 8, 3, "evaluation")]
    # step's own errors before the all-gather are reported too, unless all N values were given
    with s.perturb(8):
        pass
    with pytest.raises(TypeError):
        s.step("not numbers")
    with pytest.raises(ValueError, match="1-D"):
        s.step(torch.zeros(2, 4))  # N values, the form that does not communicate
    assert sent[2:] == [("fitnesses must be a 1-D tensor or a sequence of real numbers (one per "
                         "population member), got str", 8, 0, "step")]


def test_a_failure_is_described_in_a_bounded_number_of_bytes():
    from evotorch_eggroll.distributed import describe_exception

    assert describe_exception(ValueError("bad value")) == b"ValueError: bad value"
    assert describe_exception(KeyboardInterrupt()) == b"KeyboardInterrupt"
    long = describe_exception(RuntimeError("\u00e9" * 200), limit=40)
    assert len(long) <= 40 and long.endswith(b"...")
    assert long.decode("utf-8").startswith("RuntimeError: \u00e9")


def _gathered(monkeypatch, sent: list) -> torch.Tensor:
    """The all-gathered bytes of the payloads that the ranks' calls of ``_exchange``
    (``(local, epoch, failure)`` per rank) would send, built in one process."""
    from evotorch_eggroll import distributed as d

    payloads = []
    monkeypatch.setattr(d, "process_group_info", lambda: (0, len(sent)))
    monkeypatch.setattr(d, "collective_device", lambda like: torch.device("cpu"))
    monkeypatch.setattr(d, "_all_gather", lambda t, world: payloads.append(t) or t[None])
    for local, epoch, failure in sent:
        d._exchange(local, 2 * len(sent), "cpu", epoch, failure)
    return torch.stack(payloads)


@pytest.mark.parametrize("case, error", [
    ("same epoch", None), ("epochs not given", None), ("one epoch not given", None),
    ("a failure", "RankFailedError"), ("a long slice", "ValueError"), ("not 1-D", "ValueError"),
    ("other epochs", "RuntimeError"), ("a failure and a long slice", "RankFailedError"),
])
def test_the_deferred_checks_on_the_device_agree_with_the_headers_read_back(monkeypatch, case, error):
    """The all-gather's flag, computed on the device without a read, is set exactly when
    the headers read back call for an error, and that error is the one the blocking
    all-gather raises."""
    from evotorch_eggroll import distributed as d

    ok, long, flat = torch.arange(2.0), torch.arange(3.0), torch.zeros(1, 2)
    failed = (d._STAGES["evaluation"], b"ValueError: boom")
    sent = {
        "same epoch": [(ok, 4, None)] * 3,
        "epochs not given": [(ok, None, None)] * 3,
        "one epoch not given": [(ok, 4, None), (ok, None, None), (ok, 4, None)],
        "a failure": [(ok, 4, None), (None, 4, failed), (ok, 4, None)],
        "a long slice": [(ok, 4, None), (ok, 4, None), (long, 4, None)],
        "not 1-D": [(flat, 4, None), (ok, 4, None), (ok, 4, None)],
        "other epochs": [(ok, 4, None), (ok, 5, None), (ok, 4, None)],
        "a failure and a long slice": [(long, 4, None), (None, 4, failed), (ok, 4, None)],
    }[case]
    gathered = _gathered(monkeypatch, sent)
    checks = d.GatherChecks(gathered, 6, 2, 4)
    err = checks.read()
    assert bool(checks.flag) is (err is not None)
    assert (None if err is None else type(err).__name__) == error
    if error is None:
        assert torch.equal(d._values(gathered), torch.arange(2.0, dtype=torch.float64).repeat(3))
    if error == "RankFailedError":
        assert err.failures == {1: "ValueError: boom"} and "rank 1 failed during evaluation" in str(err)
    restored = []
    checks = d.GatherChecks(gathered, 6, 2, 4, on_failure=lambda: restored.append(True))
    assert checks.succeeded() is (error is None) and restored == ([] if error is None else [True])


# ======================================================================================
# Real process groups
# ======================================================================================

HERE = Path(__file__).resolve()
WORLD = 2
PER_RANK = 4  # members per rank: N = WORLD * PER_RANK
STEPS = 2
TIMEOUT_S = 240


# -- the scenario run on every rank ------------------------------------------------------

def _model(device, seed=0):
    import torch.nn as nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


def _fitness(out):
    return -(out - 0.5).pow(2).sum(1)


def _params(strategy) -> dict:
    return {n: p.detach().cpu().clone() for n, p in strategy.named_parameters()}


def _train(cls, kwargs, device, n, x, distributed, fitnesses=None):
    """``STEPS`` generations; returns outputs of the first, the fitnesses computed each
    step, metrics, the params after each step and the final params. ``fitnesses`` (``STEPS`` x ``n``), when given, are
    passed to ``step`` instead of the computed ones."""
    model = _model(device)
    s = cls(sigma=0.1, lr=0.05, optimizer="adam", seed=7, distributed=distributed,
            **kwargs).setup(model)
    first, computed, metrics, history, info = None, [], [], [], {}
    for step in range(STEPS):
        with s.perturb(n) as pop:
            ids = pop.local_member_ids()
            out = pop.batched_forward(model, x[ids.to(x.device)])
            if first is None:
                first = out.detach().cpu()
                info = dict(ids=ids.clone(), local=pop.local_population_size,
                            total=pop.population_size,
                            iterated=torch.tensor(list(pop.iterate())),
                            explicit=torch.equal(
                                pop.batched_forward(model, x[ids.to(x.device)], member_ids=ids), out))
        f = _fitness(out).detach()
        computed.append(f.clone())
        metrics.append(s.step(f if fitnesses is None else fitnesses[step].to(f.device, f.dtype)))
        history.append(_params(s))
    return dict(first=first, fitnesses=torch.stack(computed).cpu(), metrics=metrics,
                history=history, params=_params(s), epoch=s.epoch, **info)


def _all_gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    """``local`` (``STEPS`` x ``PER_RANK``) of every rank, concatenated in rank order along
    the members: ``STEPS`` x ``N``, identical on every rank."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=1)


def scenario_strategy(rank: int, world: int, device: torch.device) -> dict:
    import warnings

    from evotorch_eggroll import EggrollStrategy, OpenESStrategy

    n = world * PER_RANK
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1)).to(device)
    res = {}
    runs = (("eggroll", EggrollStrategy, {"rank": 2}), ("openes", OpenESStrategy, {}))
    for i, (name, cls, kwargs) in enumerate(runs):
        res[name] = _train(cls, kwargs, device, n, x, distributed=True)
        # the fitnesses the ranks computed, as the strategy all-gathered them (a collective:
        # every rank takes part)
        gathered = _all_gather_rows(res[name]["fitnesses"].to(device), world).cpu()
        res[name]["gathered"] = gathered
        if i % world == rank:  # the single-process references are shared out over the ranks
            # fed the gathered fitnesses: its update must then be bit-identical (see
            # _check_strategy_run); it still computes (and records) its own fitnesses
            res[name + "_single"] = _train(cls, kwargs, device, n, x, distributed=False,
                                           fitnesses=gathered)

    # population size not divisible by the world size: ValueError, nothing changed
    model = _model(device)
    s = EggrollStrategy(sigma=0.1, lr=0.05, rank=2, seed=7, distributed=True).setup(model)
    before = _params(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res["bad_world_msg"] = expect_error(lambda: s.perturb(n + 1), ValueError)
    res["bad_world_untouched"] = (s.epoch == 0 and s._active is None and s._last is None)

    # a wrong slice length on rank 1 only, then NaN on rank 0 only: the same error on
    # every rank, no hang, nothing changed; afterwards a correct step still works
    with s.perturb(n) as pop:
        f = _fitness(pop.batched_forward(model, x[pop.local_member_ids().to(device)]))
    res["short_msg"] = expect_error(lambda: s.step(f[:-1] if rank == 1 else f), ValueError)
    nan = f.clone()
    if rank == 0:
        nan[0] = float("nan")
    res["nan_msg"] = expect_error(lambda: s.step(nan), ValueError)
    after = _params(s)
    res["errors_untouched"] = (s.epoch == 0 and all(torch.equal(before[k], after[k]) for k in before))
    s.step(f)
    res["recovered_epoch"] = s.epoch
    res["recovered_params"] = _params(s)

    # nonfinite_fitness="worst": a NaN on rank 0 only; every rank ranks that member last
    # from the same all-gathered fitnesses and applies the same finite update
    w = EggrollStrategy(sigma=0.1, lr=0.05, rank=2, seed=7, distributed=True,
                        nonfinite_fitness="worst").setup(_model(device))
    with w.perturb(n) as pop:
        f = _fitness(pop.batched_forward(w.model, x[pop.local_member_ids().to(device)]))
    if rank == 0:
        f[1] = float("nan")
    res["worst_metrics"] = w.step(f)
    res["worst_params"] = _params(w)
    res["policy_msg"] = expect_error(
        lambda: EggrollStrategy(distributed=True, nonfinite_fitness=("worst", "raise")[rank])
        .setup(_model(device)), ValueError)

    # ranks that disagree: a clear error on every rank at setup, naming each rank's value
    res["seed_msg"] = expect_error(
        lambda: EggrollStrategy(seed=100 + rank, distributed=True).setup(_model(device)),
        ValueError)
    res["sigma_msg"] = expect_error(
        lambda: OpenESStrategy(sigma=0.1 * (rank + 1), distributed=True).setup(_model(device)),
        ValueError)
    res["param_msg"] = expect_error(
        lambda: EggrollStrategy(distributed=True).setup(_model(device, seed=rank)), ValueError)
    # ... and when loading a checkpoint with another seed on one rank (state unchanged)
    state = s.state_dict()
    state["seed"] = 7 + rank
    res["load_msg"] = expect_error(lambda: s.load_state_dict(state), ValueError)
    res["load_untouched"] = s.seed == 7 and s.epoch == 1
    return res


def _optimizer_state(strategy) -> dict:
    state = strategy.optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.detach().cpu().clone() for i, st in state.items() for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def _failing_generation(s, model, x, n, rank: int, fail: bool) -> dict:
    """One generation written as the docs say: a rank whose evaluation raises reports the
    failure in place of step(), then re-raises. Returns what this rank raised and when."""
    from evotorch_eggroll import RankFailedError

    start = time.monotonic()
    try:
        try:
            with s.perturb(n) as pop:
                out = pop.batched_forward(model, x[pop.local_member_ids().to(x.device)])
                if fail:
                    raise ValueError(f"sensor {rank} returned garbage")
                f = _fitness(out)
        except Exception as exc:
            s.report_failure(exc)
            raise
        s.step(f)
    except Exception as err:
        return dict(type=type(err).__name__, msg=str(err), seconds=time.monotonic() - start,
                    failures=getattr(err, "failures", None) if isinstance(err, RankFailedError) else None)
    return dict(type=None, msg="", seconds=time.monotonic() - start, failures=None)


def _good_generation(s, model, x, n) -> None:
    with s.perturb(n) as pop:
        f = _fitness(pop.batched_forward(model, x[pop.local_member_ids().to(x.device)]))
    s.step(f)


def scenario_failure(rank: int, world: int, device: torch.device) -> dict:
    """Failing ranks in the native loop: an evaluation that raises on rank 1 (reported with
    report_failure), a bad fitness argument on rank 0 (reported by step itself), and an
    optimizer that fails on one rank after the all-gather (the ranks' epochs then differ,
    which the next step finds on every rank)."""
    from evotorch_eggroll import EggrollStrategy

    n = world * PER_RANK
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(sigma=0.1, lr=0.05, rank=2, seed=7, distributed=True)
    res = {}

    model = _model(device)
    s = EggrollStrategy(**kw).setup(model)
    _good_generation(s, model, x, n)
    before = dict(params=_params(s), opt=_optimizer_state(s), epoch=s.epoch, steps=s.total_steps)

    # rank 1's evaluation raises: it reports; every rank raises within seconds
    res["eval"] = _failing_generation(s, model, x, n, rank, fail=rank == 1)
    res["eval_untouched"] = (
        s.epoch == before["epoch"] and s.total_steps == before["steps"]
        and all(torch.equal(v, _params(s)[k]) for k, v in before["params"].items())
        and all(torch.equal(v, _optimizer_state(s)[k]) for k, v in before["opt"].items()))
    # ... and the generation evaluated again (the failure was transient) continues the run
    # as if it had never failed
    _good_generation(s, model, x, n)
    res["retried_params"] = _params(s)
    res["retried_epoch"] = s.epoch
    ref_model = _model(device)
    ref = EggrollStrategy(**kw).setup(ref_model)
    for _ in range(2):
        _good_generation(ref, ref_model, x, n)
    res["reference_params"] = _params(ref)

    # a bad argument to step on rank 0 only: step reports it through the all-gather
    with s.perturb(n) as pop:
        f = _fitness(pop.batched_forward(model, x[pop.local_member_ids().to(device)]))
    start = time.monotonic()
    try:
        s.step("not numbers" if rank == 0 else f)
        res["step_arg"] = dict(type=None, msg="")
    except Exception as err:
        res["step_arg"] = dict(type=type(err).__name__, msg=str(err))
    res["step_arg"]["seconds"] = time.monotonic() - start
    res["step_arg_epoch"] = s.epoch
    s.step(f)  # the population is still there: every rank steps
    res["after_step_arg_epoch"] = s.epoch

    # the optimizer fails on rank 1 only, after the all-gather: rank 1 restores its state,
    # rank 0 applies the update; the next step finds the ranks at different epochs
    with s.perturb(n) as pop:
        f = _fitness(pop.batched_forward(model, x[pop.local_member_ids().to(device)]))
    if rank == 1:
        real_step = s.optimizer.step
        s.optimizer.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    res["optimizer_msg"] = expect_error(lambda: s.step(f), RuntimeError) if rank == 1 else ""
    if rank == 1:
        s.optimizer.step = real_step
    else:
        s.step(f)
    with s.perturb(n) as pop:
        f = _fitness(pop.batched_forward(model, x[pop.local_member_ids().to(device)]))
    res["out_of_step_msg"] = expect_error(lambda: s.step(f), RuntimeError)
    return res


SCENARIOS = {"strategy": scenario_strategy, "failure": scenario_failure}


# -- the tests ---------------------------------------------------------------------------

def _check_strategy_run(results: list[dict]) -> None:
    # What must be bit-identical and what only close:
    # * A rank's batched_forward runs on its PER_RANK rows, the single-process run on all N.
    #   The noise term is generated per member and is batch-size invariant, but the base
    #   product ``x @ W.T`` comes from BLAS (MKL, OpenBLAS, cuBLAS), whose kernels - and so
    #   the rounding - may depend on the number of rows. The outputs, and the fitnesses
    #   computed from them, therefore match the single-process rows only to float32
    #   rounding: compared with a tight tolerance.
    # * The update depends only on the fitnesses and on the regenerated noise. Every rank
    #   applies it from the same all-gathered fitnesses, so the parameters (and metrics)
    #   are bit-identical across ranks after every step; and the single-process reference,
    #   fed those same gathered fitnesses, must produce bit-identical parameters and metrics.
    n = WORLD * PER_RANK
    for name in ("eggroll", "openes"):
        single = next(res[name + "_single"] for res in results if name + "_single" in res)
        gathered = results[0][name]["gathered"]
        assert gathered.shape == (STEPS, n)
        for rank, res in enumerate(results):
            d = res[name]
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            # sharding: a contiguous slice per rank; iterate() walks it
            assert d["ids"].tolist() == list(range(rank * PER_RANK, (rank + 1) * PER_RANK))
            assert d["local"] == PER_RANK and d["total"] == n
            assert d["iterated"].tolist() == d["ids"].tolist()
            # batched_forward: row j -> local member j (same rows, same call: bit-equal)
            assert d["explicit"]
            # ... and the single-process rows up to BLAS rounding (batch size N vs PER_RANK)
            torch.testing.assert_close(d["first"], single["first"][rows], rtol=1e-6, atol=1e-6)
            # the all-gather: every rank holds every rank's fitnesses, in rank order
            assert torch.equal(d["gathered"], gathered), (name, rank)
            assert torch.equal(gathered[:, rows], d["fitnesses"]), (name, rank)
            # the first step's fitnesses agree with one process up to the same rounding
            # (later steps' do too as long as the parameters are equal, which they are)
            torch.testing.assert_close(d["fitnesses"], single["fitnesses"][:, rows],
                                       rtol=1e-5, atol=1e-6)
            # the same gathered fitnesses give the single-process metrics and parameters
            # bit for bit, on every rank
            assert d["metrics"] == single["metrics"], name
            assert d["epoch"] == STEPS
            assert len(d["history"]) == len(single["history"]) == STEPS
            for step, (mine, ref, rank0) in enumerate(
                    zip(d["history"], single["history"], results[0][name]["history"])):
                for k, v in ref.items():
                    assert torch.equal(mine[k], rank0[k]), (name, "vs rank 0", rank, step, k)
                    assert torch.equal(mine[k], v), (name, "vs one process", rank, step, k)
            for k, v in single["params"].items():
                assert torch.equal(d["params"][k], v), (name, rank, k)
        assert results[0][name]["metrics"][0]["population_size"] == n


def _check_error_handling(results: list[dict]) -> None:
    for res in results:
        assert "divisible by the world size 2" in res["bad_world_msg"]
        assert res["bad_world_untouched"]
        assert "rank 1: 3 values" in res["short_msg"] and "4 values" in res["short_msg"]
        assert "NaN" in res["nan_msg"]
        assert res["errors_untouched"]
        assert res["recovered_epoch"] == 1
        assert "seed differs across ranks (rank 0: seed=100, rank 1: seed=101)" in res["seed_msg"]
        assert "same seed on every rank" in res["seed_msg"]
        assert "sigma differs across ranks (rank 0: sigma=0.1, rank 1: sigma=0.2)" in res["sigma_msg"]
        assert "'0.weight' differ between rank 0 and rank(s) 1" in res["param_msg"]
        assert "torch.manual_seed" in res["param_msg"]
        assert "seed differs across ranks (rank 0: seed=7, rank 1: seed=8)" in res["load_msg"]
        assert res["load_untouched"]
    for k, v in results[0]["recovered_params"].items():
        assert torch.equal(results[1]["recovered_params"][k], v)
    for res in results:
        assert res["worst_metrics"] == results[0]["worst_metrics"]
        assert res["worst_metrics"]["nonfinite_count"] == 1
        assert "nonfinite_fitness differs across ranks" in res["policy_msg"]
        for k, v in results[0]["worst_params"].items():
            assert torch.isfinite(v).all() and torch.equal(res["worst_params"][k], v)


def test_a_failing_rank_ends_the_generation_on_every_rank(tmp_path):
    """Two Gloo ranks, the process group's timeout 300 s: a rank whose evaluation raises
    (report_failure) or whose step gets a bad argument makes every rank raise within
    seconds, naming the rank and its exception; nothing is updated and the run continues
    when the generation is evaluated again; a step that failed on one rank only after the
    all-gather leaves the ranks at different epochs, which the next step reports on every
    rank."""
    results = launch(HERE, "failure", WORLD, "gloo", tmp_path, TIMEOUT_S, pg_timeout=300)
    r0, r1 = results
    assert r1["eval"]["type"] == "ValueError" and r1["eval"]["msg"] == "sensor 1 returned garbage"
    assert r0["eval"]["type"] == "RankFailedError"
    assert "rank 1 failed during evaluation: ValueError: sensor 1 returned garbage" in r0["eval"]["msg"]
    assert "no rank applied an update for this generation (epoch 1)" in r0["eval"]["msg"]
    assert r0["eval"]["failures"] == {1: "ValueError: sensor 1 returned garbage"}
    for res in results:
        assert res["eval"]["seconds"] < 60, res["eval"]
        assert res["eval_untouched"]
        assert res["retried_epoch"] == 2
        for k, v in res["reference_params"].items():
            assert torch.equal(res["retried_params"][k], v), k
            assert torch.equal(r0["retried_params"][k], v), k

    assert r0["step_arg"]["type"] == "TypeError" and "fitnesses must be" in r0["step_arg"]["msg"]
    assert r1["step_arg"]["type"] == "RankFailedError"
    assert "rank 0 failed in step() before the update: TypeError: fitnesses must be" in r1["step_arg"]["msg"]
    for res in results:
        assert res["step_arg"]["seconds"] < 60
        assert res["step_arg_epoch"] == 2 and res["after_step_arg_epoch"] == 3

    assert "out of memory" in r1["optimizer_msg"]
    for res in results:
        assert "the ranks are at different epochs (rank 0: 4, rank 1: 3)" in res["out_of_step_msg"]


def test_two_gloo_ranks_match_single_process(tmp_path):
    """Two Gloo ranks on the CPU: sharding, all-gather, outputs close to one process,
    parameters bit-identical on every rank and to one process fed the same fitnesses, and
    the distributed error paths."""
    results = launch(HERE, "strategy", WORLD, "gloo", tmp_path, TIMEOUT_S)
    _check_strategy_run(results)
    _check_error_handling(results)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL test needs at least 2 CUDA GPUs")
def test_two_nccl_ranks_match_single_process(tmp_path):
    """The same checks with NCCL, one GPU per rank."""
    results = launch(HERE, "strategy", WORLD, "nccl", tmp_path, TIMEOUT_S)
    _check_strategy_run(results)
    _check_error_handling(results)


if __name__ == "__main__":
    worker_main(SCENARIOS)
