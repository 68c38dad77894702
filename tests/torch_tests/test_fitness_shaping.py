"""Fitness shaping (SPEC §4): z-score with the population variance (robust, float64),
tie-averaged ranks, "none", callables, the pairwise baseline, grouping, and how the shaped
weights enter the update.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import (
    EggrollStrategy,
    antithetic_baseline,
    antithetic_fold,
    centered_rank,
    rank_transform,
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
