"""``torch.distributed`` helpers for sharding a population over ranks.

EGGROLL needs very little communication: every rank regenerates the same noise from the
same seed, so after each rank evaluated its contiguous slice of the population only the
fitnesses (N numbers) must be shared, and every rank then applies the identical update.
These helpers wrap the few collectives that needs, on the default (world) process group:

* :func:`all_gather_population`: the N fitnesses from each rank's slice, with the slice
  lengths (and the epochs) validated *collectively*, so that a wrong length on one rank
  gives the same clear error on every rank instead of leaving the others blocked in the
  collective. :func:`all_gather_population_deferred` is the same collective with those
  checks left on the device, to be read later (EGGROLL reads them with its step's own
  checks, after the update is queued).
* :func:`report_failure`: the same collective on a rank whose evaluation raised: it sends a
  failure flag and a short description of the exception instead of fitnesses, and the
  other ranks raise :class:`RankFailedError` at once instead of waiting for the process
  group's timeout.
* :func:`check_ranks_agree`: a tiny collective at set-up time that compares settings
  (seed, sigma, ...) and fingerprints of the starting parameters across ranks, turning a
  silent divergence into an error that names every rank's value.
* :func:`sum_over_ranks` and :func:`broadcast_from_rank0`: running statistics and
  one-time initial values of the EvoTorch searcher.

Tensors are moved to the device the backend needs: the current CUDA device (or the
tensor's own CUDA device) for NCCL, the CPU for Gloo and other CPU backends.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch

__all__ = [
    "is_initialized",
    "process_group_info",
    "collective_device",
    "RankFailedError",
    "all_gather_population",
    "all_gather_population_deferred",
    "GatherChecks",
    "report_failure",
    "check_ranks_agree",
    "sum_over_ranks",
    "broadcast_from_rank0",
]

DeviceLike = Optional[Union[str, torch.device]]

_NO_GROUP = (
    "distributed=True needs an initialized torch.distributed process group: call "
    "torch.distributed.init_process_group(...) first (e.g. under torchrun: backend='nccl' "
    "with one GPU per rank, or 'gloo' on the CPU)"
)


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and its default group is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def process_group_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group.

    Raises:
        RuntimeError: no initialized process group.
    """
    import torch.distributed as dist

    if not is_initialized():
        raise RuntimeError(_NO_GROUP)
    return dist.get_rank(), dist.get_world_size()


def collective_device(like: DeviceLike = None) -> torch.device:
    """The device collective tensors must live on for the default group's backend.

    NCCL: ``like`` when it is a CUDA device, else the current CUDA device. A backend that
    combines NCCL with a CPU backend (``"cpu:gloo,cuda:nccl"``): ``like`` itself (CPU
    tensors go to the CPU backend). Anything else (Gloo, MPI, ...): the CPU.

    Raises:
        RuntimeError: NCCL without a CUDA device.
    """
    import torch.distributed as dist

    like = None if like is None else torch.device(like)
    backend = str(dist.get_backend()).lower()
    if backend == "nccl":
        if like is not None and like.type == "cuda":
            return like
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        raise RuntimeError("the NCCL backend needs CUDA tensors, but no CUDA device is available; "
                           "use backend='gloo' on the CPU")
    if "nccl" in backend and like is not None:
        return like
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """``(world, *t.shape)``: every rank's ``t`` (same shape and dtype on every rank)."""
    import torch.distributed as dist

    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.stack(parts)


class RankFailedError(RuntimeError):
    """Raised on the other ranks when a rank reports that it failed in a generation.

    The rank that failed takes part in the generation's fitness all-gather with a flag and
    a short description of its exception instead of fitnesses (see :func:`report_failure`),
    then raises its own exception; the other ranks raise this error from the same
    all-gather, so that nobody waits for the process group's timeout. No rank applies an
    update for that generation.

    Attributes:
        failures: process rank -> ``"ExceptionType: message"`` (the message possibly
            truncated) of every rank that reported a failure.
        epoch: the epoch of the generation that failed, as this rank counts it (None when
            unknown).
    """

    def __init__(self, message: str, failures: Optional[Mapping[int, str]] = None,
                 epoch: Optional[int] = None):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.epoch = epoch


# The fitness all-gather's per-rank payload, as bytes: four int64 header words (slice
# length, failure stage, epoch, length of the failure text), the failure text (UTF-8, at
# most _TEXT_BYTES bytes), then the slice's fitnesses as float64.
_OK, _FAILED_IN_EVALUATION, _FAILED_IN_STEP = range(3)
_STAGES = {"evaluation": _FAILED_IN_EVALUATION, "step": _FAILED_IN_STEP}
_STAGE_TEXT = {_FAILED_IN_EVALUATION: "failed during evaluation",
               _FAILED_IN_STEP: "failed in step() before the update"}
_WORDS = 4
_TEXT_BYTES = 224
_HEADER_BYTES = 8 * _WORDS + _TEXT_BYTES  # a multiple of 8: the float64 values stay aligned
_NO_EPOCH = -1


def describe_exception(error: BaseException, limit: int = _TEXT_BYTES) -> bytes:
    """``"ExceptionType: message"`` as UTF-8, cut to at most ``limit`` bytes (ending in
    ``"..."`` when cut, never inside a character)."""
    text = type(error).__name__
    message = str(error)
    if message:
        text = f"{text}: {message}"
    data = text.encode("utf-8", errors="replace")
    if len(data) > limit:
        data = data[: limit - 3].decode("utf-8", errors="ignore").encode("utf-8") + b"..."
    return data


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a small CPU tensor) on ``device``; to a CUDA device through pinned memory and
    a copy that does not make the host wait for the work queued on the device."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _exchange(local: Optional[torch.Tensor], population_size: int, like: DeviceLike,
              epoch: Optional[int], failure: Optional[tuple[int, bytes]]) -> tuple[torch.Tensor, int]:
    """The one per-generation collective: every rank's slice of fitnesses, or its failure.

    Queued without reading anything back to the host (on a GPU the host goes on while the
    device finishes the evaluation and the all-gather). Returns ``(gathered, per)``:
    ``gathered`` the ``(W, header + 8 * per)`` bytes of every rank's payload on the
    collective device (:func:`_rows` reads the headers, :func:`_values` gives the
    fitnesses), ``per = N / W``.
    """
    rank, world = process_group_info()
    n = int(population_size)
    if n % world:
        raise ValueError(f"population_size {n} must be divisible by the world size {world} "
                         f"(every rank evaluates an equal slice)")
    per = n // world
    if like is None:
        like = local.device if local is not None else None
    device = collective_device(like)
    count, stage, text = -1, _OK, b""
    values = None
    if failure is not None:
        stage, text = failure
        count = per
    else:
        count = int(local.shape[0]) if local.dim() == 1 else -1
        if count == per:
            values = local.detach().to(device=device, dtype=torch.float64)
    if values is None:
        values = torch.zeros(per, dtype=torch.float64, device=device)
    header = torch.tensor([count, stage, _NO_EPOCH if epoch is None else int(epoch), len(text)],
                          dtype=torch.int64)
    field = torch.zeros(_TEXT_BYTES, dtype=torch.uint8)
    if text:
        field[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    head = _on_device(torch.cat([header.view(torch.uint8), field]), device)
    payload = torch.cat([head, values.contiguous().view(torch.uint8)])
    try:
        gathered = _all_gather(payload, world)  # (W, header + 8 * per) bytes
    except RuntimeError as err:
        raise RuntimeError(
            f"rank {rank}: the all-gather of the generation's fitnesses failed; another rank has "
            f"probably exited (its process died or was stopped: see its output), or the process "
            f"group is broken; nothing was updated on this rank ({type(err).__name__}: {err})"
        ) from err
    return gathered, per


def _values(gathered: torch.Tensor) -> torch.Tensor:
    """The ``(N,)`` float64 fitnesses of an all-gathered payload (meaningful only when every
    rank sent a slice of the right length)."""
    return gathered[:, _HEADER_BYTES:].contiguous().view(torch.float64).reshape(-1)


def _rows(gathered: torch.Tensor) -> list:
    """One ``(count, stage, epoch, text)`` tuple per rank: the headers, read to the host."""
    heads = gathered[:, :_HEADER_BYTES].cpu()
    words = heads[:, : 8 * _WORDS].contiguous().view(torch.int64).tolist()
    rows = []
    for r, (c, s, e, length) in enumerate(words):
        msg = bytes(heads[r, 8 * _WORDS : 8 * _WORDS + length].tolist()).decode("utf-8", errors="replace")
        rows.append((c, s, e, msg))
    return rows


def _header_flag(gathered: torch.Tensor, per: int) -> torch.Tensor:
    """On the device, without a host read: True when :func:`_rows_error` would find an
    error (a failure reported, a slice of the wrong length, ranks at different epochs)."""
    words = gathered[:, : 8 * _WORDS].contiguous().view(torch.int64)
    bad = (words[:, 0] != per) | (words[:, 1] != _OK)
    epochs = words[:, 2]
    given = epochs != _NO_EPOCH
    hi = torch.where(given, epochs, torch.iinfo(torch.int64).min).amax()
    lo = torch.where(given, epochs, torch.iinfo(torch.int64).max).amin()
    return bad.any() | (given.any() & (hi != lo))


def _rows_error(rows: list, n: int, per: int, epoch: Optional[int]) -> Optional[BaseException]:
    """The error the headers ``rows`` call for, checked in this order: failures reported
    by ranks, slices of the wrong length, ranks at different epochs; None when all is well."""
    world = len(rows)
    failed = [(r, s, msg) for r, (_, s, _, msg) in enumerate(rows) if s != _OK]
    if failed:
        what = "; ".join(f"rank {r} {_STAGE_TEXT.get(s, 'failed')}: {msg or '<no message>'}"
                         for r, s, msg in failed)
        at = "" if epoch is None else f" (epoch {epoch})"
        return RankFailedError(
            f"{what}; no rank applied an update for this generation{at}; see the output of the "
            f"failing rank for its traceback",
            failures={r: msg for r, _, msg in failed}, epoch=epoch)
    bad = [(r, c) for r, (c, _, _, _) in enumerate(rows) if c != per]
    if bad:
        got = ", ".join(f"rank {r}: {'not 1-D' if c < 0 else f'{c} values'}" for r, c in bad)
        return ValueError(
            f"every rank must pass the fitnesses of its own slice of the population "
            f"({per} values = population_size {n} / world size {world}, see "
            f"pop.local_population_size), got {got}; nothing was updated"
        )
    epochs = [e for _, _, e, _ in rows]
    if len({e for e in epochs if e != _NO_EPOCH}) > 1:
        listed = ", ".join(f"rank {r}: {e}" for r, e in enumerate(epochs) if e != _NO_EPOCH)
        return RuntimeError(
            f"the ranks are at different epochs ({listed}), so they would apply different "
            f"updates; nothing was updated. A step that failed on some ranks only after the "
            f"fitnesses were gathered leaves the ranks out of step: restore every rank from "
            f"the same checkpoint (state_dict) before continuing"
        )
    return None


class GatherChecks:
    """The checks of one fitness all-gather, left on the device (from
    :func:`all_gather_population_deferred`): whether a rank reported a failure, sent a slice
    of the wrong length or was at another epoch.

    It has the interface of a step refusal (:class:`~evotorch_eggroll.strategy.StepRefusal`):
    ``flag`` is the one-element bool tensor, set on the device when any check fails, and
    :meth:`error` gives the exception that names the cause. EGGROLL and
    ``EggrollStrategy.step`` read the flag with their own checks after the update is queued,
    then roll the update back and raise :meth:`error`.

    Attributes:
        flag: one-element bool tensor on the collective device (its kernels queued when first accessed).
        failed: whether :meth:`error` was called (the generation is not to be used).
    """

    def __init__(self, gathered: torch.Tensor, population_size: int, per: int, epoch: Optional[int],
                 on_failure: Optional[Callable[[], None]] = None) -> None:
        self._gathered = gathered
        self._n, self._per, self._epoch = int(population_size), per, epoch
        self._on_failure = on_failure
        self.failed = False

    @functools.cached_property
    def flag(self) -> torch.Tensor:
        """The checks' one-element bool flag, computed on the device when first asked for
        (the blocking :func:`all_gather_population` reads the headers instead)."""
        return _header_flag(self._gathered, self._per).reshape(1)

    def read(self) -> Optional[BaseException]:
        """Reads the headers back (waits for the all-gather): the exception they call for,
        None when every rank sent its slice at the same epoch."""
        return _rows_error(_rows(self._gathered), self._n, self._per, self._epoch)

    def error(self) -> BaseException:
        """For a set flag: runs ``on_failure`` (if given: e.g. putting a problem's state
        back), marks the checks failed and gives the exception (:class:`RankFailedError`,
        or the ValueError or RuntimeError of :func:`all_gather_population`)."""
        self.failed = True
        if self._on_failure is not None:
            self._on_failure()
        err = self.read()
        return err if err is not None else RuntimeError(
            "the fitness all-gather's checks disagree between the device and the host; nothing was updated")

    def succeeded(self) -> bool:
        """Whether the all-gather succeeded on every rank (reads the flag unless
        :meth:`error` was already called; a set flag calls it)."""
        if self.failed:
            return False
        if bool(self.flag.any()):
            self.error()
            return False
        return True


def all_gather_population(local: torch.Tensor, population_size: int, *,
                          like: DeviceLike = None, epoch: Optional[int] = None) -> torch.Tensor:
    """The fitnesses of the whole population from every rank's contiguous slice.

    Rank ``k`` holds the values of members ``k * N/W .. (k+1) * N/W - 1``; the result
    concatenates the slices in rank order. One ``all_gather`` per generation of
    ``8 * N/W`` bytes of float64 values (which hold float32/float16/bfloat16 values exactly)
    plus a 256-byte header per rank: the slice length, so that a wrong length on any rank
    raises the same error on every rank rather than blocking the others; the epoch, so that
    ranks that got out of step raise instead of applying different updates; and a failure
    flag with a short description, set by a rank that failed in this generation
    (:func:`report_failure`), so that the others raise at once. The headers are read back
    to the host before this returns (:func:`all_gather_population_deferred` leaves that
    read for later).

    Args:
        local: ``(N/W,)`` this rank's values (any real dtype, any device).
        population_size: N, a multiple of the world size W.
        like: device whose backend placement to use (default: ``local``'s).
        epoch: the generation's epoch on this rank, compared across ranks (None: not
            compared).

    Returns:
        ``(N,)`` on ``local``'s device, in ``local``'s dtype; identical on every rank.

    Raises:
        RankFailedError: another rank reported a failure in this generation (naming every
            failing rank and its exception).
        ValueError: ``N`` not a multiple of the world size, or a rank gave a slice of the
            wrong length (raised on every rank, naming the ranks and their lengths).
        RuntimeError: the ranks passed different epochs, or the collective itself failed
            (e.g. a rank exited).
    """
    values, checks = all_gather_population_deferred(local, population_size, like=like, epoch=epoch)
    err = checks.read()
    if err is not None:
        raise err
    return values


def all_gather_population_deferred(
    local: torch.Tensor, population_size: int, *, like: DeviceLike = None, epoch: Optional[int] = None,
    on_failure: Optional[Callable[[], None]] = None,
) -> tuple[torch.Tensor, GatherChecks]:
    """:func:`all_gather_population` without reading anything back to the host: the
    checks of the headers stay on the device (:class:`GatherChecks`), so that the caller can
    queue work on the fitnesses before it reads them. The same collective as
    :func:`all_gather_population`, so ranks may mix the two.

    Args:
        local, population_size, like, epoch: as for :func:`all_gather_population`.
        on_failure: called by :meth:`GatherChecks.error` (e.g. to put a problem's state
            back).

    Returns:
        ``(values, checks)``: the ``(N,)`` fitnesses on ``local``'s device in its dtype
        (meaningless when ``checks.flag`` is set) and the checks.

    Raises:
        ValueError: ``N`` not a multiple of the world size.
        RuntimeError: the collective itself failed (e.g. a rank exited, with Gloo).
    """
    local = torch.as_tensor(local)
    gathered, per = _exchange(local, population_size, like, epoch, None)
    values = _values(gathered).to(device=local.device, dtype=local.dtype)
    return values, GatherChecks(gathered, population_size, per, epoch, on_failure)


def report_failure(error: BaseException, population_size: int, *, like: DeviceLike = None,
                   epoch: Optional[int] = None, during: str = "evaluation") -> None:
    """Take part in the generation's fitness all-gather as a rank that failed.

    The counterpart of :func:`all_gather_population` on a rank whose evaluation (or
    ``step``) raised ``error``: it sends a failure flag and ``"ExceptionType: message"``
    (cut to 224 bytes) instead of fitnesses, so the ranks waiting in
    :func:`all_gather_population` raise :class:`RankFailedError` at once. Returns
    normally: the caller re-raises its own exception.

    Args:
        error: this rank's exception.
        population_size: N, as the other ranks pass it to :func:`all_gather_population`.
        like: device whose backend placement to use (default: the CPU for Gloo, the
            current CUDA device for NCCL).
        epoch: the generation's epoch on this rank (for the other ranks' message).
        during: ``"evaluation"`` or ``"step"`` (where this rank failed, for the message).

    Raises:
        ValueError: ``during`` unknown, or N not a multiple of the world size.
        RuntimeError: the collective itself failed (e.g. another rank exited).
    """
    if during not in _STAGES:
        raise ValueError(f"during must be one of {sorted(_STAGES)}, got {during!r}")
    gathered, _ = _exchange(None, population_size, like, epoch, (_STAGES[during], describe_exception(error)))
    _rows(gathered)  # a host read: the collective has completed before the caller raises


# -- agreement check --------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _TEXT, _NONE = range(5)


def _encode(value: Any) -> tuple[int, int, int]:
    """A setting as three int64 words: kind, high and low halves of a 64-bit payload."""
    if value is None:
        return _NONE, 0, 0
    if isinstance(value, bool):
        return _BOOL, 0, int(value)
    if isinstance(value, int):
        v = value & 0xFFFFFFFFFFFFFFFF
        return _INT, v >> 32, v & 0xFFFFFFFF
    if isinstance(value, float):
        (v,) = struct.unpack("<Q", struct.pack("<d", value))
        return _FLOAT, v >> 32, v & 0xFFFFFFFF
    return _TEXT, 0, zlib.crc32(str(value).encode("utf-8"))


def _decode(kind: int, hi: int, lo: int, own: Any) -> str:
    if kind == _NONE:
        return "None"
    if kind == _BOOL:
        return str(bool(lo))
    if kind == _INT:
        return str((hi << 32) | lo)
    if kind == _FLOAT:
        (v,) = struct.unpack("<d", struct.pack("<Q", (hi << 32) | lo))
        return repr(v)
    if _encode(own) == (kind, hi, lo):
        return repr(own)
    return f"<a different value, crc32 {lo:08x}>"


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """``(3,)`` float64: sum, sum of squares and sum of absolute values of ``t``."""
    x = t.detach().to(torch.float64)
    return torch.stack([x.sum(), x.square().sum(), x.abs().sum()])


def _same_fingerprint(a: list[float], b: list[float]) -> bool:
    if all(math.isnan(x) for x in a + b):
        return True
    s_a, q_a, m_a = a
    s_b, q_b, m_b = b
    scale = max(m_a, m_b)
    return (abs(s_a - s_b) <= 1e-9 * scale
            and abs(q_a - q_b) <= 1e-9 * max(q_a, q_b)
            and abs(m_a - m_b) <= 1e-9 * scale)


def check_ranks_agree(settings: Mapping[str, Any],
                      tensors: Optional[Mapping[str, torch.Tensor]] = None, *,
                      like: DeviceLike = None, owner: str = "the strategy",
                      hints: Optional[Mapping[str, str]] = None) -> None:
    """Raise on every rank unless all ranks hold the same settings and tensors.

    Two tiny ``all_gather`` calls: first three int64 words per setting (plus a checksum of
    the tensors' names, shapes and dtypes), then, only when those agree, three float64
    numbers per tensor (sum, sum of squares and sum of absolute values, compared with a
    relative tolerance of 1e-9). Every rank sees the same gathered data, so every rank
    raises the same error and none is left waiting in a later collective.

    Args:
        settings: name -> int, float, bool, str or None (strings are compared by checksum).
        tensors: name -> tensor whose values must agree (e.g. the starting parameters).
        like: device for the backend placement (default: the first tensor's, else CPU).
        owner: what is being checked, for the message.
        hints: name -> advice appended to the message when that setting differs.

    Raises:
        ValueError: a setting or tensor differs; the message names every rank's value.
    """
    rank, world = process_group_info()
    tensors = dict(tensors or {})
    hints = dict(hints or {})
    if like is None and tensors:
        like = next(iter(tensors.values())).device
    device = collective_device(like)
    layout = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in tensors.items())
    fields = dict(settings)
    fields["process rank"] = rank
    fields["evolved tensors (names, shapes, dtypes)"] = layout
    names = list(fields)
    words = torch.tensor([w for k in names for w in _encode(fields[k])], dtype=torch.int64,
                         device=device)
    table = _all_gather(words, world).reshape(world, len(names), 3).tolist()

    problems = []
    for j, name in enumerate(names):
        if name == "process rank":
            continue
        column = [tuple(table[r][j]) for r in range(world)]
        if len(set(column)) > 1:
            values = ", ".join(f"rank {r}: {name}={_decode(*column[r], fields[name])}"
                               for r in range(world))
            hint = f" {hints[name]}" if name in hints else ""
            problems.append(f"{name} differs across ranks ({values}).{hint}")
    if not problems and tensors:
        prints = torch.cat([_fingerprint(v).to(device) for v in tensors.values()])
        all_prints = _all_gather(prints, world).reshape(world, len(tensors), 3).tolist()
        for j, name in enumerate(tensors):
            differing = [r for r in range(1, world)
                         if not _same_fingerprint(all_prints[0][j], all_prints[r][j])]
            if differing:
                others = ", ".join(str(r) for r in differing)
                hint = f" {hints['tensors']}" if "tensors" in hints else ""
                problems.append(f"the values of {name!r} differ between rank 0 and rank(s) "
                                f"{others}.{hint}")
                break
    if problems:
        raise ValueError(f"{owner} runs with distributed=True over {world} ranks, which must all "
                         f"agree, but " + " ".join(problems))


# -- sums and broadcasts ----------------------------------------------------------------

def sum_over_ranks(t: torch.Tensor, *, like: DeviceLike = None) -> torch.Tensor:
    """The sum of ``t`` over all ranks, added in rank order (so bit-identical on every
    rank); same shape, dtype and device as ``t``."""
    _, world = process_group_info()
    device = collective_device(t.device if like is None else like)
    gathered = _all_gather(t.detach().to(device), world)
    total = gathered[0].clone()
    for r in range(1, world):
        total += gathered[r]
    return total.to(t.device)


def broadcast_from_rank0(t: torch.Tensor, *, like: DeviceLike = None) -> torch.Tensor:
    """Rank 0's value of ``t`` (a new tensor with ``t``'s shape, dtype and device)."""
    import torch.distributed as dist

    process_group_info()
    device = collective_device(t.device if like is None else like)
    buf = t.detach().to(device).clone().contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)
