"""Mirrored (antithetic) sampling: members 2k and 2k+1 share draw k with signs +1/-1 on
every parameter; the update folds each pair to one coefficient (w_2k - w_2k+1), so equal
pair fitness gives an exactly zero update; odd populations warn.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy, OpenESStrategy


def make_mlp(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device)


def evaluate(strategy, model, n, device, epoch=None):
    with strategy.perturb(n, epoch) as pop:
        pop.batched_forward(model, torch.randn(n, 3, device=device))


def params_after_step(strategy_kwargs, fitness, device, n=None):
    model = make_mlp(device)
    s = EggrollStrategy(**strategy_kwargs).setup(model)
    n = n or len(fitness)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(s, model, n, device)
    s.step(torch.as_tensor(fitness, dtype=torch.float32, device=device))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [EggrollStrategy, OpenESStrategy])
def test_pairs_share_noise_with_opposite_signs_on_every_parameter(device, cls):
    model = make_mlp(device)
    s = cls(sigma=0.3).setup(model)
    for p in s.parameters():
        for k in range(3):
            plus = s._sample_perturbation(p, 2 * k, 1)
            minus = s._sample_perturbation(p, 2 * k + 1, 1)
            assert plus.sign == 1 and minus.sign == -1
            assert torch.equal(minus.as_matrix(), -plus.as_matrix())
            assert not torch.equal(plus.as_matrix(), torch.zeros_like(plus.as_matrix()))
        other = s._sample_perturbation(p, 2, 1).as_matrix()
        assert not torch.allclose(other, s._sample_perturbation(p, 0, 1).as_matrix())


def test_mirrored_rows_average_to_the_base_layer(device):
    layer = nn.Linear(6, 4).to(device)
    s = EggrollStrategy(sigma=0.5, rank=3).setup(layer)
    x = torch.randn(1, 6, device=device).expand(8, 6)  # the same input on every row
    with s.perturb(8) as pop:
        out = pop.batched_forward(layer, x)
    base = layer(x[:1])
    mean_pairs = (out[0::2] + out[1::2]) / 2
    torch.testing.assert_close(mean_pairs, base.expand_as(mean_pairs), rtol=1e-5, atol=1e-5)
    assert (out[0] - base[0]).abs().max() > 1e-3  # members really are perturbed


def test_without_antithetic_every_member_has_its_own_positive_noise(device):
    model = make_mlp(device)
    s = EggrollStrategy(antithetic=False).setup(model)
    w = model[0].weight
    mats = [s._sample_perturbation(w, i, 0) for i in range(4)]
    assert all(p.sign == 1 for p in mats)
    assert all(s.is_positive_perturbation(i) for i in range(4))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(mats[i].as_matrix(), mats[j].as_matrix())
            assert not torch.allclose(mats[i].as_matrix(), -mats[j].as_matrix())
    # member 2k's noise is draw 2k without mirroring, draw k with it
    mirrored = EggrollStrategy(antithetic=True).setup(model)
    assert torch.equal(mirrored._sample_perturbation(w, 2, 0).as_matrix(), mats[1].as_matrix())


def test_odd_population_warns(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    with pytest.warns(UserWarning) as record:
        with s.perturb(5):
            pass
    text = " ".join(str(r.message) for r in record)
    assert "antithetic" in text and "odd" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with s.perturb(6):
            pass
        with EggrollStrategy(antithetic=False).setup(model).perturb(5):
            pass


@pytest.mark.parametrize("optimizer,kwargs", [("sgd", {}), ("sgd", {"momentum": 0.9}),
                                              ("adam", {}), ("adamw", {"weight_decay": 0.0})])
@pytest.mark.parametrize("transform", ["normalize", "rank", "none"])
def test_equal_pair_fitness_gives_an_exactly_zero_update(device, optimizer, kwargs, transform):
    model = make_mlp(device)
    before = [p.detach().clone() for p in model.parameters()]
    s = EggrollStrategy(lr=0.1, optimizer=optimizer, optimizer_kwargs=kwargs,
                        fitness_transform=transform).setup(model)
    evaluate(s, model, 6, device)
    m = s.step(torch.tensor([3.0, 3.0, -1.0, -1.0, 7.5, 7.5], device=device))
    assert m["grad_norm"] == 0.0 and m["param_delta_norm"] == 0.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_update_equals_the_explicit_mirrored_sum(device):
    """SGD with lr=1: the change is g = (1/sqrt(N)) sum_i w_i P_i with w the shaped
    fitnesses and P_i read through the inspection API (odd N: the last member is unpaired)."""
    for antithetic, n in ((True, 6), (True, 5), (False, 5)):
        model = make_mlp(device)
        s = EggrollStrategy(sigma=0.2, lr=1.0, optimizer="sgd", antithetic=antithetic,
                            seed=7).setup(model)
        before = {n_: p.detach().clone() for n_, p in s.named_parameters()}
        fit = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1][:n], device=device)
        w = s.normalize_fitnesses(fit).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate(s, model, n, device, epoch=2)
        s.step(fit)
        for name, p in s.named_parameters():
            g = sum(w[i] * s._get_perturbation(name, i, 2).as_matrix().double()
                    for i in range(n)) / math.sqrt(n)
            torch.testing.assert_close((p.detach() - before[name]).double(), g,
                                       rtol=1e-4, atol=1e-6)


def test_constant_fitness_offset_cancels_exactly_only_with_mirroring(device):
    """The mirrored fold removes the common part of a pair's fitness: raw fitnesses shifted
    by a constant give the identical update with antithetic sampling, not without."""
    fit = [0.5, -0.25, 1.0, 0.0]
    shifted = [f + 1000.0 for f in fit]
    kw = dict(fitness_transform="none", optimizer="sgd", lr=1e-3)
    a = params_after_step(dict(kw, antithetic=True), fit, device)
    b = params_after_step(dict(kw, antithetic=True), shifted, device)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = params_after_step(dict(kw, antithetic=False), fit, device)
    d = params_after_step(dict(kw, antithetic=False), shifted, device)
    assert any(not torch.allclose(x, y) for x, y in zip(c, d))


def test_pairwise_baseline(device):
    s = EggrollStrategy(fitness_transform="none", baseline="antithetic")
    f = torch.tensor([3.0, 1.0, -2.0, 4.0, 5.0])
    assert torch.equal(s.normalize_fitnesses(f), torch.tensor([1.0, -1.0, -3.0, 3.0, 0.0]))
    # with mirrored sampling the pairwise baseline does not change the update
    kw = dict(fitness_transform="none", optimizer="sgd", lr=0.01)
    fit = [3.0, 1.0, -2.0, 4.0]
    a = params_after_step(dict(kw, baseline="antithetic"), fit, device)
    b = params_after_step(dict(kw, baseline="mean"), fit, device)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_batched_forward_uses_mirrored_noise_for_every_layer(device):
    """Row 2k+1 of the full model equals a plain forward with base - P_2k on every layer."""
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.4, rank=2).setup(model)
    x = torch.randn(4, 3, device=device)
    with s.perturb(4, epoch=3) as pop:
        out = pop.batched_forward(model, x)
    with torch.no_grad():
        for name, p in s.named_parameters():
            p -= s._get_perturbation(name, 2, 3).as_matrix()
        mirrored = model(x[3:4])
    torch.testing.assert_close(out[3:4], mirrored, rtol=1e-5, atol=1e-5)
