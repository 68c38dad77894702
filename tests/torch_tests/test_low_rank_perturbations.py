"""Low-rank and dense perturbations, per batch row.

Kernel tier: ``ops.lowrank_project``, ``ops.lowrank_expand_`` and ``ops.dense_noise_add_``
against the naive reference of ``evotorch_eggroll.reference`` (explicit formulas over
factors of the reference stream), over odd shapes, several
row-to-member maps and antithetic on/off; the factors the kernels use are exactly the
inspected ones; results do not depend on how rows are grouped into programs; the CPU
policy. CPU cases run through Triton's interpreter; ``gpu`` cases run at real sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from evotorch_eggroll import noise, ops, reference
from evotorch_eggroll.kernels import dense_noise, lowrank_expand, lowrank_project, philox
from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS, row_mask

SEED, KEY, BIAS_KEY, EPOCH = 2024, noise.param_key("net.0.weight"), noise.param_key("net.0.bias"), 3

# (m, n, rank, rows): CPU shapes are tiny and odd; GPU shapes are real layers.
SHAPES = [
    (1, 1, 1, 1),
    (3, 7, 2, 5),
    (7, 3, 3, 9),
    (5, 33, 4, 6),
    (33, 5, 5, 4),
    (4, 6, 4, 3),  # rank = min(m, n)
    (9, 17, 16, 7),
    pytest.param(1024, 4096, 16, 256, marks=pytest.mark.gpu),
    pytest.param(4096, 1024, 64, 32, marks=pytest.mark.gpu),
    pytest.param(4096, 4096, 1, 64, marks=pytest.mark.gpu),
    pytest.param(17, 256, 7, 4096, marks=pytest.mark.gpu),
]
from member_maps import MAPS, member_ids  # noqa: E402  (tests/ is on sys.path)


def tol(*sizes):
    """float32 tolerance: 1e-5 at small sizes, growing with the reduction length."""
    scale = max(1.0, math.sqrt(max(sizes)) / 8)
    return dict(atol=1e-5 * scale, rtol=1e-5 * scale)


def _case(data_seed: int, m: int, n: int, r: int, rows: int, kind: str, antithetic: bool, device):
    """A generator for the case's data, its member ids, the weight's factor layout and the
    noise arguments every op of the case takes."""
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, antithetic=antithetic)
    return (torch.Generator().manual_seed(data_seed), member_ids(kind, rows, device),
            noise.FactorLayout(m, n, r), common)


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_project_matches_explicit(device, m, n, r, rows, kind, antithetic):
    gen, ids, layout, common = _case(1, m, n, r, rows, kind, antithetic, device)
    for v, off in [(torch.randn(rows, n, generator=gen), layout.b_offset),  # x B0
                   (torch.randn(rows, m, generator=gen), layout.a_offset)]:  # g A0
        t = ops.lowrank_project(v.to(device), ids, row_offset=off, total_rows=layout.rows,
                                **common)
        assert t.shape == (rows, r) and t.dtype == torch.float32
        want = reference.lowrank_project(v, ids, row_offset=off, **common)
        torch.testing.assert_close(t.cpu().double(), want, **tol(v.shape[1]))


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_expand_matches_explicit(device, m, n, r, rows, kind, antithetic):
    gen, ids, layout, common = _case(2, m, n, r, rows, kind, antithetic, device)
    t = torch.randn(rows, r, generator=gen)
    base = torch.randn(rows, m, generator=gen)
    # through A0 (the forward), then the mirror through B0 (the backward)
    for start, off, scale in [(base, layout.a_offset, 0.3),
                              (base[:, :1].expand(rows, n), layout.b_offset, -1.5)]:
        out = start.to(device, copy=True)
        assert ops.lowrank_expand_(out, t.to(device), ids, row_offset=off, scale=scale,
                                   total_rows=layout.rows, **common) is out
        want = reference.lowrank_expand(start, t, ids, row_offset=off, scale=scale, **common)
        torch.testing.assert_close(out.cpu().double(), want, **tol(r))


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("antithetic", [True, False])
def test_expand_with_fused_bias_noise(device, m, n, r, rows, antithetic):
    gen = torch.Generator().manual_seed(3)
    ids = member_ids("shuffled", rows, device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, row_offset=n, scale=0.25,
                  antithetic=antithetic, bias_key=BIAS_KEY, bias_scale=0.5)
    t = torch.randn(rows, r, generator=gen)
    out = torch.zeros(rows, m, device=device)
    lowrank_expand.lowrank_expand_(out, t.to(device), ids, **common)
    want = reference.lowrank_expand(torch.zeros(rows, m), t, ids, **common)
    torch.testing.assert_close(out.cpu().double(), want, **tol(r))


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("part", ["right matmul", "output rows"])
def test_lowrank_branch_and_its_backward_match_the_reference(device, antithetic, part):
    """``ops.lowrank_branch`` (the low-rank term of ``x @ W`` or of a slice of a weight's
    output rows) and its gradient against autograd through the reference's project/expand."""
    m, n, r, rows = 5, 7, 3, 6
    layout = noise.FactorLayout(m, n, r)
    project, expand = ((layout.a_rows, layout.b_rows) if part == "right matmul"
                       else (layout.b_rows, layout.a_part(slice(1, 4))))
    gen = torch.Generator().manual_seed(8)
    ids = member_ids("shuffled", rows, device)
    v = torch.randn(rows, project.stop - project.start, generator=gen)
    g = torch.randn(rows, expand.stop - expand.start, generator=gen)
    vk = v.to(device, copy=True).requires_grad_()
    out = ops.lowrank_branch(vk, ids, seed=SEED, key=KEY, epoch=EPOCH, layout=layout,
                             project=project, expand=expand, sigma=0.3, antithetic=antithetic)
    out.backward(g.to(device))
    coords = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, antithetic=antithetic)
    vd = v.double().requires_grad_()
    t = reference.lowrank_project(vd, ids, row_offset=project.start, **coords)
    want = reference.lowrank_expand(torch.zeros(g.shape, dtype=torch.float64), t, ids,
                                    row_offset=expand.start, scale=0.3 / math.sqrt(r), **coords)
    want.backward(g.double())
    assert out.dtype == torch.float32 and out.shape == g.shape
    torch.testing.assert_close(out.detach().cpu().double(), want.detach(), **tol(m, n))
    torch.testing.assert_close(vk.grad.cpu().double(), vd.grad, **tol(m, n))


def test_lowrank_branch_rejects_rows_outside_the_factor_block(device):
    layout = noise.FactorLayout(4, 3, 2)
    ids = torch.arange(2, device=device)
    v = torch.zeros(2, 3, device=device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, layout=layout, sigma=0.1, antithetic=False)
    with pytest.raises(ValueError, match="factor block"):
        ops.lowrank_branch(v, ids, project=layout.b_rows, expand=slice(5, 9), **common)
    with pytest.raises(ValueError, match="columns"):
        ops.lowrank_branch(v, ids, project=layout.a_rows, expand=layout.b_rows, **common)
    with pytest.raises(TypeError, match="slice"):
        ops.lowrank_branch(v, ids, project=slice(0, 6, 2), expand=layout.a_rows, **common)


@pytest.mark.parametrize(
    "rows,d", [(1, 1), (4, 3), (9, 7), (6, 33), (5, 1030),
               pytest.param(4096, 4096, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_dense_noise_add_matches_reference(device, rows, d, kind, antithetic):
    ids = member_ids(kind, rows, device)
    base = torch.randn(rows, d, generator=torch.Generator().manual_seed(4))
    out = base.to(device, copy=True)
    common = dict(seed=SEED, key=BIAS_KEY, epoch=EPOCH, scale=0.7, antithetic=antithetic)
    assert ops.dense_noise_add_(out, ids, **common) is out
    want = reference.dense_noise_add(base, ids, **common)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "m,n,r",
    [(3, 5, 1), (7, 3, 3), (5, 9, 4), (6, 6, 6), (2, 33, 7),
     pytest.param(512, 1024, 16, marks=pytest.mark.gpu),
     pytest.param(255, 129, 64, marks=pytest.mark.gpu)],
)
def test_kernel_factors_equal_inspected_factors(device, m, n, r):
    """Projecting unit vectors reads the factors the forward uses: bit-equal to
    ``ops.lowrank_factors`` (the same stream helpers), and the expand writes them."""
    ids = torch.tensor([0, 2**31 + 3, 7], device=device)
    a0, b0 = ops.lowrank_factors(SEED, KEY, EPOCH, ids, m, n, r)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, total_rows=n + m, antithetic=False)
    for rows_of, d, off in [(b0, n, 0), (a0, m, n)]:
        for row in {0, d // 2, d - 1}:
            v = torch.zeros(3, d, device=device)
            v[:, row] = 1.0
            t = ops.lowrank_project(v, ids, row_offset=off, **common)
            assert torch.equal(t, rows_of[:, row, :])
        for k in {0, r - 1}:
            t = torch.zeros(3, r, device=device)
            t[:, k] = 1.0
            out = torch.zeros(3, d, device=device)
            ops.lowrank_expand_(out, t, ids, row_offset=off, scale=1.0, **common)
            assert torch.equal(out, rows_of[:, :, k])


@pytest.mark.parametrize("antithetic", [True, False])
def test_results_do_not_depend_on_rows_per_program(device, antithetic):
    """Each row's arithmetic is fixed by its own row: any grouping gives the same bits."""
    m, n, r, rows = 7, 33, 3, 13
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([4, 4, 5, 5, 5, 0, 9, 4, 1, 1, 2, 3, 3], device=device)
    x = torch.randn(rows, n, generator=gen).to(device)
    t = torch.randn(rows, r, generator=gen).to(device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, antithetic=antithetic)
    outs, ts, dense = [], [], []
    for block_rows in (1, 4, 16):
        ts.append(lowrank_project.lowrank_project(x, ids, row_offset=0, block_rows=block_rows,
                                                  **common))
        out = torch.zeros(rows, m, device=device)
        lowrank_expand.lowrank_expand_(out, t, ids, row_offset=n, scale=0.5,
                                       bias_key=BIAS_KEY, bias_scale=0.1,
                                       block_rows=block_rows, **common)
        outs.append(out)
        out = torch.zeros(rows, 37, device=device)
        dense_noise.dense_noise_add_(out, ids, seed=SEED, key=BIAS_KEY, epoch=EPOCH, scale=0.2,
                                     antithetic=antithetic, block_rows=block_rows)
        dense.append(out)
    for results in (ts, outs, dense):
        for other in results[1:]:
            assert torch.equal(results[0], other)


def test_large_member_ids_and_epochs(device):
    """Member ids past 2**31 (antithetic: up to 2**33 - 1) and large epochs stay exact."""
    m, n, r = 3, 5, 2
    ids = torch.tensor([2**31 - 1, 2**31, 2**32 + 1, 2**33 - 1], device=device)
    for antithetic, epoch in [(True, 2**31), (True, 2**32 - 1)]:
        idx = ids.cpu() // 2
        a0, b0 = noise.lowrank_factors(SEED, KEY, epoch, idx, m, n, r)
        v = torch.ones(4, n, device=device)
        t = ops.lowrank_project(v, ids, seed=SEED, key=KEY, epoch=epoch, rank=r, row_offset=0,
                                total_rows=n + m, antithetic=antithetic)
        torch.testing.assert_close(t.cpu(), b0.sum(1), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([2**31 - 1, 2**31, 2**32 - 1], device=device)  # non-antithetic
    a0, _ = noise.lowrank_factors(SEED, KEY, 7, ids.cpu(), m, n, r)
    out = torch.zeros(3, m, device=device)
    ops.lowrank_expand_(out, torch.ones(3, r, device=device), ids, seed=SEED, key=KEY, epoch=7,
                        rank=r, row_offset=n, total_rows=n + m, scale=1.0, antithetic=False)
    torch.testing.assert_close(out.cpu(), a0.sum(2), atol=1e-5, rtol=1e-5)


def test_noncontiguous_inputs(device):
    m, n, r, rows = 5, 7, 3, 4
    gen = torch.Generator().manual_seed(6)
    ids = torch.arange(rows, device=device)
    x = torch.randn(n, rows, generator=gen).to(device).t()  # column-major
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, total_rows=n + m, antithetic=True)
    t = ops.lowrank_project(x, ids, row_offset=0, **common)
    assert torch.equal(t, ops.lowrank_project(x.contiguous(), ids, row_offset=0, **common))
    xe = torch.randn(1, n, generator=gen).to(device).expand(rows, n)  # stride 0
    t = ops.lowrank_project(xe, ids, row_offset=0, **common)
    assert torch.equal(t, ops.lowrank_project(xe.contiguous(), ids, row_offset=0, **common))
    big = torch.zeros(rows, 2 * m, device=device)
    ops.lowrank_expand_(big[:, ::2], t, ids, row_offset=n, scale=1.0, **common)
    ref = torch.zeros(rows, m, device=device)
    ops.lowrank_expand_(ref, t, ids, row_offset=n, scale=1.0, **common)
    assert torch.equal(big[:, ::2], ref) and not big[:, 1::2].any()


def test_empty_batches(device):
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=2, total_rows=8, antithetic=True)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    t = ops.lowrank_project(torch.zeros(0, 5, device=device), ids, row_offset=0, **common)
    assert t.shape == (0, 2)
    out = torch.zeros(0, 3, device=device)
    ops.lowrank_expand_(out, t, ids, row_offset=5, scale=1.0, **common)
    ops.dense_noise_add_(out, ids, seed=0, key=0, epoch=0, scale=1.0, antithetic=False)


@triton.jit
def _row_mask_copy_kernel(src_ptr, dst_ptr, n_rows, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    mask = row_mask(col < D, row < n_rows)
    x = tl.load(src_ptr + row * D + col, mask=mask, other=-1.0)
    tl.store(dst_ptr + row * BLOCK + col, x + 1.0, mask=mask)


def test_row_mask_and_launch_options_work_on_the_installed_triton(device):
    """The one Triton-version-dependent piece (kernels/compat.py): a block mask restricted to
    one row by a scalar comparison is a valid load/store mask, and the launch options are
    accepted (compiled or interpreted, whatever Triton is installed)."""
    rows, d, block = 3, 5, 8
    src = torch.arange(rows * d, dtype=torch.float32, device=device).view(rows, d)
    dst = torch.zeros(rows + 2, block, device=device)  # two programs past the last row
    _row_mask_copy_kernel[(rows + 2,)](src, dst, rows, d, BLOCK=block, **LAUNCH_OPTIONS)
    expected = torch.zeros(rows + 2, block, device=device)
    expected[:rows, :d] = src + 1.0
    assert torch.equal(dst, expected)


@triton.jit
def _layout_probe_kernel(ids_ptr, index_ptr, out_ptr, n, m, ANTITHETIC: tl.constexpr,
                         BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)
    index, sign = philox.row_noise_index(ids_ptr, i, 1, i < BLOCK, ANTITHETIC)
    tl.store(index_ptr + i, index)
    in_b, in_a = philox.factor_block_part(i, n, m)
    probes = [sign + tl.zeros((BLOCK,), tl.float32), philox.factor_b_row(i),
              philox.factor_a_row(i, n), philox.factor_block_rows(n, m) + i * 0, in_b, in_a,
              philox.b0_row_of(i), philox.a0_row_of(i, n)]
    for k in tl.static_range(len(probes)):
        tl.store(out_ptr + k * BLOCK + i, probes[k].to(tl.float32))


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("m,n", [(3, 5), (6, 2)])
def test_device_layout_helpers_follow_noise_py(device, antithetic, m, n):
    """The device side of the noise layout (kernels/philox.py) agrees with its definition in
    evotorch_eggroll.noise: member -> noise index and sign, and the factor block's rows."""
    block = 16
    ids = torch.tensor([0, 1, 2, 3, 7, 8, 2**32 + 1, 2**33 - 1, 5, 4, 9, 10, 11, 12, 13, 14],
                       device=device)
    index = torch.zeros(block, dtype=torch.int64, device=device)
    out = torch.zeros(8, block, device=device)
    _layout_probe_kernel[(1,)](ids, index, out, n, m, ANTITHETIC=antithetic, BLOCK=block,
                               **LAUNCH_OPTIONS)
    out = out.cpu().double()
    idx, sign = noise.member_noise(ids.cpu(), antithetic)
    assert torch.equal(index.cpu(), idx) and torch.equal(out[0], sign.double())
    layout = noise.FactorLayout(m, n, 1)
    i = torch.arange(block, dtype=torch.float64)
    assert torch.equal(out[1], layout.b_offset + i) and torch.equal(out[2], layout.a_offset + i)
    assert torch.equal(out[3], torch.full((block,), float(layout.rows), dtype=torch.float64))
    rows = range(block)
    in_b = torch.tensor([float(r in range(layout.rows)[layout.b_rows]) for r in rows],
                        dtype=torch.float64)
    in_a = torch.tensor([float(r in range(layout.rows)[layout.a_rows]) for r in rows],
                        dtype=torch.float64)
    assert torch.equal(out[4], in_b) and torch.equal(out[5], in_a)
    assert torch.equal(out[6], i - layout.b_offset) and torch.equal(out[7], i - layout.a_offset)


def test_shape_and_dtype_errors(device):
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=2, total_rows=8, antithetic=False)
    ids = torch.arange(3, device=device)
    v = torch.zeros(3, 5, device=device)
    with pytest.raises(ValueError, match="member_ids"):
        ops.lowrank_project(v, ids[:2], row_offset=0, **common)
    with pytest.raises(TypeError, match="integer"):
        ops.lowrank_project(v, ids.float(), row_offset=0, **common)
    with pytest.raises(ValueError, match="factor block"):
        ops.lowrank_project(v, ids, row_offset=4, **common)
    with pytest.raises(ValueError, match="2-D"):
        ops.lowrank_project(v[0], ids, row_offset=0, **common)
    with pytest.raises(ValueError, match="rank"):
        ops.lowrank_project(v, ids, row_offset=0, **{**common, "rank": 0})
    with pytest.raises(ValueError, match="t must have shape"):
        ops.lowrank_expand_(torch.zeros(3, 3, device=device), torch.zeros(3, 4, device=device),
                            ids, row_offset=5, scale=1.0, **common)
    with pytest.raises(TypeError, match="floating"):
        ops.dense_noise_add_(torch.zeros(3, 3, dtype=torch.int32, device=device), ids, seed=0,
                             key=0, epoch=0, scale=1.0, antithetic=False)


def test_cpu_without_interpreter_raises(monkeypatch):
    """Without the interpreter, CPU tensors are refused before any kernel runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.interpreter_active()
    with pytest.raises(RuntimeError, match="CUDA") as info:
        ops.check_kernel_device(torch.zeros(1), "x")
    assert "GPU" in str(info.value) and "TRITON_INTERPRET=1" in str(info.value)
    assert 'backend="torch"' in str(info.value)  # the plain-torch opt-in
    ids = torch.zeros(2, dtype=torch.int64)
    calls = [
        lambda: ops.normal_block(0, 0, 0, ids, 4),
        lambda: ops.lowrank_factors(0, 0, 0, ids, 2, 3, 1),
        lambda: ops.lowrank_project(torch.zeros(2, 3), ids, seed=0, key=0, epoch=0, rank=1,
                                    row_offset=0, total_rows=5, antithetic=False),
        lambda: ops.lowrank_expand_(torch.zeros(2, 2), torch.zeros(2, 1), ids, seed=0, key=0,
                                    epoch=0, rank=1, row_offset=3, total_rows=5, scale=1.0,
                                    antithetic=False),
        lambda: ops.dense_noise_add_(torch.zeros(2, 2), ids, seed=0, key=0, epoch=0, scale=1.0,
                                     antithetic=False),
        lambda: ops.perturbed_linear(torch.zeros(2, 3), torch.zeros(2, 3), None, ids, seed=0,
                                     weight_key=0, bias_key=None, epoch=0, rank=1, sigma=0.1,
                                     antithetic=False),
        lambda: ops.lowrank_update(2, 3, seed=0, key=0, epoch=0, rank=1, noise_indices=ids,
                                   coeffs=torch.zeros(2)),
        lambda: ops.dense_update(4, seed=0, key=0, epoch=0, noise_indices=ids,
                                 coeffs=torch.zeros(2)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="GPU"):
            call()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.interpreter_active()
    ops.check_kernel_device(torch.zeros(1), "x")


# -- strategy level: the perturbations a strategy applies -------------------------------------------

import torch.nn as nn  # noqa: E402

from evotorch_eggroll import EggrollStrategy, OpenESStrategy  # noqa: E402


@pytest.mark.parametrize("m,n,r", [(6, 5, 1), (6, 5, 2), (8, 3, 3), (4, 6, 4)])  # r = min(m, n) too
def test_strategy_weight_perturbations_have_rank_r(device, m, n, r):
    layer = nn.Linear(n, m).to(device)
    s = EggrollStrategy(sigma=0.3, rank=r).setup(layer)
    for member in (0, 1, 5):
        p = s._sample_perturbation(layer.weight, member, 0)
        a, b = p.factors
        assert a.shape == (m, r) and b.shape == (n, r)
        assert int(torch.linalg.matrix_rank(p.as_matrix().double(), atol=1e-5)) == min(r, m, n)
        stats = p.storage_stats()
        assert stats["low_rank_elements"] == r * (m + n) and stats["full_rank_elements"] == m * n


def test_strategy_perturbation_scale_is_sigma_per_entry(device):
    """P = sigma/sqrt(r) A0 B0^T has entries of variance sigma^2 whatever the rank."""
    layer = nn.Linear(32, 32, bias=False).to(device)
    for r in (1, 4):
        s = EggrollStrategy(sigma=0.5, rank=r, antithetic=False).setup(layer)
        mats = torch.stack([p.as_matrix() for p in s.sample_perturbations(layer.weight, 64, 0)])
        assert float(mats.pow(2).mean()) == pytest.approx(0.25, rel=0.15)
        assert abs(float(mats.mean())) < 0.05


def test_strategy_biases_and_openes_use_dense_noise(device):
    layer = nn.Linear(5, 4).to(device)
    s = EggrollStrategy(sigma=0.2).setup(layer)
    bias = s._sample_perturbation(layer.bias, 0, 0)
    assert bias.rank is None and bias.factors.shape == (4,)
    assert bias.storage_stats()["savings_ratio"] == 1.0
    o = OpenESStrategy(sigma=0.2).setup(layer)
    dense = o._sample_perturbation(layer.weight, 0, 0)
    assert dense.rank is None and dense.factors.shape == (4, 5)
    assert int(torch.linalg.matrix_rank(dense.as_matrix().double())) == 4


def test_strategy_conv_weights_are_low_rank_over_out_by_in_times_kernel(device):
    conv = nn.Conv2d(3, 4, 3).to(device)
    s = EggrollStrategy(rank=2).setup(conv)
    p = s._sample_perturbation(conv.weight, 1, 0)
    a, b = p.factors
    assert a.shape == (4, 2) and b.shape == (27, 2)
    assert p.as_matrix().shape == conv.weight.shape
    assert int(torch.linalg.matrix_rank(p.as_matrix().reshape(4, 27).double(), atol=1e-5)) == 2


def test_batched_forward_adds_a_rank_r_term_per_member(device):
    """All rows of one member: out - base = X P^T has rank r (no bias noise here)."""
    layer = nn.Linear(7, 6, bias=False).to(device)
    s = EggrollStrategy(sigma=0.4, rank=2).setup(layer)
    x = torch.randn(10, 7, device=device)
    with s.perturb(4) as pop:
        out = pop.batched_forward(layer, x, member_ids=torch.full((10,), 3, device=device))
    delta = (out - layer(x)).detach().double()
    assert int(torch.linalg.matrix_rank(delta, atol=1e-4)) == 2


def _assert_agree(a, b, device, *sizes):
    """Bit-equal in the interpreter; within float32 rounding once compiled."""
    if device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, **tol(*sizes))


def _drawn(seed, key, epoch, indices, rows, r, device):
    """Factor blocks ``(K, rows, r)`` (or ``(K, rows)`` with ``r=None``) as a cache holds them."""
    idx = torch.tensor(list(indices), dtype=torch.int64, device=device)
    width = rows * (r or 1)
    block = ops.normal_block(seed, key, epoch, idx, width)
    return block.view(len(indices), rows, r) if r else block


@pytest.mark.parametrize("m,n,r,rows", SHAPES)
@pytest.mark.parametrize("kind,antithetic", MAPS)
def test_drawn_factors_give_the_generated_results(device, m, n, r, rows, kind, antithetic):
    """Project and expand read drawn factors (a cache of noise indices ``base..``) and give
    what in-kernel generation gives: the same tiles through the same code (bit for bit in
    the interpreter; the compiled variants may contract multiply-adds differently)."""
    gen = torch.Generator().manual_seed(11)
    ids = member_ids(kind, rows, device)
    idx = ids // 2 if antithetic else ids
    base = int(idx.min())
    indices = range(base, int(idx.max()) + 3)  # a few indices past the last one used
    block = _drawn(SEED, KEY, EPOCH, indices, n + m, r, device)
    bias = _drawn(SEED, BIAS_KEY, EPOCH, indices, m, None, device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=r, total_rows=n + m,
                  antithetic=antithetic)
    for v, off in [(torch.randn(rows, n, generator=gen), 0), (torch.randn(rows, m, generator=gen), n)]:
        v = v.to(device)
        drawn = ops.lowrank_project(v, ids, row_offset=off, cache=(block, base), **common)
        _assert_agree(drawn, ops.lowrank_project(v, ids, row_offset=off, **common), device, m, n)
    t = torch.randn(rows, r, generator=gen).to(device)
    out = torch.randn(rows, m, generator=gen).to(device)
    generated = out.clone()
    lowrank_expand.lowrank_expand_(generated, t, ids, row_offset=n, scale=0.7, bias_key=BIAS_KEY,
                                   bias_scale=0.2, **{k: v for k, v in common.items()
                                                      if k != "total_rows"})
    drawn = out.clone()
    lowrank_expand.lowrank_expand_(drawn, t, ids, row_offset=n, scale=0.7, bias_key=BIAS_KEY,
                                   bias_scale=0.2, cache=(block, base), bias_cache=(bias, base),
                                   **{k: v for k, v in common.items() if k != "total_rows"})
    _assert_agree(drawn, generated, device, m, n)
    assert not torch.equal(drawn, out)  # the noise was added


def test_drawn_factor_cache_is_checked(device):
    """A cache of the wrong shape, dtype or device is refused before any launch."""
    ids = torch.tensor([0, 1], device=device)
    v = torch.randn(2, 5, device=device)
    common = dict(seed=SEED, key=KEY, epoch=EPOCH, rank=2, row_offset=0, total_rows=8,
                  antithetic=True)
    good = _drawn(SEED, KEY, EPOCH, range(0, 1), 8, 2, device)
    for bad in (good[:, :7], good.double(), good.transpose(1, 2)):
        with pytest.raises(ValueError, match="cache"):
            ops.lowrank_project(v, ids, cache=(bad, 0), **common)
    with pytest.raises(ValueError, match="base"):
        ops.lowrank_project(v, ids, cache=(good, -1), **common)
