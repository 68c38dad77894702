"""The plain-torch backend: every op of :mod:`evotorch_eggroll.ops` without Triton.

The same perturbed forward, backward and update as the Triton kernels, from the same noise
stream (:mod:`evotorch_eggroll.noise`): Philox words bit for bit, normals from the
reference Box–Muller (float64 math rounded once to float32, so within the stream's
tolerance of the kernels' float32 transform). Fast on a CPU, where the kernels only run
through Triton's slow interpreter:

* noise is generated vectorised over noise indices and elements (one Philox evaluation per
  quad of elements, for every noise index of a call at once), and only once per distinct
  noise index in a call (or read from the drawn factors of a
  :class:`~evotorch_eggroll.factor_cache.FactorCache`);
* the low-rank term is two batched products per layer, ``t = x B0`` then ``t A0^T``: rows
  are either paired with their member's factors (one row per member) or grouped by member
  into one ``bmm`` (many rows per member, e.g. a minibatch each);
* the update is one ``(m, K r) @ (K r, n)`` product per chunk of noise indices.

This is an optimised path, not the reference: the tests compare it (like the kernels) with
the deliberately naive float64 formulas of :mod:`evotorch_eggroll.reference`. The factor
block's rows and each member's noise index and sign come from
:mod:`evotorch_eggroll.noise` (``FactorLayout``, ``member_noise``).

The functions take the arguments of the kernel launchers in ``evotorch_eggroll.kernels``
and assume the checks of :mod:`evotorch_eggroll.ops` have run (stream coordinates are
words, shapes agree, cached blocks cover every row's noise index); they work on any
device. Nothing imports Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import noise as _noise

__all__ = [
    "philox_words",
    "normal_block",
    "lowrank_project",
    "lowrank_expand_",
    "dense_noise_add_",
    "perturbed_linear",
    "perturbed_linear_grad_x",
    "lowrank_update",
    "dense_update",
]

CHUNK_QUADS = 1 << 18  # Philox quads evaluated at once (bounds the int64 temporaries)
UPDATE_CHUNK_ELEMENTS = 1 << 24  # normals held at once by the updates (64 MiB of float32)
GROUP_MIN_ROWS = 4  # rows per distinct member from which rows are grouped into one bmm

Cache = Optional[tuple[torch.Tensor, int]]


# -- the stream, vectorised ---------------------------------------------------------------


def _quad_words(seed: int, key: int, epoch: int, idx: torch.Tensor, first_quad: int,
                quads: int) -> tuple[torch.Tensor, ...]:
    """The four Philox words of quads ``first_quad ..`` for each noise index: 4 x ``(K, Q)``."""
    q = torch.arange(first_quad, first_quad + quads, dtype=torch.int64, device=idx.device)
    return _noise.philox4x32(q[None, :], idx[:, None], key, epoch, seed)  # each (K, Q)


def _chunks(k: int, per_index: int, budget: int):
    """Slices of ``range(k)`` holding at most ``budget`` elements of ``per_index`` each."""
    step = max(1, budget // max(per_index, 1))
    for start in range(0, k, step):
        yield slice(start, min(k, start + step))


def philox_words(seed: int, key: int, epoch: int, noise_indices: torch.Tensor, numel: int,
                 first_element: int = 0) -> torch.Tensor:
    """Raw 32-bit words of elements ``first_element .. first_element + numel - 1``.

    Returns:
        ``(K, numel)`` int64 on ``noise_indices.device``, equal bit for bit to the kernels'
        and to :func:`evotorch_eggroll.noise.philox_words`.
    """
    idx = noise_indices.reshape(-1).to(torch.int64)
    out = torch.empty((idx.numel(), numel), dtype=torch.int64, device=idx.device)
    if out.numel() == 0:
        return out
    q0, skip = divmod(first_element, 4)
    quads = (skip + numel + 3) // 4
    for sl in _chunks(idx.numel(), quads, CHUNK_QUADS):
        words = torch.stack(_quad_words(seed, key, epoch, idx[sl], q0, quads), dim=-1)
        out[sl] = words.reshape(words.shape[0], quads * 4)[:, skip:skip + numel]
    return out


def normal_block(seed: int, key: int, epoch: int, noise_indices: torch.Tensor, numel: int,
                 out: Optional[torch.Tensor] = None, first_element: int = 0) -> torch.Tensor:
    """Normals of elements ``first_element .. first_element + numel - 1`` per noise index.

    Args:
        seed, key, epoch: stream coordinates.
        noise_indices: ``(K,)`` integer tensor.
        numel: elements per noise index.
        out: optional contiguous ``(K, numel)`` float32 tensor on that device to write to.
        first_element: first element (any; the quads around it are evaluated).

    Returns:
        ``(K, numel)`` float32 on ``noise_indices.device`` (``out`` when given).
    """
    idx = noise_indices.reshape(-1).to(torch.int64)
    out = _noise.normals_out(idx, numel, out)
    if out.numel() == 0:
        return out
    q0, skip = divmod(first_element, 4)
    quads = (skip + numel + 3) // 4
    for sl in _chunks(idx.numel(), quads, CHUNK_QUADS):
        words = _quad_words(seed, key, epoch, idx[sl], q0, quads)
        z = torch.stack(_noise.normals_from_words(*words), dim=-1)  # (k, Q, 4)
        out[sl] = z.reshape(z.shape[0], quads * 4)[:, skip:skip + numel]
    return out


def _member_noise(member_ids: torch.Tensor, antithetic: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise index ``(rows,)`` int64 and sign ``(rows,)`` float32 of each row's member."""
    return _noise.member_noise(member_ids.reshape(-1), antithetic)


# -- per-row factors ----------------------------------------------------------------------


class _RowFactors:
    """Rows ``row_offset .. row_offset + D - 1`` of each row's factor block, and how rows map
    to them: ``blocks (U, D, r)`` float32 and ``inv (rows,)`` with row ``j`` using
    ``blocks[inv[j]]``. Each distinct noise index is generated once (or read from a cache).
    """

    def __init__(self, idx: torch.Tensor, *, seed: int, key: int, epoch: int, rank: int,
                 row_offset: int, d: int, cache: Cache):
        rows = idx.shape[0]
        self._idx, self._seed, self._epoch = idx, seed, epoch
        self._uniq: Optional[torch.Tensor] = None
        self._base: Optional[int] = None
        if cache is not None:
            block, base = cache
            view = block[:, row_offset:row_offset + d]  # (K, D, r), no copy
            if rows >= GROUP_MIN_ROWS * block.shape[0]:
                self.blocks, self.inv = view, idx - base
                self._base = base
            else:  # about one row per member: pair each row with its factors
                self.blocks, self.inv = view[idx - base], None
            return
        uniq, inv = torch.unique(idx, return_inverse=True)
        blocks = normal_block(seed, key, epoch, uniq, d * rank, first_element=row_offset * rank)
        self.blocks = blocks.view(-1, d, rank)
        self.inv = inv
        if rows < GROUP_MIN_ROWS * uniq.shape[0]:
            self.blocks, self.inv = self.blocks[inv], None
        else:
            self._uniq = uniq

    def dense(self, key: int, d: int, cache: Cache) -> torch.Tensor:
        """Elements ``0 .. D-1`` of another key's dense noise, laid out like ``blocks``:
        ``(len(blocks), D)`` float32 (per row, or per group of rows)."""
        if self.inv is None:
            return _dense_rows(self._idx, d, seed=self._seed, key=key, epoch=self._epoch,
                               cache=cache)
        if self._uniq is not None:
            return normal_block(self._seed, key, self._epoch, self._uniq, d)
        span = self.blocks.shape[0]
        if cache is None:
            groups = torch.arange(self._base, self._base + span, device=self._idx.device)
            return normal_block(self._seed, key, self._epoch, groups, d)
        block, base = cache
        if base == self._base and block.shape[0] == span:
            return block[:, :d]
        groups = torch.arange(self._base - base, self._base - base + span,
                              device=self._idx.device)
        return block[groups, :d]

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``t[j] = v[j] @ blocks[inv[j]]`` for ``v (rows, D)`` float32: ``(rows, r)``."""
        if self.inv is None:
            return torch.bmm(v.unsqueeze(1), self.blocks).squeeze(1)
        return _grouped(v, self.inv, self.blocks)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``out[j] = blocks[inv[j]] @ t[j]`` for ``t (rows, r)`` float32: ``(rows, D)``."""
        if self.inv is None:
            return torch.bmm(self.blocks, t.unsqueeze(2)).squeeze(2)
        return _grouped(t, self.inv, self.blocks.transpose(1, 2))


def _grouped(v: torch.Tensor, inv: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``out[j] = v[j] @ mats[inv[j]]`` for ``v (rows, D)``, ``mats (U, D, E)``: ``(rows, E)``.

    Rows are sorted by matrix and padded to the largest group: one ``bmm`` for all of them
    (a plain reshape when the rows already come member by member in equal groups).
    """
    u, rows = mats.shape[0], v.shape[0]
    if rows == 0:
        return v.new_zeros(0, mats.shape[2])
    counts = torch.bincount(inv, minlength=u)
    width = int(counts.max())
    if rows == u * width and bool((inv.reshape(u, width) == torch.arange(
            u, device=inv.device)[:, None]).all()):
        return torch.bmm(v.reshape(u, width, -1), mats).reshape(rows, -1)
    order = torch.argsort(inv, stable=True)
    g = inv[order]
    pos = torch.arange(rows, device=v.device) - (torch.cumsum(counts, 0) - counts)[g]
    padded = v.new_zeros(u, width, v.shape[1]).index_put_((g, pos), v[order])  # (U, c, D)
    res = torch.bmm(padded, mats)  # (U, c, E)
    out = torch.empty(rows, mats.shape[2], dtype=res.dtype, device=res.device)
    out[order] = res[g, pos]
    return out


def _dense_rows(idx: torch.Tensor, d: int, *, seed: int, key: int, epoch: int,
                cache: Cache) -> torch.Tensor:
    """Elements ``0 .. D-1`` of each row's dense noise: ``(rows, D)`` float32."""
    if cache is not None:
        block, base = cache
        return block[idx - base, :d]
    uniq, inv = torch.unique(idx, return_inverse=True)
    return normal_block(seed, key, epoch, uniq, d)[inv]


# -- per-row ops (the launchers' arguments) -------------------------------------------------


def lowrank_project(v: torch.Tensor, member_ids: torch.Tensor, *, seed: int, key: int,
                    epoch: int, rank: int, row_offset: int, antithetic: bool,
                    cache: Cache = None) -> torch.Tensor:
    """``t[j] = v[j] @ F_j[row_offset : row_offset + D]`` for ``v (rows, D)``: ``(rows, r)``
    float32 (unsigned, unscaled)."""
    rows, d = v.shape
    if rows == 0 or d == 0:
        return torch.zeros(rows, rank, dtype=torch.float32, device=v.device)
    idx, _ = _member_noise(member_ids, antithetic)
    f = _RowFactors(idx, seed=seed, key=key, epoch=epoch, rank=rank, row_offset=row_offset,
                    d=d, cache=cache)
    return f.project(v.float())


def lowrank_expand_(out: torch.Tensor, t: torch.Tensor, member_ids: torch.Tensor, *, seed: int,
                    key: int, epoch: int, rank: int, row_offset: int, scale: float,
                    antithetic: bool, bias_key: Optional[int] = None, bias_scale: float = 0.0,
                    cache: Cache = None, bias_cache: Cache = None) -> torch.Tensor:
    """In place: ``out[j] += sign_j (scale F_j[row_offset : row_offset + D] @ t[j] +
    bias_scale eps_bias_j[0 .. D))`` in float32, one rounding to ``out``'s dtype."""
    rows, d = out.shape
    if rows == 0 or d == 0:
        return out
    idx, sign = _member_noise(member_ids, antithetic)
    f = _RowFactors(idx, seed=seed, key=key, epoch=epoch, rank=rank, row_offset=row_offset,
                    d=d, cache=cache)
    delta = f.expand(t.float()) * (sign * scale)[:, None]  # (rows, D)
    if bias_key is not None:
        eps = _dense_rows(idx, d, seed=seed, key=bias_key, epoch=epoch, cache=bias_cache)
        delta += eps * (sign * bias_scale)[:, None]
    out.copy_(out.float() + delta)
    return out


def dense_noise_add_(out: torch.Tensor, member_ids: torch.Tensor, *, seed: int, key: int,
                     epoch: int, scale: float, antithetic: bool) -> torch.Tensor:
    """In place: ``out[j] += sign_j scale eps_j[0 .. D)`` (float32 math, one rounding)."""
    rows, d = out.shape
    if rows == 0 or d == 0:
        return out
    idx, sign = _member_noise(member_ids, antithetic)
    eps = _dense_rows(idx, d, seed=seed, key=key, epoch=epoch, cache=None)
    out.copy_(out.float() + eps * (sign * scale)[:, None])
    return out


# -- the perturbed linear layer -------------------------------------------------------------


def perturbed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     member_ids: torch.Tensor, *, seed: int, weight_key: Optional[int],
                     bias_key: Optional[int], epoch: int, rank: int, scale: float, sigma: float,
                     antithetic: bool, weight_cache: Cache = None, bias_cache: Cache = None
                     ) -> torch.Tensor:
    """``out[j] = x[j] W^T + b + s_j scale (x[j] B0_j) A0_j^T + s_j sigma eps_b_j``.

    ``x (rows, n)``, ``weight (m, n)``, ``member_ids (rows,)``; the factor block of each
    distinct member is generated (or read from ``weight_cache``) once for both products.
    Not differentiable by itself (``ops`` wraps it with its backward).
    """
    out = torch.nn.functional.linear(x, weight, bias)  # (rows, m)
    rows = x.shape[0]
    m, n = weight.shape
    if rows == 0 or (weight_key is None and bias_key is None):
        return out
    idx, sign = _member_noise(member_ids, antithetic)
    if weight_key is None:  # bias noise only
        eps = _dense_rows(idx, m, seed=seed, key=bias_key, epoch=epoch, cache=bias_cache)
        delta = eps * (sign * sigma)[:, None]  # (rows, m)
    else:
        layout = _noise.FactorLayout(m, n, rank)
        f = _RowFactors(idx, seed=seed, key=weight_key, epoch=epoch, rank=rank, row_offset=0,
                        d=layout.rows, cache=weight_cache)
        t = _Slice(f, layout.b_rows).project(x.float()) * (sign * scale)[:, None]  # (rows, r)
        a0 = _Slice(f, layout.a_rows)
        if bias_key is not None:
            # the bias noise as one more column of A0 (its coefficient s_j sigma): one product
            eps = f.dense(bias_key, m, bias_cache)  # (rows or groups, m)
            a0.blocks = torch.cat([a0.blocks, eps.unsqueeze(2)], dim=2)  # (., m, r + 1)
            t = torch.cat([t, (sign * sigma)[:, None]], dim=1)  # (rows, r + 1)
        delta = a0.expand(t)  # (rows, m)
    if out.dtype == torch.float32:
        return out.add_(delta)
    return (out.float() + delta).to(out.dtype)


class _Slice:
    """Rows ``rows`` of a :class:`_RowFactors`' blocks (a view, nothing copied)."""

    def __init__(self, f: _RowFactors, rows: slice):
        self.blocks = f.blocks[:, rows]
        self.inv = f.inv

    project = _RowFactors.project
    expand = _RowFactors.expand


def perturbed_linear_grad_x(grad_out: torch.Tensor, weight: torch.Tensor,
                            member_ids: torch.Tensor, *, seed: int, weight_key: Optional[int],
                            epoch: int, rank: int, scale: float, antithetic: bool
                            ) -> torch.Tensor:
    """``dx[j] = g[j] W + s_j scale (g[j] A0_j) B0_j^T`` with the factors regenerated."""
    grad_x = grad_out.mm(weight)  # (rows, n)
    if weight_key is None or grad_out.shape[0] == 0:
        return grad_x
    m, n = weight.shape
    idx, sign = _member_noise(member_ids, antithetic)
    layout = _noise.FactorLayout(m, n, rank)
    f = _RowFactors(idx, seed=seed, key=weight_key, epoch=epoch, rank=rank, row_offset=0,
                    d=layout.rows, cache=None)
    u = _Slice(f, layout.a_rows).project(grad_out.float())  # (rows, r)
    delta = _Slice(f, layout.b_rows).expand(u) * (sign * scale)[:, None]
    return (grad_x.float() + delta).to(grad_x.dtype)


# -- the updates ------------------------------------------------------------------------------


def lowrank_update(m: int, n: int, *, seed: int, key: int, epoch: int, rank: int,
                   noise_indices: torch.Tensor, coeffs: torch.Tensor,
                   precision: str = "ieee") -> torch.Tensor:
    """``G = sum_k coeffs[k] A0_k @ B0_k^T``: ``(m, n)`` float32.

    One ``(m, K_chunk r) @ (K_chunk r, n)`` product per chunk of noise indices, float32
    accumulation; ``"bf16"`` rounds ``coeffs[k] A0_k`` and ``B0_k`` to bfloat16 once and
    multiplies those values in float32. On a CUDA device the product follows PyTorch's
    float32 matmul setting (this backend's target is the CPU, where ``"tf32"`` is IEEE).
    """
    idx = noise_indices.reshape(-1).to(torch.int64)
    coef = coeffs.reshape(-1).to(device=idx.device, dtype=torch.float32)
    g = torch.zeros((m, n), dtype=torch.float32, device=idx.device)
    k = idx.numel()
    if k == 0 or m == 0 or n == 0:
        return g
    layout = _noise.FactorLayout(m, n, rank)
    for sl in _chunks(k, layout.numel, UPDATE_CHUNK_ELEMENTS):
        block = normal_block(seed, key, epoch, idx[sl], layout.numel).view(-1, layout.rows, rank)
        a0, b0 = layout.split(block)
        a = (a0 * coef[sl, None, None]).permute(1, 0, 2).reshape(m, -1)  # (m, Kr)
        b = b0.permute(1, 0, 2).reshape(n, -1)  # (n, Kr)
        if precision == "bf16":
            a = a.to(torch.bfloat16).float()
            b = b.to(torch.bfloat16).float()
        g.addmm_(a, b.T)
    return g


def dense_update(numel: int, *, seed: int, key: int, epoch: int, noise_indices: torch.Tensor,
                 coeffs: torch.Tensor) -> torch.Tensor:
    """``g = sum_k coeffs[k] eps_k``: ``(numel,)`` float32."""
    idx = noise_indices.reshape(-1).to(torch.int64)
    coef = coeffs.reshape(-1).to(device=idx.device, dtype=torch.float32)
    g = torch.zeros((numel,), dtype=torch.float32, device=idx.device)
    if numel == 0:
        return g
    for sl in _chunks(idx.numel(), numel, UPDATE_CHUNK_ELEMENTS):
        g.addmv_(normal_block(seed, key, epoch, idx[sl], numel).T, coef[sl])
    return g
