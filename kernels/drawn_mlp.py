"""A whole perturbed MLP from drawn factors, in one launch (narrow policies).

For ``nn.Sequential(Linear, act, Linear, act, ..., Linear[, act])`` with every layer's
factors drawn beforehand (see :mod:`drawn_linear` for one layer), a program owns
``BLOCK_M`` batch rows and runs them through up to :data:`MAX_LAYERS` layers:

``h_{l+1}[j] = act_l(h_l[j] W_l^T + b_l + s_j scale (h_l[j] B0_lk) A0_lk^T + s_j bias_scale eps_lk)``

with ``k`` row ``j``'s noise index. Each layer is computed exactly as :mod:`drawn_linear`
computes it (output features in chunks of ``BLOCK_N``, input features in chunks of
``BLOCK_K``); the hidden activations go through a per-row scratch buffer that the program
itself writes and reads back after a barrier, so they stay in the L1/L2 caches instead of
making a round trip through memory between launches. For the RL policies of
neuroevolution (a few layers of at most a few hundred features) this replaces two
launches per layer (the layer and its activation) by one launch for the whole network.
Each row's arithmetic depends only on that row.

Factor layout: each layer's drawn block is the factor block of
``evotorch_eggroll.noise.FactorLayout`` (``(N_IN + M_OUT) * R`` elements per noise index,
``B0`` row ``i`` at block row ``i``, ``A0`` row ``i`` at block row ``N_IN + i``), the layout
that the device helpers of :mod:`evotorch_eggroll.kernels.philox` (``factor_block_rows``,
``factor_b_row``, ``factor_a_row``) spell for every other kernel. This kernel writes those
offsets inline: it runs at its register budget, and routing its addresses
through the helpers (the same arithmetic) changes ptxas's register allocation and
instruction count for sm_90 (``scripts/sm90_compile_check.py --only drawn_mlp``), so the
code is kept as it was measured. ``tests/torch_tests/test_fused_mlp.py`` checks its results
against each member's materialised network.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS, dependent_launch, wait_for_previous
from evotorch_eggroll.kernels.philox import device_guard, next_power_of_2, row_noise_index

try:  # the device's own tanh (the one torch uses); Triton's interpreter lacks it
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover - every supported Triton has it
    _libdevice = None

MAX_FEATURES = 512
MAX_LAYERS = 4
# networks whose widths are all at most this keep the activations in registers
REGS_MAX_FEATURES = 64
# 32 rows on 4 warps; at rank 1, at most 128 registers per thread (four programs per SM;
# H200, CartPole policy: 8.7 / 52.6 / 193 us per call at 4,096 / 65,536 / 262,144 rows,
# against 10.8 / 54.7 / 204 for 64 rows row-major with 255 registers). Higher ranks keep
# every factor in flight and would spill under that cap (sm_90 compile: 238 registers at
# rank 2, 250 at rank 4, no spills uncapped), so they run uncapped.
REGS_BLOCK_M = 32
REGS_NUM_WARPS = 4
REGS_MAXNREG: Optional[int] = 128
# float32 products on the CUDA cores instead of the tensor cores (``_layer_regs``' FMA) for
# a first layer with at most REGS_FMA_MAX_INPUTS inputs and for any other layer with at most
# REGS_FMA_MAX_OUTPUTS outputs (the CartPole policy's 4 -> 64 and 64 -> 2; counts padded to
# powers of two); 0 turns either off
REGS_FMA_MAX_INPUTS = 16
REGS_FMA_MAX_OUTPUTS = 4
# wider networks: output features in chunks of BLOCK_N, input features in chunks of BLOCK_K;
# BLOCK_M rows per program, SMALL_BLOCK_M up to SMALL_ROWS rows (more programs)
BLOCK_M = 64
SMALL_BLOCK_M = 16
SMALL_ROWS = 8192
BLOCK_N_MAX = 64
BLOCK_K_MAX = 64
NUM_WARPS = 4
# tl.dot precision of float32 products when TF32 is off: "tf32x3" (three TF32 tensor-core
# products per product, float32 accuracy) measured 2-3x faster than "ieee" (CUDA-core FMAs)
FLOAT32_PRECISION = "tf32x3"

# Activation codes (the ``ACT`` constexpr of a layer).
IDENTITY, TANH, RELU, SIGMOID = 0, 1, 2, 3


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) from 0.25 up; below it, where 1 - e
    # cancels, the odd series to x^9 (relative error below 1e-8 there). On the GPU the
    # quotient is the hardware's fast division (about 2 ulp): the device's own tanh branches
    # per element and took a tenth of the policy kernel's time
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # -2 / ln 2
    if LIBDEVICE:
        big = _libdevice.fast_dividef(1.0 - e, 1.0 + e)
    else:
        big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0
                                                                   + x2 * (62.0 / 2835.0)))))
    y = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -y, y)


@triton.jit
def _activate(v, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    if ACT == 1:
        v = _tanh(v, LIBDEVICE)
    elif ACT == 2:
        v = tl.maximum(v, 0.0)
    elif ACT == 3:
        v = tl.sigmoid(v)
    return v


@triton.jit
def _layer(
    src_ptr, stride_sm, stride_sk, dst_ptr, stride_dm, stride_dn,
    rows, row_ok, rel, sign,
    w_ptr, stride_wm, stride_wk, b_ptr, f_ptr, e_ptr,
    N_IN, M_OUT, scale, bias_scale,
    R: tl.constexpr, RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHT_NOISE: tl.constexpr,
    BIAS_NOISE: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """One layer for the program's rows: reads ``src`` (rows, N_IN), writes ``dst``."""
    block = rel * ((N_IN + M_OUT) * R)  # (BLOCK_M,) start of each row's factors
    rk = tl.arange(0, RP)
    n0 = M_OUT * 0
    t = tl.zeros((BLOCK_M, RP), dtype=tl.float32)  # x B0 of each row, summed once
    if WEIGHT_NOISE:
        k0 = N_IN * 0
        while k0 < N_IN:
            ks = k0 + tl.arange(0, BLOCK_K)
            xk_mask = row_ok[:, None] & (ks < N_IN)[None, :]
            x = tl.load(src_ptr + rows[:, None] * stride_sm + ks[None, :] * stride_sk,
                        mask=xk_mask, other=0.0).to(tl.float32)
            for r in tl.static_range(R):
                b0 = tl.load(f_ptr + block[:, None] + ks[None, :] * R + r, mask=xk_mask,
                             other=0.0)
                part = tl.sum(x * b0, axis=1)
                t += tl.where(rk[None, :] == r, part[:, None], 0.0)
            k0 += BLOCK_K
    while n0 < M_OUT:  # a while loop: runtime loop bounds trip Triton's interpreter
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M_OUT
        out_mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k0 = N_IN * 0
        while k0 < N_IN:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < N_IN
            x = tl.load(src_ptr + rows[:, None] * stride_sm + ks[None, :] * stride_sk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_wm + ks[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            k0 += BLOCK_K
        if WEIGHT_NOISE:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r in tl.static_range(R):
                a0 = tl.load(f_ptr + block[:, None] + (N_IN + cols)[None, :] * R + r,
                             mask=out_mask, other=0.0)
                t_r = tl.sum(tl.where(rk[None, :] == r, t, 0.0), axis=1)
                low += a0 * t_r[:, None]
            acc += low * (sign * scale)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if BIAS_NOISE:
            eps = tl.load(e_ptr + rel[:, None] * M_OUT + cols[None, :], mask=out_mask,
                          other=0.0)
            acc += (sign * bias_scale)[:, None] * eps
        acc = _activate(acc, ACT, LIBDEVICE)
        tl.store(dst_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                 acc.to(dst_ptr.dtype.element_ty), mask=out_mask)
        n0 += BLOCK_N


@triton.jit
def _drawn_mlp_kernel(
    x_ptr, stride_xm, stride_xk, out_ptr, stride_om, stride_on,
    s0_ptr, s1_ptr, stride_s,
    ids_ptr, stride_ids, n_rows, base, scale, bias_scale,
    w0, sw0m, sw0k, b0, f0, e0, w1, sw1m, sw1k, b1, f1, e1,
    w2, sw2m, sw2k, b2, f2, e2, w3, sw3m, sw3k, b3, f3, e3,
    D0, D1, D2, D3, D4,
    LAYERS: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BLOCK_M: tl.constexpr,
    BN0: tl.constexpr, BK0: tl.constexpr, HB0: tl.constexpr, WN0: tl.constexpr,
    BZ0: tl.constexpr, ACT0: tl.constexpr,
    BN1: tl.constexpr, BK1: tl.constexpr, HB1: tl.constexpr, WN1: tl.constexpr,
    BZ1: tl.constexpr, ACT1: tl.constexpr,
    BN2: tl.constexpr, BK2: tl.constexpr, HB2: tl.constexpr, WN2: tl.constexpr,
    BZ2: tl.constexpr, ACT2: tl.constexpr,
    BN3: tl.constexpr, BK3: tl.constexpr, HB3: tl.constexpr, WN3: tl.constexpr,
    BZ3: tl.constexpr, ACT3: tl.constexpr,
    ANTITHETIC: tl.constexpr, PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    index, sign = row_noise_index(ids_ptr, rows, stride_ids, row_ok, ANTITHETIC)
    sign = sign + tl.zeros((BLOCK_M,), tl.float32)  # (BLOCK_M,) also when it is a scalar
    rel = index - base
    # layer l reads the input (l = 0) or scratch l % 2 and writes the output (last layer)
    # or scratch (l + 1) % 2; a barrier makes a layer's writes visible to the next one
    if LAYERS == 1:
        _layer(x_ptr, stride_xm, stride_xk, out_ptr, stride_om, stride_on, rows, row_ok, rel,
               sign, w0, sw0m, sw0k, b0, f0, e0, D0, D1, scale, bias_scale, R, RP, BLOCK_M,
               BN0, BK0, HB0, WN0, BZ0, ACT0, PRECISION, LIBDEVICE)
    else:
        _layer(x_ptr, stride_xm, stride_xk, s1_ptr, stride_s, 1, rows, row_ok, rel,
               sign, w0, sw0m, sw0k, b0, f0, e0, D0, D1, scale, bias_scale, R, RP, BLOCK_M,
               BN0, BK0, HB0, WN0, BZ0, ACT0, PRECISION, LIBDEVICE)
        tl.debug_barrier()
        if LAYERS == 2:
            _layer(s1_ptr, stride_s, 1, out_ptr, stride_om, stride_on, rows, row_ok, rel,
                   sign, w1, sw1m, sw1k, b1, f1, e1, D1, D2, scale, bias_scale, R, RP,
                   BLOCK_M, BN1, BK1, HB1, WN1, BZ1, ACT1, PRECISION, LIBDEVICE)
        else:
            _layer(s1_ptr, stride_s, 1, s0_ptr, stride_s, 1, rows, row_ok, rel,
                   sign, w1, sw1m, sw1k, b1, f1, e1, D1, D2, scale, bias_scale, R, RP,
                   BLOCK_M, BN1, BK1, HB1, WN1, BZ1, ACT1, PRECISION, LIBDEVICE)
            tl.debug_barrier()
            if LAYERS == 3:
                _layer(s0_ptr, stride_s, 1, out_ptr, stride_om, stride_on, rows, row_ok,
                       rel, sign, w2, sw2m, sw2k, b2, f2, e2, D2, D3, scale, bias_scale, R,
                       RP, BLOCK_M, BN2, BK2, HB2, WN2, BZ2, ACT2, PRECISION, LIBDEVICE)
            else:
                _layer(s0_ptr, stride_s, 1, s1_ptr, stride_s, 1, rows, row_ok,
                       rel, sign, w2, sw2m, sw2k, b2, f2, e2, D2, D3, scale, bias_scale, R,
                       RP, BLOCK_M, BN2, BK2, HB2, WN2, BZ2, ACT2, PRECISION, LIBDEVICE)
                tl.debug_barrier()
                _layer(s1_ptr, stride_s, 1, out_ptr, stride_om, stride_on, rows, row_ok,
                       rel, sign, w3, sw3m, sw3k, b3, f3, e3, D3, D4, scale, bias_scale, R,
                       RP, BLOCK_M, BN3, BK3, HB3, WN3, BZ3, ACT3, PRECISION, LIBDEVICE)


@triton.jit
def _tf32_part(x):
    """``x`` rounded to TF32 (10 mantissa bits, to nearest, ties away from zero; inf stays
    inf, a NaN stays NaN unless its payload lies only in the 13 dropped bits): the leading
    part of the three-product split of a float32 operand."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _layer_regs(
    h, x_ptr, stride_xm, stride_xk, rows, row_ok, rel, sign, w_ptr, stride_wm, stride_wk,
    b_ptr, f_ptr, e_ptr, N_IN, M_OUT, scale, bias_scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, PIN: tl.constexpr, POUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_NOISE: tl.constexpr, BIAS_NOISE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr, FMA: tl.constexpr,
):
    """One layer on a feature-major register tile: ``h (PIN, BLOCK_M)`` (feature, row) ->
    ``(POUT, BLOCK_M)``. Rows of ``h`` past ``N_IN`` may hold anything: the weight and
    factor loads mask them. The product is ``W h`` (the weight as the first operand), so
    that neither operand is held in registers in the tensor cores' operand layout.

    ``FMA`` picks how the product is computed: 0 on the tensor cores (``PRECISION``); in
    float32 on the CUDA cores, 1 as one sum over the input features per output (a layer
    with few outputs), 2 as one rank-1 update per input feature, its column read from
    ``x_ptr`` (rows ``rows``, strides ``stride_xm``, ``stride_xk``; the first layer, few
    inputs). Tensor-core products pad such layers to 16 features and convert their operands
    through shared memory, with barriers; these need neither."""
    ks = tl.arange(0, PIN)
    cols = tl.arange(0, POUT)
    k_ok = ks < N_IN
    col_ok = cols < M_OUT
    out_mask = col_ok[:, None] & row_ok[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_wm + ks[None, :] * stride_wk  # (POUT, PIN): W
    w_ok = col_ok[:, None] & k_ok[None, :]
    if FMA == 2:  # the input's columns: a rank-1 update of the accumulator per input
        acc = tl.zeros((POUT, BLOCK_M), dtype=tl.float32)
        for k in tl.static_range(PIN):
            # block-shaped masks: a scalar one is refused by newer Triton interpreters
            x_ok = row_ok & (tl.full(row_ok.shape, k, tl.int32) < N_IN)
            xk = tl.load(x_ptr + rows * stride_xm + k * stride_xk, mask=x_ok,
                         other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + cols * stride_wm + k * stride_wk,
                         mask=col_ok & (tl.full(cols.shape, k, tl.int32) < N_IN), other=0.0)
            acc += wk[:, None] * xk[None, :]
    elif FMA:  # few outputs: one sum over the input features per output
        acc = tl.zeros((POUT, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(POUT):
            wj = tl.load(w_ptr + j * stride_wm + ks * stride_wk,
                         mask=k_ok & (tl.full(ks.shape, j, tl.int32) < M_OUT), other=0.0)
            acc = tl.where(cols[:, None] == j, tl.sum(wj[:, None] * h, axis=0)[None, :], acc)
    elif PRECISION == "tf32x3":
        # the three TF32 products written out, W loaded again (from L1) for each one, so that
        # W and its two parts are never all live at once (Triton's own tf32x3 holds them all
        # and spills under the register cap)
        h_big = _tf32_part(h)
        h_small = h - h_big
        acc = tl.dot(_tf32_part(tl.load(w_ptrs, mask=w_ok, other=0.0)), h_small,
                     input_precision="tf32")
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        acc = tl.dot(w - _tf32_part(w), h_big, acc, input_precision="tf32")
        # an infinite operand's remainder is NaN: the small products then count as 0 (as in
        # Triton's own split), and the product of the leading parts carries inf and NaN
        acc = tl.where(acc == acc, acc, 0.0)
        acc = tl.dot(_tf32_part(tl.load(w_ptrs, mask=w_ok, other=0.0)), h_big, acc,
                     input_precision="tf32")
    else:
        acc = tl.dot(tl.load(w_ptrs, mask=w_ok, other=0.0), h, input_precision=PRECISION)
    if WEIGHT_NOISE:
        block = rel * ((N_IN + M_OUT) * R)
        for r in tl.static_range(R):
            b0 = tl.load(f_ptr + block[None, :] + ks[:, None] * R + r,
                         mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            t_r = tl.sum(h * b0, axis=0) * (sign * scale)  # (BLOCK_M,)
            a0 = tl.load(f_ptr + block[None, :] + (N_IN + cols)[:, None] * R + r,
                         mask=out_mask, other=0.0)
            acc += a0 * t_r[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if BIAS_NOISE:
        eps = tl.load(e_ptr + rel[None, :] * M_OUT + cols[:, None], mask=out_mask, other=0.0)
        acc += (sign * bias_scale)[None, :] * eps
    return _activate(acc, ACT, LIBDEVICE)


@triton.jit
def _drawn_mlp_regs_kernel(
    x_ptr, stride_xm, stride_xk, out_ptr, stride_om, stride_on,
    ids_ptr, stride_ids, n_rows, base, scale, bias_scale,
    w0, sw0m, sw0k, b0, f0, e0, w1, sw1m, sw1k, b1, f1, e1,
    w2, sw2m, sw2k, b2, f2, e2, w3, sw3m, sw3k, b3, f3, e3,
    D0, D1, D2, D3, D4, n_out,
    LAYERS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
    HB0: tl.constexpr, WN0: tl.constexpr, BZ0: tl.constexpr, ACT0: tl.constexpr,
    HB1: tl.constexpr, WN1: tl.constexpr, BZ1: tl.constexpr, ACT1: tl.constexpr,
    HB2: tl.constexpr, WN2: tl.constexpr, BZ2: tl.constexpr, ACT2: tl.constexpr,
    HB3: tl.constexpr, WN3: tl.constexpr, BZ3: tl.constexpr, ACT3: tl.constexpr,
    PL: tl.constexpr, ANTITHETIC: tl.constexpr, PRECISION: tl.constexpr,
    LIBDEVICE: tl.constexpr, OFF32: tl.constexpr, ARGMAX: tl.constexpr,
    FM0: tl.constexpr, FM1: tl.constexpr, FM2: tl.constexpr, FM3: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The whole network with the activations in registers (every width at most
    ``REGS_MAX_FEATURES``), feature-major (a program's activations are a ``(features,
    BLOCK_M)`` tile): no scratch, no barriers. ``OFF32``: every factor and bias-noise block
    has fewer than 2**31 elements, so offsets into them fit 32 bits (fewer address
    instructions than 64-bit ones). ``ARGMAX``: ``out`` is ``(rows,)`` int64 and receives
    the index of each row's largest output, as ``torch.argmax`` picks it (the first of equal
    values; a NaN counts as larger than everything, the first NaN wins). ``FM0``..``FM3``:
    how each layer computes its product (``_layer_regs``' ``FMA``). ``PDL``: launched as a
    programmatic dependent launch (see ``compat.dependent_launch``)."""
    wait_for_previous(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    index, sign = row_noise_index(ids_ptr, rows, stride_ids, row_ok, ANTITHETIC)
    sign = sign + tl.zeros((BLOCK_M,), tl.float32)
    rel = index - base
    if OFF32:
        rel = rel.to(tl.int32)
    ks = tl.arange(0, P0)
    h = tl.load(x_ptr + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                mask=row_ok[None, :] & (ks < D0)[:, None], other=0.0).to(tl.float32)
    h = _layer_regs(h, x_ptr, stride_xm, stride_xk, rows, row_ok, rel, sign, w0, sw0m, sw0k,
                    b0, f0, e0, D0, D1, scale, bias_scale, R, BLOCK_M, P0, P1, HB0, WN0, BZ0,
                    ACT0, PRECISION, LIBDEVICE, FM0)
    if LAYERS > 1:
        h = _layer_regs(h, x_ptr, stride_xm, stride_xk, rows, row_ok, rel, sign, w1, sw1m,
                        sw1k, b1, f1, e1, D1, D2, scale, bias_scale, R, BLOCK_M, P1, P2,
                        HB1, WN1, BZ1, ACT1, PRECISION, LIBDEVICE, FM1)
    if LAYERS > 2:
        h = _layer_regs(h, x_ptr, stride_xm, stride_xk, rows, row_ok, rel, sign, w2, sw2m,
                        sw2k, b2, f2, e2, D2, D3, scale, bias_scale, R, BLOCK_M, P2, P3,
                        HB2, WN2, BZ2, ACT2, PRECISION, LIBDEVICE, FM2)
    if LAYERS > 3:
        h = _layer_regs(h, x_ptr, stride_xm, stride_xk, rows, row_ok, rel, sign, w3, sw3m,
                        sw3k, b3, f3, e3, D3, D4, scale, bias_scale, R, BLOCK_M, P3, P4,
                        HB3, WN3, BZ3, ACT3, PRECISION, LIBDEVICE, FM3)
    cols = tl.arange(0, PL)
    if ARGMAX:
        valid = (cols < n_out)[:, None]
        nan = (h != h) & valid
        first_nan = tl.min(tl.where(nan, cols[:, None], PL), axis=0)
        top = tl.argmax(tl.where(valid & ~nan, h, float("-inf")), axis=0,
                        tie_break_left=True)
        pick = tl.where(first_nan < PL, first_nan, top)
        tl.store(out_ptr + rows * stride_om, pick.to(tl.int64), mask=row_ok)
    else:
        tl.store(out_ptr + rows[None, :] * stride_om + cols[:, None] * stride_on, h,
                 mask=row_ok[None, :] & (cols < n_out)[:, None])


class Layer:
    """One layer of :func:`drawn_mlp`: ``weight (m, n)``, optional ``bias (m,)``, the drawn
    ``(block, base)`` caches of its factors (None: no weight noise) and bias noise (None:
    none), and the activation code applied to its output."""

    __slots__ = ("weight", "bias", "cache", "bias_cache", "act")

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 cache: Optional[tuple[torch.Tensor, int]],
                 bias_cache: Optional[tuple[torch.Tensor, int]], act: int) -> None:
        self.weight, self.bias, self.cache, self.bias_cache, self.act = (
            weight, bias, cache, bias_cache, act)


def fits(widths: Sequence[int]) -> bool:
    """Whether a network with these feature counts (input, hidden..., output) takes this
    kernel."""
    return len(widths) >= 2 and all(0 < w <= MAX_FEATURES for w in widths)


def _block_sizes(n: int, m: int) -> tuple[int, int]:
    return (min(BLOCK_N_MAX, max(16, next_power_of_2(m))),
            min(BLOCK_K_MAX, max(16, next_power_of_2(n))))


def drawn_mlp(
    x: torch.Tensor,
    layers: Sequence[Layer],
    member_ids: torch.Tensor,
    *,
    rank: int,
    scale: float,
    bias_scale: float,
    antithetic: bool,
    precision: str,
    argmax: bool = False,
) -> torch.Tensor:
    """``x (rows, n0)`` float32 through the perturbed layers: ``(rows, m_last)`` float32, or
    with ``argmax`` the ``(rows,)`` int64 index of each row's largest output (as
    ``torch.argmax(out, dim=1)`` picks it), computed in the same launch when the network
    runs in registers.

    Args:
        x: ``(rows, n0)`` input, any strides.
        layers: the network's layers in order (see :class:`Layer`); every cache must start
            at the same noise index and hold every row's noise index; more than
            :data:`MAX_LAYERS` layers take one launch per group of that many.
        member_ids: ``(rows,)`` integer member of each row.
        rank: factor rank ``R``.
        scale: multiplier of the low-rank term (``sigma / sqrt(R)``).
        bias_scale: multiplier of the bias noise (``sigma``).
        antithetic: members ``2k``, ``2k + 1`` share noise index ``k``, signs ``+1``/``-1``.
        precision: ``"ieee"`` or ``"tf32"`` for the base products.
        argmax: return the index of each row's largest output instead of the outputs.
    """
    if not layers:
        raise ValueError("drawn_mlp needs at least one layer")
    base = None
    for lay in layers:
        for c in (lay.cache, lay.bias_cache):
            if c is not None and c[1] != base:
                if base is not None:
                    raise ValueError("every layer's factor caches must start at the same "
                                     "noise index")
                base = c[1]
    base = 0 if base is None else base
    for group in range(0, len(layers), MAX_LAYERS):
        last = group + MAX_LAYERS >= len(layers)
        x = _launch(x, layers[group:group + MAX_LAYERS], member_ids, base, rank=rank,
                    scale=scale, bias_scale=bias_scale, antithetic=antithetic,
                    precision=precision, argmax=argmax and last)
    return x


# The constexpr parameters of the two kernels, in signature order (they end each signature;
# ``tests/torch_tests/test_fused_mlp.py`` checks these names against the kernels). A launch
# passes them positionally: Triton's launcher binds keyword arguments to the parameter list
# one name at a time, which took about as long as specialising every runtime argument.
_LAYER_FLAGS = ("HB", "WN", "BZ", "ACT")
_MLP_CONSTEXPRS = ("LAYERS", "R", "RP", "BLOCK_M",
                   *(f"{k}{i}" for i in range(MAX_LAYERS) for k in ("BN", "BK", *_LAYER_FLAGS)),
                   "ANTITHETIC", "PRECISION", "LIBDEVICE")
_REGS_CONSTEXPRS = ("LAYERS", "R", "BLOCK_M", *(f"P{i}" for i in range(MAX_LAYERS + 1)),
                    *(f"{k}{i}" for i in range(MAX_LAYERS) for k in _LAYER_FLAGS),
                    "PL", "ANTITHETIC", "PRECISION", "LIBDEVICE", "OFF32", "ARGMAX",
                    *(f"FM{i}" for i in range(MAX_LAYERS)))
_UNUSED_FLAGS = (False, False, False, IDENTITY)

# Launch configurations (constexpr values in signature order, grid rows per program, launch
# options) by what decides them: the feature counts, the layers' flags, rank, antithetic sampling,
# precision, the device's tanh, whether the batch is small, and the module's tuning knobs
# (``scripts/sweep_drawn_mlp.py`` changes those between runs).
_configs: dict[tuple, tuple[tuple, int, dict, bool]] = {}


def _tuning() -> tuple:
    return (REGS_MAX_FEATURES, REGS_BLOCK_M, REGS_NUM_WARPS, REGS_MAXNREG, REGS_FMA_MAX_INPUTS,
            REGS_FMA_MAX_OUTPUTS, BLOCK_M, SMALL_BLOCK_M, SMALL_ROWS, BLOCK_N_MAX, BLOCK_K_MAX,
            NUM_WARPS, FLOAT32_PRECISION)


def _config(dims: tuple, flags: tuple, layers: int, rank: int, antithetic: bool,
            precision: str, libdevice: bool, small: bool, off32: bool,
            argmax: bool) -> tuple[tuple, int, dict, bool]:
    """``(constexprs, block_m, options, regs)`` of one launch: the kernel's constexpr
    values in signature order (:data:`_MLP_CONSTEXPRS`, or :data:`_REGS_CONSTEXPRS` when
    ``regs``: every width in ``dims`` is at most :data:`REGS_MAX_FEATURES`), the batch rows
    per program and the launch options (warps, register cap, :data:`LAUNCH_OPTIONS`).
    ``dims`` holds the feature counts padded with 1 to ``MAX_LAYERS + 1``, ``flags`` each
    layer slot's ``(HB, WN, BZ, ACT)``; ``off32``: every noise block has fewer than 2**31
    elements; ``argmax``: the in-register kernel returns each row's argmax."""
    common = dict(LAYERS=layers, R=rank, ANTITHETIC=bool(antithetic),
                  PRECISION=FLOAT32_PRECISION if precision == "ieee" else precision,
                  LIBDEVICE=libdevice)
    meta = {f"{k}{i}": v for i, f in enumerate(flags) for k, v in zip(_LAYER_FLAGS, f)}
    if max(dims) <= REGS_MAX_FEATURES:
        pow2 = [next_power_of_2(w) for w in dims]
        # 2: the first layer's product from its input's columns, read from memory
        fma = [2 if i == 0 and pow2[0] <= REGS_FMA_MAX_INPUTS
               else 1 if i < layers and pow2[i + 1] <= REGS_FMA_MAX_OUTPUTS
               else 0 for i in range(MAX_LAYERS)]
        # a width next to a tensor-core product is padded to its minimum of 16
        pads = [p if all(fma[j] for j in (i - 1, i) if 0 <= j < layers) else max(16, p)
                for i, p in enumerate(pow2)]
        meta.update({f"P{i}": p for i, p in enumerate(pads)}, PL=pads[layers],
                    **{f"FM{i}": f for i, f in enumerate(fma)},
                    BLOCK_M=REGS_BLOCK_M, OFF32=off32, ARGMAX=argmax, **common)
        options = dict(num_warps=REGS_NUM_WARPS, **LAUNCH_OPTIONS)
        if REGS_MAXNREG is not None and rank == 1:
            options["maxnreg"] = REGS_MAXNREG
        return tuple(meta[n] for n in _REGS_CONSTEXPRS), REGS_BLOCK_M, options, True
    block_m = SMALL_BLOCK_M if small else BLOCK_M
    for i in range(MAX_LAYERS):
        meta[f"BN{i}"], meta[f"BK{i}"] = _block_sizes(dims[i], dims[i + 1])
    meta.update(RP=next_power_of_2(rank), BLOCK_M=block_m, **common)
    return (tuple(meta[n] for n in _MLP_CONSTEXPRS), block_m,
            dict(num_warps=NUM_WARPS, **LAUNCH_OPTIONS), False)


def _launch(x, layers, member_ids, base, *, rank, scale, bias_scale, antithetic, precision,
            argmax):
    rows, n0 = x.shape
    device = x.device
    out = torch.empty((rows, layers[-1].weight.shape[0]), dtype=torch.float32, device=device)
    if rows == 0:
        return out.argmax(dim=1) if argmax else out
    # each layer slot: weight, its strides, bias, factor block, bias noise (unused slots and
    # absent tensors point at ``out`` and are never read) and its flags
    args, dims, flags, off32 = [], [n0], [], True
    for lay in layers:
        w, b, c, bc = lay.weight, lay.bias, lay.cache, lay.bias_cache
        if (c is not None and c[0].numel() >= 2**31) or (
                bc is not None and bc[0].numel() >= 2**31):
            off32 = False
        sw = w.stride()
        args += (w, sw[0], sw[1], out if b is None else b, out if c is None else c[0],
                 out if bc is None else bc[0])
        dims.append(w.shape[0])
        flags.append((b is not None, c is not None, bc is not None, int(lay.act)))
    n_layers = len(layers)
    for _ in range(n_layers, MAX_LAYERS):
        args += (out, 0, 0, out, out, out)
        flags.append(_UNUSED_FLAGS)
    n_out = dims[-1]
    hidden = max(dims[1:-1], default=1)
    dims += [1] * (MAX_LAYERS - n_layers)
    dims, flags = tuple(dims), tuple(flags)
    libdevice = x.is_cuda and _libdevice is not None
    key = (dims, flags, rank, antithetic, precision, libdevice, rows <= SMALL_ROWS, off32,
           argmax, _tuning())
    config = _configs.get(key)
    if config is None:
        config = _configs[key] = _config(dims, flags, n_layers, rank, antithetic, precision,
                                         libdevice, rows <= SMALL_ROWS, off32, argmax)
    constexprs, block_m, options, regs = config
    sx = x.stride()
    grid = (-(-rows // block_m),)
    if regs:  # ``out`` is contiguous: strides (n_out, 1); the argmax (rows,)
        dst, stride = ((torch.empty((rows,), dtype=torch.int64, device=device), 1) if argmax
                       else (out, n_out))
        with device_guard(x):
            _drawn_mlp_regs_kernel[grid](
                x, sx[0], sx[1], dst, stride, 1, member_ids, member_ids.stride(0), rows,
                int(base), float(scale), float(bias_scale), *args, *dims, n_out, *constexprs,
                **options, **dependent_launch(device))
        return dst
    # the two scratch buffers in one allocation, each starting on a 16-byte boundary
    # (as separate allocations would)
    size = -(-rows * hidden // 4) * 4
    if n_layers > 1:
        s0 = torch.empty((2 * size if n_layers > 2 else size,), dtype=torch.float32,
                         device=device)
        s1 = s0[size:] if n_layers > 2 else s0
    else:
        s0 = s1 = out
    with device_guard(x):
        _drawn_mlp_kernel[grid](
            x, sx[0], sx[1], out, n_out, 1, s0, s1, hidden, member_ids,
            member_ids.stride(0), rows, int(base), float(scale), float(bias_scale), *args,
            *dims, *constexprs, **options)
    return out.argmax(dim=1) if argmax else out
