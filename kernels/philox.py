"""Noise stream v1 inside Triton: Philox4x32-10 words, uniforms and Box–Muller normals.

Every random number is a pure function of ``(seed, key, epoch, noise_index, element)``:
Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(element // 4, noise_index, key, epoch)`` gives four 32-bit words per *quad* of
elements; lane ``element % 4`` picks the word. Uniforms are ``((w >> 8) + 0.5) * 2**-24``
and Box–Muller runs on the lane pairs (0, 1) and (2, 3): the even lane gets
``r cos(theta)``, the odd lane ``r sin(theta)``.

One Philox call and one log/sqrt/cos/sin set always serve a whole quad (four elements),
so generating ``E`` normals costs ``E / 4`` Philox calls and ``E / 2`` of each
transcendental. The helpers here are shared by every kernel, so the factors the forward
uses, the inspected factors and the update's factors are produced by the same code.

Scalar arguments of the helpers: ``seed`` is the 64-bit key built by :func:`stream_seed`;
``noise_index``, ``key`` and ``epoch`` are integer scalars below ``2**32`` (int64 when they
arrive as kernel arguments of ``2**31`` or more, so they are cast to uint32 here).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS

PHILOX_ROUNDS = tl.constexpr(10)
# Cheap Box–Muller (hardware log2 through inline PTX, polynomial sin/cos): on for compiled
# GPU kernels, off under Triton's interpreter (which cannot run PTX and keeps the precise
# path); EGGROLL_PRECISE_NORMALS=1 selects the precise path on the GPU too (comparisons).
FAST_TRANSCENDENTALS = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    and os.environ.get("EGGROLL_PRECISE_NORMALS", "0") in ("", "0")
)
MASK32 = 0xFFFFFFFF
_WORD_MASK = tl.constexpr(0xFFFFFFFF)


def split_seed(seed: int) -> tuple[int, int]:
    """Philox key words ``(seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` of a Python int."""
    seed = int(seed)
    return seed & MASK32, (seed >> 32) & MASK32


@triton.jit
def stream_seed(seed_lo, seed_hi):
    """The 64-bit ``tl.philox`` seed whose (low, high) halves are our Philox key."""
    return (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)


@triton.jit
def philox_quads(seed, quad, noise_index, key, epoch):
    """Philox4x32-10 words of the quads ``quad`` (int64 block): four uint32 blocks."""
    c0 = quad.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + noise_index.to(tl.uint32)
    c2 = zero + key.to(tl.uint32)
    c3 = zero + epoch.to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)


@triton.jit
def uniform_from_word(w):
    """float32 uniform in (0, 1] from a uint32 word: ``((w >> 8) + 0.5) * 2**-24``."""
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _lg2_approx(x):
    """Hardware base-2 logarithm (``lg2.approx``: absolute error about 2**-22)."""
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _box_muller_precise(wa, wb):
    radius = tl.sqrt(-2.0 * tl.log(uniform_from_word(wa)))
    theta = 6.283185307179586 * uniform_from_word(wb)
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def _box_muller_fast(wa, wb):
    # Radius: -2 ln u with u = fl32(i + 1/2) 2**-24, i = wa >> 8 (the stream rounds
    # i + 1/2 to float32, as uniform_from_word does). The hardware log has an absolute
    # error, which becomes a large relative one as u -> 1; there v = 1 - u (exact:
    # 2**24 - fl32(i + 1/2) is) is small and -ln(1 - v) = v + v^2/2 + ... + v^6/6 is used
    # instead (truncation below 1e-8 relative for v < 1/16).
    ua = (wa >> 8).to(tl.float32) + 0.5
    u = ua * 5.9604644775390625e-08
    v = (16777216.0 - ua) * 5.9604644775390625e-08
    series = 1.0 / 6.0
    series = series * v + 0.2
    series = series * v + 0.25
    series = series * v + (1.0 / 3.0)
    series = series * v + 0.5
    series = series * v + 1.0
    s = tl.where(v < 0.0625, (2.0 * v) * series, -1.3862943611198906 * _lg2_approx(u))
    radius = tl.sqrt(s)
    # Angle: theta = 2 pi t with t = fl32(k + 1/2) 2**-24, k = wb >> 8. Exact quadrant
    # reduction: q = round(4 t) (from k), f = t - q/4 in about [-1/8, 1/8], x = 2 pi f in
    # about [-pi/4, pi/4]; sin x, cos x by short polynomials (absolute error ~1.1e-7 over
    # every k, checked exhaustively), then rotated by q quarter turns.
    k = (wb >> 8).to(tl.int32)
    q = (k + 2097152) >> 22
    kf = k.to(tl.float32) + 0.5  # fl32(k + 1/2), as the stream's uniform
    x = (kf - (q << 22).to(tl.float32)) * 3.745070387140004e-07  # exact difference; 2 pi 2**-24
    x2 = x * x
    sp = -1.9515295891e-4
    sp = sp * x2 + 8.3321608736e-3
    sp = sp * x2 - 1.6666654611e-1
    sin_x = x + (x * x2) * sp
    cp = 2.443315711809948e-5
    cp = cp * x2 - 1.388731625493765e-3
    cp = cp * x2 + 4.166664568298827e-2
    cos_x = (1.0 - 0.5 * x2) + (x2 * x2) * cp
    swap = (q & 1) != 0
    c = tl.where(swap, sin_x, cos_x)
    s = tl.where(swap, cos_x, sin_x)
    rc = tl.where(((q + 1) & 2) != 0, -radius, radius)
    rs = tl.where((q & 2) != 0, -radius, radius)
    return rc * c, rs * s


@triton.jit
def box_muller(wa, wb):
    """Two normals from the words of one lane pair: ``(r cos(theta), r sin(theta))``.

    On the GPU (``FAST_TRANSCENDENTALS``) the transform uses the hardware log2 and
    polynomial sine/cosine after an exact quadrant reduction (:func:`_box_muller_fast`);
    the interpreter runs the precise library functions. Both stay within the documented
    tolerance of the float64 reference.
    """
    if FAST_TRANSCENDENTALS:
        return _box_muller_fast(wa, wb)
    else:
        return _box_muller_precise(wa, wb)


@triton.jit
def normal_quads(seed, quad, noise_index, key, epoch):
    """The four normals (lanes 0..3) of each quad in ``quad``: four float32 blocks."""
    w0, w1, w2, w3 = philox_quads(seed, quad, noise_index, key, epoch)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def normal_run(seed, first_quad, noise_index, key, epoch, BLOCK_Q: tl.constexpr):
    """Normals of elements ``4*first_quad .. 4*(first_quad + BLOCK_Q) - 1``: ``[4*BLOCK_Q]``."""
    quad = first_quad + tl.arange(0, BLOCK_Q).to(tl.int64)
    z0, z1, z2, z3 = normal_quads(seed, quad, noise_index, key, epoch)
    # interleave(interleave(z0, z2), interleave(z1, z3)) = z0[0], z1[0], z2[0], z3[0], z0[1], ...
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


# ----------------------------------------------------------------------------------------
# The noise layout on the device. Its definition is evotorch_eggroll.noise's
# (``member_noise``: the member -> noise index and sign rule; ``FactorLayout``: the factor
# block ``(n + m, R)`` of an ``(m, n)`` weight, ``B0`` in rows ``0..n-1`` and ``A0`` in rows
# ``n..n+m-1``); these helpers are its device-side mirror, and the tests run them against
# that module. The project/expand kernels receive their factor-block row offsets as
# arguments, taken from ``FactorLayout`` by their callers; drawn_mlp.py says why it keeps
# its offsets inline.


@triton.jit
def row_noise_index(ids_ptr, row, stride_ids, row_ok, ANTITHETIC: tl.constexpr):
    """Noise index and sign of batch row ``row``'s member (``ids_ptr[row * stride_ids]``;
    member 0 for a row with ``row_ok`` False), by ``noise.member_noise``'s rule: with
    ``ANTITHETIC`` members ``2k`` and ``2k + 1`` share index ``k`` with signs ``+1``/``-1``,
    otherwise index = member, sign 1."""
    member = tl.load(ids_ptr + row * stride_ids, mask=row_ok, other=0).to(tl.int64)
    if ANTITHETIC:
        noise_index = member // 2
        sign = 1.0 - 2.0 * (member % 2).to(tl.float32)
    else:
        noise_index = member
        sign = 1.0
    return noise_index, sign


@triton.jit
def factor_block_rows(n, m):
    """Rows of an ``(m, n)`` weight's factor block: ``n + m`` (``FactorLayout.rows``)."""
    return n + m


@triton.jit
def factor_b_row(i):
    """Factor-block row of ``B0``'s row ``i``: ``i`` (``FactorLayout.b_offset`` is 0)."""
    return i


@triton.jit
def factor_a_row(i, n):
    """Factor-block row of ``A0``'s row ``i``: ``n + i`` (``FactorLayout.a_offset`` is
    ``n``)."""
    return n + i


@triton.jit
def factor_block_part(row, n, m):
    """Which factor a factor-block row belongs to: ``(in B0, in A0)`` masks (see
    :func:`b0_row_of` and :func:`a0_row_of` for its row there)."""
    return row < n, (row >= n) & (row < factor_block_rows(n, m))


@triton.jit
def b0_row_of(row):
    """``B0``'s row held by factor-block row ``row`` (the inverse of :func:`factor_b_row`)."""
    return row


@triton.jit
def a0_row_of(row, n):
    """``A0``'s row held by factor-block row ``row`` (the inverse of :func:`factor_a_row`)."""
    return row - n


@triton.jit
def drawn_b0_column(f_ptr, block, ks, r: tl.constexpr, R: tl.constexpr, mask):
    """``B0[ks, r]`` of each row's drawn factors (``block``: the element offset of each row's
    factor block, ``(rows,)``): ``(rows, len(ks))``, 0 where ``mask`` is False."""
    return tl.load(f_ptr + block[:, None] + factor_b_row(ks)[None, :] * R + r, mask=mask,
                   other=0.0)


@triton.jit
def drawn_a0_column(f_ptr, block, cols, n, r: tl.constexpr, R: tl.constexpr, mask):
    """``A0[cols, r]`` of each row's drawn factors of an ``(m, n)`` weight: ``(rows,
    len(cols))``, 0 where ``mask`` is False."""
    return tl.load(f_ptr + block[:, None] + factor_a_row(cols, n)[None, :] * R + r, mask=mask,
                   other=0.0)


@triton.jit
def drawn_run(block_ptr, numel, first_quad, BLOCK_Q: tl.constexpr):
    """The run :func:`normal_run` generates, read from a drawn ``(numel,)`` block instead
    (elements past ``numel`` read as 0), laid out by the same interleaving so that the
    code consuming it compiles the same way."""
    e = (first_quad + tl.arange(0, BLOCK_Q).to(tl.int64)) * 4
    z0 = tl.load(block_ptr + e, mask=e < numel, other=0.0)
    z1 = tl.load(block_ptr + e + 1, mask=e + 1 < numel, other=0.0)
    z2 = tl.load(block_ptr + e + 2, mask=e + 2 < numel, other=0.0)
    z3 = tl.load(block_ptr + e + 3, mask=e + 3 < numel, other=0.0)
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def normal_tile(
    seed,
    noise_index,
    key,
    epoch,
    first_row,
    R: tl.constexpr,
    RP: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DIRECT: tl.constexpr,
    cache_ptr,
    cache_base,
    cache_rows,
    CACHED: tl.constexpr,
):
    """Rows ``first_row .. first_row + ROWS - 1`` of a row-major ``(rows, R)`` normal block.

    Element ``(row, k)`` is stream element ``row * R + k``. The quads covering the rows are
    generated once (``BLOCK_Q`` of them, starting at the quad of the first element) and laid
    out as a ``[TILE_ROWS, RP]`` tile; entries with ``k >= R`` or tile row ``>= ROWS`` are 0.

    ``DIRECT`` (launcher's promise): ``R == RP``, ``ROWS == TILE_ROWS``,
    ``ROWS * R == 4 * BLOCK_Q`` and ``first_row * R`` is a multiple of 4, so the run of
    normals is the tile itself. Otherwise the run is gathered into the tile, which needs
    ``(first_row * R) % 4 + ROWS * R <= 4 * BLOCK_Q``.

    With ``CACHED`` the block of every noise index in ``[cache_base, cache_base + K)`` was
    drawn beforehand (by the normal-block kernel: the same numbers) into ``cache_ptr``, a
    contiguous ``(K, cache_rows, R)`` float32 array, and the run is read from there (the
    launcher guarantees that the noise index lies in that range). Past the block's end the
    read run holds 0 where the generated one holds further stream values; every caller
    masks those positions, and the tile is laid out by the same code either way, so both
    give the same results bit for bit.
    """
    first = first_row.to(tl.int64) * R
    first_quad = first // 4
    if CACHED:
        numel = cache_rows.to(tl.int64) * R
        start = (noise_index.to(tl.int64) - cache_base) * numel
        z = drawn_run(cache_ptr + start, numel, first_quad, BLOCK_Q)  # (4*BLOCK_Q,)
    else:
        z = normal_run(seed, first_quad, noise_index, key, epoch, BLOCK_Q)  # (4*BLOCK_Q,)
    if DIRECT:
        tile = tl.reshape(z, (TILE_ROWS, RP))
    else:
        skew = (first - first_quad * 4).to(tl.int32)  # first element's lane
        rows = tl.arange(0, TILE_ROWS)[:, None]
        cols = tl.arange(0, RP)[None, :]
        pos = skew + rows * R + cols  # (TILE_ROWS, RP) position in the run
        valid = (rows < ROWS) & (cols < R) & (pos < 4 * BLOCK_Q)
        pos = tl.where(valid, pos, 0)
        picked = tl.gather(z, tl.reshape(pos, (TILE_ROWS * RP,)), 0)
        tile = tl.where(valid, tl.reshape(picked, (TILE_ROWS, RP)), 0.0)
    return tile


# ----------------------------------------------------------------------------------------
# Debug kernel: raw Philox words of the stream (tests compare them bit-exactly).


@triton.jit(do_not_specialize=["first_quad", "seed_lo", "seed_hi", "key", "epoch"])
def _philox_words_kernel(
    idx_ptr,
    out_ptr,
    numel,
    first_quad,
    seed_lo,
    seed_hi,
    key,
    epoch,
    BLOCK_Q: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_e = tl.program_id(1)
    seed = stream_seed(seed_lo, seed_hi)
    noise_index = tl.load(idx_ptr + pid_k)
    quad = first_quad + pid_e.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    w0, w1, w2, w3 = philox_quads(seed, quad, noise_index, key, epoch)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3)).to(tl.int64) & _WORD_MASK
    pos = pid_e.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q).to(tl.int64)
    tl.store(out_ptr + pid_k.to(tl.int64) * numel + pos, words, mask=pos < numel)


def philox_words(
    seed: int,
    key: int,
    epoch: int,
    noise_indices: torch.Tensor,
    numel: int,
    first_element: int = 0,
) -> torch.Tensor:
    """Raw 32-bit words of elements ``first_element ..``: ``(K, numel)`` int64.

    A debug view of the stream (the tests compare it bit-exactly with the reference).

    Args:
        seed: stream seed (any Python int; its low 64 bits form the Philox key).
        key: parameter key in ``[0, 2**32)``.
        epoch: effective epoch in ``[0, 2**32)``.
        noise_indices: ``(K,)`` integer tensor, values in ``[0, 2**32)``.
        numel: number of elements per noise index.
        first_element: first element, a multiple of 4.

    Returns:
        ``(K, numel)`` int64 on ``noise_indices.device``.
    """
    first_quad = first_quad_of(first_element)
    idx = noise_indices.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((idx.numel(), numel), dtype=torch.int64, device=idx.device)
    block_q = 64
    return launch_per_index(_philox_words_kernel, idx, out, first_quad, seed, key, epoch,
                            4 * block_q, block_q)


def first_quad_of(first_element: int) -> int:
    """The quad of ``first_element``, which must be a multiple of 4 (a run of the stream
    that a per-index kernel writes starts at a quad)."""
    if first_element % 4:
        raise ValueError(f"first_element must be a multiple of 4, got {first_element}")
    return first_element // 4


def launch_per_index(kernel, idx: torch.Tensor, out: torch.Tensor, first_quad: int, seed: int,
                     key: int, epoch: int, block_elements: int, *constexprs) -> torch.Tensor:
    """Launch a kernel that writes a run of the stream for each noise index: program
    ``(k, e)`` writes elements ``e * block_elements ..`` of row ``k`` of ``out (K, numel)``.

    The kernel's arguments are ``(idx_ptr, out_ptr, numel, first_quad, seed_lo, seed_hi,
    key, epoch, *constexprs)``: the constexpr values in signature order, passed positionally
    (Triton binds keyword arguments one parameter name at a time). Returns ``out``
    (untouched when empty).
    """
    k, numel = out.shape
    if k == 0 or numel == 0:
        return out
    seed_lo, seed_hi = split_seed(seed)
    grid = (idx.shape[0], -(-numel // block_elements))
    with device_guard(out):
        kernel[grid](idx, out, numel, first_quad, seed_lo, seed_hi, key, epoch, *constexprs,
                     **LAUNCH_OPTIONS)
    return out


# ----------------------------------------------------------------------------------------
# Launch planning shared by the factor kernels (pure Python).


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def row_tile_plan(rank: int, row_offset: int, num_rows: int, block_e: int) -> dict:
    """How a kernel walks ``num_rows`` rows of an ``(rows, rank)`` normal block.

    Rows ``row_offset .. row_offset + num_rows - 1`` are visited in chunks of ``ROWS``
    rows; each chunk generates ``4 * BLOCK_Q`` consecutive normals (about ``block_e``) once
    and lays them out as a ``[TILE_ROWS, RP]`` tile (see :func:`normal_tile`). The plan
    depends only on the layer's shape, never on the number of batch rows, so every batch
    row's reductions run in the same order at any batch size.

    Returns:
        Constexpr keyword arguments ``R, RP, ROWS, TILE_ROWS, BLOCK_Q, DIRECT``.
    """
    rp = next_power_of_2(rank)
    lo = max(16, 4 * rp)
    block_e = max(lo, min(next_power_of_2(num_rows * rank + 3), max(block_e, lo)))
    direct = rp == rank and (row_offset * rank) % 4 == 0
    if direct:
        rows = tile_rows = block_e // rank
    else:
        rows = (block_e - 3) // rank
        tile_rows = next_power_of_2(rows)
    return dict(R=rank, RP=rp, ROWS=rows, TILE_ROWS=tile_rows, BLOCK_Q=block_e // 4,
                DIRECT=direct)


def bias_tile_plan(rows: int, tile_rows: int) -> dict:
    """Plan for a 1-D noise chunk of ``rows`` elements starting at a multiple of ``rows``.

    Returns:
        Constexpr keyword arguments ``BIAS_BLOCK_Q, BIAS_DIRECT`` for :func:`normal_tile`
        with ``R = RP = 1``.
    """
    if rows == tile_rows and rows % 4 == 0:
        return dict(BIAS_BLOCK_Q=rows // 4, BIAS_DIRECT=True)
    return dict(BIAS_BLOCK_Q=next_power_of_2(triton.cdiv(rows + 3, 4)), BIAS_DIRECT=False)


_SM_COUNT: dict = {}


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def rows_per_program(num_rows: int, device: torch.device, cap: int) -> int:
    """Batch rows one program walks (a power of two in ``[1, cap]``).

    Consecutive rows of one noise index share the generated factors, so more rows per
    program means less generation when rows share members; fewer rows per program means
    more programs. Results never depend on this choice (each row's arithmetic is the same).
    """
    target = num_rows // (4 * multiprocessor_count(device))
    block = 1
    while block * 2 <= min(target, cap):
        block *= 2
    return block


def cache_arguments(cache: tuple[torch.Tensor, int] | None, dummy: torch.Tensor) -> tuple:
    """Kernel arguments ``(cache_ptr, cache_base, cache_rows)`` of a ``(block, base)`` factor
    cache (see :func:`normal_tile`); ``dummy`` stands in for the pointer without a cache."""
    if cache is None:
        return dummy, 0, 1
    block, base = cache
    return block, int(base), int(block.shape[1])


def index_operand(noise_indices: torch.Tensor) -> torch.Tensor:
    """Noise indices as a kernel reads them: 1-D contiguous int64, converted only when they
    are not already (a 1-D tensor is not reshaped to itself)."""
    idx = noise_indices if noise_indices.dim() == 1 else noise_indices.reshape(-1)
    if idx.dtype != torch.int64 or not idx.is_contiguous():
        idx = idx.to(torch.int64).contiguous()
    return idx


def update_operands(noise_indices: torch.Tensor,
                    coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An update kernel's ``(K,)`` operands: the noise indices as contiguous int64 and the
    coefficients as contiguous float32 on the indices' device, converted only when they are
    not already (a 1-D tensor is not reshaped to itself)."""
    idx = index_operand(noise_indices)
    coef = coeffs if coeffs.dim() == 1 else coeffs.reshape(-1)
    if coef.dtype != torch.float32 or coef.device != idx.device or not coef.is_contiguous():
        coef = coef.to(device=idx.device, dtype=torch.float32).contiguous()
    return idx, coef


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for a launch (no-op on the CPU and
    when it already is)."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    index = t.get_device()
    if index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)
