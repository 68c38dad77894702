"""The strategy interface contract: constructor, attributes,
setup and parameter discovery, the perturb/step cycle, metrics, callbacks, inspection,
checkpoints and the error table. Models are tiny; CPU runs go through Triton's interpreter.
"""

from __future__ import annotations

import dataclasses
import io
import math
import types

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import (
    EggrollStrategy,
    ESModule,
    OpenESStrategy,
    Perturbation,
)

METRIC_KEYS = {
    "grad_norm", "param_delta_norm", "fitness_mean", "fitness_std", "fitness_max",
    "fitness_min", "normalized_fitness_mean", "epoch", "lr", "sigma", "population_size",
    "nonfinite_count",
}


def make_mlp(device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)


def generation(strategy, model, x, n: int, epoch=None):
    """One perturb/evaluate/step cycle with a fixed smooth fitness; returns metrics."""
    with strategy.perturb(n, epoch) as pop:
        out = pop.batched_forward(model, x[:n])
        fit = -(out - 0.5).pow(2).sum(dim=1)
    return strategy.step(fit)


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


# -- constructor ------------------------------------------------------------------------------

def test_constructor_defaults_need_no_model_and_no_gpu():
    s = EggrollStrategy()
    assert s.sigma == 0.1 and type(s.sigma) is float
    assert s.lr == 0.01 and type(s.lr) is float
    assert s.rank == 4 and s.seed == 0
    assert s.antithetic is True and s.noise_reuse == 1
    assert s.fitness_transform == "normalize" and s.baseline == "mean"
    assert s.fitness_eps == 1e-8 and s.group_size == 0
    assert s.evolve_bias is True and s.max_grad_norm is None and s.distributed is False
    assert s.model is None and s.optimizer is None


def test_sigma_and_lr_are_python_floats():
    s = EggrollStrategy(sigma=1, lr=torch.tensor(0.5).item())
    assert type(s.sigma) is float and type(s.lr) is float


@pytest.mark.parametrize("kwargs,error", [
    ({"optimizer": "lbfgs-ish"}, ValueError),
    ({"optimizer": 3}, TypeError),
    ({"fitness_transform": "zscore-ish"}, ValueError),
    ({"fitness_transform": 3}, TypeError),
    ({"baseline": "median"}, ValueError),
    ({"rank": 0}, ValueError),
    ({"sigma": -0.1}, ValueError),
    ({"lr": float("nan")}, ValueError),
    ({"noise_reuse": -1}, ValueError),
    ({"group_size": -2}, ValueError),
    ({"optimizer_kwargs": {"lr": 0.1}}, ValueError),
])
def test_bad_constructor_arguments_fail_at_construction(kwargs, error):
    with pytest.raises(error):
        EggrollStrategy(**kwargs)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW),
                                      (torch.optim.RMSprop, torch.optim.RMSprop)])
def test_optimizer_choices_build_real_torch_optimizers(device, name, cls):
    model = make_mlp(device)
    s = EggrollStrategy(optimizer=name, lr=0.03, optimizer_kwargs={"weight_decay": 0.0})
    s.setup(model)
    assert isinstance(s.optimizer, cls)
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in params] == [id(p) for p in s.parameters()]
    assert all(g["lr"] == 0.03 and g["weight_decay"] == 0.0 for g in s.optimizer.param_groups)


def test_optimizer_kwargs_are_forwarded(device):
    s = EggrollStrategy(optimizer="sgd", optimizer_kwargs={"momentum": 0.9, "nesterov": True})
    s.setup(make_mlp(device))
    assert s.optimizer.param_groups[0]["momentum"] == 0.9
    assert s.optimizer.param_groups[0]["nesterov"] is True


def test_from_config_accepts_dataclass_mapping_and_attribute_bag():
    @dataclasses.dataclass
    class Cfg:
        sigma: float = 0.2
        rank: int = 3
        batch_size: int = 64  # unknown: ignored

    s1 = EggrollStrategy.from_config(Cfg())
    s2 = EggrollStrategy.from_config({"sigma": 0.2, "rank": 3, "epochs": 10})
    s3 = EggrollStrategy.from_config(types.SimpleNamespace(sigma=0.2, rank=3, foo="bar"))
    for s in (s1, s2, s3):
        assert isinstance(s, EggrollStrategy)
        assert s.sigma == 0.2 and s.rank == 3 and s.lr == 0.01
    o = OpenESStrategy.from_config({"sigma": 0.3, "rank": 7})  # rank is not an OpenES name
    assert isinstance(o, OpenESStrategy) and o.sigma == 0.3


# -- setup and parameters ------------------------------------------------------------------------

def test_setup_returns_self_and_keeps_the_model_object(device):
    model = make_mlp(device)
    s = EggrollStrategy()
    assert s.setup(model) is s
    assert s.model is model
    assert s.epoch == 0 and s.total_steps == 0


def test_parameter_discovery_order_and_kinds(device):
    model = make_mlp(device)
    model[0].bias.requires_grad_(False)
    s = EggrollStrategy().setup(model)
    names = [n for n, _ in s.named_parameters()]
    assert names == ["0.weight", "2.weight", "2.bias"]
    assert all(p is dict(model.named_parameters())[n] for n, p in s.named_parameters())
    assert [id(p) for p in s.parameters()] == [id(p) for _, p in s.named_parameters()]
    assert [id(p) for p in s.weight_parameters()] == [id(model[0].weight), id(model[2].weight)]
    assert [id(p) for p in s.bias_parameters()] == [id(model[2].bias)]


def test_include_exclude_and_evolve_bias(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model, include=["0.weight", "2.bias"])
    assert [n for n, _ in s.named_parameters()] == ["0.weight", "2.bias"]
    s = EggrollStrategy().setup(model, exclude=["0.weight"])
    assert [n for n, _ in s.named_parameters()] == ["0.bias", "2.weight", "2.bias"]
    s = EggrollStrategy(evolve_bias=False).setup(model)
    assert [n for n, _ in s.named_parameters()] == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="nope"):
        EggrollStrategy().setup(model, exclude=["nope"])


def test_evolve_bias_false_neither_perturbs_nor_updates_biases(device):
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.5, lr=0.1, evolve_bias=False, optimizer="sgd").setup(model)
    x = torch.randn(4, 3, device=device)
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    generation(s, model, x, 4)
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[2].bias, biases[1])
    # with only the bias-free first layer perturbed away, a zero input sees the plain bias
    with s.perturb(4) as pop:
        out = pop.batched_forward(model[0], torch.zeros(4, 3, device=device))
    assert torch.equal(out, model[0].bias.expand(4, -1))


def test_freeze_removes_a_parameter_from_evolution(device):
    model = make_mlp(device)
    s = EggrollStrategy(optimizer="sgd", lr=0.1).setup(model)
    s.freeze("2.bias")
    assert "2.bias" not in dict(s.named_parameters())
    assert all(p is not model[2].bias for g in s.optimizer.param_groups for p in g["params"])
    before = model[2].bias.detach().clone()
    generation(s, model, torch.randn(4, 3, device=device), 4)
    assert torch.equal(model[2].bias, before)
    with pytest.raises(ValueError):
        s.freeze("not.a.param")
    pre = EggrollStrategy()
    pre.freeze("0.bias")  # before setup: applied at setup
    pre.setup(model)
    assert "0.bias" not in dict(pre.named_parameters())


def test_model_outside_a_context_is_unchanged_and_nothing_is_installed(device):
    model = make_mlp(device)
    x = torch.randn(5, 3, device=device)
    ref = model(x)
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    s1 = EggrollStrategy(seed=1).setup(model)
    s2 = EggrollStrategy(seed=2).setup(model, exclude=["0.weight"])
    assert torch.equal(model(x), ref)
    with s1.perturb(4) as pop:
        pop.batched_forward(model, x[:4])
        assert torch.equal(model(x), ref)  # base values inside the context too
    with s2.perturb(4) as pop:
        pop.batched_forward(model, x[:4])
    assert torch.equal(model(x), ref)
    hooks_after = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert hooks_before == hooks_after
    assert type(model) is nn.Sequential and type(model[0]) is nn.Linear


def test_setup_rejects_cpu_models_without_the_interpreter(monkeypatch):
    model = make_mlp("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError) as err:
        EggrollStrategy().setup(model)
    msg = str(err.value)
    assert "CUDA" in msg and "GPU" in msg and "TRITON_INTERPRET=1" in msg
    assert 'backend="torch"' in msg  # names the plain-torch opt-in


def test_cpu_model_is_accepted_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = EggrollStrategy().setup(make_mlp("cpu"))
    assert len(s.parameters()) == 4


def test_model_moved_to_cpu_later_and_cpu_inputs_raise(device, monkeypatch):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(2) as pop:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            pop.batched_forward(model, torch.randn(2, 3))  # a CPU input
    model.cpu()
    with pytest.raises(RuntimeError, match="GPU"):
        s.perturb(2)


# -- the perturb/step cycle --------------------------------------------------------------------------

def test_perturb_and_step_before_setup_raise():
    s = EggrollStrategy()
    with pytest.raises(RuntimeError, match="setup"):
        s.perturb(4)
    with pytest.raises(RuntimeError, match="setup"):
        s.step(torch.zeros(4))


def test_step_without_a_context_or_inside_one_raises(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    with pytest.raises(RuntimeError):
        s.step(torch.zeros(4))
    with s.perturb(4):
        with pytest.raises(RuntimeError):
            s.step(torch.zeros(4))
    s.step(torch.zeros(4))
    with pytest.raises(RuntimeError):  # the context was used up by that step
        s.step(torch.zeros(4))


def test_epoch_and_total_steps_advance_and_perturb_defaults_to_current_epoch(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    x = torch.randn(4, 3, device=device)
    seen = []
    s.register_callback("on_perturb", lambda n, e: seen.append((n, e)))
    for i in range(3):
        m = generation(s, model, x, 4)
        assert m["epoch"] == i
        assert s.epoch == i + 1 and s.total_steps == i + 1
    generation(s, model, x, 2, epoch=10)  # an explicit epoch keys the noise; counters go on
    assert seen == [(4, 0), (4, 1), (4, 2), (2, 10)]
    assert s.epoch == 4 and s.total_steps == 4


def test_step_metrics_are_plain_python_numbers(device):
    model = make_mlp(device)
    s = EggrollStrategy(lr=0.02, sigma=0.3).setup(model)
    with s.perturb(6) as pop:
        pop.batched_forward(model, torch.randn(6, 3, device=device))
    fit = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], device=device)
    m = s.step(fit)
    assert set(m) == METRIC_KEYS
    assert all(type(v) in (int, float) for v in m.values())
    assert type(m["epoch"]) is int and type(m["population_size"]) is int
    assert m["population_size"] == 6 and m["epoch"] == 0
    assert m["lr"] == 0.02 and m["sigma"] == 0.3
    assert m["fitness_mean"] == pytest.approx(4.0)
    assert m["fitness_std"] == pytest.approx(float(fit.cpu().double().std(unbiased=False)))
    assert m["fitness_max"] == 9.0 and m["fitness_min"] == 1.0
    assert abs(m["normalized_fitness_mean"]) < 1e-12
    assert m["grad_norm"] > 0 and m["param_delta_norm"] > 0


def test_param_delta_norm_measures_the_change(device):
    model = make_mlp(device)
    s = EggrollStrategy(lr=0.05, optimizer="sgd").setup(model)
    before = snapshot(model)
    m = generation(s, model, torch.randn(4, 3, device=device), 4)
    delta = math.sqrt(sum(float((a.double() - b.double()).pow(2).sum())
                          for a, b in zip(snapshot(model), before)))
    assert m["param_delta_norm"] == pytest.approx(delta, rel=1e-6)
    # plain SGD: the step is lr * g
    assert m["param_delta_norm"] == pytest.approx(0.05 * m["grad_norm"], rel=1e-5)


def test_lr_setter_updates_the_optimizer_and_zero_lr_is_bit_identical(device):
    model = make_mlp(device)
    s = EggrollStrategy(lr=0.1).setup(model)
    s.lr = 0.0
    assert all(g["lr"] == 0.0 for g in s.optimizer.param_groups)
    before = snapshot(model)
    m = generation(s, model, torch.randn(4, 3, device=device), 4)
    assert same_bits(snapshot(model), before)
    assert m["param_delta_norm"] == 0.0 and m["lr"] == 0.0
    s.sigma = 0.25
    assert s.sigma == 0.25
    with pytest.raises(ValueError):
        s.lr = -1.0


def test_sigma_zero_means_no_perturbation_and_no_update(device):
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.0, lr=0.1, optimizer="sgd").setup(model)
    x = torch.randn(4, 3, device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
    assert torch.allclose(out, model(x), atol=1e-6)
    before = snapshot(model)
    s.step(torch.arange(4.0, device=device))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))


def test_max_grad_norm_clips_the_es_gradient(device):
    model = make_mlp(device)
    free = EggrollStrategy(seed=3, optimizer="sgd").setup(model)
    x = torch.randn(4, 3, device=device)
    with free.perturb(4) as pop:
        pop.batched_forward(model, x)
    g_free = free.step(torch.tensor([0.0, 10.0, 3.0, -5.0], device=device))["grad_norm"]
    model = make_mlp(device)
    clipped = EggrollStrategy(seed=3, optimizer="sgd", lr=0.1, max_grad_norm=0.1).setup(model)
    assert g_free > 0.1
    with clipped.perturb(4) as pop:
        pop.batched_forward(model, x)
    m = clipped.step(torch.tensor([0.0, 10.0, 3.0, -5.0], device=device))
    assert m["grad_norm"] == pytest.approx(0.1, rel=1e-4)
    assert m["param_delta_norm"] == pytest.approx(0.1 * 0.1, rel=1e-4)


def test_parameters_own_grad_is_restored_after_step(device):
    model = make_mlp(device)
    s = EggrollStrategy(lr=0.1).setup(model)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    model[2].bias.grad = None
    generation(s, model, torch.randn(4, 3, device=device), 4)
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[2].bias.grad is None


def test_normalize_fitnesses_works_before_setup_on_cpu():
    s = EggrollStrategy()
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = s.normalize_fitnesses(f)
    assert out.shape == f.shape and out.device == f.device and out.dtype == f.dtype
    assert abs(float(out.mean())) < 1e-6
    assert float(out.double().var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)


def test_eval_context_gives_the_plain_model_even_while_iterating(device):
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.5).setup(model)
    x = torch.randn(3, 3, device=device)
    ref = model(x)
    with s.eval():
        assert torch.equal(model(x), ref)
    with s.perturb(2) as pop:
        for k in pop.iterate():
            perturbed = model(x)
            with s.eval():
                assert torch.equal(model(x), ref)
            assert torch.equal(model(x), perturbed)
    assert torch.equal(model(x), ref)


def test_callbacks(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    steps, perturbs = [], []
    s.register_callback("on_step", steps.append)
    s.register_callback("on_perturb", lambda n, e: perturbs.append((n, e)))
    with pytest.raises(ValueError):
        s.register_callback("on_epoch_end", print)
    m = generation(s, model, torch.randn(4, 3, device=device), 4)
    assert perturbs == [(4, 0)]
    assert len(steps) == 1 and steps[0] == m


# -- errors of bad calls ----------------------------------------------------------------------------

def test_fitness_length_must_match_the_population(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(4):
        pass
    with pytest.raises(ValueError, match="population"):
        s.step(torch.zeros(5))
    with pytest.raises(ValueError, match="population"):
        s.step(torch.zeros(3))
    s.step(torch.zeros(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_fitness_changes_nothing(device, bad):
    model = make_mlp(device)
    s = EggrollStrategy(lr=0.1).setup(model)
    x = torch.randn(4, 3, device=device)
    generation(s, model, x, 4)  # so that the optimizer has state
    state = s.state_dict()
    with s.perturb(4):
        pass
    with pytest.raises(ValueError):
        s.step(torch.tensor([1.0, bad, 0.0, 2.0]))
    after = s.state_dict()
    assert s.epoch == 1 and s.total_steps == 1
    for k in ("epoch", "total_steps", "lr", "sigma"):
        assert after[k] == state[k]
    for n, v in state["parameters"].items():
        assert torch.equal(after["parameters"][n], v)
    for i, st in state["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(after["optimizer"]["state"][i][k], v)
    s.step(torch.tensor([1.0, 3.0, 0.0, 2.0]))  # the context is still there to step on
    assert s.epoch == 2


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_refused_step_is_rolled_back_and_the_run_goes_on_as_if_it_never_ran(device, optimizer):
    """The fitnesses' values are checked after the update is queued: a refused step is
    rolled back, and the run continues bit-identically to one that never saw it (Adam's
    moments and step count included, with clipping on)."""
    x = torch.randn(4, 3, device=device)
    runs = []
    for refuse in (False, True):
        model = make_mlp(device)
        s = EggrollStrategy(seed=5, lr=0.05, optimizer=optimizer, max_grad_norm=0.05).setup(model)
        generation(s, model, x, 4)  # the optimizer has state
        with s.perturb(4) as pop:
            pop.batched_forward(model, x)
        if refuse:
            with pytest.raises(ValueError, match="NaN or inf"):
                s.step(torch.tensor([1.0, 3.0, float("nan"), 2.0], device=device))
            assert s.epoch == 1
        metrics = s.step(torch.tensor([1.0, 3.0, 0.0, 2.0], device=device))
        generation(s, model, x, 4)
        runs.append((snapshot(model), s.state_dict()["optimizer"]["state"], metrics))
    (params_a, opt_a, m_a), (params_b, opt_b, m_b) = runs
    assert same_bits(params_a, params_b) and m_a == m_b
    assert opt_a.keys() == opt_b.keys()
    for i, st in opt_a.items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(opt_b[i][k]), torch.as_tensor(v)), (i, k)


class _HistorySGD(torch.optim.SGD):
    """SGD that also keeps a list in each parameter's state (a mutable value that the
    rollback cannot restore by copying tensors)."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                history = self.state[p].setdefault("history", [])
                history.append(len(history))
        return out


def test_a_refused_step_restores_the_optimizer_state_in_place_with_buffers_kept(device):
    """The rollback's snapshot copies the optimizer's tensors into buffers the strategy
    keeps (the same ones at every step), and a refused step gives the values back to the
    very tensors the optimizer held (Adam changes its moments and step counts in place);
    an optimizer whose state holds a list is restored through a copy of its state_dict."""
    x = torch.randn(4, 3, device=device)
    nan = torch.tensor([1.0, 3.0, float("nan"), 2.0], device=device)
    good = torch.tensor([1.0, 3.0, 0.0, 2.0], device=device)
    model = make_mlp(device)
    s = EggrollStrategy(seed=5, lr=0.05, optimizer="adam").setup(model)
    generation(s, model, x, 4)
    generation(s, model, x, 4)
    buffers = [b.data_ptr() for b in s._rollback_buffers[1]]
    held = {p: dict(state) for p, state in s.optimizer.state.items()}
    values = {p: {k: v.clone() for k, v in state.items()} for p, state in held.items()}
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
    with pytest.raises(ValueError, match="NaN or inf"):
        s.step(nan)
    assert s.optimizer.state.keys() == held.keys()
    for p, state in s.optimizer.state.items():
        assert state.keys() == held[p].keys()
        assert all(v is held[p][k] and torch.equal(v, values[p][k]) for k, v in state.items())
    s.step(good)
    assert [b.data_ptr() for b in s._rollback_buffers[1]] == buffers and len(buffers) == 12

    model = make_mlp(device)
    s = EggrollStrategy(seed=5, lr=0.05, optimizer=_HistorySGD).setup(model)
    generation(s, model, x, 4)
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
    with pytest.raises(ValueError, match="NaN or inf"):
        s.step(nan)
    assert [state["history"] for state in s.optimizer.state.values()] == [[0]] * 4
    s.step(good)
    assert [state["history"] for state in s.optimizer.state.values()] == [[0, 1]] * 4


def test_a_step_without_metrics_updates_exactly_like_one_with_them(device):
    """The step EGGROLL takes (``metrics=False``: only the checks, no statistics, no norms
    unless clipping needs one) updates the parameters and the optimizer exactly as
    ``step()``, clipping included, gives back the values of ``extra`` read with its checks,
    and still refuses non-finite weights."""
    x = torch.randn(4, 3, device=device)
    fits = [torch.tensor(v, device=device) for v in ([1.0, 3.0, 0.0, 2.0], [0.5, -1.0, 2.0, 0.0])]
    params = []
    for lean in (False, True):
        model = make_mlp(device)
        s = EggrollStrategy(seed=5, lr=0.05, optimizer="adam", max_grad_norm=0.05).setup(model)
        for f in fits:
            with s.perturb(4) as pop:
                pop.batched_forward(model, x)
            if lean:
                out, values = s._step(f, True, metrics=False, extra=f * 2)
                assert values == (f * 2).tolist()
            else:
                out = s.step(f, prenormalized=True)
            assert (out is None) == lean
        params.append(snapshot(model))
        if lean:
            with s.perturb(4) as pop:
                pop.batched_forward(model, x)
            with pytest.raises(ValueError, match="prenormalized weights contain NaN"):
                s._step(torch.tensor([1.0, float("nan"), 0.0, 2.0], device=device), True,
                        metrics=False)
            assert same_bits(snapshot(model), params[-1]) and s.epoch == 2
    assert same_bits(params[0], params[1])


def test_population_size_must_be_positive(device):
    s = EggrollStrategy().setup(make_mlp(device))
    for bad in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match="population_size must be a positive integer"):
            s.perturb(bad)


# -- inspection and perturbation objects ---------------------------------------------

def test_inspection_returns_the_noise_of_forward_and_update(device):
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.2, rank=2).setup(model)
    w = model[0].weight
    p1 = s._sample_perturbation(w, 3, 0)
    p2 = s._sample_perturbation(param=w, member_id=3, epoch=0)
    p3 = s._get_perturbation("0.weight", 3, 0)
    p4 = s._get_perturbation(param_name="0.weight", member_id=3, epoch=0)
    for p in (p2, p3, p4):
        assert torch.equal(p.as_matrix(), p1.as_matrix())
    x = torch.randn(4, 3, device=device)
    with s.perturb(4, epoch=0) as pop:
        a, b = pop.get_factors(3, "0.weight")
        out = pop.batched_forward(model[0], x)
    assert torch.equal(a, p1.factors[0]) and torch.equal(b, p1.factors[1])
    expected = x[3] @ (w + p1.as_matrix()).T + model[0].bias + \
        s._get_perturbation("0.bias", 3, 0).as_matrix()
    torch.testing.assert_close(out[3], expected, rtol=1e-5, atol=1e-5)


def test_perturbation_fields_and_storage_stats(device):
    model = nn.Linear(6, 5).to(device)
    s = EggrollStrategy(sigma=0.1, rank=2).setup(model)
    p = s._sample_perturbation(model.weight, 1, 4)
    assert isinstance(p, Perturbation)
    a, b = p.factors
    assert a.shape == (5, 2) and b.shape == (6, 2)
    assert a.dtype == model.weight.dtype and a.device == model.weight.device
    assert p.rank == 2 and p.member_id == 1 and p.epoch == 4 and p.sign == -1
    assert p.as_matrix().shape == model.weight.shape
    torch.testing.assert_close(p.as_matrix(), a @ b.T)
    stats = p.storage_stats()
    assert stats["full_rank_elements"] == 30 and stats["low_rank_elements"] == 2 * 11
    assert stats["savings_ratio"] == pytest.approx(30 / 22)
    bias = s._sample_perturbation(model.bias, 1, 4)
    assert isinstance(bias.factors, torch.Tensor) and bias.factors.shape == (5,)
    assert bias.as_matrix().shape == (5,)


def test_perturbations_are_immutable_and_have_an_informative_repr(device):
    model = nn.Linear(6, 5).to(device)
    s = EggrollStrategy(rank=3).setup(model)
    p = s._sample_perturbation(model.weight, 1, 2)
    for field in ("factors", "rank", "member_id", "epoch", "sign"):
        with pytest.raises(AttributeError):
            setattr(p, field, None)
    text = repr(p)
    for part in ("weight", "(5, 6)", "rank=3", "member=1", "epoch=2", "sign=-"):
        assert part in text


def test_sample_perturbations_is_a_sequence(device):
    model = nn.Linear(4, 3).to(device)
    s = EggrollStrategy(rank=1).setup(model)
    seq = s.sample_perturbations(model.weight, 4, 0)
    assert len(seq) == 4
    items = list(seq)
    assert [p.member_id for p in items] == [0, 1, 2, 3]
    assert torch.equal(seq[2].as_matrix(), items[2].as_matrix())
    assert torch.equal(seq[-1].as_matrix(), items[3].as_matrix())
    assert [p.member_id for p in seq[1:3]] == [1, 2]
    with pytest.raises(IndexError):
        seq[4]
    single = s.sample_perturbations(param=model.weight, population_size=4, epoch=0)
    assert torch.equal(single[1].as_matrix(), s._sample_perturbation(model.weight, 1, 0).as_matrix())


def test_member_perturbation_takes_the_sigma_of_its_generation(device):
    """A member of a generation that ran with another sigma: its noise, scaled by that
    sigma, without changing the strategy's own sigma; the default is the current sigma."""
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.2, rank=2, antithetic=True).setup(model)
    w = model[0].weight
    then = s._sample_perturbation(w, 3, 1)
    s.sigma = 0.5
    now = s._sample_perturbation(w, 3, 1)
    assert torch.equal(s.member_perturbation(w, 3, 1, sigma=0.2).as_matrix(), then.as_matrix())
    assert torch.equal(s.member_perturbation("0.weight", 3, 1).as_matrix(), now.as_matrix())
    assert torch.equal(s.member_perturbation(model[0].bias, 3, 1, sigma=0.2).as_matrix(),
                       EggrollStrategy(sigma=0.2, rank=2).setup(model)._sample_perturbation(model[0].bias, 3, 1)
                       .as_matrix())
    assert s.sigma == 0.5
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        s.member_perturbation(w, 3, 1, sigma=-1.0)


def test_inspection_rejects_foreign_parameters(device):
    model = nn.Linear(4, 3).to(device)
    s = EggrollStrategy().setup(model)
    with pytest.raises(ValueError):
        s._sample_perturbation(nn.Parameter(torch.zeros(3, 4)), 0, 0)
    with pytest.raises(KeyError):
        s._get_perturbation("missing.weight", 0, 0)


def test_antithetic_partner_and_sign_helpers():
    s = EggrollStrategy()
    assert [s.get_antithetic_partner(i) for i in range(6)] == [1, 0, 3, 2, 5, 4]
    assert [s.is_positive_perturbation(i) for i in range(4)] == [True, False, True, False]
    plain = EggrollStrategy(antithetic=False)
    assert all(plain.is_positive_perturbation(i) for i in range(4))


# -- checkpoints -------------------------------------------------------------------------

def test_state_dict_keys_are_stable_and_load_with_weights_only(device):
    model = make_mlp(device)
    s = EggrollStrategy(optimizer="adam").setup(model)
    keys0 = set(s.state_dict())
    for k in ("sigma", "lr", "epoch", "total_steps", "seed", "rank", "antithetic",
              "noise_reuse", "optimizer", "parameters"):
        assert k in keys0
    generation(s, model, torch.randn(4, 3, device=device), 4)
    sd = s.state_dict()
    assert set(sd) == keys0
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["epoch"] == 1 and loaded["seed"] == 0


def test_resume_from_checkpoint_is_bit_identical(device):
    x = torch.randn(6, 3, device=device, generator=None)
    kwargs = dict(sigma=0.2, lr=0.05, rank=2, optimizer="adam", seed=11)

    model_a = make_mlp(device)
    a = EggrollStrategy(**kwargs).setup(model_a)
    metrics_a = [generation(a, model_a, x, 6) for _ in range(4)]

    model_b = make_mlp(device)
    b = EggrollStrategy(**kwargs).setup(model_b)
    for _ in range(2):
        generation(b, model_b, x, 6)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model_c = make_mlp(device, seed=99)  # different initial values: the checkpoint wins
    c = EggrollStrategy(sigma=0.9, lr=0.5, rank=2, optimizer="adam", seed=5).setup(model_c)
    c.load_state_dict(state)
    assert c.seed == 11 and c.sigma == 0.2 and c.lr == 0.05 and c.epoch == 2
    metrics_c = [generation(c, model_c, x, 6) for _ in range(2)]
    assert same_bits(snapshot(model_c), snapshot(model_a))
    assert metrics_c == metrics_a[2:]
    assert c.total_steps == a.total_steps == 4


def test_state_dict_is_a_snapshot(device):
    model = make_mlp(device)
    s = EggrollStrategy(optimizer="adam").setup(model)
    x = torch.randn(4, 3, device=device)
    generation(s, model, x, 4)
    sd = s.state_dict()
    frozen = {n: v.clone() for n, v in sd["parameters"].items()}
    exp_avg = sd["optimizer"]["state"][0]["exp_avg"].clone()
    generation(s, model, x, 4)
    assert all(torch.equal(sd["parameters"][n], v) for n, v in frozen.items())
    assert torch.equal(sd["optimizer"]["state"][0]["exp_avg"], exp_avg)


def test_load_state_dict_validates_before_changing(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    sd = s.state_dict()
    bad = dict(sd, parameters={"0.weight": sd["parameters"]["0.weight"]})
    before = snapshot(model)
    with pytest.raises(ValueError):
        s.load_state_dict(bad)
    with pytest.raises(KeyError):
        s.load_state_dict({k: v for k, v in sd.items() if k != "epoch"})
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))


# -- OpenES and ESModule ------------------------------------------------------------------

def test_openes_has_the_same_interface_with_full_rank_noise(device):
    model = make_mlp(device)
    s = OpenESStrategy(sigma=0.1, lr=0.05, seed=4)
    assert not hasattr(s, "rank")
    s.setup(model)
    p = s._sample_perturbation(model[0].weight, 2, 0)
    assert p.rank is None and p.factors.shape == model[0].weight.shape
    assert torch.linalg.matrix_rank(p.as_matrix().float()) == 3  # full rank (4 x 3)
    mirror = s._sample_perturbation(model[0].weight, 3, 0)
    assert torch.equal(mirror.as_matrix(), -p.as_matrix())
    x = torch.randn(4, 3, device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
        ref = torch.cat([model(x[k:k + 1]) for k in pop.iterate()])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    m = s.step(-(out - 0.5).pow(2).sum(1))
    assert set(m) == METRIC_KEYS and s.epoch == 1
    assert s.state_dict()["rank"] == 0


def test_strategy_on_esmodule_respects_its_choices(device):
    inner = make_mlp(device)
    es = ESModule(inner)
    es.freeze_parameter("0.bias")
    es.freeze_parameter("module.2.bias")
    s = EggrollStrategy().setup(es)
    assert s.model is es
    assert [n for n, _ in s.named_parameters()] == ["0.weight", "2.weight"]
    x = torch.randn(4, 3, device=device)
    assert torch.equal(es(x), inner(x))
    with s.perturb(4) as pop:
        out = pop.batched_forward(es, x)
        a, _ = pop.get_factors(0, "0.weight")
    assert out.shape == (4, 2) and a.shape == (4, s.rank)


# -- bad-input catalogue: the named error and no state change ---------------------------

import copy as _copy  # noqa: E402
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

if str(_Path(__file__).resolve().parents[1]) not in _sys.path:  # the tests folder: the snapshot
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from state_snapshot import assert_unchanged, capture  # noqa: E402


_PRIMED: dict = {}


def primed(device, open_context: bool = True):
    """A strategy with Adam state after one generation and, optionally, a perturb context
    waiting for its step; returns (strategy, model, x). The generation runs once per device
    and is loaded from its checkpoint afterwards (the kernels are slow on the interpreter)."""
    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.2, lr=0.1, rank=2, optimizer="adam", seed=3).setup(model)
    x = torch.randn(4, 3, device=device, generator=torch.Generator().manual_seed(5)
                    ) if device == "cpu" else torch.randn(4, 3).to(device)
    key = str(device)
    if key not in _PRIMED:
        generation(s, model, x, 4)
        _PRIMED[key] = _copy.deepcopy(s.state_dict())
    else:
        s.load_state_dict(_copy.deepcopy(_PRIMED[key]))
    if open_context:
        with s.perturb(4):
            pass
    return s, model, x


@pytest.mark.parametrize("make,error,match", [
    (lambda d: torch.tensor([1.0, float("nan"), 0.0, 2.0]), ValueError, "NaN or inf"),
    (lambda d: torch.tensor([1.0, float("inf"), 0.0, 2.0]), ValueError, "NaN or inf"),
    (lambda d: torch.tensor([1.0, -float("inf"), 0.0, 2.0]), ValueError, "NaN or inf"),
    (lambda d: torch.tensor([7e4, 0.0, 0.0, 1.0]).half(), ValueError, "NaN or inf"),  # overflow
    (lambda d: torch.zeros(3), ValueError, "population"),
    (lambda d: torch.zeros(5), ValueError, "population"),
    (lambda d: torch.zeros(0), ValueError, "population"),
    (lambda d: torch.tensor(1.0), ValueError, "population"),
    (lambda d: torch.zeros(2, 2), ValueError, "1-D"),
    (lambda d: torch.zeros(4, 2), ValueError, "1-D"),
    (lambda d: torch.zeros(4, dtype=torch.complex64), TypeError, "real numbers"),
    (lambda d: torch.ones(4, dtype=torch.bool), TypeError, "real numbers"),
    (lambda d: [True, False, True, False], TypeError, "real numbers"),
    (lambda d: ["a", "b", "c", "d"], TypeError, "sequence of real numbers"),
    (lambda d: None, TypeError, "sequence of real numbers"),
    (lambda d: {"fitness": 1.0}, TypeError, "sequence of real numbers"),
    (lambda d: torch.zeros(4, device="meta"), RuntimeError, "meta"),
])
def test_bad_fitnesses_raise_and_change_nothing(device, make, error, match):
    s, model, x = primed(device)
    before = capture(s)
    with pytest.raises(error, match=match):
        s.step(make(device))
    assert_unchanged(s, before)
    s.step(torch.tensor([1.0, 3.0, 0.0, 2.0], device=device))  # the context is still there
    assert s.epoch == 2 and s.total_steps == 2


def test_integer_and_half_fitnesses_are_used_as_real_numbers(device):
    """Integer fitnesses (episode lengths, counts) are legal and equal to their float values."""
    results = []
    for f in (torch.tensor([3, 1, 0, 2]), [3, 1, 0, 2], torch.tensor([3.0, 1.0, 0.0, 2.0]).half(),
              torch.tensor([[3.0], [1.0], [0.0], [2.0]])):
        s, model, _ = primed(device)
        s.step(f)
        results.append(snapshot(model))
    assert all(same_bits(results[0], r) for r in results[1:])


def test_step_without_a_context_or_inside_one_changes_nothing(device):
    s, model, x = primed(device, open_context=False)
    before = capture(s)
    with pytest.raises(RuntimeError, match="preceding perturb context"):
        s.step(torch.zeros(4))
    assert_unchanged(s, before)
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
        inside = capture(s)
        with pytest.raises(RuntimeError, match="inside a perturb context"):
            s.step(torch.zeros(4))
        assert_unchanged(s, inside)


@pytest.mark.parametrize("ids,error,match", [
    ([0, 1, 2, 4], ValueError, r"\[0, 4\)"),
    ([0, 1, 2, 2 ** 40], ValueError, r"\[0, 4\)"),
    ([-1, 0, 1, 2], ValueError, r"\[0, 4\)"),
    ([0, 1, 2], ValueError, "shape"),
    ([0, 1, 2, 3, 0], ValueError, "shape"),
    ([[0, 1, 2, 3]], ValueError, "shape"),
    (torch.tensor(0), ValueError, "shape"),
    ([0.0, 1.0, 2.0, 3.0], TypeError, "integers"),
    (torch.ones(4, dtype=torch.bool), TypeError, "integers"),
    ("0123", TypeError, "integer"),
    (torch.arange(4, device="meta"), RuntimeError, "meta"),
])
def test_bad_member_ids_raise_and_change_nothing(device, ids, error, match):
    s, model, x = primed(device, open_context=False)
    with s.perturb(4) as pop:
        before = capture(s)
        with pytest.raises(error, match=match):
            pop.batched_forward(model, x, member_ids=ids)
        assert_unchanged(s, before)
        ok = pop.batched_forward(model, x, member_ids=[3, 2, 1, 0])  # still usable
    assert ok.shape == (4, 2)


def test_reused_member_ids_are_checked_again_after_any_change(device):
    """A member-id tensor passed again unchanged skips the range check; any in-place write
    to it (also through a view), another population size or another tensor checks again."""
    s, model, x = primed(device, open_context=False)
    ids = torch.tensor([3, 2, 1, 0], device=device)
    with s.perturb(4) as pop:
        first = pop.batched_forward(model, x, member_ids=ids)
        assert torch.equal(pop.batched_forward(model, x, member_ids=ids), first)
        ids[0] = 4
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            pop.batched_forward(model, x, member_ids=ids)
        ids[0] = 3
        pop.batched_forward(model, x, member_ids=ids)
        ids[2:].fill_(-1)
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            pop.batched_forward(model, x, member_ids=ids)
        ids[2:] = torch.tensor([1, 0])
        pop.batched_forward(model, x, member_ids=ids)
    with s.perturb(2) as pop:  # the same, unchanged tensor, but out of range for N = 2
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            pop.batched_forward(model, x, member_ids=ids)


def test_reused_unmodified_member_ids_skip_the_range_check(device, monkeypatch):
    """The range check (a read-back of the ids' minimum and maximum) runs once for a tensor
    passed again unchanged, and again for a written tensor, another tensor or a list."""
    s, model, x = primed(device, open_context=False)
    checked = []
    real_aminmax = torch.aminmax

    def counting_aminmax(t, *args, **kwargs):
        checked.append(t.tolist())
        return real_aminmax(t, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    ids = torch.tensor([3, 2, 1, 0], device=device)
    with s.perturb(4) as pop:
        first = pop.batched_forward(model, x, member_ids=ids)
        assert checked == [[3, 2, 1, 0]]
        for _ in range(3):
            assert torch.equal(pop.batched_forward(model, x, member_ids=ids), first)
        assert len(checked) == 1
        ids[1:3] = torch.tensor([1, 2])  # in-place write: checked again, then remembered
        pop.batched_forward(model, x, member_ids=ids)
        pop.batched_forward(model, x, member_ids=ids)
        assert checked == [[3, 2, 1, 0], [3, 1, 2, 0]]
        pop.batched_forward(model, x, member_ids=ids.clone())  # equal values, another tensor
        assert len(checked) == 3
        pop.batched_forward(model, x, member_ids=[0, 1, 2, 3])  # not a tensor: always checked
        pop.batched_forward(model, x, member_ids=[0, 1, 2, 3])
        assert len(checked) == 5


@pytest.mark.gpu
def test_reused_member_ids_do_not_synchronise_with_the_host(device):
    """On the GPU the check's read-back is a host synchronisation; a reused, unmodified
    member-id tensor makes none (what lets a CUDA graph capture the batched forward)."""
    s, model, x = primed(device, open_context=False)
    ids = torch.tensor([3, 2, 1, 0], device=device)
    with s.perturb(4) as pop:
        pop.batched_forward(model, x, member_ids=ids)  # checked and remembered
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pop.batched_forward(model, x, member_ids=ids)  # raises if it synchronises
            with pytest.raises(RuntimeError, match="synchroniz"):  # the mode sees the check
                pop.batched_forward(model, x, member_ids=ids.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("make,error,match", [
    (lambda d: torch.randn(4, 5, device=d), ValueError, "shape"),
    (lambda d: torch.randn(4, 2, device=d), ValueError, "shape"),
    (lambda d: torch.randn(4, 3, device=d, dtype=torch.float64), TypeError, "dtype"),
    (lambda d: torch.ones(4, 3, device=d, dtype=torch.int64), TypeError, "floating"),
    (lambda d: torch.tensor(1.0, device=d), ValueError, "batch dimension"),
    (lambda d: torch.randn(4, 3, device="meta"), RuntimeError, "meta"),
    (lambda d: [[0.0, 1.0, 2.0]] * 4, TypeError, "Tensor"),
])
def test_bad_inputs_raise_and_change_nothing(device, make, error, match):
    s, model, x = primed(device, open_context=False)
    with s.perturb(4) as pop:
        before = capture(s)
        with pytest.raises(error, match=match):
            pop.batched_forward(model, make(device))
        assert_unchanged(s, before)
        assert pop.batched_forward(model, x).shape == (4, 2)


@pytest.mark.parametrize("bad", [0, -1, -4, 2.5, 4.0, True, False, "4", None, 1 << 33])
def test_bad_population_sizes_raise_and_change_nothing(device, bad):
    s, model, x = primed(device)
    before = capture(s)
    with pytest.raises(ValueError, match="population_size must be"):
        s.perturb(bad)
    assert_unchanged(s, before)
    assert s._active is None


@pytest.mark.parametrize("attr", ["sigma", "lr"])
@pytest.mark.parametrize("bad,error", [
    (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (-float("inf"), ValueError), ("0.1", TypeError), (None, TypeError), (True, TypeError),
    (torch.tensor(0.1), TypeError),
])
def test_bad_sigma_and_lr_setters_raise_and_change_nothing(device, attr, bad, error):
    s, _, _ = primed(device)
    before = capture(s)
    with pytest.raises(error, match=attr):
        setattr(s, attr, bad)
    assert_unchanged(s, before)


@pytest.mark.parametrize("kwargs,error", [
    ({"sigma": float("nan")}, ValueError), ({"sigma": float("inf")}, ValueError),
    ({"sigma": "0.1"}, TypeError), ({"lr": -1e-3}, ValueError), ({"lr": float("inf")}, ValueError),
    ({"lr": None}, TypeError), ({"rank": -1}, ValueError), ({"rank": 2.0}, TypeError),
    ({"rank": float("nan")}, TypeError), ({"rank": True}, TypeError), ({"rank": "2"}, TypeError),
])
def test_more_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        EggrollStrategy(**kwargs)


class _IntegerState(nn.Module):
    def __init__(self):
        super().__init__()
        self.count = nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)


@pytest.mark.parametrize("factory,kwargs", [
    (lambda: nn.ReLU(), {}),
    (lambda: nn.Linear(3, 2).requires_grad_(False), {}),
    (lambda: _IntegerState(), {}),
    (lambda: nn.LayerNorm(3), {"evolve_bias": False}),
    (lambda: nn.Linear(3, 2), {"exclude": ["weight", "bias"]}),
])
def test_models_with_nothing_to_evolve_fail_setup_and_leave_the_strategy_alone(device, factory,
                                                                               kwargs):
    exclude = kwargs.pop("exclude", None)
    fresh = EggrollStrategy(**kwargs)
    with pytest.raises(ValueError, match="evolve"):
        fresh.setup(factory().to(device), exclude=exclude)
    assert fresh.model is None
    s, model, _ = primed(device)  # a strategy already set up keeps its model and state
    s.evolve_bias = fresh.evolve_bias
    before = capture(s)
    with pytest.raises(ValueError, match="evolve"):
        s.setup(factory().to(device), exclude=exclude)
    assert s.model is model
    assert_unchanged(s, before)


def test_model_moved_to_an_unusable_device_after_setup(device, monkeypatch):
    """A model moved off the kernels' device after setup (CUDA -> CPU; on a CPU-only machine
    simulated by switching the interpreter off, which makes the CPU unusable) is an error at
    perturb, batched_forward and step, raised before anything changes."""
    s, model, x = primed(device)
    before = capture(s)

    def moved():
        if device.type == "cuda":
            model.cpu()
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "0")

    def back():
        if device.type == "cuda":
            model.to(device)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    moved()
    try:
        with pytest.raises(RuntimeError, match="GPU"):
            s.step(torch.tensor([1.0, 3.0, 0.0, 2.0]))
        with pytest.raises(RuntimeError, match="GPU"):
            s.perturb(4)
        assert s._active is None
    finally:
        back()
    assert_unchanged(s, before)
    with s.perturb(4) as pop:
        moved()
        try:
            with pytest.raises(RuntimeError, match="GPU"):
                pop.batched_forward(model, x.cpu())
        finally:
            back()
    s.step(torch.tensor([1.0, 3.0, 0.0, 2.0], device=device))
    assert s.epoch == 2


def test_model_whose_parameters_were_replaced_is_an_error(device):
    """model.to("meta") replaces the Parameter objects (no shallow copy across those tensor
    types): the strategy refuses to go on with parameters the model no longer holds."""
    s, model, _ = primed(device)
    before = capture(s)
    model.to("meta")
    with pytest.raises(RuntimeError, match="setup"):
        s.step(torch.tensor([1.0, 3.0, 0.0, 2.0]))
    with pytest.raises(RuntimeError, match="setup"):
        s.perturb(4)
    assert s.epoch == before["epoch"] and s.total_steps == before["total_steps"]
    assert s._last == before["pending"] and s._active is None


def _corrupt(good: dict, device) -> list:
    """(name, corrupted state_dict, error) for the load_state_dict catalogue."""
    def with_(**kw):
        d = _copy.deepcopy(good)
        d.update(kw)
        return d

    def with_param(name, value):
        d = _copy.deepcopy(good)
        d["parameters"][name] = value
        return d

    def with_opt(fn):
        d = _copy.deepcopy(good)
        fn(d["optimizer"])
        return d

    w = good["parameters"]["0.weight"]
    other = EggrollStrategy().setup(nn.Linear(3, 2).to(device)).state_dict()
    wider = EggrollStrategy().setup(nn.Sequential(nn.Linear(3, 5), nn.Tanh(),
                                                  nn.Linear(5, 2)).to(device)).state_dict()
    sgd = EggrollStrategy(optimizer="sgd", optimizer_kwargs={"momentum": 0.9})
    sgd_model = make_mlp(device)
    sgd.setup(sgd_model)
    generation(sgd, sgd_model, torch.randn(4, 3, device=device), 4)
    openes = OpenESStrategy().setup(make_mlp(device)).state_dict()
    return [
        ("another architecture", other, ValueError),
        ("other widths", wider, ValueError),
        ("missing key", {k: v for k, v in good.items() if k != "optimizer"}, KeyError),
        ("missing parameter", with_(parameters={"0.weight": w}), ValueError),
        ("extra parameter", with_(parameters={**good["parameters"], "3.weight": w}), ValueError),
        ("parameters not a mapping", with_(parameters=[w]), ValueError),
        ("openes state", openes, ValueError),
        ("noise stream version", with_(noise_stream_version=0), ValueError),
        ("sigma a string", with_(sigma="0.2"), TypeError),
        ("sigma nan", with_(sigma=float("nan")), ValueError),
        ("lr negative", with_(lr=-1.0), ValueError),
        ("epoch a float", with_(epoch=1.5), TypeError),
        ("epoch negative", with_(epoch=-1), ValueError),
        ("seed negative", with_(seed=-1), ValueError),
        ("rank zero", with_(rank=0), ValueError),
        ("antithetic a string", with_(antithetic="no"), TypeError),
        ("weight transposed", with_param("0.weight", w.t().clone()), ValueError),
        ("weight integer", with_param("0.weight", w.long()), TypeError),
        ("weight complex", with_param("0.weight", w.to(torch.complex64)), TypeError),
        ("weight nan", with_param("0.weight", torch.full_like(w, float("nan"))), ValueError),
        ("weight a list", with_param("0.weight", w.tolist()), ValueError),
        ("weight on meta", with_param("0.weight", torch.empty_like(w, device="meta")),
         RuntimeError),
        ("optimizer not a mapping", with_(optimizer=[1, 2]), ValueError),
        ("optimizer without groups", with_opt(lambda o: o.pop("param_groups")), ValueError),
        ("optimizer buffer shape", with_opt(lambda o: o["state"][0].update(
            exp_avg=torch.zeros(7))), ValueError),
        ("optimizer buffer missing", with_opt(lambda o: o["state"][0].pop("exp_avg")),
         ValueError),
        ("optimizer step a string", with_opt(lambda o: o["state"][0].update(step="x")),
         ValueError),
        ("optimizer group size", with_opt(lambda o: o["param_groups"][0].update(
            params=[0, 1])), ValueError),
        ("optimizer betas broken", with_opt(lambda o: o["param_groups"][0].update(
            betas="x")), ValueError),
        ("another optimizer's state", with_(optimizer=sgd.state_dict()["optimizer"]),
         ValueError),
    ]


def test_corrupted_or_foreign_checkpoints_raise_and_change_nothing(device):
    s, model, x = primed(device, open_context=False)
    good = s.state_dict()
    generation(s, model, x, 4)  # now the strategy differs from `good`
    with s.perturb(4) as pop:
        pop.batched_forward(model, x)
    for name, bad, error in _corrupt(good, device):
        before = capture(s)
        with pytest.raises(error):
            s.load_state_dict(bad)
        assert_unchanged(s, before), name
    s.load_state_dict(good)  # a sound checkpoint still loads, and the run goes on
    assert s.epoch == 1
    generation(s, model, x, 4)
    assert s.epoch == 2


# -- resume in a fresh process -----------------------------------------------------------

import os as _os  # noqa: E402
import subprocess as _subprocess  # noqa: E402

_RESUME_CODE = '''
import torch, torch.nn as nn
from evotorch_eggroll import EggrollStrategy

def fresh(dtype, device, init_seed):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device, dtype)
    s = EggrollStrategy(sigma=0.2, lr=0.05, rank=2, optimizer="adam", seed=17).setup(model)
    return s, model

def advance(s, model, generations):
    p = next(model.parameters())
    x = torch.linspace(-1, 1, 12).reshape(4, 3).to(p.device, p.dtype)
    for _ in range(generations):
        with s.perturb(4) as pop:
            out = pop.batched_forward(model, x)
        s.step(-(out.float() - 0.5).pow(2).sum(1))
    return [q.detach().cpu().clone() for q in model.parameters()]
'''


def test_checkpoint_resumes_bit_identically_in_a_fresh_process(device, tmp_path):
    """torch.save(strategy.state_dict()) after 2 generations; a fresh process loads it with
    weights_only=True into a freshly built (differently initialised) model and runs 2 more:
    the same bits as 4 uninterrupted generations, in float32 and bfloat16."""
    scope: dict = {}
    exec(_RESUME_CODE, scope)
    expected = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        s, model = scope["fresh"](dtype, device, 0)
        scope["advance"](s, model, 2)
        torch.save(s.state_dict(), tmp_path / f"{name}.pt")
        expected[name] = scope["advance"](s, model, 2)  # the uninterrupted run goes on
    script = _RESUME_CODE + f'''
import sys
out = {{}}
for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    state = torch.load(sys.argv[1] + "/" + name + ".pt", weights_only=True)
    s, model = fresh(dtype, "{device.type}", 99)
    s.load_state_dict(state)
    out[name] = advance(s, model, 2)
    assert s.epoch == 4 and s.total_steps == 4
torch.save(out, sys.argv[1] + "/resumed.pt")
'''
    env = dict(_os.environ)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    _subprocess.run([_sys.executable, "-c", script, str(tmp_path)], env=env, check=True,
                    timeout=300, capture_output=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name in expected:
        assert same_bits(resumed[name], expected[name]), name


def test_no_silent_no_ops(device):
    """A context in which no perturbed forward ran, and a generation of equal fitnesses,
    each warn once per strategy; a second step on the same population says so."""
    import warnings as _warnings

    model = make_mlp(device)
    s = EggrollStrategy(sigma=0.1, rank=2).setup(model)
    x = torch.randn(4, 3, device=device)
    for _ in range(2):
        with s.perturb(4):
            model(x)  # the plain model: no member is evaluated
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            s.step(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        messages = [str(w.message) for w in caught]
        assert sum("no perturbed forward ran" in m for m in messages) == (1 if _ == 0 else 0)
    with pytest.raises(RuntimeError, match="already used by a step"):
        s.step(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    for i in range(2):
        with s.perturb(4) as pop:
            pop.batched_forward(model, x)
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            metrics = s.step(torch.full((4,), 7.0))
        messages = [str(w.message) for w in caught]
        assert sum("fitnesses are equal" in m for m in messages) == (1 if i == 0 else 0)
        assert not any("no perturbed forward" in m for m in messages)
        assert metrics["grad_norm"] == 0.0  # (Adam's momentum may still move the parameters)


def test_device_messages_name_the_devices(device):
    model = make_mlp(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(4) as pop:
        with pytest.raises(RuntimeError, match="meta device") as info:
            pop.batched_forward(model, torch.zeros(4, 3, device="meta"))
        assert "GPU" not in str(info.value)
        if device.type == "cuda":
            with pytest.raises(RuntimeError, match=r"is on cpu.*CUDA") as info:
                pop.batched_forward(model, torch.zeros(4, 3))
            assert "parameters on cuda" in str(info.value)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_step_leaves_no_reference_cycles(device, optimizer):
    """Everything a generation allocates is freed when the last reference goes, not at the
    garbage collector's next pass: a cycle holding the optimizer-state snapshot would keep
    its GPU memory alive, growing from generation to generation between collections.
    (On the CPU through the plain-torch path: Triton's interpreter makes cycles of its own.)"""
    import gc

    model = make_mlp(device)
    backend = "torch" if device.type == "cpu" else "triton"
    strategy = EggrollStrategy(sigma=0.1, lr=0.01, rank=1, optimizer=optimizer, seed=0,
                               backend=backend).setup(model)
    x = torch.randn(8, 3, device=device)
    generation(strategy, model, x, 8)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            generation(strategy, model, x, 8)
            assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
