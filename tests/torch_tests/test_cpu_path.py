"""The plain-torch backend (``backend="torch"``) against the kernels.

Every op of :mod:`evotorch_eggroll.ops` computed by :mod:`evotorch_eggroll.torch_ops` and by
the Triton kernels (on the GPU, or through Triton's interpreter on the CPU) on the same
inputs: odd shapes, ranks 1/2/3, antithetic on/off, bias noise, drawn factors, dense
parameters; Philox words bit for bit, normals and everything built from them within the
stream's float32 tolerance. Then the selection: the native API takes the CPU path only when
asked (its default error names the opt-in), the EvoTorch searcher takes it by default on a
CPU without the interpreter, and training with it improves the fitness.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy, OpenESStrategy, noise, ops, torch_ops
from evotorch_eggroll.kernels import philox

SEED, KEY, BIAS_KEY, EPOCH = 2024, noise.param_key("net.0.weight"), noise.param_key("net.0.bias"), 3
TOL = dict(atol=1e-5, rtol=1e-5)  # the stream's float32 tolerance (normals)


def _close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    """Equal to float32 rounding of sums of products of normals (``scale``: magnitude)."""
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=1e-5 * scale, rtol=1e-4)


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail if any kernel launcher is reached (the torch path must not need Triton)."""
    def refuse():
        raise AssertionError("the plain-torch path reached the Triton kernels")
    monkeypatch.setattr(ops, "_kernels", refuse)


def _ids(kind: str, rows: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows)
    if kind == "identity":
        ids = torch.arange(rows)
    elif kind == "blocks":  # many rows per member, member by member (a minibatch each)
        ids = torch.arange(rows) // 4
    elif kind == "shuffled":
        ids = torch.randperm(rows, generator=gen) % max(1, rows // 5 + 1)
    else:  # one member for every row, far into the counter range
        ids = torch.full((rows,), 2**32 - 3)
    return ids.to(device)


# -- the stream ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, SEED, 2**40 + 12345, 2**64 - 1])
@pytest.mark.parametrize("numel, first", [(1, 0), (7, 0), (33, 4), (10, 8)])
def test_philox_words_are_bit_identical(device, seed, numel, first):
    idx = torch.tensor([0, 1, 5, 2**31, 2**32 - 1], device=device)
    got = torch_ops.philox_words(seed, KEY, EPOCH, idx, numel, first_element=first)
    kernel = philox.philox_words(seed, KEY, EPOCH, idx, numel, first_element=first)
    assert torch.equal(got.cpu(), kernel.cpu())
    ref = noise.philox_words(seed, KEY, EPOCH, idx.cpu(), first + numel)[:, first:]
    assert torch.equal(got.cpu(), ref)


def test_torch_normals_are_the_reference_stream(device):
    """The plain-torch normals are the reference's exactly, at any first element."""
    idx = torch.tensor([3, 0, 2**32 - 1], device=device)
    ref = noise.normal_stream(SEED, KEY, EPOCH, idx.cpu(), 41)
    assert torch.equal(torch_ops.normal_block(SEED, KEY, EPOCH, idx, 41).cpu(), ref)
    for first in (1, 2, 3, 5, 18):
        part = torch_ops.normal_block(SEED, KEY, EPOCH, idx, 41 - first, first_element=first)
        assert torch.equal(part.cpu(), ref[:, first:])


@pytest.mark.parametrize("numel", [1, 6, 37])
def test_normal_block_and_factors_match_the_kernels(device, numel):
    idx = torch.tensor([0, 7, 2**32 - 2], device=device)
    got = ops.normal_block(SEED, KEY, EPOCH, idx, numel, backend="torch")
    torch.testing.assert_close(got.cpu(), ops.normal_block(SEED, KEY, EPOCH, idx, numel).cpu(),
                               **TOL)
    out = torch.empty(3, numel, device=device)
    assert ops.normal_block(SEED, KEY, EPOCH, idx, numel, out=out, backend="torch") is out
    assert torch.equal(out, got)
    a_t, b_t = ops.lowrank_factors(SEED, KEY, EPOCH, idx, 5, 3, 2, backend="torch")
    a_k, b_k = ops.lowrank_factors(SEED, KEY, EPOCH, idx, 5, 3, 2)
    assert a_t.shape == (3, 5, 2) and b_t.shape == (3, 3, 2)
    torch.testing.assert_close(a_t.cpu(), a_k.cpu(), **TOL)
    torch.testing.assert_close(b_t.cpu(), b_k.cpu(), **TOL)


# -- per-row ops -----------------------------------------------------------------------------


@pytest.mark.parametrize("m, n, rank, rows", [(1, 1, 1, 1), (3, 7, 2, 5), (7, 3, 3, 9),
                                              (5, 2, 2, 16)])
@pytest.mark.parametrize("kind", ["identity", "blocks", "shuffled", "same"])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_project_and_expand_match_the_kernels(device, m, n, rank, rows, kind, antithetic,
                                              cached):
    gen = torch.Generator().manual_seed(m * 100 + rows)
    ids = _ids(kind, rows, device)
    cache = bias_cache = None
    if cached:  # drawn blocks covering every row's noise index
        idx = ids // 2 if antithetic else ids
        base = int(idx.min())
        span = torch.arange(base, int(idx.max()) + 1, device=device)
        cache = (ops.normal_block(SEED, KEY, EPOCH, span, (n + m) * rank)
                 .view(-1, n + m, rank).contiguous(), base)
        bias_cache = (ops.normal_block(SEED, BIAS_KEY, EPOCH, span, m), base)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=rank, total_rows=n + m,
                  antithetic=antithetic, cache=cache)
    v = torch.randn(rows, n, generator=gen).to(device)
    t_torch = ops.lowrank_project(v, ids, row_offset=0, backend="torch", **common)
    t_kern = ops.lowrank_project(v, ids, row_offset=0, **common)
    _close(t_torch, t_kern, n)
    base_out = torch.randn(rows, m, generator=gen).to(device)
    out_torch, out_kern = base_out.clone(), base_out.clone()
    ops.lowrank_expand_(out_torch, t_kern, ids, row_offset=n, scale=0.7, backend="torch",
                        **common)
    ops.lowrank_expand_(out_kern, t_kern, ids, row_offset=n, scale=0.7, **common)
    _close(out_torch, out_kern, n)
    # the bias noise fused into the expand (as the kernel launcher does), through torch_ops
    fused = base_out.clone()
    torch_ops.lowrank_expand_(fused, t_kern, ids, seed=SEED, key=KEY, epoch=EPOCH, rank=rank,
                              row_offset=n, scale=0.7, antithetic=antithetic,
                              bias_key=BIAS_KEY, bias_scale=0.3, cache=cache,
                              bias_cache=bias_cache)
    want = out_kern.clone()
    ops.dense_noise_add_(want, ids, seed=SEED, key=BIAS_KEY, epoch=EPOCH, scale=0.3,
                         antithetic=antithetic)
    _close(fused, want, n)


@pytest.mark.parametrize("rows, d", [(1, 1), (5, 7), (12, 33)])
@pytest.mark.parametrize("antithetic", [True, False])
def test_dense_noise_add_matches_the_kernels(device, rows, d, antithetic):
    ids = _ids("shuffled", rows, device)
    base = torch.randn(rows, d).to(device)
    a, b = base.clone(), base.clone()
    ops.dense_noise_add_(a, ids, seed=SEED, key=BIAS_KEY, epoch=EPOCH, scale=0.2,
                         antithetic=antithetic, backend="torch")
    ops.dense_noise_add_(b, ids, seed=SEED, key=BIAS_KEY, epoch=EPOCH, scale=0.2,
                         antithetic=antithetic)
    torch.testing.assert_close(a.cpu(), b.cpu(), **TOL)


def test_noncontiguous_and_low_precision_outputs(device):
    """Strided ``v``/``out`` and a bfloat16 ``out`` (one rounding of the float32 sum)."""
    ids = _ids("identity", 6, device)
    big = torch.randn(6, 10).to(device)
    v = big[:, ::2]  # (6, 5), strided
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=2, total_rows=9, antithetic=True)
    _close(ops.lowrank_project(v, ids, row_offset=0, backend="torch", **common),
           ops.lowrank_project(v, ids, row_offset=0, **common), 5)
    t = torch.randn(6, 2).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.randn(4, 6).to(device, dtype).t()  # (6, 4), strided
        a, b = out.clone().t().contiguous().t(), out.clone()
        ops.lowrank_expand_(a, t, ids, row_offset=5, scale=0.5, backend="torch", **common)
        ops.lowrank_expand_(b, t, ids, row_offset=5, scale=0.5, **common)
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=atol)


# -- the perturbed linear layer --------------------------------------------------------------


@pytest.mark.parametrize("m, n, rank, rows", [(1, 1, 1, 1), (3, 7, 2, 5), (6, 4, 3, 12)])
@pytest.mark.parametrize("kind", ["identity", "blocks", "shuffled"])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("noise_on", ["weight+bias", "weight", "bias"])
@pytest.mark.parametrize("cached", [False, True])
def test_perturbed_linear_forward_and_backward_match_the_kernels(
        device, m, n, rank, rows, kind, antithetic, noise_on, cached):
    gen = torch.Generator().manual_seed(rows + 7 * m)
    ids = _ids(kind, rows, device)
    w = torch.randn(m, n, generator=gen).to(device)
    b = torch.randn(m, generator=gen).to(device)
    x = torch.randn(rows, n, generator=gen).to(device)
    weight_key = KEY if "weight" in noise_on else None
    bias_key = BIAS_KEY if "bias" in noise_on else None
    caches = {}
    if cached:
        idx = ids // 2 if antithetic else ids
        base = int(idx.min())
        span = torch.arange(base, int(idx.max()) + 1, device=device)
        caches = dict(
            weight_cache=(ops.normal_block(SEED, KEY, EPOCH, span, (n + m) * rank)
                          .view(-1, n + m, rank).contiguous(), base),
            bias_cache=(ops.normal_block(SEED, BIAS_KEY, EPOCH, span, m), base))
    kw = dict(seed=SEED, weight_key=weight_key, bias_key=bias_key, epoch=EPOCH, rank=rank,
              sigma=0.4, antithetic=antithetic, **caches)
    results = []
    for backend in ("torch", "triton"):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = ops.perturbed_linear(xs, ws, bs, ids, backend=backend, **kw)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        results.append((out.detach(), xs.grad, ws.grad, bs.grad))
    for got, want in zip(*results):
        _close(got, want, n)


@pytest.mark.parametrize("bias_cache_from", [None, 0, 1])
def test_perturbed_linear_weight_cache_with_other_bias_draws(device, no_kernels,
                                                             bias_cache_from):
    """Drawn weight factors with generated bias noise, or bias noise drawn from another
    first index: the same numbers as generating both (many rows per member and one)."""
    m, n, rank = 5, 3, 2
    w, b = torch.randn(m, n).to(device), torch.randn(m).to(device)
    span = torch.arange(1, 5, device=device)
    weight_cache = (ops.normal_block(SEED, KEY, EPOCH, span, (n + m) * rank, backend="torch")
                    .view(-1, n + m, rank).contiguous(), 1)
    bias_cache = None
    if bias_cache_from is not None:
        bias_span = torch.arange(bias_cache_from, 6, device=device)
        bias_cache = (ops.normal_block(SEED, BIAS_KEY, EPOCH, bias_span, m, backend="torch"),
                      bias_cache_from)
    for ids in (torch.arange(2, 10, device=device).repeat_interleave(5),
                torch.tensor([2, 9, 4], device=device)):
        x = torch.randn(ids.shape[0], n).to(device)
        kw = dict(seed=SEED, weight_key=KEY, bias_key=BIAS_KEY, epoch=EPOCH, rank=rank,
                  sigma=0.3, antithetic=True, backend="torch")
        want = ops.perturbed_linear(x, w, b, ids, **kw)
        got = ops.perturbed_linear(x, w, b, ids, weight_cache=weight_cache,
                                   bias_cache=bias_cache, **kw)
        _close(got, want, n)


def test_perturbed_linear_sequences_and_no_grad(device, no_kernels):
    """A 3-D input with one member per leading row equals the same rows flattened, and
    ``torch.no_grad()`` gives no graph."""
    ids = torch.tensor([4, 1, 0], device=device)
    x = torch.randn(3, 5, 6).to(device)
    w, b = torch.randn(7, 6).to(device), torch.randn(7).to(device)
    kw = dict(seed=SEED, weight_key=KEY, bias_key=BIAS_KEY, epoch=EPOCH, rank=2, sigma=0.3,
              antithetic=True, backend="torch")
    out = ops.perturbed_linear(x, w, b, ids, **kw)
    flat = ops.perturbed_linear(x.reshape(-1, 6), w, b, ids.repeat_interleave(5), **kw)
    assert out.shape == (3, 5, 7)
    torch.testing.assert_close(out.reshape(-1, 7), flat)
    with torch.no_grad():
        assert ops.perturbed_linear(x.requires_grad_(), w, b, ids, **kw).grad_fn is None


# -- the updates -----------------------------------------------------------------------------


@pytest.mark.parametrize("m, n, rank, k", [(1, 1, 1, 1), (3, 7, 2, 5), (9, 4, 3, 11)])
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_lowrank_update_matches_the_kernels(device, m, n, rank, k, precision):
    idx = torch.arange(k, device=device) * 3 + 1
    coeffs = torch.linspace(-1, 1, k, device=device)
    kw = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=rank, noise_indices=idx, coeffs=coeffs,
              precision=precision)
    got = ops.lowrank_update(m, n, backend="torch", **kw)
    want = ops.lowrank_update(m, n, **kw)
    atol = 1e-5 * k * rank if precision == "ieee" else 2e-2 * k * rank
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=1e-3)


@pytest.mark.parametrize("numel, k", [(1, 1), (13, 6), (40, 17)])
def test_dense_update_matches_the_kernels(device, numel, k):
    idx = torch.arange(k, device=device) + 2**32 - k
    coeffs = torch.linspace(-2, 1, k, device=device)
    kw = dict(seed=SEED, key=BIAS_KEY, epoch=EPOCH, noise_indices=idx, coeffs=coeffs)
    torch.testing.assert_close(ops.dense_update(numel, backend="torch", **kw).cpu(),
                               ops.dense_update(numel, **kw).cpu(), atol=1e-5 * k, rtol=1e-4)


def test_empty_inputs(device, no_kernels):
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.normal_block(0, 0, 0, ids, 5, backend="torch").shape == (0, 5)
    t = ops.lowrank_project(torch.zeros(0, 3, device=device), ids, seed=0, key=0, epoch=0,
                            rank=2, row_offset=0, total_rows=5, antithetic=True,
                            backend="torch")
    assert t.shape == (0, 2)
    out = ops.perturbed_linear(torch.zeros(0, 3, device=device), torch.zeros(2, 3, device=device),
                               None, ids, seed=0, weight_key=0, bias_key=None, epoch=0, rank=1,
                               sigma=0.1, antithetic=False, backend="torch")
    assert out.shape == (0, 2)
    g = ops.lowrank_update(2, 3, seed=0, key=0, epoch=0, rank=1, noise_indices=ids,
                           coeffs=torch.zeros(0, device=device), backend="torch")
    assert torch.equal(g, torch.zeros(2, 3, device=device))


# -- backend selection -----------------------------------------------------------------------


def test_backend_names_and_resolution(monkeypatch):
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("triton", torch.device("cpu")) == "triton"
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "triton"  # kernels stay tested
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cpu", torch.device("cpu"))
    with pytest.raises(TypeError, match="backend"):
        ops.check_backend(None)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="backend"):
        ops.normal_block(0, 0, 0, ids, 4, backend="gpu")
    # the torch path runs on the CPU without the interpreter; the kernels refuse it
    assert ops.normal_block(0, 0, 0, ids, 4, backend="auto").shape == (2, 4)
    with pytest.raises(RuntimeError, match='backend="torch"'):
        ops.normal_block(0, 0, 0, ids, 4)
    with pytest.raises(RuntimeError, match="meta"):
        ops.normal_block(0, 0, 0, torch.zeros(2, dtype=torch.int64, device="meta"), 4,
                         backend="torch")


def _mlp(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)


def test_native_api_default_error_names_the_opt_in(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _mlp("cpu")
    for cls in (EggrollStrategy, OpenESStrategy):
        with pytest.raises(RuntimeError, match="CUDA") as info:
            cls().setup(model)
        msg = str(info.value)
        assert "GPU" in msg and 'backend="torch"' in msg and "TRITON_INTERPRET=1" in msg
    with pytest.raises(ValueError, match="backend"):
        EggrollStrategy(backend="numpy")
    with pytest.raises(TypeError, match="backend"):
        OpenESStrategy(backend=1)


@pytest.mark.parametrize("cls", [EggrollStrategy, OpenESStrategy])
@pytest.mark.parametrize("antithetic", [True, False])
def test_native_api_opt_in_matches_the_kernels(device, cls, antithetic):
    """A strategy with ``backend="torch"`` computes the kernels' batched forward (with and
    without drawn factors), sequential members and update, to float32 rounding."""
    x = torch.randn(6, 5).to(device)
    fit = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2, 1.1], device=device)
    outs, params = [], []
    for backend in ("torch", "triton"):
        model = _mlp(device)
        kw = dict(sigma=0.2, lr=0.1, optimizer="sgd", antithetic=antithetic, backend=backend)
        if cls is EggrollStrategy:
            kw["rank"] = 2
        s = cls(**kw).setup(model)
        assert s.backend == backend
        got = []
        for budget in (None, 0):  # drawn factors, then generated ones
            s.factor_cache_bytes = budget
            with s.perturb(6) as pop:
                got.append(pop.batched_forward(model, x))
                got.append(pop.batched_forward(model, x[:3].repeat(2, 1),
                                               member_ids=[5, 4, 3, 2, 1, 0]))
                for k in pop.iterate():
                    if k == 3:
                        got.append(model(x[k:k + 1]))
        s.step(fit)
        outs.append(got)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        _close(a, b, 5)
    for a, b in zip(*params):
        _close(a, b, 5)


def test_native_api_opt_in_runs_without_the_interpreter(monkeypatch, no_kernels):
    """On a CPU without the interpreter, ``backend="torch"`` (and ``"auto"``) run the whole
    loop in plain torch, and the inspected factors are the reference stream's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for backend in ("torch", "auto"):
        model = _mlp("cpu")
        s = EggrollStrategy(sigma=0.1, lr=0.05, rank=2, seed=7, backend=backend).setup(model)
        x = torch.randn(8, 5)
        with s.perturb(8) as pop:
            out = pop.batched_forward(model, x)
            a, b = pop.get_factors(3, "0.weight")
        metrics = s.step(-out.pow(2).sum(1))
        assert s.epoch == 1 and metrics["param_delta_norm"] > 0
        a0, b0 = noise.lowrank_factors(7, noise.param_key("0.weight"), 0, [1], 7, 5, 2)
        torch.testing.assert_close(a, -0.1 / 2**0.5 * a0[0])
        torch.testing.assert_close(b, b0[0])


def test_routed_layers_match_the_kernels(device):
    """Conv, embedding and norm affines through ``batched_forward`` with the torch backend."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.conv = nn.Conv1d(4, 3, kernel_size=2)
            self.norm = nn.LayerNorm(3)
            self.head = nn.Linear(3, 2)

        def forward(self, tokens):
            h = self.emb(tokens).transpose(1, 2)  # (B, 4, T)
            h = self.conv(h).transpose(1, 2)  # (B, T - 1, 3)
            return self.head(self.norm(h)).mean(1)

    tokens = torch.tensor([[0, 1, 2, 3], [5, 4, 3, 2], [1, 1, 0, 0], [2, 3, 4, 5]]).to(device)
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        net = Net().to(device)
        s = EggrollStrategy(sigma=0.3, rank=2, backend=backend).setup(net)
        with s.perturb(4) as pop:
            outs.append(pop.batched_forward(net, tokens))
    _close(outs[0], outs[1], 4)


# -- the EvoTorch searcher ---------------------------------------------------------------------


def test_searcher_uses_the_torch_path_by_default_on_cpu_and_learns(monkeypatch, no_kernels):
    """Without a GPU or the interpreter, EGGROLL's default backend runs a supervised problem
    entirely in plain torch (no kernel is reached) and the loss falls."""
    from evotorch_eggroll.algorithms import EGGROLL
    from evotorch_eggroll.neuroevolution import EggrollSupervisedNE

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(x, y)
    problem = EggrollSupervisedNE(data, nn.Linear(3, 1), nn.functional.mse_loss,
                                  minibatch_size=64, device="cpu", seed=0)
    searcher = EGGROLL(problem, popsize=32, sigma=0.1, lr=0.1, rank=1, seed=0)
    assert searcher.strategy.backend == "auto"
    searcher.step()
    first = float(searcher.status["mean_eval"])
    for _ in range(30):
        searcher.step()
    assert float(searcher.status["mean_eval"]) < 0.5 * first
