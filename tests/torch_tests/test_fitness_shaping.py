"""Fitness shaping: z-score with the population variance (robust, float64),
tie-averaged ranks, "none", callables, the pairwise baseline, grouping, how the shaped
weights enter the update, and the non-finite fitness policy (``nonfinite_fitness``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import (
    EggrollStrategy,
    OpenESStrategy,
    antithetic_baseline,
    antithetic_fold,
    centered_rank,
    rank_transform,
    replace_nonfinite,
    shape_fitnesses,
    zscore,
)


# -- pure functions -------------------------------------------------------------------------------

def test_zscore_uses_the_population_variance():
    f = torch.tensor([1.0, 2.0, 4.0, 7.0])
    out = zscore(f, eps=1e-8)
    mean, var = f.double().mean(), f.double().var(unbiased=False)
    torch.testing.assert_close(out, (f.double() - mean) / torch.sqrt(var + 1e-8))
    assert out.dtype == torch.float64


def test_zscore_eps_enters_the_denominator():
    f = torch.tensor([0.0, 1e-4], dtype=torch.float64)
    small = zscore(f, eps=1e-8)
    big = zscore(f, eps=1.0)
    assert small[1] == pytest.approx(1e-4 / math.sqrt(0.25e-8 + 1e-8) / 2, rel=1e-9)
    assert big[1] == pytest.approx(0.5e-4 / math.sqrt(0.25e-8 + 1.0), rel=1e-9)


@pytest.mark.parametrize("f", [
    torch.tensor([5.0]),
    torch.full((6,), 3.7),
    torch.full((4,), -1e30),
    torch.tensor([0.0, 0.0, 0.0]),
])
def test_zscore_is_exactly_zero_for_one_element_or_constant_input(f):
    out = zscore(f)
    assert torch.equal(out, torch.zeros_like(out))


def test_zscore_handles_huge_magnitudes():
    f = torch.tensor([1e30, -1e30, 3e29, 0.0], dtype=torch.float64)
    out = zscore(f)
    assert torch.isfinite(out).all()
    ref = zscore(f / 1e29)  # scale invariance (up to eps, negligible at both scales)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
    f32 = torch.tensor([3e30, 1e30], dtype=torch.float32)
    torch.testing.assert_close(zscore(f32), torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_rank_transform_ties_and_range():
    f = torch.tensor([10.0, -3.0, 10.0, 2.0, 7.0])
    out = rank_transform(f)
    # ranks: -3 -> 0, 2 -> 1, 7 -> 2, the two 10s share (3 + 4) / 2 = 3.5
    expected = torch.tensor([3.5, 0.0, 3.5, 1.0, 2.0], dtype=torch.float64) / 4 - 0.5
    assert torch.equal(out, expected)
    assert out.min() >= -0.5 and out.max() <= 0.5
    assert torch.equal(centered_rank(f), expected)
    assert torch.equal(rank_transform(torch.tensor([1.0, 2.0, 3.0])),
                       torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))
    assert torch.equal(rank_transform(torch.tensor([4.0])), torch.zeros(1, dtype=torch.float64))


def test_rank_transform_is_invariant_to_monotone_maps():
    f = torch.randn(9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rank_transform(f), rank_transform(torch.exp(3 * f) - 100))


def test_antithetic_baseline_and_fold():
    w = torch.tensor([3.0, 1.0, -2.0, 4.0, 5.0])
    assert torch.equal(antithetic_baseline(w),
                       torch.tensor([1.0, -1.0, -3.0, 3.0, 0.0], dtype=torch.float64))
    idx, coeffs = antithetic_fold(w, antithetic=True)
    assert idx.tolist() == [0, 1, 2]
    assert coeffs.tolist() == [2.0, -6.0, 5.0]  # pairs fold to differences; 5th is unpaired
    idx, coeffs = antithetic_fold(w, antithetic=False)
    assert idx.tolist() == [0, 1, 2, 3, 4] and coeffs.tolist() == w.tolist()


def test_group_size_shapes_consecutive_groups_independently():
    f = torch.tensor([1.0, 2.0, 3.0, 100.0, 200.0, 300.0])
    out = shape_fitnesses(f, "normalize", group_size=3)
    torch.testing.assert_close(out[:3], out[3:], rtol=1e-7, atol=1e-7)  # up to eps
    torch.testing.assert_close(out[:3], zscore(f[:3]))
    ranks = shape_fitnesses(f, "rank", group_size=2)
    assert ranks.tolist() == [-0.5, 0.5] * 3  # every pair is increasing
    with pytest.raises(ValueError):
        shape_fitnesses(f, "normalize", group_size=4)


def test_shape_fitnesses_rejects_non_finite_values():
    with pytest.raises(ValueError):
        shape_fitnesses(torch.tensor([1.0, float("nan")]))


# -- the strategy's transform ---------------------------------------------------------------------

@pytest.mark.parametrize("transform", ["normalize", "rank", "centered_rank", "none"])
def test_normalize_fitnesses_keeps_shape_device_and_dtype(device, transform):
    s = EggrollStrategy(fitness_transform=transform)
    for dtype in (torch.float32, torch.float64):
        f = torch.tensor([2.0, -1.0, 0.5, 3.0], device=device, dtype=dtype)
        out = s.normalize_fitnesses(f)
        assert out.shape == f.shape and out.device == f.device and out.dtype == dtype
    ints = s.normalize_fitnesses(torch.tensor([1, 5, 2, 2]))
    assert ints.dtype == torch.float32


def test_none_returns_raw_fitness_and_callables_are_used_as_returned():
    f = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(EggrollStrategy(fitness_transform="none").normalize_fitnesses(f), f)
    fn = lambda t: t * 10 + 1  # noqa: E731 - not centred on purpose: used exactly as returned
    s = EggrollStrategy(fitness_transform=fn, baseline="antithetic")
    torch.testing.assert_close(s.normalize_fitnesses(f), f * 10 + 1)


def test_callable_with_wrong_shape_is_an_error():
    s = EggrollStrategy(fitness_transform=lambda t: t[:1])
    with pytest.raises(ValueError):
        s.normalize_fitnesses(torch.tensor([1.0, 2.0]))


# -- shaping and the update ---------------------------------------------------------------------

def _step(device, fit, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy(sigma=0.2, lr=1.0, optimizer="sgd", seed=5, **kwargs).setup(model)
    with s.perturb(len(fit)) as pop:
        pop.batched_forward(model, torch.randn(len(fit), 3, device=device))
    metrics = s.step(torch.as_tensor(fit, device=device), **(
        {"prenormalized": True} if kwargs.pop("_pre", False) else {}))
    return [p.detach().clone() for p in model.parameters()], metrics


def test_normalize_makes_the_update_invariant_to_affine_fitness_maps(device):
    fit = torch.tensor([0.5, 2.0, -1.0, 0.25, 3.0, 1.0])
    a, _ = _step(device, fit)
    b, _ = _step(device, fit * 1000.0 - 77.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_prenormalized_fitnesses_bypass_the_transform(device):
    fit = torch.tensor([0.5, 2.0, -1.0, 0.25])
    w = EggrollStrategy().normalize_fitnesses(fit)
    torch.manual_seed(0)
    model_a = nn.Linear(3, 2).to(device)
    torch.manual_seed(0)
    model_b = nn.Linear(3, 2).to(device)
    sa = EggrollStrategy(lr=1.0, optimizer="sgd", fitness_transform="none").setup(model_a)
    sb = EggrollStrategy(lr=1.0, optimizer="sgd", fitness_transform="rank").setup(model_b)
    x = torch.randn(4, 3, device=device)
    for s, m in ((sa, model_a), (sb, model_b)):
        with s.perturb(4) as pop:
            pop.batched_forward(m, x)
    ma = sa.step(w.to(device))
    mb = sb.step(w.to(device), prenormalized=True)  # "rank" is skipped
    assert ma["normalized_fitness_mean"] == pytest.approx(mb["normalized_fitness_mean"])
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_transform_choice_changes_the_update(device):
    fit = torch.tensor([0.0, 10.0, 1.0, 2.0])
    z, _ = _step(device, fit, fitness_transform="normalize")
    r, _ = _step(device, fit, fitness_transform="rank")
    assert any(not torch.allclose(x, y) for x, y in zip(z, r))


def test_callable_transform_drives_the_update(device):
    fit = torch.tensor([0.0, 10.0, 1.0, 2.0])
    doubled, m2 = _step(device, fit, fitness_transform=lambda t: 2 * (t - t.mean()))
    single, m1 = _step(device, fit, fitness_transform=lambda t: t - t.mean())
    base, _ = _step(device, torch.zeros(4), fitness_transform="none")
    for d, s_, b in zip(doubled, single, base):
        torch.testing.assert_close(d - b, 2 * (s_ - b), rtol=1e-4, atol=1e-6)
    assert m2["grad_norm"] == pytest.approx(2 * m1["grad_norm"], rel=1e-5)


def test_group_size_must_divide_the_population_at_step(device):
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy(group_size=4).setup(model)
    with s.perturb(6):
        pass
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError):
        s.step(torch.arange(6.0))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert s.epoch == 0


def test_normalized_fitness_mean_metric(device):
    _, m = _step(device, torch.tensor([1.0, 2.0, 3.0, 10.0]), fitness_transform="none")
    assert m["normalized_fitness_mean"] == pytest.approx(4.0)
    _, m = _step(device, torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert abs(m["normalized_fitness_mean"]) < 1e-12


def test_strategy_fitness_eps_and_group_size_reach_the_transform():
    f = torch.tensor([0.0, 1e-3, 5.0, 7.0], dtype=torch.float64)
    eps = EggrollStrategy(fitness_eps=1.0).normalize_fitnesses(f)
    torch.testing.assert_close(eps, zscore(f, eps=1.0))
    grouped = EggrollStrategy(group_size=2).normalize_fitnesses(f)
    torch.testing.assert_close(grouped, torch.cat([zscore(f[:2]), zscore(f[2:])]))
    assert grouped[0] < 0 < grouped[1] and grouped[2] < 0 < grouped[3]


# -- non-finite fitnesses (nonfinite_fitness="worst") ------------------------------------------------

NAN, INF = float("nan"), float("inf")


def test_replace_nonfinite_puts_diverged_members_one_spread_below_the_worst():
    f = torch.tensor([1.0, NAN, 3.0, INF, -INF, 0.5])
    out, count = replace_nonfinite(f)
    assert count == 3 and out.dtype == f.dtype
    assert out.tolist() == [1.0, -2.0, 3.0, -2.0, -2.0, 0.5]  # 0.5 - (3.0 - 0.5)
    # all finite values equal: lo - max(|lo|, 1)
    assert replace_nonfinite(torch.tensor([2.0, NAN, 2.0]))[0].tolist() == [2.0, 0.0, 2.0]
    assert replace_nonfinite(torch.tensor([0.0, INF]))[0].tolist() == [0.0, -1.0]
    assert replace_nonfinite(torch.tensor([-5.0, NAN]))[0].tolist() == [-5.0, -10.0]
    # outside the dtype's range: its lowest finite value, still below every finite one
    half, _ = replace_nonfinite(torch.tensor([-6e4, 6e4, NAN]).half())
    assert half[2] == torch.finfo(torch.float16).min and half[2] < half[0]
    # nothing to replace: the input itself
    clean = torch.tensor([1.0, 2.0])
    assert replace_nonfinite(clean) == (clean, 0)
    with pytest.raises(ValueError, match="all 2 fitnesses are NaN or inf"):
        replace_nonfinite(torch.tensor([NAN, -INF]))


@pytest.mark.parametrize("transform", ["normalize", "rank", "centered_rank", "none",
                                       lambda t: t * 2.0 - 1.0])
@pytest.mark.parametrize("baseline", ["mean", "antithetic"])
def test_worst_policy_shapes_the_replaced_fitnesses(transform, baseline):
    f = torch.tensor([0.5, NAN, 2.0, -1.0, INF, 0.25, -INF, 3.0])
    replaced, _ = replace_nonfinite(f)
    got = shape_fitnesses(f, transform, baseline=baseline, nonfinite="worst")
    assert torch.isfinite(got).all()
    assert torch.equal(got, shape_fitnesses(replaced, transform, baseline=baseline))
    if baseline == "mean":  # the diverged members (NaN, +inf, -inf) get the lowest weight
        assert bool((got[[1, 4, 6]] == got.min()).all()) and got[[0, 2, 3, 5, 7]].min() > got.min()
    with pytest.raises(ValueError, match="NaN or inf"):
        shape_fitnesses(f, transform, baseline=baseline)


def test_rank_transforms_rank_diverged_members_last_whatever_the_replacement():
    f = torch.tensor([0.5, NAN, 2.0, -1.0, INF, 0.25])
    below = f.clone()
    below[[1, 4]] = -1.0001  # anything below the finite minimum ranks the same
    for t in ("rank", "centered_rank"):
        assert torch.equal(shape_fitnesses(f, t, nonfinite="worst"), shape_fitnesses(below, t))


def test_nonfinite_policy_values_are_checked():
    for bad in ("ignore", "Worst", None, 1):
        with pytest.raises(ValueError, match="nonfinite_fitness must be one of 'raise', 'worst'"):
            EggrollStrategy(nonfinite_fitness=bad)
        with pytest.raises(ValueError, match="nonfinite_fitness must be one of 'raise', 'worst'"):
            OpenESStrategy(nonfinite_fitness=bad)
    with pytest.raises(ValueError, match="nonfinite must be one of 'raise', 'worst'"):
        shape_fitnesses(torch.tensor([1.0, 2.0]), nonfinite="skip")
    assert EggrollStrategy().nonfinite_fitness == "raise"
    assert OpenESStrategy(nonfinite_fitness="worst").nonfinite_fitness == "worst"


def test_normalize_fitnesses_applies_the_policy():
    f = torch.tensor([1.0, NAN, 3.0, 2.0])
    s = EggrollStrategy(nonfinite_fitness="worst", fitness_transform="centered_rank")
    torch.testing.assert_close(s.normalize_fitnesses(f), torch.tensor([-1 / 6, -0.5, 0.5, 1 / 6]))
    with pytest.raises(ValueError, match="NaN or inf"):
        EggrollStrategy().normalize_fitnesses(f)


def _nonfinite_step(device, fit, cls=EggrollStrategy, **kwargs):
    """One step of a fresh strategy on a fixed model; returns (parameters, metrics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    s = cls(**{"sigma": 0.2, "lr": 0.1, "optimizer": "adam", "seed": 5, **kwargs}).setup(model)
    x = torch.randn(len(fit), 3, device=device, generator=torch.Generator().manual_seed(1))
    with s.perturb(len(fit)) as pop:
        pop.batched_forward(model, x)
    metrics = s.step(torch.as_tensor(fit).to(device))
    return [p.detach().clone() for p in model.parameters()], metrics


@pytest.mark.parametrize("cls, kwargs", [
    (EggrollStrategy, dict(fitness_transform="normalize")),
    (EggrollStrategy, dict(fitness_transform="centered_rank", antithetic=False)),
    (EggrollStrategy, dict(fitness_transform="none", baseline="antithetic")),
    (OpenESStrategy, dict(fitness_transform="rank")),
])
def test_worst_policy_updates_as_if_the_member_had_the_replacement_fitness(device, cls, kwargs):
    fit = torch.tensor([0.5, 2.0, NAN, -1.0, 0.25, INF, 1.5, 3.0])
    replaced, _ = replace_nonfinite(fit)
    assert replaced[2] == replaced[5] == -5.0  # -1 - (3 - -1)
    params, metrics = _nonfinite_step(device, fit, cls, nonfinite_fitness="worst", **kwargs)
    expected, reference = _nonfinite_step(device, replaced, cls, **kwargs)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, expected))
    assert metrics["nonfinite_count"] == 2 and reference["nonfinite_count"] == 0
    assert metrics["grad_norm"] == reference["grad_norm"] > 0
    assert metrics["param_delta_norm"] == reference["param_delta_norm"]
    finite = fit[torch.isfinite(fit)].double()
    assert metrics["fitness_min"] == -1.0 and metrics["fitness_max"] == 3.0
    assert metrics["fitness_mean"] == pytest.approx(float(finite.mean()))
    assert metrics["fitness_std"] == pytest.approx(float(finite.std(unbiased=False)))


def test_an_antithetic_pair_that_diverged_together_contributes_nothing(device):
    fit = torch.tensor([NAN, INF, 2.0, -1.0, 0.25, 1.5])
    # the pair (0, 1) gets equal weights: the same update as any other tied pair
    tied = fit.clone()
    tied[:2] = 7.0
    a, m = _nonfinite_step(device, fit, nonfinite_fitness="worst", fitness_transform="none",
                           baseline="antithetic", optimizer="sgd")
    b, _ = _nonfinite_step(device, tied, fitness_transform="none", baseline="antithetic",
                           optimizer="sgd")
    assert m["nonfinite_count"] == 2
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_all_nonfinite_fitnesses_raise_and_change_nothing(device):
    import sys
    from pathlib import Path

    if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the tests folder
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from state_snapshot import assert_unchanged, capture

    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy(lr=0.1, nonfinite_fitness="worst").setup(model)
    x = torch.randn(4, 3, device=device)
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
    s.step(torch.tensor([1.0, 2.0, 0.0, 3.0], device=device))  # the optimizer has state
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
    before = capture(s)
    with pytest.raises(ValueError, match="all 4 fitnesses are NaN or inf; nothing was updated"):
        s.step(torch.tensor([NAN, INF, -INF, NAN], device=device))
    # prenormalized weights are used as given: never replaced
    with pytest.raises(ValueError, match="prenormalized weights contain NaN or inf"):
        s.step(torch.tensor([0.5, NAN, -0.5, 0.0], device=device), prenormalized=True)
    assert_unchanged(s, before)
    assert s.step(torch.tensor([1.0, NAN, 0.0, 3.0], device=device))["nonfinite_count"] == 1
    assert s.epoch == 2


def test_raise_is_the_default_and_names_the_alternative(device):
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(4):
        pass
    with pytest.raises(ValueError, match="fitnesses contain NaN or inf; nothing was updated") as err:
        s.step(torch.tensor([1.0, NAN, 0.0, 2.0], device=device))
    assert "nonfinite_fitness='worst'" in str(err.value) and "1 of 4" in str(err.value)
    assert s.epoch == 0
    assert s.step(torch.tensor([1.0, 3.0, 0.0, 2.0], device=device))["nonfinite_count"] == 0


def test_nonfinite_policy_round_trips_through_config_state_dict_and_pickle(device):
    import io
    import pickle

    assert EggrollStrategy.from_config({"nonfinite_fitness": "worst"}).nonfinite_fitness == "worst"
    assert OpenESStrategy.from_config({"nonfinite_fitness": "worst"}).nonfinite_fitness == "worst"
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy(nonfinite_fitness="worst").setup(model)
    state = s.state_dict()
    assert state["nonfinite_fitness"] == "worst"
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = EggrollStrategy().setup(nn.Linear(3, 2).to(device))
    other.load_state_dict(state)  # the loaded setting overrides the constructor's
    assert other.nonfinite_fitness == "worst"
    # a state saved before the setting existed keeps the current one
    older = {k: v for k, v in state.items() if k != "nonfinite_fitness"}
    fresh = EggrollStrategy().setup(nn.Linear(3, 2).to(device))
    fresh.load_state_dict(older)
    assert fresh.nonfinite_fitness == "raise"
    with pytest.raises(ValueError, match="state_dict nonfinite_fitness must be one of"):
        fresh.load_state_dict(dict(state, nonfinite_fitness="skip", epoch=5))
    assert fresh.nonfinite_fitness == "raise" and fresh.epoch == 0
    assert pickle.loads(pickle.dumps(EggrollStrategy(nonfinite_fitness="worst"))).nonfinite_fitness == "worst"
