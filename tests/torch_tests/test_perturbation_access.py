"""Public access to one member's perturbation of one parameter: ``pop.get_perturbation`` inside
a perturb context and ``strategy.sample_perturbations`` by name outside one; both give the
noise the batched forward uses, for low-rank and for dense (full-rank) noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy, OpenESStrategy, Perturbation


def _model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device)


@pytest.mark.parametrize("cls", [EggrollStrategy, OpenESStrategy])
def test_get_perturbation_is_the_noise_of_the_batched_forward(device, cls):
    model = _model(device)
    s = cls(sigma=0.3, seed=7).setup(model)
    layer = model[0]
    x = torch.randn(6, 3, device=device)
    with s.perturb(6, epoch=2) as pop:
        out = pop.batched_forward(layer, x)
        for k in range(6):
            dw = pop.get_perturbation(k, "0.weight")
            db = pop.get_perturbation(k, "0.bias")
            assert isinstance(dw, Perturbation) and dw.is_low_rank == (cls is EggrollStrategy)
            assert (dw.member_id, dw.epoch, dw.param_name) == (k, 2, "0.weight")
            expected = x[k] @ (layer.weight + dw.as_matrix()).T + layer.bias + db.as_matrix()
            torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-5)
    # the same as the strategy's sequence, looked up by name, at that epoch
    by_name = s.sample_perturbations("0.weight", 6, epoch=2)
    by_param = s.sample_perturbations(layer.weight, 6, epoch=2)
    with s.perturb(6, epoch=2) as pop:
        for k in range(6):
            m = pop.get_perturbation(k, "0.weight").as_matrix()
            assert torch.equal(m, by_name[k].as_matrix()) and torch.equal(m, by_param[k].as_matrix())


def test_get_factors_of_dense_noise_points_to_get_perturbation(device):
    model = _model(device)
    s = OpenESStrategy().setup(model)
    with s.perturb(4) as pop:
        with pytest.raises(ValueError, match=r"pop\.get_perturbation\(member_id, '0\.weight'\)"):
            pop.get_factors(1, "0.weight")
        dense = pop.get_perturbation(1, "0.weight").as_matrix()
    assert dense.shape == model[0].weight.shape and bool(dense.abs().sum() > 0)


def test_get_perturbation_checks_its_arguments(device):
    s = EggrollStrategy().setup(_model(device))
    with s.perturb(4) as pop:
        with pytest.raises(ValueError, match=r"member id 4 out of range: must lie in \[0, 4\)"):
            pop.get_perturbation(4, "0.weight")
        with pytest.raises(TypeError, match="member_id must be a non-negative integer, got True"):
            pop.get_perturbation(True, "0.weight")
        with pytest.raises(KeyError, match="not an evolved parameter"):
            pop.get_perturbation(0, "nope")
        factors = pop.get_factors(3, "2.weight")
        via = pop.get_perturbation(3, "2.weight").factors
        assert torch.equal(factors[0], via[0]) and torch.equal(factors[1], via[1])
