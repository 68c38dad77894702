"""The ES update regenerates exactly the noise of the forward.

Kernel tier: ``ops.lowrank_update`` (``sum_k c_k A0_k B0_k^T`` as chunked
``(m, K r) @ (K r, n)`` products in IEEE float32, or on TF32/bf16 tensor cores for weights
whose forward runs at that precision) and ``ops.dense_update`` (``c @ eps``) against the
naive reference of ``evotorch_eggroll.reference`` (einsums over the reference stream's
noise); the update's factors are bit-equal to the inspected ones; results do not depend on
the chunking beyond float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from evotorch_eggroll import noise, ops, reference
from evotorch_eggroll.kernels import lowrank_update as lowrank_update_kernel

SEED, EPOCH = 4242, 9
KEY = noise.param_key("encoder.layers.0.weight")

SHAPES = [  # (m, n, rank, K)
    (1, 1, 1, 1),
    (3, 7, 2, 5),
    (7, 3, 3, 4),
    (33, 5, 5, 3),
    (4, 6, 4, 7),
    (9, 17, 16, 2),
    pytest.param(1024, 4096, 16, 64, marks=pytest.mark.gpu),
    pytest.param(4096, 4096, 4, 32, marks=pytest.mark.gpu),
    pytest.param(256, 512, 64, 300, marks=pytest.mark.gpu),
]


def coefficients(k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, generator=torch.Generator().manual_seed(seed))


def noise_indices(k: int) -> torch.Tensor:
    """Distinct indices, a repeat, and indices past 2**31."""
    idx = torch.arange(k, dtype=torch.int64) * 3
    if k >= 3:
        idx[1] = idx[0]
        idx[2] = 2**32 - 1
    return idx


def tol(k, r):
    """G sums k*r products of two normals, so |G| ~ sqrt(k r); each normal is within ~1e-6
    of the float64 reference and float32 rounding adds ~1e-7 |G|: absolute error grows like
    sqrt(k r), and entries near zero are compared absolutely."""
    return dict(atol=1e-5 * max(1.0, math.sqrt(k * r)), rtol=1e-5)


@pytest.mark.parametrize("m,n,r,k", SHAPES)
def test_lowrank_update_matches_einsum(device, m, n, r, k):
    idx, c = noise_indices(k), coefficients(k)
    g = ops.lowrank_update(m, n, seed=SEED, key=KEY, epoch=EPOCH, rank=r,
                           noise_indices=idx.to(device), coeffs=c.to(device))
    assert g.shape == (m, n) and g.dtype == torch.float32 and g.device == idx.to(device).device
    want = reference.lowrank_update(m, n, seed=SEED, key=KEY, epoch=EPOCH, rank=r,
                                    noise_indices=idx, coeffs=c)
    torch.testing.assert_close(g.cpu().double(), want, **tol(k, r))


@pytest.mark.parametrize("m,n,r,k", [(7, 3, 3, 5), (5, 9, 2, 6),
                                     pytest.param(512, 1024, 16, 40, marks=pytest.mark.gpu)])
def test_lowrank_update_chunking(device, m, n, r, k):
    """Chunks of noise indices (bounded memory) add up to the one-shot product."""
    idx, c = noise_indices(k).to(device), coefficients(k, 1).to(device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, noise_indices=idx, coeffs=c)
    whole = lowrank_update_kernel.lowrank_update(m, n, chunk=k, **common)
    for chunk in (1, 2, 3):
        part = lowrank_update_kernel.lowrank_update(m, n, chunk=chunk, **common)
        torch.testing.assert_close(part, whole, **tol(k, r))
    # deterministic: same call, same bits
    assert torch.equal(ops.lowrank_update(m, n, **common), ops.lowrank_update(m, n, **common))


@pytest.mark.parametrize("m,n,r", [(3, 5, 1), (7, 2, 3), (4, 9, 4),
                                   pytest.param(300, 200, 64, marks=pytest.mark.gpu)])
def test_update_factors_equal_inspected_factors(device, m, n, r):
    """The matrices the update multiplies hold exactly the inspected factors."""
    idx = torch.tensor([5, 0, 2**31 + 9], device=device)
    c = torch.tensor([1.0, -2.0, 0.5], device=device)
    a, b = lowrank_update_kernel.factor_matrices(m, n, seed=SEED, key=KEY, epoch=EPOCH, rank=r,
                                                 noise_indices=idx, coeffs=c)
    assert a.shape == (m, 3 * r) and b.shape == (n, 3 * r)
    a0, b0 = ops.lowrank_factors(SEED, KEY, EPOCH, idx, m, n, r)
    for k in range(3):
        assert torch.equal(b[:, k * r:(k + 1) * r], b0[k])
        assert torch.equal(a[:, k * r:(k + 1) * r], c[k] * a0[k])


@pytest.mark.parametrize("m,n,r,k", [(3, 7, 2, 5), (33, 5, 5, 3), (9, 17, 16, 2),
                                     pytest.param(1024, 4096, 16, 64, marks=pytest.mark.gpu)])
def test_bf16_update_multiplies_the_rounded_factors(device, m, n, r, k):
    """precision="bf16": each factor value (``c_k A0_k`` and ``B0_k``) is rounded to bf16
    once; the product of those values is accumulated in float32."""
    idx, c = noise_indices(k).to(device), coefficients(k, 3).to(device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, noise_indices=idx, coeffs=c)
    a32, b32 = lowrank_update_kernel.factor_matrices(m, n, **common)
    a16, b16 = lowrank_update_kernel.factor_matrices(m, n, dtype=torch.bfloat16, **common)
    assert a16.dtype == b16.dtype == torch.bfloat16
    assert torch.equal(a16, a32.to(torch.bfloat16)) and torch.equal(b16, b32.to(torch.bfloat16))
    g = ops.lowrank_update(m, n, precision="bf16", **common)
    assert g.shape == (m, n) and g.dtype == torch.float32
    want = a16.cpu().double() @ b16.cpu().double().T
    torch.testing.assert_close(g.cpu().double(), want, **tol(k, r))
    # really the rounded factors: the float32 factors' product differs
    assert not torch.equal(g, ops.lowrank_update(m, n, **common))


def test_tf32_update_is_ieee_only_on_the_cpu(device):
    """precision="tf32" on the CPU, where there are no TF32 tensor cores, is the IEEE product
    bit for bit; on CUDA it is not (the next test checks by how much it differs)."""
    m, n, r, k = 9, 17, 4, 6
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, noise_indices=noise_indices(k).to(device),
                  coeffs=coefficients(k, 4).to(device))
    same = torch.equal(ops.lowrank_update(m, n, precision="tf32", **common),
                       ops.lowrank_update(m, n, **common))
    assert same == (device.type == "cpu")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.gpu
def test_tf32_and_ieee_updates_round_as_they_claim(device):
    """Against the float64 product of the same float32 factors: IEEE float32 is exact to
    float32 accumulation (relative error ~1e-7); TF32 rounds each operand to 10 mantissa bits
    (relative error ~2**-11 per operand, ~3e-4 for the product), so it must differ from the
    reference by far more than IEEE does while staying within the TF32 tolerance. A TF32 that
    silently fell back to IEEE, or an IEEE path running on TF32, fails here."""
    m, n, r, k = 256, 384, 8, 40
    idx, c = noise_indices(k).to(device), coefficients(k, 4).to(device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, noise_indices=idx, coeffs=c)
    a, b = lowrank_update_kernel.factor_matrices(m, n, **common)
    want = a.cpu().double() @ b.cpu().double().T
    ieee = ops.lowrank_update(m, n, precision="ieee", **common).cpu()
    tf32 = ops.lowrank_update(m, n, precision="tf32", **common).cpu()
    assert _relative_error(ieee, want) < 5e-6
    assert 5e-5 < _relative_error(tf32, want) < 5e-3
    torch.testing.assert_close(tf32.double(), want, atol=5e-3 * math.sqrt(k * r), rtol=1e-2)
    assert not torch.equal(tf32, ieee)
    # the default precision is IEEE, whatever PyTorch's TF32 switch says
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert torch.equal(ops.lowrank_update(m, n, **common).cpu(), ieee)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_update_precision_follows_the_forward(device):
    w32 = torch.zeros(2, 2, device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ops.update_precision(w32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert ops.update_precision(w32) == ("tf32" if device.type == "cuda" else "ieee")
        for dtype in (torch.bfloat16, torch.float16):
            assert ops.update_precision(w32.to(dtype)) == "bf16"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(ValueError, match="precision"):
        ops.lowrank_update(2, 2, seed=0, key=0, epoch=0, rank=1,
                           noise_indices=torch.zeros(1, dtype=torch.int64, device=device),
                           coeffs=torch.ones(1, device=device), precision="fp8")


def test_zero_coefficients_give_an_exactly_zero_update(device):
    """Equal fitness (folded pair coefficients of 0) leaves the parameters untouched."""
    idx = torch.tensor([4, 9, 2**32 - 1], device=device)
    c = torch.zeros(3, device=device)
    g = ops.lowrank_update(6, 5, seed=SEED, key=KEY, epoch=EPOCH, rank=3, noise_indices=idx,
                           coeffs=c)
    assert not g.any()
    g = ops.dense_update(11, seed=SEED, key=KEY, epoch=EPOCH, noise_indices=idx, coeffs=c)
    assert not g.any()


def test_zero_members(device):
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    c = torch.zeros(0, device=device)
    g = ops.lowrank_update(3, 4, seed=SEED, key=KEY, epoch=EPOCH, rank=2, noise_indices=idx,
                           coeffs=c)
    assert g.shape == (3, 4) and not g.any()
    g = ops.dense_update(5, seed=SEED, key=KEY, epoch=EPOCH, noise_indices=idx, coeffs=c)
    assert g.shape == (5,) and not g.any()


@pytest.mark.parametrize(
    "numel,k", [(1, 1), (7, 3), (33, 5), (1030, 4), (3, 150),  # 150: three K slices
                pytest.param(1 << 20, 64, marks=pytest.mark.gpu),
                pytest.param(256, 8192, marks=pytest.mark.gpu)]
)
def test_dense_update_matches_reference(device, numel, k):
    idx, c = noise_indices(k), coefficients(k, 2)
    g = ops.dense_update(numel, seed=SEED, key=KEY, epoch=EPOCH, noise_indices=idx.to(device),
                         coeffs=c.to(device))
    assert g.shape == (numel,) and g.dtype == torch.float32
    want = reference.dense_update(numel, seed=SEED, key=KEY, epoch=EPOCH, noise_indices=idx,
                                  coeffs=c)
    scale = max(1.0, math.sqrt(k) / 8)
    torch.testing.assert_close(g.cpu().double(), want, atol=1e-5 * scale, rtol=1e-5 * scale)


@pytest.mark.parametrize("epoch", [0, EPOCH, 2**32 - 1])
def test_update_kernels_with_the_epoch_in_memory_are_the_same_stream(device, epoch):
    """The update kernels reading their epoch from a one-element device tensor (what a
    captured update replays) give the same bits as with the epoch passed as an argument:
    factor matrices in both dtypes, chunked low-rank updates and dense updates."""
    from evotorch_eggroll.kernels import dense_noise

    held = torch.tensor([epoch], dtype=torch.int64, device=device)
    idx, c = noise_indices(7).to(device), coefficients(7, 3).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        common = dict(seed=SEED, key=KEY, rank=3, noise_indices=idx, coeffs=c, dtype=dtype)
        want = lowrank_update_kernel.factor_matrices(5, 9, epoch=epoch, **common)
        got = lowrank_update_kernel.factor_matrices(5, 9, epoch=held, **common)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), dtype
    common = dict(seed=SEED, key=KEY, rank=2, noise_indices=idx, coeffs=c, chunk=3)
    assert torch.equal(lowrank_update_kernel.lowrank_update(6, 4, epoch=held, **common),
                       lowrank_update_kernel.lowrank_update(6, 4, epoch=epoch, **common))
    for numel in (1, 33, 1030):
        common = dict(seed=SEED, key=KEY, noise_indices=idx, coeffs=c)
        assert torch.equal(dense_noise.dense_update(numel, epoch=held, **common),
                           dense_noise.dense_update(numel, epoch=epoch, **common)), numel


def test_update_input_errors(device):
    idx = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="coeffs"):
        ops.lowrank_update(2, 2, seed=0, key=0, epoch=0, rank=1, noise_indices=idx,
                           coeffs=torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="floating"):
        ops.dense_update(2, seed=0, key=0, epoch=0, noise_indices=idx,
                         coeffs=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="integer"):
        ops.dense_update(2, seed=0, key=0, epoch=0, noise_indices=idx.float(),
                         coeffs=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="rank"):
        ops.lowrank_update(2, 2, seed=0, key=0, epoch=0, rank=0, noise_indices=idx,
                           coeffs=torch.zeros(3, device=device))


# -- strategy level: the ES gradient and the optimizer step -------------------------------------------

import torch.nn as nn  # noqa: E402

from evotorch_eggroll import EggrollStrategy  # noqa: E402
from cuda_graphs import Eager  # noqa: E402  (tests/ is on sys.path)


def _delta_after_step(device, fitness_of, population, **kwargs):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=False).to(device)
    s = EggrollStrategy(**kwargs).setup(layer)
    before = layer.weight.detach().clone()
    x = torch.linspace(-1.0, 1.0, 5, device=device).expand(population, 5)
    with s.perturb(population) as pop:
        out = pop.batched_forward(layer, x)
    metrics = s.step(fitness_of(out))
    return layer.weight.detach() - before, metrics, s


def test_es_update_estimates_the_gradient_of_a_linear_objective(device):
    """f_i = c . y_i with y_i = W_i x: the gradient in W is c x^T, and the ES update with
    raw fitnesses is sqrt(N) sigma^2 c x^T in expectation."""
    c = torch.tensor([1.0, -2.0, 0.5, 1.5], device=device)
    x = torch.linspace(-1.0, 1.0, 5, device=device)
    sigma, n = 0.1, 64
    delta, _, _ = _delta_after_step(device, lambda out: out @ c, n, sigma=sigma, lr=1.0, rank=2,
                                    optimizer="sgd", fitness_transform="none", seed=1)
    true = torch.outer(c, x)
    cosine = float((delta * true).sum() / (delta.norm() * true.norm()))
    assert cosine > 0.6  # 32 mirrored draws in a 20-dimensional space
    scale = float((delta * true).sum() / true.pow(2).sum())
    assert scale == pytest.approx(math.sqrt(n) * sigma ** 2, rel=0.3)


def test_negative_es_gradient_is_handed_to_the_optimizer(device):
    """Adam's first moment after one step is (1 - beta1) * grad, with grad = -g where g is
    the SGD(lr=1) change of the same run."""
    fit = lambda out: -(out - 0.3).pow(2).sum(1)  # noqa: E731
    g, _, _ = _delta_after_step(device, fit, 6, sigma=0.2, lr=1.0, optimizer="sgd", seed=2)
    _, _, s = _delta_after_step(device, fit, 6, sigma=0.2, lr=0.01, optimizer="adam", seed=2)
    state = s.optimizer.state[s.parameters()[0]]
    torch.testing.assert_close(state["exp_avg"], 0.1 * -g, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("antithetic", [True, False])
def test_the_captured_gradient_stage_updates_as_the_eager_one(antithetic):
    """From the second step of the same population on, the strategy replays its gradient
    stage from a captured graph (the update kernels read the epoch from device memory):
    after steps with new epochs, the same and then another population size, the
    parameters and Adam's state are bit-identical to a strategy that never captures."""
    runs = []
    for graphed in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).cuda()
        s = EggrollStrategy(sigma=0.1, lr=0.05, rank=2, antithetic=antithetic, optimizer="adam",
                            seed=3).setup(model)
        if not graphed:
            s._graphed_gradients = Eager()
        x = torch.randn(8, 5, device="cuda")
        for n in (8, 8, 8, 8, 6, 6, 6):
            with torch.no_grad(), s.perturb(n) as pop:
                out = pop.batched_forward(model, x[:n])
            s.step(-(out - 0.5).pow(2).sum(1))
        if graphed:
            assert s._graphed_gradients._graph is not None  # replayed, not eager
        state = [t for p in s.parameters() for t in s.optimizer.state[p].values()]
        runs.append([p.detach().clone() for p in s.parameters()] + [t.clone() for t in state])
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))


def test_steps_ascend_the_fitness(device):
    """Identity rows read the member's weight matrix: fitness -||W_i - T||^2 rises."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).to(device)
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(device)
    s = EggrollStrategy(sigma=0.1, lr=0.1, rank=2, seed=0).setup(layer)
    n = 8
    eye = torch.eye(4, device=device).repeat(n, 1)  # (n * 4, 4)
    ids = torch.arange(n, device=device).repeat_interleave(4)

    def distance() -> float:
        return float((layer.weight.detach() - target).pow(2).sum())

    start = distance()
    for _ in range(15):
        with s.perturb(n) as pop:
            w_rows = pop.batched_forward(layer, eye, member_ids=ids).view(n, 4, 3)
        s.step(-(w_rows - target.T).pow(2).sum(dim=(1, 2)))
    assert distance() < 0.5 * start


def test_update_uses_the_evaluated_noise(device):
    """The step regenerates the noise of the context it follows: its epoch (here not the
    strategy's counter) and its sigma (even if sigma changed since)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).to(device)
    s = EggrollStrategy(sigma=0.2, lr=1.0, rank=1, optimizer="sgd",
                        fitness_transform="none").setup(layer)
    before = layer.weight.detach().clone()
    expected = [s._get_perturbation("weight", k, 5).as_matrix() for k in range(4)]
    with s.perturb(4, epoch=5) as pop:
        pop.batched_forward(layer, torch.randn(4, 3, device=device))
    s.sigma = 0.7
    fit = torch.tensor([1.0, -0.5, 0.25, 2.0], device=device)
    m = s.step(fit)
    g = sum(f * p for f, p in zip(fit.tolist(), expected)) / 2.0  # 1/sqrt(N), N = 4
    torch.testing.assert_close(layer.weight.detach() - before, g, rtol=1e-5, atol=1e-6)
    assert m["epoch"] == 5 and m["sigma"] == 0.7 and s.epoch == 1


# -- property-based: the strategy's update against an einsum over reference factors --------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 6), n=st.integers(1, 6), r=st.integers(1, 4),
       weights=st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=8),
       antithetic=st.booleans(), seed=st.integers(0, 2**40), epoch=st.integers(0, 4))
def test_property_strategy_update_matches_einsum(device, m, n, r, weights, antithetic, seed, epoch):
    """With prenormalized weights w and plain SGD (lr = 1), one step moves an nn.Linear by
    exactly g = (1/sqrt(N)) sum_i w_i P_i, P_i from the reference noise stream."""
    import warnings

    from evotorch_eggroll import EggrollStrategy

    r = min(r, m, n)
    model = torch.nn.Linear(n, m).to(device)
    s = EggrollStrategy(sigma=0.5, lr=1.0, rank=r, optimizer="sgd", seed=seed,
                        antithetic=antithetic).setup(model)
    before = [p.detach().double().cpu().clone() for p in (model.weight, model.bias)]
    big_n = len(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # odd antithetic populations
        ctx = s.perturb(big_n, epoch)
    with ctx:
        pass
    s.step(torch.tensor(weights), prenormalized=True)
    idx, sign = reference.row_noise(torch.arange(big_n), antithetic)
    coef = torch.tensor(weights, dtype=torch.float64) * sign / math.sqrt(big_n)
    g_w = reference.lowrank_update(m, n, seed=seed, key=noise.param_key("weight"), epoch=epoch,
                                   rank=r, noise_indices=idx, coeffs=coef * 0.5 / math.sqrt(r))
    g_b = reference.dense_update(m, seed=seed, key=noise.param_key("bias"), epoch=epoch,
                                 noise_indices=idx, coeffs=coef * 0.5)
    k_eff = max(1, big_n)
    torch.testing.assert_close(model.weight.detach().double().cpu(), before[0] + g_w,
                               **tol(k_eff, r))
    torch.testing.assert_close(model.bias.detach().double().cpu(), before[1] + g_b,
                               **tol(k_eff, 1))


def test_update_launches_pass_the_constexprs_that_end_each_signature():
    """The update and normal-block launchers pass their constexprs positionally, after the
    runtime arguments: each kernel's signature must end with exactly these constexprs."""
    import inspect

    from evotorch_eggroll.kernels import dense_noise, normal_block, philox

    flag = "EPOCH_IN_MEMORY"
    for kernel, names in ((lowrank_update_kernel._factor_matrices_kernel, ("R", "BLOCK_E", flag)),
                          (dense_noise._dense_update_kernel, ("BLOCK_E", flag)),
                          (normal_block._normal_block_kernel, ("BLOCK_E", flag)),
                          (philox._philox_words_kernel, ("BLOCK_Q",))):
        params = list(inspect.signature(kernel.fn).parameters.values())
        constexprs = [p.name for p in params if "constexpr" in str(p.annotation)]
        assert tuple(constexprs) == names
        assert [p.name for p in params[-len(names):]] == constexprs
