"""Gradients through the perturbed forward.

Kernel tier: the backward of ``ops.perturbed_linear`` (dx through the mirrored low-rank
project/expand, dW and db the unperturbed gradients) against autograd through the explicit
float64 formula with reference factors, over odd shapes, member maps and antithetic on/off;
gradients accumulate over calls like any autograd op.
"""

from __future__ import annotations

import math

import pytest
import torch

from evotorch_eggroll import noise, ops, reference

SEED, EPOCH = 31, 2
W_KEY, B_KEY = noise.param_key("head.weight"), noise.param_key("head.bias")

SHAPES = [  # (m, n, rank, rows)
    (1, 1, 1, 1),
    (3, 7, 2, 5),
    (7, 3, 3, 9),
    (33, 6, 4, 4),
    (5, 33, 5, 3),
    pytest.param(1024, 4096, 16, 128, marks=pytest.mark.gpu),
    pytest.param(4096, 512, 64, 64, marks=pytest.mark.gpu),
]
from member_maps import MAPS, member_ids  # noqa: E402  (tests/ is on sys.path)

GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=5e-2, rtol=3e-2),
}


def explicit_grads(x, w, b, ids, grad_out, *, rank, sigma, antithetic):
    """Autograd through ``x (W + s sigma/sqrt(r) A0 B0^T)^T + b + s sigma eps`` in float64
    (:func:`evotorch_eggroll.reference.perturbed_linear`)."""
    xd, wd, bd = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    out = reference.perturbed_linear(xd, wd, bd, ids, seed=SEED, weight_key=W_KEY,
                                     bias_key=B_KEY, epoch=EPOCH, rank=rank, sigma=sigma,
                                     antithetic=antithetic)
    out.backward(grad_out.detach().double().cpu())
    return xd.grad, wd.grad, bd.grad


def tol(dtype, size):
    t = GRAD_TOL[dtype]
    scale = max(1.0, math.sqrt(size) / 8) if dtype == torch.float32 else 1.0
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def make(m, n, rows, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(m, n, generator=gen) / math.sqrt(n)).to(device, dtype).requires_grad_()
    b = torch.randn(m, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(rows, m, generator=gen).to(device, dtype)
    return x, w, b, g


def run(x, w, b, ids, *, rank, sigma, antithetic):
    return ops.perturbed_linear(x, w, b, ids, seed=SEED, weight_key=W_KEY, bias_key=B_KEY,
                                epoch=EPOCH, rank=rank, sigma=sigma, antithetic=antithetic)


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_backward_matches_explicit_formula(device, m, n, r, rows, kind, antithetic):
    x, w, b, g = make(m, n, rows, torch.float32, device)
    ids = member_ids(kind, rows, device)
    sigma = 0.5 / math.sqrt(n)
    run(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic).backward(g)
    gx, gw, gb = explicit_grads(x, w, b, ids, g, rank=r, sigma=sigma, antithetic=antithetic)
    torch.testing.assert_close(x.grad.cpu().double(), gx, **tol(torch.float32, m))
    torch.testing.assert_close(w.grad.cpu().double(), gw, **tol(torch.float32, rows))
    torch.testing.assert_close(b.grad.cpu().double(), gb, **tol(torch.float32, rows))


@pytest.mark.gpu
@pytest.mark.parametrize("antithetic", [True, False])
def test_backward_bf16(device, antithetic):
    m, n, r, rows = 512, 1024, 16, 64
    x, w, b, g = make(m, n, rows, torch.bfloat16, device)
    ids = member_ids("repeated", rows, device)
    sigma = 0.5 / math.sqrt(n)
    run(x, w, b, ids, rank=r, sigma=sigma, antithetic=antithetic).backward(g)
    assert x.grad.dtype == torch.bfloat16
    gx, gw, gb = explicit_grads(x, w, b, ids, g, rank=r, sigma=sigma, antithetic=antithetic)
    # bf16 grads are O(sqrt(size)): compare relative to their scale
    for got, want in ((x.grad, gx), (w.grad, gw), (b.grad, gb)):
        err = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert err < 2e-2


def test_gradients_accumulate_over_calls(device):
    """Two backward passes add up, and equal one pass over the concatenated batch."""
    m, n, r, rows = 4, 6, 2, 5
    x, w, b, g = make(m, n, rows, torch.float32, device)
    ids = torch.tensor([0, 1, 2, 3, 3], device=device)
    for part in (slice(0, 2), slice(2, rows)):
        run(x[part], w, b, ids[part], rank=r, sigma=0.3, antithetic=True).backward(g[part])
    acc = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    run(x, w, b, ids, rank=r, sigma=0.3, antithetic=True).backward(g)
    assert torch.equal(acc[0], x.grad)  # rows are independent: bit-equal
    torch.testing.assert_close(acc[1], w.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc[2], b.grad, atol=1e-6, rtol=1e-6)


def test_backward_only_for_inputs_that_need_it(device):
    m, n, r, rows = 3, 5, 2, 4
    x, w, b, g = make(m, n, rows, torch.float32, device)
    ids = torch.arange(rows, device=device)
    w.requires_grad_(False)
    b.requires_grad_(False)
    run(x, w, b, ids, rank=r, sigma=0.2, antithetic=False).backward(g)
    assert x.grad is not None and w.grad is None and b.grad is None
    x2 = x.detach()
    w.requires_grad_(True)
    run(x2, w, None, ids, rank=r, sigma=0.2, antithetic=False).backward(g)
    torch.testing.assert_close(w.grad, g.t() @ x2, atol=1e-6, rtol=1e-6)


def test_backward_noncontiguous_grad_and_leading_dims(device):
    """A (B, T, n) input with one member per leading row and an expanded output grad."""
    m, n, r = 4, 5, 3
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, n, generator=gen).to(device).requires_grad_()
    w = torch.randn(m, n, generator=gen).to(device).requires_grad_()
    ids = torch.tensor([6, 1, 6], device=device)
    out = ops.perturbed_linear(x, w, None, ids, seed=SEED, weight_key=W_KEY, bias_key=None,
                               epoch=EPOCH, rank=r, sigma=0.3, antithetic=True)
    g = torch.randn(1, 1, m, generator=gen).to(device).expand(3, 2, m)
    out.backward(g)
    xf = x.detach().reshape(6, n).requires_grad_()
    out_f = ops.perturbed_linear(xf, w.detach(), None, ids.repeat_interleave(2), seed=SEED,
                                 weight_key=W_KEY, bias_key=None, epoch=EPOCH, rank=r,
                                 sigma=0.3, antithetic=True)
    out_f.backward(g.reshape(6, m).contiguous())
    torch.testing.assert_close(x.grad.reshape(6, n), xf.grad, atol=1e-6, rtol=1e-6)


def test_backward_runs_later(device):
    """The backward uses its saved tensors and coordinates only: other perturbed calls
    (other coordinates, other members) may run between forward and backward."""
    m, n, r, rows = 3, 4, 2, 3
    x, w, b, g = make(m, n, rows, torch.float32, device)
    ids = torch.arange(rows, device=device)
    out = run(x, w, b, ids, rank=r, sigma=0.2, antithetic=True)
    ops.perturbed_linear(x.detach(), w.detach(), b.detach(), ids + 7, seed=SEED + 1,
                         weight_key=W_KEY, bias_key=B_KEY, epoch=EPOCH + 1, rank=1, sigma=1.0,
                         antithetic=False)
    gx, _, _ = explicit_grads(x, w, b, ids, g, rank=r, sigma=0.2, antithetic=True)
    out.backward(g)
    torch.testing.assert_close(x.grad.cpu().double(), gx, atol=1e-5, rtol=1e-5)


# -- strategy level: high-rank updates from accumulated low-rank perturbations ----------------------

import torch.nn as nn  # noqa: E402

from evotorch_eggroll import EggrollStrategy  # noqa: E402


def _update_rank(delta: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(delta.double(), atol=1e-6))


@pytest.mark.parametrize("population,rank,expected", [(2, 1, 1), (4, 1, 2), (8, 1, 4),
                                                      (4, 2, 4), (16, 2, 8)])
def test_one_update_has_rank_draws_times_r(device, population, rank, expected):
    """Each member's perturbation has rank r; the update sums N/2 mirrored draws, so its
    rank is min(N/2 * r, m, n) (generic fitnesses)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 10, bias=False).to(device)
    s = EggrollStrategy(sigma=0.1, lr=0.1, rank=rank, optimizer="sgd").setup(layer)
    before = layer.weight.detach().clone()
    with s.perturb(population) as pop:
        pop.batched_forward(layer, torch.randn(population, 8, device=device))
    s.step(torch.linspace(-1.0, 2.0, population) ** 3)
    assert _update_rank(layer.weight.detach() - before) == min(expected, 8)


def test_updates_accumulate_to_full_rank_over_steps(device):
    torch.manual_seed(0)
    layer = nn.Linear(6, 6, bias=False).to(device)
    s = EggrollStrategy(sigma=0.1, lr=0.1, rank=1, optimizer="sgd").setup(layer)
    start = layer.weight.detach().clone()
    ranks = []
    for step in range(3):
        with s.perturb(4) as pop:
            pop.batched_forward(layer, torch.randn(4, 6, device=device))
        s.step(torch.tensor([1.0, -1.0, 0.5, 2.0]) + step)
        ranks.append(_update_rank(layer.weight.detach() - start))
    assert ranks == [2, 4, 6]  # fresh noise every epoch (noise_reuse=1) adds new directions


def test_reused_noise_keeps_updates_in_one_low_rank_subspace(device):
    torch.manual_seed(0)
    layer = nn.Linear(6, 6, bias=False).to(device)
    s = EggrollStrategy(sigma=0.1, lr=0.1, rank=1, optimizer="sgd", noise_reuse=0).setup(layer)
    start = layer.weight.detach().clone()
    for step in range(3):
        with s.perturb(4) as pop:
            pop.batched_forward(layer, torch.randn(4, 6, device=device))
        s.step(torch.tensor([1.0, -1.0, 0.5, 2.0]) * (step + 1))
    assert _update_rank(layer.weight.detach() - start) == 2
