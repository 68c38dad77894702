"""``pop.batched_forward`` under ``torch.compile`` and inside CUDA graph captures.

On the CPU the kernels run in Triton's interpreter, so the compiled code is checked with
the ``eager`` and ``aot_eager`` backends (Inductor's code for the GPU needs a GPU); the GPU
tier compiles with Inductor and captures CUDA graphs.

Compiled code runs the routed per-op kernels. Eagerly, a plain MLP under ``no_grad`` with
drawn factors takes the one-launch fused kernel instead (equal to float32 rounding, see
test_fused_mlp.py), so the eager references here take the routed path too, for bit
equality; one test compares compiled code with the fused eager path to rounding.
"""

import contextlib
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn

from cuda_graphs import capture  # tests/ is on sys.path
from evotorch_eggroll import EggrollStrategy, fused_mlp, library

N = 6


def mlp(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).to(device)


def strategy(model, drawn: bool = True, antithetic: bool = True) -> EggrollStrategy:
    s = EggrollStrategy(sigma=0.1, rank=2, antithetic=antithetic).setup(model)
    if not drawn:
        s.factor_cache_bytes = 0
    return s


@contextlib.contextmanager
def drawn_context(device) -> Iterator[tuple[nn.Module, torch.Tensor, Any]]:
    """``(model, x, pop)``: the MLP, an input of N rows and its open perturb context (no
    grad), whose factors are already drawn."""
    model = mlp(device)
    x = torch.randn(N, 5, device=device)
    with torch.no_grad(), strategy(model).perturb(N, epoch=1) as pop:
        pop.cache_factors()
        yield model, x, pop


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def routed_eager(request, monkeypatch):
    """Eager references take the routed per-op path (what compiled code runs)."""
    if "fused_eager_path" not in request.node.name:
        monkeypatch.setattr(fused_mlp, "try_forward", lambda *a, **k: None)


def given_ids(device) -> torch.Tensor:
    return torch.tensor([0, 3, 3, 1, 5, 2], device=device)


# -- the registered operators -----------------------------------------------------------------


def _operator_samples(device):
    g = torch.Generator().manual_seed(0)
    rows, n, m, r = 3, 5, 4, 2
    ids = torch.tensor([0, 2, 1], device=device)
    v = torch.randn(rows, n, generator=g).to(device)
    w = torch.randn(m, n, generator=g).to(device)
    b = torch.randn(m, generator=g).to(device)
    block = torch.randn(3, n + m, r, generator=g).to(device)  # noise indices 0..2
    bias_block = torch.randn(3, m, generator=g).to(device)
    t = torch.randn(rows, r, generator=g).to(device)
    ops = torch.ops.evotorch_eggroll
    return [
        (ops.lowrank_project, (v, ids, 7, 1, 11, 3, r, 0, True, None, None, 0)),
        (ops.lowrank_project, (v, ids, 7, 1, 11, 3, r, 0, True, None, block, 0)),
        (ops.lowrank_expand_, (torch.zeros(rows, m, device=device), t, ids, 7, 1, 11, 3, r, n,
                               0.5, True, 12, 0.1, None, None, 0, None, 0)),
        (ops.lowrank_expand_, (torch.zeros(rows, m, device=device), t, ids, 7, 1, 11, 3, r, n,
                               0.5, False, 12, 0.1, None, block, 0, bias_block, 0)),
        (ops.dense_noise_add_, (torch.zeros(rows, m, device=device), ids, 7, 1, 11, 3, 0.1,
                                False, None)),
        (ops.drawn_linear, (v, w, b, ids, r, 0.5, 0.1, True, block, 0, bias_block, 0, "ieee")),
        (ops.drawn_linear, (v, w, None, ids, r, 0.5, 0.1, False, block, 0, None, 0, "ieee")),
        (ops.normal_block_, (torch.empty(2, 9, device=device), torch.tensor([4, 1], device=device),
                             7, 1, 11, 3, 9, 0)),
        (ops.member_ids, (ids, 3, ids.device)),
    ]


def test_operators_pass_opcheck(device):
    """Schemas, fake implementations (shapes, dtypes, strides) and the traced versions of
    every registered operator agree with the operators themselves."""
    for op, args in _operator_samples(device):
        torch.library.opcheck(op, args)


def test_operators_match_the_launchers(device):
    from evotorch_eggroll.kernels import drawn_linear, lowrank_project

    (_, a), (_, c) = _operator_samples(device)[:2]
    ops = torch.ops.evotorch_eggroll
    want = lowrank_project.lowrank_project(a[0], a[1], seed=7 + (1 << 32), key=11, epoch=3,
                                           rank=2, row_offset=0, antithetic=True)
    assert torch.equal(ops.lowrank_project(*a), want)
    assert torch.equal(ops.lowrank_project(*c), lowrank_project.lowrank_project(
        c[0], c[1], seed=7 + (1 << 32), key=11, epoch=3, rank=2, row_offset=0, antithetic=True,
        cache=(c[10], 0)))
    _, d = _operator_samples(device)[5]
    assert torch.equal(ops.drawn_linear(*d), drawn_linear.drawn_linear(
        d[0], d[1], d[2], d[3], rank=2, scale=0.5, bias_scale=0.1, antithetic=True,
        cache=(d[8], 0), bias_cache=(d[10], 0), precision="ieee"))


def test_member_ids_operator_rejects_ids_out_of_range(device):
    with pytest.raises(ValueError, match=r"member ids must lie in \[0, 3\)"):
        torch.ops.evotorch_eggroll.member_ids(torch.tensor([0, 3], device=device), 3,
                                              torch.device(device))


def test_eager_calls_bypass_the_dispatcher():
    """Eager launches go straight to the launchers (no per-call dispatcher overhead)."""
    from evotorch_eggroll import ops
    from evotorch_eggroll.kernels import lowrank_project

    assert ops._kernels().lowrank_project is lowrank_project


# -- batched_forward under torch.compile ------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("drawn", [True, False], ids=["drawn", "generated"])
@pytest.mark.parametrize("ids", ["default", "given"])
def test_compiled_batched_forward_equals_eager(device, backend, drawn, ids):
    model = mlp(device)
    s = strategy(model, drawn=drawn)
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(1)).to(device)
    member_ids = given_ids(device) if ids == "given" else None
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        assert pop.cache_factors() is drawn
        f = torch.compile(lambda x, i: pop.batched_forward(model, x, i), backend=backend,
                          fullgraph=True)
        got = f(x, member_ids)
        want = pop.batched_forward(model, x, member_ids)
        again = f(x, member_ids)
    assert torch.equal(got, want)
    assert torch.equal(again, want)


def test_compiled_batched_forward_is_close_to_the_fused_eager_path(device, monkeypatch):
    calls = []
    real = fused_mlp.try_forward
    monkeypatch.setattr(fused_mlp, "try_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = mlp(device)
    s = strategy(model)
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        pop.cache_factors()
        f = torch.compile(lambda x: pop.batched_forward(model, x), backend="eager",
                          fullgraph=True)
        got = f(x)
        want = pop.batched_forward(model, x)
    assert calls  # the eager call went through the fused path
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["layer_norm", "conv1d"])
def test_compiled_norm_and_conv_models_equal_eager(device, layer):
    torch.manual_seed(0)
    if layer == "layer_norm":
        model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(4, 5)
    else:
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2))
        x = torch.randn(4, 2, 5)
    model, x = model.to(device), x.to(device)
    s = strategy(model, antithetic=False)
    with torch.no_grad(), s.perturb(4, epoch=1) as pop:
        pop.cache_factors()
        got = torch.compile(lambda x: pop.batched_forward(model, x), backend="aot_eager",
                            fullgraph=True)(x)
        assert torch.equal(got, pop.batched_forward(model, x))


def test_batched_forward_traces_into_one_graph(device):
    with drawn_context(device) as (model, x, pop):
        for ids in (None, given_ids(device)):
            torch._dynamo.reset()
            report = torch._dynamo.explain(lambda x, i: pop.batched_forward(model, x, i))(x, ids)
            assert report.graph_break_count == 0, report.break_reasons
            assert report.graph_count == 1
            names = {str(n.target) for g in report.graphs for n in g.graph.nodes
                     if n.op == "call_function"}
            assert any("evotorch_eggroll.drawn_linear" in t for t in names), names


def test_first_compiled_call_draws_no_factors(device):
    """Compiled code allocates and draws nothing for the context: a first call that is
    compiled decides, like one inside a CUDA graph capture, that the kernels generate the
    factors for the rest of the context (and gives eager's result)."""
    model = mlp(device)
    s = strategy(model)
    x = torch.randn(N, 5, device=device)
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        got = torch.compile(lambda x: pop.batched_forward(model, x), backend="aot_eager",
                            fullgraph=True)(x)
        assert pop._cache is None
        want = pop.batched_forward(model, x)
        assert pop._cache is None
    assert torch.equal(got, want)


def test_compiled_batched_forward_rejects_member_ids_out_of_range(device):
    with drawn_context(device) as (model, x, pop):
        f = torch.compile(lambda x, i: pop.batched_forward(model, x, i), backend="aot_eager",
                          fullgraph=True)
        f(x, given_ids(device))
        with pytest.raises(ValueError, match=r"member ids must lie in \[0, 6\)"):
            f(x, torch.tensor([0, 1, 2, 3, 4, 6], device=device))
        with pytest.raises(ValueError, match=r"member ids must lie in \[0, 6\)"):
            f(x, torch.tensor([0, -1, 2, 3, 4, 5], device=device))


def test_compiled_batched_forward_gradient_equals_eager(device):
    model = mlp(device)
    s = strategy(model)
    x = torch.randn(N, 5, device=device, requires_grad=True)
    with s.perturb(N, epoch=1) as pop:
        pop.cache_factors()
        f = torch.compile(lambda x: pop.batched_forward(model, x), backend="aot_eager",
                          fullgraph=True)
        got = f(x)
        (g_got,) = torch.autograd.grad(got.sum(), x)
        want = pop.batched_forward(model, x)
        (g_want,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(got, want)
    assert torch.equal(g_got, g_want)


def test_compiled_function_across_contexts(device):
    """One compiled function serves every context: with the factors drawn and no gradient,
    the traced code reads no stream coordinate, so later contexts of the same shape reuse
    the first graph; each result equals that context's eager forward."""
    from torch._dynamo.utils import counters

    model = mlp(device)
    s = strategy(model)
    x = torch.randn(N, 5, device=device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def forward(pop, x, ids):
        return pop.batched_forward(model, x, ids)

    counters.clear()
    for epoch in (1, 2, 3):
        with torch.no_grad(), s.perturb(N, epoch=epoch) as pop:
            assert pop.cache_factors()
            for ids in (None, given_ids(device)):
                assert torch.equal(forward(pop, x, ids), pop.batched_forward(model, x, ids))
    assert counters["stats"]["unique_graphs"] == 2  # one per member-id kind


# -- GPU: Inductor and CUDA graphs ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("drawn", [True, False], ids=["drawn", "generated"])
@pytest.mark.parametrize("ids", ["default", "given"])
def test_inductor_batched_forward_equals_eager(drawn, ids):
    """Inductor may pick other algorithms for the base products it compiles, so the
    results agree to float32 rounding (the perturbations come from the same kernels)."""
    model = mlp("cuda")
    s = strategy(model, drawn=drawn)
    x = torch.randn(N, 5, device="cuda")
    member_ids = given_ids("cuda") if ids == "given" else None
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        assert pop.cache_factors() is drawn
        f = torch.compile(lambda x, i: pop.batched_forward(model, x, i), fullgraph=True)
        got = f(x, member_ids)
        want = pop.batched_forward(model, x, member_ids)
        with pytest.raises(ValueError, match="member ids must lie"):
            f(x, torch.tensor([0, 1, 2, 3, 4, 6], device="cuda"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_inductor_reduce_overhead_batched_forward_equals_eager():
    """Inductor with its own CUDA graphs (``mode="reduce-overhead"``)."""
    model = mlp("cuda")
    s = strategy(model)
    x = torch.randn(N, 5, device="cuda")
    ids = given_ids("cuda")
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        pop.cache_factors()
        f = torch.compile(lambda x, i: pop.batched_forward(model, x, i), fullgraph=True,
                          mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            got = f(x, ids).clone()
        want = pop.batched_forward(model, x, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("ids", ["default", "given"])
def test_cuda_graph_replays_batched_forward_across_contexts(ids):
    """A graph captured in one context (after a warm-up call that draws the factors) replays
    equal to eager there and, after the warm-up call of a later context of the same shape
    (whose factors are drawn into the same buffers), equal to eager in that context."""
    model = mlp("cuda")
    s = strategy(model)
    x = torch.randn(N, 5, device="cuda")
    member_ids = given_ids("cuda") if ids == "given" else None
    with torch.no_grad():
        with s.perturb(N, epoch=1) as pop:
            pop.batched_forward(model, x, member_ids)  # warm-up: draws the factors
            graph, out = capture(lambda: pop.batched_forward(model, x, member_ids))
            key = pop._replay_key()
            assert key is not None
            x.copy_(torch.randn(N, 5, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, pop.batched_forward(model, x, member_ids))
            first = out.clone()
        with s.perturb(N, epoch=2) as pop:
            pop.batched_forward(model, x, member_ids)  # warm-up: draws this context's factors
            assert pop._replay_key() == key
            graph.replay()
            torch.cuda.synchronize()
            want = pop.batched_forward(model, x, member_ids)
            assert torch.equal(out, want)
            assert not torch.equal(out, first)  # another epoch, other perturbations


@pytest.mark.gpu
def test_cuda_graph_capture_with_unchecked_member_ids():
    """Member ids never seen before a capture are checked on the device (no host read),
    so the capture works and the replay equals eager."""
    model = mlp("cuda")
    s = strategy(model)
    x = torch.randn(N, 5, device="cuda")
    with torch.no_grad(), s.perturb(N, epoch=1) as pop:
        pop.batched_forward(model, x)  # warm-up: draws the factors, compiles the kernels
        ids = given_ids("cuda")  # a tensor the warm-up did not check
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = pop.batched_forward(model, x, ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, pop.batched_forward(model, x, ids))


@pytest.mark.gpu
def test_cuda_graph_of_compiled_batched_forward_across_contexts():
    """A compiled batched forward captured in a user's CUDA graph replays equal to eager,
    also in a later context of the same shape once its factors are drawn."""
    model = mlp("cuda")
    s = strategy(model)
    x = torch.randn(N, 5, device="cuda")
    ids = given_ids("cuda")
    f = torch.compile(lambda pop, x, i: pop.batched_forward(model, x, i), fullgraph=True)
    with torch.no_grad():
        with s.perturb(N, epoch=1) as pop:
            pop.cache_factors()
            graph, out = capture(lambda: f(pop, x, ids))
            x.copy_(torch.randn(N, 5, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, f(pop, x, ids))
        with s.perturb(N, epoch=2) as pop:
            pop.cache_factors()  # draws into the buffers the graph reads
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, f(pop, x, ids))


def test_operators_are_registered():
    assert set(library.OPERATORS) >= {"lowrank_project", "lowrank_expand_", "dense_noise_add_",
                                      "drawn_linear", "normal_block_", "member_ids"}
