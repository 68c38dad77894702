"""The perturbed forward equals the explicit formula.

Kernel tier: ``ops.perturbed_linear`` (base ``F.linear`` + in-kernel low-rank term + bias
noise) against ``x (W + s sigma/sqrt(r) A0 B0^T)^T + b + s sigma eps_b`` with factors from
the reference stream, over odd shapes, row-to-member maps, antithetic on/off and bias
choices; bit-equal under row permutation and batch splitting; float32 within 1e-5 of the
float64 formula, bf16/fp16 within their table entries (GPU tier).
"""

from __future__ import annotations

import math

import pytest
import torch

from evotorch_eggroll import noise, ops, reference

SEED, EPOCH = 77, 5
W_KEY, B_KEY = noise.param_key("fc.weight"), noise.param_key("fc.bias")

# Output tolerance vs the float64 formula, per dtype (at O(1) outputs).
OUT_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}

SHAPES = [  # (m, n, rank, rows)
    (1, 1, 1, 1),
    (3, 7, 2, 5),
    (7, 3, 3, 9),
    (6, 33, 4, 4),
    (33, 6, 6, 3),
    pytest.param(1024, 4096, 16, 256, marks=pytest.mark.gpu),
    pytest.param(4096, 1024, 64, 64, marks=pytest.mark.gpu),
    pytest.param(6, 256, 4, 4096, marks=pytest.mark.gpu),
]
from cuda_graphs import capture  # noqa: E402  (tests/ is on sys.path)
from member_maps import MAPS, member_ids  # noqa: E402


def layer(m, n, dtype, device, seed=0):
    """x (rows,) ~ N(0, 1) rows; W ~ N(0, 1/n) so outputs are O(1); b ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=gen) / math.sqrt(n)).to(device, dtype)
    b = torch.randn(m, generator=gen).to(device, dtype)
    return w, b


def tol(dtype, n):
    """Table entry, widened for float32 as the reduction length n grows past 64."""
    t = OUT_TOL[dtype]
    if dtype != torch.float32:
        return t
    scale = max(1.0, math.sqrt(n) / 8)
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def explicit(x, w, b, ids, *, rank, sigma, antithetic, perturb_weight=True, perturb_bias=True):
    """``x (W + s sigma/sqrt(r) A0 B0^T)^T + b + s sigma eps_b`` in float64 over the reference
    stream's factors (:func:`evotorch_eggroll.reference.perturbed_linear`)."""
    return reference.perturbed_linear(x, w, b, ids, seed=SEED,
                                      weight_key=W_KEY if perturb_weight else None,
                                      bias_key=B_KEY if perturb_bias else None, epoch=EPOCH,
                                      rank=rank, sigma=sigma, antithetic=antithetic)


def run(x, w, b, ids, *, rank, sigma, antithetic, weight_key=W_KEY, bias_key=B_KEY):
    return ops.perturbed_linear(x, w, b, ids, seed=SEED, weight_key=weight_key,
                                bias_key=bias_key, epoch=EPOCH, rank=rank, sigma=sigma,
                                antithetic=antithetic)


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_forward_matches_explicit_formula(device, m, n, r, rows, kind, antithetic):
    w, b = layer(m, n, torch.float32, device)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(1)).to(device)
    ids = member_ids(kind, rows, device)
    sigma = 0.5 / math.sqrt(n)
    out = run(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic)
    assert out.shape == (rows, m) and out.dtype == torch.float32 and out.device == x.device
    want = explicit(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic)
    torch.testing.assert_close(out.cpu().double(), want, **tol(torch.float32, n))


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
     pytest.param(torch.float16, marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize(
    "m,n,r,rows",
    [pytest.param(1024, 4096, 16, 128, marks=pytest.mark.gpu),
     pytest.param(33, 7, 3, 9, marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("antithetic", [True, False])
def test_forward_half_precision(device, dtype, m, n, r, rows, antithetic):
    """bf16/fp16: fp32 accumulation, output in the input dtype, within the dtype's table."""
    w, b = layer(m, n, dtype, device)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ids = member_ids("repeated", rows, device)
    sigma = 0.5 / math.sqrt(n)
    out = run(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic)
    assert out.dtype == dtype
    want = explicit(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic)
    torch.testing.assert_close(out.cpu().double(), want, **tol(dtype, n))


@pytest.mark.parametrize("with_bias", ["none", "fixed", "perturbed"])
@pytest.mark.parametrize("perturb_weight", [True, False])
def test_forward_parameter_choices(device, with_bias, perturb_weight):
    m, n, r, rows = 5, 7, 3, 6
    w, b = layer(m, n, torch.float32, device)
    b = None if with_bias == "none" else b
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(2)).to(device)
    ids = member_ids("identity", rows, device)
    out = run(x, w, b, ids, rank=r, sigma=0.3, antithetic=True,
              weight_key=W_KEY if perturb_weight else None,
              bias_key=B_KEY if with_bias == "perturbed" else None)
    want = explicit(x, w, b, ids, rank=r, sigma=0.3, antithetic=True,
                    perturb_weight=perturb_weight, perturb_bias=with_bias == "perturbed")
    torch.testing.assert_close(out.cpu().double(), want, **OUT_TOL[torch.float32])


def test_antithetic_pairs_are_mirrored(device):
    """Members 2k and 2k+1 perturb by +P and -P: their outputs average to the base."""
    m, n, r = 4, 6, 2
    w, b = layer(m, n, torch.float32, device)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(3)).to(device).expand(6, n)
    ids = torch.arange(6, device=device)
    out = run(x, w, b, ids, rank=r, sigma=0.4, antithetic=True).double()
    base = torch.nn.functional.linear(x, w, b).double()
    torch.testing.assert_close((out[0::2] + out[1::2]) / 2, base[0::2], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[0], out[2])  # different pairs, different noise


def test_sigma_zero_is_the_base_layer(device):
    m, n = 5, 9
    w, b = layer(m, n, torch.float32, device)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(4)).to(device)
    out = run(x, w, b, torch.arange(4, device=device), rank=2, sigma=0.0, antithetic=True)
    assert torch.equal(out, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize(
    "m,n,r,rows",
    [(7, 33, 3, 13), (1, 2, 1, 5), pytest.param(512, 1024, 16, 1024, marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("antithetic", [True, False])
def test_row_permutation_and_batch_split_are_bit_equal(device, m, n, r, rows, antithetic):
    """Every row's arithmetic is its own: permuting rows or splitting the batch changes no
    bit of the noise path. With W = 0 the base product is exactly zero at every batch size,
    so the whole output is compared bit for bit. With a real W the base product comes from
    the vendor library (cuBLAS / MKL), whose kernels may round a row differently at another
    position or batch size: repeated calls are bit-equal, permuted ones equal to 1e-6."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, n, generator=gen).to(device)
    ids = (torch.arange(rows) // 2).flip(0).to(device)
    perm = torch.randperm(rows, generator=gen).to(device)
    _, b = layer(m, n, torch.float32, device)
    zero = torch.zeros(m, n, device=device)
    full = run(x, zero, b, ids, rank=r, sigma=0.2, antithetic=antithetic)
    assert torch.equal(run(x[perm], zero, b, ids[perm], rank=r, sigma=0.2,
                           antithetic=antithetic), full[perm])
    for cut in {1, rows // 2}:
        parts = [run(x[:cut], zero, b, ids[:cut], rank=r, sigma=0.2, antithetic=antithetic),
                 run(x[cut:], zero, b, ids[cut:], rank=r, sigma=0.2, antithetic=antithetic)]
        assert torch.equal(torch.cat(parts), full)
    w, _ = layer(m, n, torch.float32, device)
    full = run(x, w, b, ids, rank=r, sigma=0.2, antithetic=antithetic)
    assert torch.equal(run(x, w, b, ids, rank=r, sigma=0.2, antithetic=antithetic), full)
    torch.testing.assert_close(run(x[perm], w, b, ids[perm], rank=r, sigma=0.2,
                                   antithetic=antithetic), full[perm], atol=1e-6, rtol=1e-6)


def test_no_grad_output_has_no_grad_fn(device):
    m, n = 3, 4
    w, b = layer(m, n, torch.float32, device)
    w.requires_grad_()
    x = torch.randn(2, n, device=device, requires_grad=True)
    ids = torch.arange(2, device=device)
    with torch.no_grad():
        out = run(x, w, b, ids, rank=2, sigma=0.1, antithetic=False)
    assert out.grad_fn is None and not out.requires_grad
    assert run(x, w, b, ids, rank=2, sigma=0.1, antithetic=False).grad_fn is not None


def test_leading_dimensions(device):
    """x (B, T, n) with one member per leading row, or one per (B, T) entry."""
    m, n, r = 4, 5, 2
    w, b = layer(m, n, torch.float32, device)
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(6)).to(device)
    per_row = torch.tensor([4, 0, 9], device=device)
    out = run(x, w, b, per_row, rank=r, sigma=0.3, antithetic=True)
    assert out.shape == (3, 2, m)
    flat_ids = per_row.repeat_interleave(2)
    flat = run(x.reshape(6, n), w, b, flat_ids, rank=r, sigma=0.3, antithetic=True)
    assert torch.equal(out.reshape(6, m), flat)
    out2 = run(x, w, b, flat_ids.view(3, 2), rank=r, sigma=0.3, antithetic=True)
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="member_ids"):
        run(x, w, b, torch.arange(4, device=device), rank=r, sigma=0.3, antithetic=True)


def test_expanded_input(device):
    m, n, rows = 6, 7, 5
    w, b = layer(m, n, torch.float32, device)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(7)).to(device)
    ids = torch.arange(rows, device=device)
    out = run(x.expand(rows, n), w, b, ids, rank=3, sigma=0.3, antithetic=False)
    want = run(x.expand(rows, n).contiguous(), w, b, ids, rank=3, sigma=0.3, antithetic=False)
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_linear_replays_in_a_cuda_graph(dtype):
    """The forward issues no host synchronisation: a captured graph replays it bit-equal."""
    m, n, r, rows = 256, 96, 4, 512
    w, b = layer(m, n, dtype, "cuda")
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    ids = member_ids("shuffled", rows, "cuda")
    with torch.no_grad():
        graph, out = capture(lambda: run(x, w, b, ids, rank=r, sigma=0.1, antithetic=True))
        x.copy_(torch.randn(rows, n, generator=torch.Generator().manual_seed(4)).to(dtype))
        graph.replay()
        want = run(x, w, b, ids, rank=r, sigma=0.1, antithetic=True)
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.gpu
def test_batched_forward_of_an_mlp_replays_in_a_cuda_graph():
    """A whole batched forward (default member ids) captures and replays bit-equal."""
    import torch.nn as nn

    from evotorch_eggroll import EggrollStrategy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 6)).cuda()
    s = EggrollStrategy(sigma=0.1, rank=4).setup(model)
    x = torch.randn(256, 17, device="cuda")
    with torch.no_grad(), s.perturb(256, epoch=2) as pop:
        graph, out = capture(lambda: pop.batched_forward(model, x))
        x.copy_(torch.randn(256, 17, device="cuda"))
        graph.replay()
        want = pop.batched_forward(model, x)
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_forward_errors(device):
    w, b = layer(3, 4, torch.float32, device)
    ids = torch.arange(2, device=device)
    x = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match="shape"):
        run(torch.randn(2, 5, device=device), w, b, ids, rank=1, sigma=0.1, antithetic=False)
    with pytest.raises(TypeError, match="dtype"):
        run(x.double(), w, b, ids, rank=1, sigma=0.1, antithetic=False)
    with pytest.raises(ValueError, match="bias"):
        run(x, w, b[:2], ids, rank=1, sigma=0.1, antithetic=False)
    with pytest.raises(ValueError, match="weight"):
        run(x, w[0], b, ids, rank=1, sigma=0.1, antithetic=False)
    with pytest.raises(ValueError, match="rank"):
        run(x, w, b, ids, rank=0, sigma=0.1, antithetic=False)
    with pytest.raises(ValueError, match="sigma"):
        run(x, w, b, ids, rank=1, sigma=float("nan"), antithetic=False)
    with pytest.raises(ValueError, match="weight_key"):
        run(x, w, b, ids, rank=1, sigma=0.1, antithetic=False, weight_key=2**32)


# -- strategy level: batched_forward against the explicit formula ------------------------------------

import torch.nn as nn  # noqa: E402

from evotorch_eggroll import EggrollStrategy, OpenESStrategy  # noqa: E402


@pytest.mark.parametrize("antithetic", [True, False])
def test_batched_forward_matches_the_spec_formula(device, antithetic):
    """out_j = x_j W^T + b + (x_j B) A^T + s sigma eps_b with the member's factors from
    pop.get_factors (sign and sigma/sqrt(r) folded into A)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2, antithetic=antithetic).setup(layer)
    x = torch.randn(6, 5, device=device)
    ids = torch.tensor([0, 1, 2, 3, 1, 0], device=device)
    with s.perturb(4, epoch=7) as pop:
        out = pop.batched_forward(layer, x, member_ids=ids)
        factors = {k: pop.get_factors(k, "weight") for k in range(4)}
    for j, k in enumerate(ids.tolist()):
        a, b = factors[k]
        eps_b = s._get_perturbation("bias", k, 7).as_matrix()
        want = x[j] @ layer.weight.T + layer.bias + (x[j] @ b) @ a.T + eps_b
        torch.testing.assert_close(out[j], want, rtol=1e-5, atol=1e-5)
        # the factored form equals the materialised one (which the forward never builds)
        torch.testing.assert_close(want, x[j] @ (layer.weight + a @ b.T).T + layer.bias + eps_b,
                                   rtol=1e-5, atol=1e-5)


def test_batched_forward_of_an_mlp_equals_explicit_per_member_weights(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device)
    s = EggrollStrategy(sigma=0.2, rank=3).setup(model)
    x = torch.randn(8, 4, device=device)
    ids = torch.arange(4, device=device).repeat_interleave(2)
    with s.perturb(4, epoch=1) as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
    for j, k in enumerate(ids.tolist()):
        p = {n: s._get_perturbation(n, k, 1).as_matrix() for n, _ in s.named_parameters()}
        h = torch.tanh(x[j] @ (model[0].weight + p["0.weight"]).T + model[0].bias + p["0.bias"])
        want = h @ (model[2].weight + p["2.weight"]).T + model[2].bias + p["2.bias"]
        torch.testing.assert_close(out[j], want, rtol=1e-5, atol=1e-5)


def test_openes_forward_uses_full_rank_member_weights(device):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(device)
    s = OpenESStrategy(sigma=0.2).setup(layer)
    x = torch.randn(5, 4, device=device)
    ids = torch.tensor([2, 0, 2, 1, 3], device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(layer, x, member_ids=ids)
    for j, k in enumerate(ids.tolist()):
        w = layer.weight + s._get_perturbation("weight", k, 0).as_matrix()
        b = layer.bias + s._get_perturbation("bias", k, 0).as_matrix()
        torch.testing.assert_close(out[j], x[j] @ w.T + b, rtol=1e-5, atol=1e-5)


def test_sigma_zero_batched_forward_is_the_plain_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(device)
    s = EggrollStrategy(sigma=0.0).setup(model)
    x = torch.randn(4, 4, device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
    assert torch.equal(out, model(x))


# -- property-based: a strategy's Linear against the reference stream ------------------------------------

import warnings  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PROPERTY = settings(max_examples=15, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _linear_cases(draw):
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rank = draw(st.integers(1, min(m, n)))
    population = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(0, population - 1), min_size=rows, max_size=rows))
    return dict(m=m, n=n, rank=rank, population=population, ids=ids,
                antithetic=draw(st.booleans()), seed=draw(st.integers(0, 2**40)),
                epoch=draw(st.integers(0, 5)), dtype=draw(st.sampled_from(["float32", "bfloat16"])))


@_PROPERTY
@given(case=_linear_cases())
def test_property_strategy_linear_matches_the_reference_formula(device, case):
    """For any shape, rank <= min(m, n), population, row-to-member map, antithetic setting,
    seed, epoch and dtype: batched_forward of an nn.Linear equals
    ``x W^T + b + s sigma/sqrt(r) (x B0) A0^T + s sigma eps_b`` built from the reference noise
    (evotorch_eggroll.noise), and get_factors returns the reference factors."""
    from evotorch_eggroll import EggrollStrategy

    dtype = getattr(torch, case["dtype"])
    m, n, r, sigma = case["m"], case["n"], case["rank"], 0.3
    torch.manual_seed(case["seed"] % 1000)
    model = torch.nn.Linear(n, m).to(device, dtype)
    s = EggrollStrategy(sigma=sigma, rank=r, seed=case["seed"],
                        antithetic=case["antithetic"]).setup(model)
    ids = torch.tensor(case["ids"], dtype=torch.int64)
    x = torch.randn(len(case["ids"]), n).to(device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # odd antithetic populations
        ctx = s.perturb(case["population"], case["epoch"])
    with ctx as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
        k = case["ids"][0]
        a, b = pop.get_factors(k, "weight")
    anti = case["antithetic"]
    ref = reference.perturbed_linear(x, model.weight, model.bias, ids, seed=case["seed"],
                                     weight_key=noise.param_key("weight"),
                                     bias_key=noise.param_key("bias"), epoch=case["epoch"],
                                     rank=r, sigma=sigma, antithetic=anti)
    t = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(out.double().cpu(), ref, **t)
    sk = noise.member_sign(k, anti)
    a0, b0 = noise.lowrank_factors(case["seed"], noise.param_key("weight"), case["epoch"],
                                   [noise.noise_index(k, anti)], m, n, r)
    factor_tol = ({"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32  # kernel Box-Muller
                  else {"atol": 2e-2, "rtol": 1e-2})                       # vs float64 reference
    torch.testing.assert_close(a.float().cpu(), (sk * sigma / math.sqrt(r)) * a0[0], **factor_tol)
    torch.testing.assert_close(b.float().cpu(), b0[0], **factor_tol)


@_PROPERTY
@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 4),
       indices=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
       seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 2**32 - 1))
def test_property_kernel_factors_are_the_reference_stream(device, m, n, r, indices, seed, epoch):
    key = noise.param_key("layer.weight")
    idx = torch.tensor(indices, dtype=torch.int64)
    a, b = ops.lowrank_factors(seed, key, epoch, idx.to(device), m, n, r)
    a0, b0 = noise.lowrank_factors(seed, key, epoch, idx, m, n, r)
    torch.testing.assert_close(a.cpu(), a0, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(b.cpu(), b0, atol=2e-6, rtol=2e-6)


def _mlp(device):
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
def test_drawn_factors_serve_every_forward_of_a_context(device, antithetic, rank):
    """batched_forward draws every member's factors at the first call of a context and
    every call reads them: repeated calls are bit-equal, for default and explicit member
    ids; the outputs agree with generating the factors in the kernels (budget 0) to
    float32 rounding; the drawn buffers are zeroed when the context exits."""
    from evotorch_eggroll import EggrollStrategy

    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1)).to(device)
    ids = torch.tensor([3, 3, 0, 9, 1, 2, 2, 8, 5], device=device)
    outs = []
    for budget in (None, 0):
        model = _mlp(device)
        s = EggrollStrategy(sigma=0.3, rank=rank, antithetic=antithetic).setup(model)
        s.factor_cache_bytes = budget
        with torch.no_grad(), s.perturb(10, epoch=4) as pop:
            first = pop.batched_forward(model, x)
            first_ids = pop.batched_forward(model, x, member_ids=ids.clone())
            assert (pop._cache is not None) == (budget is None)  # decided at the first call
            assert torch.equal(pop.batched_forward(model, x), first)
            assert torch.equal(pop.batched_forward(model, x, member_ids=ids), first_ids)
            buffers = list(s._factor_storage.values())
        outs.append((first, first_ids))
        if budget is None:
            assert len(buffers) == 4 and all(not b.any() for b in buffers)  # zeroed on exit
            with pytest.raises(RuntimeError, match="perturb"):
                pop.cache_factors()
        else:
            assert not buffers
    for drawn, generated in zip(*outs):
        torch.testing.assert_close(drawn, generated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n,r,rows", [(7, 5, 1, 9), (3, 33, 2, 5), (17, 4, 3, 12), (64, 64, 1, 40),
                                        pytest.param(256, 17, 1, 4096, marks=pytest.mark.gpu),
                                        pytest.param(6, 256, 4, 2048, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_drawn_narrow_linear_matches_the_explicit_formula(device, m, n, r, rows, antithetic,
                                                          with_bias):
    """The one-launch kernel for narrow layers with drawn factors: the explicit formula
    over the reference stream's factors, independent of the row order."""
    from evotorch_eggroll.kernels import drawn_linear

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(m, n, generator=gen).to(device)
    b = torch.randn(m, generator=gen).to(device) if with_bias else None
    x = torch.randn(rows, n, generator=gen).to(device)
    ids = member_ids("shuffled", rows, device)
    idx, _ = noise.member_noise(ids, antithetic)
    indices = torch.arange(int(idx.min()), int(idx.max()) + 1, device=device)
    base = int(indices[0])
    layout = noise.FactorLayout(m, n, r)
    block = ops.normal_block(SEED, noise.param_key("w"), EPOCH, indices,
                             layout.numel).view(-1, layout.rows, r)
    bias = ops.normal_block(SEED, noise.param_key("b"), EPOCH, indices, m)
    sigma = 0.3
    kw = dict(rank=r, scale=sigma / math.sqrt(r), bias_scale=sigma, antithetic=antithetic,
              cache=(block, base), bias_cache=(bias, base), precision="ieee")
    out = drawn_linear.drawn_linear(x, w, b, ids, **kw)
    # the kernel adds the drawn bias noise with or without a bias: a zero bias in the formula
    want = reference.perturbed_linear(x, w, torch.zeros(m) if b is None else b, ids, seed=SEED,
                                      weight_key=noise.param_key("w"),
                                      bias_key=noise.param_key("b"), epoch=EPOCH, rank=r,
                                      sigma=sigma, antithetic=antithetic)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5,
                               atol=1e-5 * max(1.0, n ** 0.5))
    perm = torch.randperm(rows, generator=gen).to(device)
    permuted = drawn_linear.drawn_linear(x[perm], w, b, ids[perm], **kw)
    if device.type == "cuda":
        assert torch.equal(permuted, out[perm])
    else:
        # Triton's interpreter computes tl.dot with numpy's matmul, whose BLAS may round a
        # row differently by its place in the block (it does on some CPUs): equal to float32
        # rounding there, bit-equal on the GPU
        torch.testing.assert_close(permuted, out[perm], rtol=1e-6, atol=1e-6 * max(1.0, n ** 0.5))


def test_drawn_factors_are_the_stream_and_respect_the_budget(device):
    """The drawn blocks are the stream's factors bit for bit (the very numbers the update
    regenerates); with ``factor_cache_bytes = 0`` nothing is drawn, the forward agrees to
    float32 rounding and the update (which always regenerates) is bit-identical."""
    from evotorch_eggroll import EggrollStrategy
    from evotorch_eggroll.evolved import member_noise

    results = []
    for budget in (None, 0):
        model = _mlp(device)
        s = EggrollStrategy(sigma=0.2, rank=3, lr=0.1, optimizer="sgd").setup(model)
        s.factor_cache_bytes = budget
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2)).to(device)
        with torch.no_grad(), s.perturb(6) as pop:
            outs = [pop.batched_forward(model, x) for _ in range(3)]
            assert pop.cache_factors() == (budget is None)
            if budget is None:
                e = s._evolved.by_name["0.weight"]
                idx, _ = member_noise(torch.arange(6, device=device), True)
                a0, b0 = ops.lowrank_factors(pop.coords.seed, e.key, pop.coords.epoch,
                                             idx.unique(), e.m, e.n, 3)
                block = s._factor_storage["0.weight"]
                assert torch.equal(block[:, :e.n], b0) and torch.equal(block[:, e.n:], a0)
                bias = s._factor_storage["0.bias"]
                assert torch.equal(bias, ops.normal_block(pop.coords.seed,
                                                          s._evolved.by_name["0.bias"].key,
                                                          pop.coords.epoch, idx.unique(), 7))
        s.step(torch.arange(6.0, device=device))
        results.append((outs, [p.detach().clone() for p in model.parameters()]))
    (outs_a, params_a), (outs_b, params_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_the_default_budget_asks_for_free_memory_only_when_a_draw_allocates(device, monkeypatch):
    """A context whose draw fits the buffers the strategy already holds (the same
    population as the last one) reuses them and takes the default budget without asking
    the device how much memory is free; a new population size allocates and asks."""
    from evotorch_eggroll import EggrollStrategy
    from evotorch_eggroll import context as context_module
    from evotorch_eggroll.factor_cache import FactorCache

    asked = []
    real = context_module.default_budget_bytes
    monkeypatch.setattr(context_module, "default_budget_bytes",
                        lambda dev, allocates=True: asked.append(allocates) or real(dev, allocates))
    model = _mlp(device)
    s = EggrollStrategy(sigma=0.2, rank=2).setup(model)
    x = torch.randn(6, 5, device=device)
    for n in (6, 6, 4):
        with torch.no_grad(), s.perturb(n) as pop:
            holds = FactorCache.holds(s._evolved, pop.coords, range(n), s._factor_storage)
            assert holds == (n == 6 and bool(asked))
            held = [b.data_ptr() for b in s._factor_storage.values()]
            pop.batched_forward(model, x[:n])
            assert pop._cache is not None
            if n == 6 and len(asked) == 2:
                assert [b.data_ptr() for b in s._factor_storage.values()] == held  # reused
    assert asked == [True, False, True]


@pytest.mark.gpu
def test_captured_factor_draws_are_each_contexts_stream():
    """From the second context of the same population on, the factors are drawn by
    replaying a captured graph of the draws with the epoch read from device memory: every
    context's blocks are its epoch's stream bit for bit, a new population size draws by
    launches again and is captured on its second context."""
    from evotorch_eggroll import EggrollStrategy

    model = _mlp("cuda")
    s = EggrollStrategy(sigma=0.2, rank=2, antithetic=True).setup(model)
    x = torch.randn(10, 5, device="cuda")
    for n in (10, 10, 10, 10, 6, 6, 6):
        with torch.no_grad(), s.perturb(n) as pop:
            pop.batched_forward(model, x[:n])
            epoch, k = pop.coords.epoch, (n + 1) // 2
            for name, e in s._evolved.by_name.items():
                numel = s._factor_storage[name][0].numel()
                want = ops.normal_block(pop.coords.seed, e.key, epoch,
                                        torch.arange(k, device="cuda"), numel)
                assert torch.equal(s._factor_storage[name].reshape(k, numel), want), (n, name)
        s.step(torch.arange(float(n), device="cuda"))
        graphed = s._draw_graphs.get(("draws", torch.device("cuda", 0)))
        captured = graphed is not None and graphed._graph is not None
        assert captured == (n == 10 and s.epoch >= 2 or n == 6 and s.epoch >= 6)


def test_a_strategy_with_captured_draws_pickles_and_copies_without_them(device):
    """The captured draws (CUDA graphs, which neither pickle nor copy) are left out of a
    pickled or copied strategy; the copy draws the same factors, capturing them anew."""
    import copy
    import pickle
    import threading

    from evotorch_eggroll import EggrollStrategy

    model = _mlp(device)
    s = EggrollStrategy(sigma=0.2, rank=2).setup(model)
    x = torch.randn(4, 5, device=device)
    with torch.no_grad(), s.perturb(4) as pop:
        want = pop.batched_forward(model, x)
    s._draw_graphs[("draws", torch.device(device))] = threading.Lock()  # as unpicklable as a graph
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone._draw_graphs == {} and ("draws", torch.device(device)) in s._draw_graphs
        with torch.no_grad(), clone.perturb(4, epoch=0) as pop:
            assert torch.equal(pop.batched_forward(clone.model, x), want)


def test_factor_cache_covers_only_the_local_slice():
    from evotorch_eggroll.factor_cache import FactorCache, noise_index_range

    assert noise_index_range(range(4, 9), True) == range(2, 5)
    assert noise_index_range(range(4, 9), False) == range(4, 9)
    assert noise_index_range(range(0), True) == range(0)
    cache = FactorCache(range(4, 9), range(2, 5), {})
    assert cache.covers(4, 8) and cache.covers(5, 5)
    assert not cache.covers(3, 8) and not cache.covers(4, 9)
