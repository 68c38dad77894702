"""The noise stream, version 1: the single definition of every random number we use.

Every number is a pure function of ``(seed, param_key, effective_epoch, noise_index,
element)``:

* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
  with key ``(seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` and counter
  ``(element // 4, noise_index, param_key, effective_epoch)``; lane ``element % 4``.
* uniform from a 32-bit word ``x``: ``((x >> 8) + 0.5) * 2**-24``, rounded once to float32.
* normals by Box–Muller on the lane pairs (0, 1) and (2, 3): ``r = sqrt(-2 ln u_a)``,
  ``theta = 2 pi u_b``; the even lane gets ``r cos theta``, the odd lane ``r sin theta``.
* a weight of shape ``(m, n)`` and rank ``r`` owns the factor block ``F`` of shape
  ``(n + m, r)``, row-major (``element = row * r + k``): rows ``0..n-1`` are ``B0``, rows
  ``n..n+m-1`` are ``A0`` (:class:`FactorLayout`). A 1-D parameter of length ``L`` owns
  elements ``0..L-1``.
* with antithetic sampling members ``2k`` and ``2k + 1`` share noise index ``k`` with signs
  ``+1`` and ``-1``; without it member ``j`` uses noise index ``j`` with sign ``+1``
  (:func:`noise_index`, :func:`member_sign`, :func:`member_noise`).

This module is the one definition of that layout: every other module takes the factor
block's row offsets from :class:`FactorLayout` and a member's noise index and sign from
:func:`member_noise` (or passes them to the kernels as arguments). The Triton kernels
implement the same rules on the device in ``evotorch_eggroll.kernels.philox``
(``row_noise_index`` and the ``factor_*_row`` helpers), documented there as mirrors of this
module and tested against it.

This module is also the plain-torch reference of the stream: integer-exact Philox words
and float64 Box–Muller rounded to float32. The Triton kernels in
``evotorch_eggroll.kernels`` follow it and are tested against it. Changing anything here is
a new stream version, never an edit.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = [
    "STREAM_VERSION",
    "param_key",
    "effective_epoch",
    "noise_index",
    "member_sign",
    "philox4x32",
    "uniform_from_words",
    "normals_from_words",
    "philox_words",
    "normal_stream",
    "lowrank_factors",
    "FactorLayout",
    "member_noise",
    "noise_index_range",
]

STREAM_VERSION = 1

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # round multiplier for counter word 0
PHILOX_M1 = 0xCD9E8D57  # round multiplier for counter word 2
PHILOX_W0 = 0x9E3779B9  # key schedule (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key schedule (sqrt(3) - 1)
PHILOX_ROUNDS = 10


def param_key(name: str) -> int:
    """Stream key of a parameter: CRC-32 of its dotted name (UTF-8), an unsigned 32-bit int."""
    if not isinstance(name, str):
        raise TypeError(f"parameter names are strings, got {type(name).__name__}")
    return zlib.crc32(name.encode("utf-8")) & MASK32


def effective_epoch(epoch: int, noise_reuse: int) -> int:
    """Epoch that keys the noise: 0 when ``noise_reuse == 0``, else ``epoch // noise_reuse``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if noise_reuse < 0:
        raise ValueError(f"noise_reuse must be >= 0, got {noise_reuse}")
    return 0 if noise_reuse == 0 else epoch // noise_reuse


def noise_index(member: int, antithetic: bool) -> int:
    """Which noise draw a member uses: members 2k and 2k+1 share draw k when antithetic."""
    return member // 2 if antithetic else member


def member_sign(member: int, antithetic: bool) -> int:
    """+1 for even members (and every member without antithetic sampling), -1 for odd ones."""
    return -1 if (antithetic and member % 2 == 1) else 1


def member_noise(member_ids: torch.Tensor, antithetic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`noise_index` and :func:`member_sign` of every member id, vectorised.

    Returns:
        noise indices (int64) and signs (float32, ``+1.0``/``-1.0``) of ``member_ids``'
        shape, on its device.
    """
    ids = member_ids.to(torch.int64)
    if antithetic:
        return ids // 2, 1.0 - 2.0 * (ids % 2).to(torch.float32)
    return ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device)


def noise_index_range(members: range, antithetic: bool) -> range:
    """The noise indices a contiguous range of members draws from (:func:`noise_index`)."""
    if len(members) == 0:
        return range(0)
    return range(noise_index(members.start, antithetic),
                 noise_index(members.stop - 1, antithetic) + 1)


class FactorLayout(NamedTuple):
    """Where the factors of an ``(m, n)`` weight of rank ``rank`` sit in its stream.

    The weight owns the factor block ``F`` of shape ``(rows, rank) = (n + m, rank)``,
    row-major: stream element ``row * rank + k`` is ``F[row, k]``. Rows
    ``b_offset .. b_offset + n - 1`` (``b_offset = 0``) are ``B0 (n, r)`` and rows
    ``a_offset .. a_offset + m - 1`` (``a_offset = n``) are ``A0 (m, r)``; the weight's
    unscaled perturbation is ``A0 @ B0.T``.

    A linear layer ``x W^T`` projects its input through ``B0`` and expands through ``A0``;
    its backward, and a right product ``x W``, do the mirror image.
    """

    m: int
    n: int
    rank: int

    @property
    def rows(self) -> int:
        """Rows of the factor block: ``n + m``."""
        return self.n + self.m

    @property
    def numel(self) -> int:
        """Stream elements of the factor block: ``(n + m) * rank``."""
        return self.rows * self.rank

    @property
    def b_offset(self) -> int:
        """First factor-block row of ``B0``: 0."""
        return 0

    @property
    def a_offset(self) -> int:
        """First factor-block row of ``A0``: ``n``."""
        return self.n

    @property
    def b_rows(self) -> slice:
        """The factor-block rows of ``B0``."""
        return slice(self.b_offset, self.b_offset + self.n)

    @property
    def a_rows(self) -> slice:
        """The factor-block rows of ``A0``."""
        return slice(self.a_offset, self.a_offset + self.m)

    def a_part(self, part: slice) -> slice:
        """The factor-block rows of ``A0[part]``: the factors of the weight's output rows
        ``part`` (a slice with start and stop, step 1)."""
        return slice(self.a_offset + part.start, self.a_offset + part.stop)

    def split(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(A0, B0)`` of factor blocks ``(..., n + m, rank)``: ``(..., m, rank)`` and
        ``(..., n, rank)``."""
        return block[..., self.a_rows, :], block[..., self.b_rows, :]


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b``.

    ``b`` is split into 16-bit halves so that no intermediate leaves the int64 range.
    """
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p = a * b_hi  # < 2**48
    q = a * b_lo  # < 2**48
    hi = (p + (q >> 16)) >> 16
    lo = (((p & 0xFFFF) << 16) + q) & MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    seed: int,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding unsigned 32-bit values; returns the 4 words."""
    k0 = int(seed) & MASK32
    k1 = (int(seed) >> 32) & MASK32
    # Python-int counters join the tensors' device (a CPU scalar broadcast beside CUDA
    # counters would no longer count as a scalar)
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) & MASK32
                      for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox4x32_numpy(c0: np.ndarray, c1: np.ndarray, c2: int, c3: int, seed: int,
                     rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """:func:`philox4x32` on numpy: counters ``c0``, ``c1`` (arrays of unsigned 32-bit
    values) and the scalars ``c2``, ``c3``; returns the words as a ``(len, 4)`` uint64
    array. For CPU-side streams of modest size, where torch's per-operation overhead
    (about a hundred operations per call) would dominate."""
    mask = np.uint64(MASK32)
    x0, x1 = np.asarray(c0, np.uint64) & mask, np.asarray(c1, np.uint64) & mask
    x2 = np.full_like(x0, c2 & MASK32)
    x3 = np.full_like(x0, c3 & MASK32)
    k0, k1 = int(seed) & MASK32, (int(seed) >> 32) & MASK32
    m0, m1, s32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(32)
    for _ in range(rounds):
        p0, p1 = m0 * x0, m1 * x2  # below 2**64: exact
        x0, x1, x2, x3 = ((p1 >> s32) ^ x1 ^ np.uint64(k0), p1 & mask,
                          (p0 >> s32) ^ x3 ^ np.uint64(k1), p0 & mask)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return np.stack([x0, x1, x2, x3], axis=-1)


def uniform_from_words(x: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1] from 32-bit words: ``((x >> 8) + 0.5) * 2**-24``."""
    return ((x >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def normals_from_words(
    w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box–Muller on the lane pairs (0, 1) and (2, 3); float64 math, float32 result."""
    out = []
    for wa, wb in ((w0, w1), (w2, w3)):
        ua = uniform_from_words(wa).to(torch.float64)
        ub = uniform_from_words(wb).to(torch.float64)
        radius = torch.sqrt(-2.0 * torch.log(ua))
        theta = (2.0 * math.pi) * ub
        out += [(radius * torch.cos(theta)).float(), (radius * torch.sin(theta)).float()]
    return tuple(out)  # type: ignore[return-value]


def normals_out(idx: torch.Tensor, numel: int, out: torch.Tensor | None) -> torch.Tensor:
    """The ``(K, numel)`` float32 buffer on ``idx``'s device that normals of the ``K`` noise
    indices ``idx`` are written to: ``out`` when given (checked: contiguous, that shape,
    dtype and device), else a new one."""
    if out is None:
        return torch.empty((idx.numel(), numel), dtype=torch.float32, device=idx.device)
    if (tuple(out.shape) != (idx.numel(), numel) or out.dtype != torch.float32
            or out.device != idx.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({idx.numel()}, {numel}) float32 tensor on "
                         f"{idx.device}")
    return out


def _as_index_tensor(values: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.int64).reshape(-1).cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > MASK32):
        raise ValueError("noise indices must lie in [0, 2**32)")
    return t


def _philox_at(seed: int, key: int, epoch: int, noise_indices: int | Sequence[int] | torch.Tensor,
               quads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox words of counters ``(quads, noise index, key, epoch)`` for every noise
    index (rows) and quad (``quads (1, Q)``): four ``(K, Q)`` int64 tensors."""
    idx = _as_index_tensor(noise_indices)[:, None]  # (K, 1)
    return philox4x32(quads, idx, torch.tensor(key), torch.tensor(epoch), seed)


def philox_words(
    seed: int,
    key: int,
    epoch: int,
    noise_indices: int | Sequence[int] | torch.Tensor,
    numel: int,
) -> torch.Tensor:
    """The raw 32-bit word of every element: int64 tensor of shape ``(K, numel)``.

    ``key`` is a :func:`param_key`, ``epoch`` the effective epoch.
    """
    elem = torch.arange(numel, dtype=torch.int64)[None, :]  # (1, E)
    words = _philox_at(seed, key, epoch, noise_indices, elem // 4)
    stacked = torch.stack(words, dim=0)  # (4, K, E)
    lane = (elem % 4).expand_as(words[0])[None]
    return torch.gather(stacked, 0, lane)[0]


def normal_stream(
    seed: int,
    key: int,
    epoch: int,
    noise_indices: int | Sequence[int] | torch.Tensor,
    numel: int,
) -> torch.Tensor:
    """Standard normals of elements ``0..numel-1`` for each noise index: ``(K, numel)`` float32."""
    quads = (numel + 3) // 4
    q = torch.arange(quads, dtype=torch.int64)[None, :]  # (1, Q)
    words = _philox_at(seed, key, epoch, noise_indices, q)
    z = torch.stack(normals_from_words(*words), dim=-1)  # (K, Q, 4)
    return z.reshape(z.shape[0], quads * 4)[:, :numel].contiguous()


def lowrank_factors(
    seed: int,
    key: int,
    epoch: int,
    noise_indices: int | Sequence[int] | torch.Tensor,
    m: int,
    n: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled factors of a ``(m, n)`` weight: ``A0`` ``(K, m, r)`` and ``B0`` ``(K, n, r)``."""
    layout = FactorLayout(m, n, rank)
    block = normal_stream(seed, key, epoch, noise_indices, layout.numel)
    a0, b0 = layout.split(block.reshape(-1, layout.rows, rank))
    return a0.contiguous(), b0.contiguous()
