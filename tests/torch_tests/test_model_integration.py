"""nn.Module compatibility: batched_forward runs the model's own forward
for Sequential, custom and nested modules, convolutions, embeddings, norm layers and
elementwise parameters; it equals iterate(); parameters are restored on every exit path;
unsupported uses are errors, never silently unperturbed; a supervised model learns.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from evotorch_eggroll import EggrollStrategy, ESModule, OpenESStrategy

TOL = dict(rtol=1e-4, atol=1e-5)


class CustomLinear(nn.Module):
    """Calls F.linear itself and adds/multiplies its own 1-D parameters."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.shift = nn.Parameter(torch.randn(n_out) * 0.1)
        self.gain = nn.Parameter(1 + torch.randn(n_out) * 0.1)

    def forward(self, x):
        return (F.linear(x, self.weight) + self.shift) * self.gain


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.ModuleList([nn.Linear(4, 6), nn.LayerNorm(6)]),
            nn.ModuleList([CustomLinear(6, 5), nn.RMSNorm(5)]),
        ])
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        for lin, norm in self.blocks:
            x = torch.tanh(norm(lin(x)))
        return self.head(x)


class ConvNet(nn.Module):
    """Conv2d (padding, groups, 'same' with an even kernel), GroupNorm, BatchNorm, Conv1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv1d(4, 3, 2, dilation=2)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # (B, 2, 5, 5)
        h = self.bn(self.gn(torch.relu(self.c2(torch.relu(self.c1(x))))))  # (B, 4, 3, 3)
        h = self.c3(h.flatten(2))  # (B, 3, 7)
        return self.head(h.mean(-1))


class TokenNet(nn.Module):
    """Embedding of token ids, a sequence of rows per sample, mean pooling."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, tokens):  # (B, T) int64
        return self.out(self.ln(self.emb(tokens))).mean(1)


def perturbed_by_iterate(pop, model, x):
    return torch.cat([model(x[k:k + 1]) for k in pop.iterate()])


def seeded(factory):
    torch.manual_seed(0)
    return factory()


# -- equivalence with iterate() over layer types ----------------------------------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cls", [EggrollStrategy, OpenESStrategy])
@pytest.mark.parametrize("name", ["sequential", "nested", "conv", "tokens"])
def test_batched_forward_equals_iterate(device, cls, name):
    if name == "sequential":
        model = seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
        x = torch.randn(4, 4)
    elif name == "nested":
        model = seeded(Nested)
        x = torch.randn(4, 4)
    elif name == "conv":
        model = seeded(ConvNet).eval()
        x = torch.randn(4, 2, 5, 5)
    else:
        model = seeded(TokenNet)
        x = torch.randint(0, 7, (4, 3))
    model = model.to(device)
    x = x.to(device)
    kwargs = {} if cls is OpenESStrategy else {"rank": 2}
    s = cls(sigma=0.3, **kwargs).setup(model)
    training = model.training
    with s.perturb(4, epoch=1) as pop:
        out = pop.batched_forward(model, x)
        ref = perturbed_by_iterate(pop, model, x)
    torch.testing.assert_close(out, ref, **TOL)
    with torch.no_grad():
        base = model(x)
    assert (out - base).abs().max() > 1e-3  # the members differ from the base model
    assert model.training == training


def test_sequence_rows_share_their_member(device):
    """(R, T, n) inputs: every position of sample j uses member j."""
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.4, rank=2).setup(model)
    x = torch.randn(4, 5, 3, device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
        ref = torch.stack([model(x[k]) for k in pop.iterate()])
    assert out.shape == (4, 5, 2)
    torch.testing.assert_close(out, ref, **TOL)


def test_batch_norm_in_training_mode_keeps_the_batch_statistics(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).to(device)
    s = EggrollStrategy(sigma=0.0).setup(model)
    x = torch.randn(6, 3, device=device)
    with s.perturb(6) as pop:
        out = pop.batched_forward(model, x)
    assert model.training
    torch.testing.assert_close(out, F.batch_norm(model[0](x), None, None, model[1].weight,
                                                 model[1].bias, True), **TOL)


# -- the forward's contract -------------------------------------------------------------------------

def test_member_ids_map_rows_to_members(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    x = torch.randn(6, 3, device=device)
    ids = torch.tensor([3, 3, 0, 1, 3, 2], device=device)
    with s.perturb(4) as pop:
        mapped = pop.batched_forward(model, x, member_ids=ids)
        listed = pop.batched_forward(model, x, member_ids=ids.tolist())
        per_member = {k: model(x) for k in pop.iterate()}
        default = pop.batched_forward(model, x[:4])
        explicit = pop.batched_forward(model, x[:4], member_ids=torch.arange(4))
    for j, k in enumerate(ids.tolist()):
        torch.testing.assert_close(mapped[j], per_member[k][j], **TOL)
    assert torch.equal(mapped, listed)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("ids,error", [
    ([0, 1, 4], ValueError),  # N = 4
    ([-1, 0, 1], ValueError),
    ([0, 1], ValueError),
    ([[0, 1, 2]], ValueError),
    ([0.0, 1.0, 2.0], TypeError),
])
def test_bad_member_ids(device, ids, error):
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(4) as pop:
        with pytest.raises(error):
            pop.batched_forward(model, torch.randn(3, 3, device=device), member_ids=ids)
        with pytest.raises(ValueError):  # 5 rows by default need 5 members
            pop.batched_forward(model, torch.randn(5, 3, device=device))


def test_non_contiguous_and_expanded_inputs(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    base = torch.randn(3, 4, device=device)
    strided = base.T  # (4, 3), non-contiguous
    expanded = torch.randn(1, 3, device=device).expand(4, 3)
    with s.perturb(4) as pop:
        torch.testing.assert_close(pop.batched_forward(model, strided),
                                   pop.batched_forward(model, strided.contiguous()), **TOL)
        torch.testing.assert_close(pop.batched_forward(model, expanded),
                                   pop.batched_forward(model, expanded.contiguous()), **TOL)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_output_is_differentiable_in_x_even_after_exit(device):
    model = seeded(ConvNet).eval().to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    x = torch.randn(2, 2, 5, 5, device=device, requires_grad=True)
    with s.perturb(2) as pop:
        out = pop.batched_forward(model, x)
        refs = []
        for k in pop.iterate():
            xk = x[k:k + 1].detach().clone().requires_grad_(True)
            model(xk).pow(2).sum().backward()
            refs.append(xk.grad)
    model.zero_grad()
    out.pow(2).sum().backward()  # after the context exited
    torch.testing.assert_close(x.grad, torch.cat(refs), **TOL)


def test_no_grad_output_has_no_graph(device):
    model = seeded(Nested).to(device)
    s = EggrollStrategy().setup(model)
    x = torch.randn(2, 4, device=device, requires_grad=True)
    with s.perturb(2) as pop:
        with torch.no_grad():
            out = pop.batched_forward(model, x)
    assert out.grad_fn is None and not out.requires_grad


def test_deterministic_across_contexts_batch_sizes_and_row_order(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))).to(device)
    s = EggrollStrategy(sigma=0.2, rank=2, seed=9).setup(model)
    x = torch.randn(6, 3, device=device)
    ids = torch.tensor([0, 1, 2, 3, 4, 5], device=device)
    with s.perturb(6, epoch=2) as pop:
        full = pop.batched_forward(model, x)
    with s.perturb(6, epoch=2) as pop:
        again = pop.batched_forward(model, x)
        halves = torch.cat([pop.batched_forward(model, x[:2], member_ids=ids[:2]),
                            pop.batched_forward(model, x[2:], member_ids=ids[2:])])
        perm = torch.tensor([4, 0, 5, 2, 1, 3], device=device)
        permuted = pop.batched_forward(model, x[perm], member_ids=ids[perm])
    with s.perturb(8, epoch=2) as pop:  # the population size does not key the noise
        bigger = pop.batched_forward(model, x, member_ids=ids)
    assert torch.equal(full, again)
    assert torch.equal(full, halves)
    assert torch.equal(full[perm], permuted)
    assert torch.equal(full, bigger)
    with s.perturb(6, epoch=3) as pop:
        other_epoch = pop.batched_forward(model, x)
    assert not torch.equal(full, other_epoch)


def test_same_architecture_and_seed_give_identical_noise(device):
    a = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).to(device)
    torch.manual_seed(123)
    b = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(device)  # other values
    sa = EggrollStrategy(seed=4).setup(a)
    sb = EggrollStrategy(seed=4).setup(b)
    with sa.perturb(4) as pa, sb.perturb(4) as pb:
        for name in ("0.weight", "1.weight"):
            for k in range(4):
                fa, fb = pa.get_factors(k, name), pb.get_factors(k, name)
                assert torch.equal(fa[0], fb[0]) and torch.equal(fa[1], fb[1])
    for name in ("0.bias", "1.bias"):
        assert torch.equal(sa._get_perturbation(name, 1, 0).as_matrix(),
                           sb._get_perturbation(name, 1, 0).as_matrix())


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_get_factors_are_the_additive_perturbation(device):
    model = seeded(ConvNet).eval().to(device)
    s = EggrollStrategy(sigma=0.25, rank=3).setup(model)
    with s.perturb(4, epoch=5) as pop:
        base = model.c1.weight.detach().clone()
        a, b = pop.get_factors(member_id=3, param_name="c1.weight")
        assert a.shape == (4, 3) and b.shape == (2 * 9, 3)
        for k in pop.iterate():
            if k == 3:
                delta = model.c1.weight.detach() - base
        torch.testing.assert_close((a @ b.T).view_as(base), delta, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError):
            pop.get_factors(0, "c1.bias")  # dense noise
        with pytest.raises(ValueError):
            pop.get_factors(4, "c1.weight")
        with pytest.raises(KeyError):
            pop.get_factors(0, "nope.weight")


def test_vmap_forward_equals_batched_forward(device):
    model = seeded(Nested).to(device)
    s = EggrollStrategy().setup(model)
    x = torch.randn(2, 4, device=device)
    with s.perturb(2) as pop:
        assert torch.equal(pop.vmap_forward(model, x), pop.batched_forward(model, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        try:
            F.linear(torch.ones(1, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
        except RuntimeError:
            pytest.skip("float16 matmul is not available on this CPU build")
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    model = model.to(device=device, dtype=dtype)
    s = EggrollStrategy(sigma=0.2, rank=2, lr=0.05).setup(model)
    x = torch.randn(4, 4, device=device, dtype=dtype)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
        ref = perturbed_by_iterate(pop, model, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)
    before = [p.detach().clone() for p in model.parameters()]
    s.step(-(out.float() - 0.5).pow(2).sum(1))
    assert all(p.dtype == dtype for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- restoring parameters ----------------------------------------------------------------------------

def test_parameters_are_restored_exactly_even_when_the_body_raises(device):
    model = seeded(Nested).to(device)
    s = EggrollStrategy(sigma=0.5).setup(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ZeroDivisionError):
        with s.perturb(4) as pop:
            next(iter(pop.iterate()))  # a member's values are in the parameters now
            with torch.no_grad():
                model.head.weight.mul_(3.0)
            1 / 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.view(torch.uint8), b.view(torch.uint8))
    with s.perturb(2):  # the strategy is usable again
        pass


def test_iterate_restores_after_the_loop_and_after_break(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.5).setup(model)
    before = [p.detach().clone() for p in model.parameters()]
    with s.perturb(4) as pop:
        seen = []
        for k in pop.iterate():
            seen.append(k)
            assert not torch.equal(model[0].weight, before[0])
        assert seen == [0, 1, 2, 3]
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        for k in pop.iterate():
            if k == 1:
                break
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_model_training_flag_is_never_touched(device):
    model = seeded(Nested).to(device)
    s = EggrollStrategy().setup(model)
    for mode in (True, False):
        model.train(mode)
        with s.perturb(2) as pop:
            pop.batched_forward(model, torch.randn(2, 4, device=device))
            for _ in pop.iterate():
                assert model.training is mode
        assert all(m.training is mode for m in model.modules())


def test_nested_contexts_and_forward_outside_raise(device):
    model = nn.Linear(3, 2).to(device)
    s = EggrollStrategy().setup(model)
    other = EggrollStrategy(seed=1).setup(model)
    calls = []
    s.register_callback("on_perturb", lambda n, e: calls.append(n))
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError):
            with s.perturb(2):
                pass
        with other.perturb(2):  # another strategy on the same model may open its own
            pass
        for _ in pop.iterate():
            with pytest.raises(RuntimeError):
                pop.batched_forward(model, torch.randn(2, 3, device=device))
            break
    assert calls == [2]
    with pytest.raises(RuntimeError):
        pop.batched_forward(model, torch.randn(2, 3, device=device))
    with pytest.raises(RuntimeError):
        with pop:  # a context is entered once
            pass


# -- unsupported parameters -------------------------------------------------------------------------

class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):  # (B, T, 4)
        h = self.proj(x)
        return self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("factory,name", [
    (lambda: nn.Sequential(nn.Linear(3, 3), nn.Conv3d(1, 1, 1)), "1.weight"),
    (lambda: nn.Sequential(nn.Linear(3, 3), nn.PReLU()), "1.weight"),
    (lambda: nn.LSTM(3, 4, proj_size=2), "weight_ih_l0"),
])
def test_unsupported_modules_are_rejected_at_setup(device, factory, name):
    model = seeded(factory).to(device)
    with pytest.raises(ValueError) as err:
        EggrollStrategy().setup(model)
    assert "exclude" in str(err.value)
    assert name.split(".")[0] in str(err.value)


def test_excluding_unsupported_parameters_makes_the_model_usable(device):
    model = seeded(WithAttention).to(device)
    attn = [n for n, _ in model.named_parameters() if n.startswith("attn.")]
    s = EggrollStrategy(sigma=0.3).setup(model, exclude=attn)
    assert [n for n, _ in s.named_parameters()] == ["proj.weight", "proj.bias"]
    x = torch.randn(2, 3, 4, device=device)
    with s.perturb(2) as pop:
        out = pop.batched_forward(model, x)
        ref = torch.cat([model(x[k:k + 1]) for k in pop.iterate()])
    torch.testing.assert_close(out, ref, **TOL)


class MatmulModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.weight)  # not an op perturbed per row


class UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.spare = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_parameters_reaching_other_ops_are_errors_not_silently_unperturbed(device):
    model = MatmulModule().to(device)
    s = EggrollStrategy().setup(model)  # a custom module: only checkable at run time
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError, match="'weight'") as err:
            pop.batched_forward(model, torch.randn(2, 3, device=device))
    assert "exclude" in str(err.value)


def test_parameters_not_consumed_by_the_forward_are_errors(device):
    model = seeded(UnusedHead).to(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError, match="spare.weight"):
            pop.batched_forward(model, torch.randn(2, 3, device=device))
        pop.batched_forward(model.body, torch.randn(2, 3, device=device))  # a submodule is fine
    s = EggrollStrategy().setup(model, exclude=["spare.weight", "spare.bias"])
    with s.perturb(2) as pop:
        assert pop.batched_forward(model, torch.randn(2, 3, device=device)).shape == (2, 2)


def test_linear_layers_follow_the_batch_through_transposes(device):
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # (B, T, 3) -> (T, B, 3): positions first
            return torch.tanh(self.lin(x.transpose(0, 1))).permute(1, 2, 0)  # (B, 2, T)

    model = seeded(Transposed).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    x = torch.randn(2, 5, 3, device=device)
    with s.perturb(2) as pop:
        out = pop.batched_forward(model, x)
        ref = perturbed_by_iterate(pop, model, x)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("case", ["mean_over_batch", "concatenated_batch", "conv_batch_second"])
def test_ops_must_see_the_batch(device, case):
    class Lost(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.conv = nn.Conv1d(3, 2, 1)

        def forward(self, x):  # (B, T, 3)
            if case == "mean_over_batch":
                return self.lin(x.mean(0))  # (T, 3): the batch is gone
            if case == "concatenated_batch":
                return self.lin(torch.cat([x, x]))  # (2B, T, 3)
            return self.conv(x.transpose(0, 2))  # (3, T, B) -> channels first, batch last

    model = seeded(Lost).to(device)
    s = EggrollStrategy().setup(model, include=["conv.weight"] if case.startswith("conv")
                                else ["lin.weight"])
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError, match="leading dimension"):
            pop.batched_forward(model, torch.randn(2, 4, 3, device=device))


# -- ESModule ----------------------------------------------------------------------------------------

def test_esmodule_wraps_without_changing_the_forward(device):
    inner = seeded(Nested).to(device)
    es = ESModule(inner)
    x = torch.randn(3, 4, device=device)
    assert torch.equal(es(x), inner(x))
    assert [id(p) for p in es.es_parameters] == [id(p) for p in inner.parameters()]
    es.freeze_parameter("head.bias")
    assert all(p is not inner.head.bias for p in es.es_parameters)
    assert es.frozen_parameters == {"head.bias"}
    with pytest.raises(KeyError):
        es.freeze_parameter("missing")
    inner.head.weight.requires_grad_(False)
    assert all(p is not inner.head.weight for p in es.es_parameters)
    s = EggrollStrategy().setup(es)
    assert {n for n, _ in s.named_parameters()}.isdisjoint({"head.bias", "head.weight"})


# -- learning ----------------------------------------------------------------------------------------

def test_supervised_quick_start_runs_as_written(device):
    """The SEED supervised quick start, verbatim apart from sizes and the device."""
    X = torch.randn(24, 8, device=device)
    y = torch.randn(24, 2, device=device)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).to(device)
    strategy = EggrollStrategy(sigma=0.1, lr=0.01, rank=4)
    strategy.setup(model)
    population_size = 4
    for epoch in range(1):
        for x_batch, y_batch in loader:
            x_expanded = x_batch.unsqueeze(0).expand(population_size, -1, -1)
            x_flat = x_expanded.reshape(-1, x_batch.shape[-1])
            member_ids = torch.arange(population_size, device=device).repeat_interleave(
                len(x_batch))
            with strategy.perturb(population_size=population_size, epoch=epoch) as pop:
                preds_flat = pop.batched_forward(model, x_flat, member_ids=member_ids)
                preds = preds_flat.reshape(population_size, len(x_batch), -1)
                y_expanded = y_batch.unsqueeze(0).expand(population_size, -1, -1)
                losses = ((preds - y_expanded) ** 2).mean(dim=(1, 2))
                fitnesses = -losses
            strategy.step(fitnesses)
    assert strategy.total_steps == 3 and fitnesses.shape == (population_size,)


def test_supervised_regression_learns(device):
    """Regression on a tanh teacher with minibatches: the loss drops by a clear factor."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(128, 4, generator=gen)
    y = torch.tanh(X @ torch.randn(4, 1, generator=gen))
    X, y = X.to(device), y.to(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))).to(device)
    # on the CPU the plain-torch path (the same noise stream) instead of Triton's interpreter
    backend = "triton" if device.type == "cuda" else "torch"
    strategy = EggrollStrategy(sigma=0.1, lr=0.05, rank=2, seed=0, backend=backend).setup(model)

    def loss() -> float:
        with torch.no_grad():
            return float(((model(X) - y) ** 2).mean())

    population_size, start = 8, loss()
    member_ids = torch.arange(population_size, device=device).repeat_interleave(8)
    batches = (batch for _ in range(2) for batch in loader)  # 16 minibatches per epoch
    for _, (x_batch, y_batch) in zip(range(20), batches):
        x_flat = x_batch.unsqueeze(0).expand(population_size, -1, -1).reshape(-1, 4)
        with strategy.perturb(population_size) as pop:  # fresh noise every step
            preds = pop.batched_forward(model, x_flat, member_ids=member_ids)
            preds = preds.reshape(population_size, len(x_batch), -1)
            losses = ((preds - y_batch.unsqueeze(0)) ** 2).mean(dim=(1, 2))
        strategy.step(-losses)
    assert strategy.total_steps == 20
    assert loss() < start / 3


# -- faults: nothing half-updated ---------------------------------------------------------------------
#
# Semantics: an exception or KeyboardInterrupt inside a perturb context or inside
# pop.iterate() leaves the base parameters bit-identical. An optimizer that fails part-way
# through step() leaves the model fully *before* the update (parameters and optimizer state
# restored, counters not advanced, the context still available for another step). on_step
# callbacks fire after the update is complete: their exceptions propagate with the update kept.

import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

if str(_Path(__file__).resolve().parents[1]) not in _sys.path:  # the tests folder: the snapshot
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from state_snapshot import assert_unchanged, capture, differences  # noqa: E402


class FlakyMomentumSGD(torch.optim.SGD):
    """SGD with momentum that can fail part-way: after moving the first parameter (and its
    momentum buffer), or after a complete update."""

    fail: str = ""  # "", "part-way", "after", "interrupt"

    def step(self, closure=None):
        if self.fail == "part-way":
            p = self.param_groups[0]["params"][0]
            with torch.no_grad():
                p.add_(p.grad, alpha=-1.0)
            self.state[p]["momentum_buffer"] = torch.ones_like(p)
            raise RuntimeError("optimizer failed part-way")
        out = super().step(closure)
        if self.fail == "after":
            raise RuntimeError("optimizer failed after updating")
        if self.fail == "interrupt":
            raise KeyboardInterrupt
        return out


def _flaky_run(device, fail_at=None, mode="part-way"):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.2, lr=0.1, rank=2, optimizer=FlakyMomentumSGD,
                        optimizer_kwargs={"momentum": 0.9}, seed=2).setup(model)
    x = torch.linspace(-1, 1, 12, device=device).reshape(4, 3)
    for gen in range(2):
        with s.perturb(4) as pop:
            fit = -pop.batched_forward(model, x).pow(2).sum(1)
        if gen == fail_at:
            s.optimizer.fail = mode
            before = capture(s)
            with pytest.raises(KeyboardInterrupt if mode == "interrupt" else RuntimeError):
                s.step(fit)
            assert_unchanged(s, before)
            s.optimizer.fail = ""
        s.step(fit)  # a retry continues exactly as if nothing had failed
    return [p.detach().clone() for p in model.parameters()], s.state_dict()["optimizer"]


_FLAKY_REFERENCE: dict = {}


@pytest.mark.parametrize("mode", ["part-way", "after", "interrupt"])
def test_optimizer_failure_restores_parameters_and_optimizer_state(device, mode):
    if str(device) not in _FLAKY_REFERENCE:
        _FLAKY_REFERENCE[str(device)] = _flaky_run(device)
    ref_params, ref_opt = _FLAKY_REFERENCE[str(device)]
    params, opt = _flaky_run(device, fail_at=1, mode=mode)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(params, ref_params))
    for i, st in ref_opt["state"].items():
        assert torch.equal(opt["state"][i]["momentum_buffer"], st["momentum_buffer"])


def test_failing_on_step_callback_keeps_the_completed_update(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).to(device)
    twin = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.2, lr=0.1, rank=2).setup(model)
    t = EggrollStrategy(sigma=0.2, lr=0.1, rank=2).setup(twin)
    seen = []

    def boom(metrics):
        seen.append(metrics["epoch"])
        raise ValueError("callback failed")

    s.register_callback("on_step", boom)
    s.register_callback("on_step", lambda m: seen.append("never"))
    fit = torch.tensor([0.5, 1.0, -1.0, 2.0], device=device)
    for strategy in (s, t):
        with strategy.perturb(4):
            pass
    with pytest.raises(ValueError, match="callback failed"):
        s.step(fit)
    t.step(fit)
    assert seen == [0]  # the update was complete; later callbacks did not run
    assert s.epoch == 1 and s.total_steps == 1 and s._last is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    with pytest.raises(RuntimeError):  # the evaluated context was consumed by that update
        s.step(fit)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exceptions_and_interrupts_inside_a_context_or_iterate_restore_parameters(device, exc):
    model = seeded(Nested).to(device)
    s = EggrollStrategy(sigma=0.5, rank=2).setup(model)
    before = capture(s)
    x = torch.randn(2, 4, device=device)
    with pytest.raises(exc):
        with s.perturb(2) as pop:
            pop.batched_forward(model, x)
            raise exc()
    assert not [d for d in differences(s, before) if d != "pending"]
    with pytest.raises(exc):
        with s.perturb(2) as pop:
            for k in pop.iterate():
                model(x)
                if k == 1:
                    raise exc()  # member 1's values are in the parameters right now
    assert not [d for d in differences(s, before) if d != "pending"]
    it = None
    with pytest.raises(exc):
        with s.perturb(2) as pop:
            it = pop.iterate()
            next(it)
            raise exc()  # the generator is left suspended; the context restores anyway
    assert not [d for d in differences(s, before) if d != "pending"]
    del it

    def failing_on_perturb(n, epoch):
        raise exc()

    s.register_callback("on_perturb", failing_on_perturb)
    with pytest.raises(exc):
        with s.perturb(2):
            pass
    assert s._active is None
    assert not [d for d in differences(s, before) if d != "pending"]


# -- memory: no growth over many cycles, no reference kept to user tensors -----------------------------

import gc as _gc  # noqa: E402
import weakref as _weakref  # noqa: E402


def _live_tensors() -> int:
    _gc.collect()
    return sum(1 for o in _gc.get_objects() if isinstance(o, torch.Tensor))


def test_many_perturb_step_cycles_do_not_grow_memory(device):
    """150 perturb/step cycles (plus 20 with a batched forward) of a tiny model leave no
    more live tensors and no more Python objects than before (gc counts; tracemalloc would
    slow the interpreter-run kernels too much on the CPU)."""
    model = seeded(lambda: nn.Linear(2, 2)).to(device)
    s = EggrollStrategy(sigma=0.1, lr=0.01, rank=1, optimizer="adam").setup(model)
    x = torch.randn(2, 2, device=device)
    fit = torch.tensor([1.0, 0.0], device=device)

    def cycle(forward: bool):
        with s.perturb(2) as pop:
            f = -pop.batched_forward(model, x).pow(2).sum(1) if forward else fit
        s.step(f.detach())

    for _ in range(5):
        cycle(True)
    tensors = _live_tensors()
    objects = len(_gc.get_objects())
    for _ in range(150):
        cycle(False)
    for _ in range(20):
        cycle(True)
    assert _live_tensors() <= tensors
    assert len(_gc.get_objects()) - objects < 500
    assert s.total_steps == 175


def test_no_reference_to_user_tensors_is_kept(device):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(device)
    s = EggrollStrategy(sigma=0.1, rank=2).setup(model)
    x = torch.randn(4, 3, device=device, requires_grad=True)
    ids = torch.tensor([1, 0, 3, 2], device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
        for _ in pop.iterate():
            model(x)
    fit = -out.detach().pow(2).sum(1)
    s.step(fit)
    refs = [_weakref.ref(t) for t in (x, ids, out, fit)]
    del x, ids, out, fit, pop
    _gc.collect()
    assert all(r() is None for r in refs)
