"""Performance table: ``python -m evotorch_eggroll.benchmark``.

Every case is timed against, in the same process and at the same precision:

* ``plain``: the unperturbed forward of the same model on the same rows — the limit;
* ``ours``: ``pop.batched_forward`` (layer cases too), eager;
* ``update``: one ``strategy.step`` (noise regenerated, ES gradient, Adam);
* ``naive``: per-member weights ``W + A Bᵀ`` materialised, then a batched matmul (skipped
  when it would not fit in memory);
* ``jax``: the JAX reference algorithm when ``jax`` is importable: one jitted call, the
  per-member forward under ``jax.vmap``, the noise drawn in the call with ``jax.random``
  as ours is (antithetic pairs: members 2k and 2k+1 share a draw with opposite signs;
  low-rank factors scaled by sigma/sqrt(rank) on weights, full-rank noise on biases);
* ``graph``: a CUDA graph captured from the same call, replayed: the plain forward's and
  ours (layer cases: the ``ops.perturbed_linear`` call itself; other cases: the same
  ``batched_forward`` call as the eager timing, whose member-id range check ran once
  during warm-up).

Two kinds of time, never mixed in one ratio:

* **wall** (every column unless marked otherwise): host wall-clock of one call from a
  synchronised start (the device idle) to a synchronised end — what a caller waits for,
  host overhead included; for JAX the jitted call with ``block_until_ready``;
* **device**: CUDA-event time of one graph replay (no host work), for the plain forward's
  graph and ours only; ``dev ratio`` divides these two. JAX has no device-time column.

Every time is the median of ``--reps`` samples after warm-up (the update too). Precisions:
``fp32`` (IEEE), ``tf32`` (``torch.backends.cuda.matmul.allow_tf32 = True``; JAX with
``default_matmul_precision("tensorfloat32")``) and ``bf16``. A graph capture that fails
prints its reason under the case's row and makes the command exit with status 1. On a
machine without a GPU the sizes shrink, the kernels run in Triton's interpreter and no
graph is captured: those numbers only show that the code runs.

``--lm`` times a character-level transformer language model instead
(:class:`evotorch_eggroll.char_lm.CharGPT`, nanoGPT-shaped: embeddings, causal
self-attention, GELU MLP, LayerNorms, linear head): ``pop.batched_forward`` of the whole
population against the plain forward of the same model on the same batch of tokens (every
member its own sequences), as population tokens per second of wall-clock time, eager, at
the precisions asked for. The GPU size is the LM example's: 16384 members x 4 sequences x
64 characters, 2 layers of width 128.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Callable, Optional, Union

import torch

__all__ = ["Case", "Result", "default_cases", "run_case", "LMCase", "LMResult", "lm_case",
           "run_lm_case", "main"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a model, rows per member, population size and rank."""

    name: str
    kind: str  # "rl" | "supervised" | "layer"
    population: int
    rows_per_member: int
    rank: int
    layers: tuple[int, ...]  # feature sizes, e.g. (17, 256, 256, 6)
    shared_rows: bool = False  # supervised: every member sees the same minibatch

    @property
    def rows(self) -> int:
        return self.population * self.rows_per_member


@dataclasses.dataclass
class Result:
    """One row of the table. ``*_ms`` fields are wall-clock medians (see the module
    docstring) except ``*_device_ms``, device time of one graph replay."""

    case: str
    precision: str
    plain_ms: float
    eggroll_ms: float
    update_ms: float
    naive_ms: Optional[float]
    jax_ms: Optional[float]
    plain_graph_ms: Optional[float] = None
    graph_ms: Optional[float] = None
    plain_graph_device_ms: Optional[float] = None
    graph_device_ms: Optional[float] = None
    graph_error: Optional[str] = None  # why a graph capture failed; None if none did

    @property
    def ratio(self) -> float:
        return self.eggroll_ms / self.plain_ms

    @property
    def update_ratio(self) -> float:
        return self.update_ms / self.eggroll_ms

    @property
    def vs_jax(self) -> Optional[float]:
        return _quotient(self.eggroll_ms, self.jax_ms)

    @property
    def graph_vs_jax(self) -> Optional[float]:
        return _quotient(self.graph_ms, self.jax_ms)

    @property
    def graph_ratio(self) -> Optional[float]:
        """Device time of our graph over the plain forward's graph."""
        return _quotient(self.graph_device_ms, self.plain_graph_device_ms)


def _quotient(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def default_cases(small: bool = False) -> list[Case]:
    """The cases of the performance goals; ``small`` shrinks them for a CPU smoke run."""
    if small:
        return [
            Case("rl_mlp", "rl", 64, 1, 4, (17, 32, 32, 6)),
            Case("supervised_shared", "supervised", 8, 8, 4, (64, 32, 10), shared_rows=True),
            Case("layer_r4_1row", "layer", 64, 1, 4, (64, 64)),
            Case("layer_r4_16rows", "layer", 4, 16, 4, (64, 64)),
        ]
    cases = [Case(f"rl_mlp_N{n}", "rl", n, 1, 4, (17, 256, 256, 6)) for n in (2048, 16384, 65536)]
    cases += [
        Case("supervised_shared", "supervised", 256, 64, 4, (784, 256, 10), shared_rows=True),
        Case("supervised_distinct", "supervised", 256, 64, 4, (784, 256, 10)),
    ]
    for rows in (4096, 16384):
        for r in (1, 4, 16):
            cases.append(Case(f"layer4096_rows{rows}_r{r}_1row", "layer", rows, 1, r, (4096, 4096)))
        cases.append(Case(f"layer4096_rows{rows}_r4_16rows", "layer", rows // 16, 16, 4, (4096, 4096)))
    return cases


@dataclasses.dataclass(frozen=True)
class LMCase:
    """The ``--lm`` case: a :class:`~evotorch_eggroll.char_lm.CharGPT` evaluated for a
    population, ``seqs_per_member`` sequences of ``seq_len`` characters per member."""

    name: str
    population: int
    seqs_per_member: int
    seq_len: int
    d_model: int
    layers: int
    heads: int
    rank: int

    @property
    def tokens(self) -> int:
        """Tokens per forward call: population x sequences per member x sequence length."""
        return self.population * self.seqs_per_member * self.seq_len


@dataclasses.dataclass
class LMResult:
    """One row of the ``--lm`` table: wall-clock medians of one forward call of ``tokens``
    tokens, the plain model's and ``pop.batched_forward``'s."""

    case: str
    precision: str
    tokens: int
    plain_ms: float
    eggroll_ms: float

    @property
    def plain_tokens_per_s(self) -> float:
        return self.tokens / (self.plain_ms * 1e-3)

    @property
    def eggroll_tokens_per_s(self) -> float:
        return self.tokens / (self.eggroll_ms * 1e-3)

    @property
    def ratio(self) -> float:
        """Time of the population's forward over the plain forward's."""
        return self.eggroll_ms / self.plain_ms


def lm_case(small: bool = False) -> LMCase:
    """The LM example's GPU size, or with ``small`` a tiny one for a CPU smoke run."""
    if small:
        return LMCase("char_lm_small", 8, 2, 8, 16, 1, 2, 1)
    return LMCase("char_lm_N16384", 16384, 4, 64, 128, 2, 4, 1)


def _build_model(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    sizes = case.layers
    if case.kind == "layer":
        model: torch.nn.Module = torch.nn.Linear(sizes[0], sizes[1])
    else:
        act = torch.nn.Tanh if case.kind == "rl" else torch.nn.ReLU
        mods: list[torch.nn.Module] = []
        for i in range(len(sizes) - 1):
            mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                mods.append(act())
        model = torch.nn.Sequential(*mods)
    return model.to(device=device, dtype=dtype)


def _inputs(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n_in = case.layers[0]
    if case.shared_rows:
        base = torch.randn(case.rows_per_member, n_in, generator=g)
        x = base.repeat(case.population, 1)
    else:
        x = torch.randn(case.rows, n_in, generator=g)
    ids = torch.arange(case.population).repeat_interleave(case.rows_per_member)
    return x.to(device=device, dtype=dtype), ids.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(device: torch.device, fn: Callable[[], object], warmup: int, reps: int,
            before: Optional[Callable[[], object]] = None) -> float:
    """Median wall-clock ms of one call of ``fn`` from a synchronised start to a synchronised
    end; ``before`` (untimed) runs ahead of every call."""
    times = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        _synchronize(device)
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median device ms (CUDA events) of one call of ``fn``: only meaningful for work that
    the host issues at once, such as one graph replay or one kernel."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(fn: Callable[[], object]) -> "torch.cuda.CUDAGraph":
    """Warm ``fn`` up on a side stream (compiling its kernels), then capture one call of it
    in a CUDA graph. Raises whatever the capture raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


@dataclasses.dataclass(frozen=True)
class GraphTiming:
    wall_ms: Optional[float] = None
    device_ms: Optional[float] = None
    error: Optional[str] = None  # the capture's exception, as "Type: message"


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda"


def graph_timing(device: torch.device, fn: Callable[[], object], warmup: int,
                 reps: int) -> GraphTiming:
    """Wall-clock and device time of a graph replay of ``fn``, or why capturing it failed."""
    if not graphs_available(device):
        return GraphTiming()
    try:
        graph = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001 - reported in the table and by the exit status
        if device.type == "cuda":
            torch.cuda.synchronize()
        reason = " ".join(str(exc).split()) or "(no message)"
        return GraphTiming(error=f"{type(exc).__name__}: {reason}")
    return GraphTiming(wall_ms(device, graph.replay, warmup, reps),
                       device_ms(graph.replay, warmup, reps))


def _layer_call(model: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, case: Case,
                sigma: float) -> Callable[[], object]:
    """The perturbed-linear op of a single-layer case, as batched_forward calls it."""
    from . import ops

    def run():
        return ops.perturbed_linear(x, model.weight, model.bias, ids, seed=1, weight_key=2,
                                    bias_key=3, epoch=0, rank=case.rank, sigma=sigma,
                                    antithetic=True)

    return run


def _naive_forward(model: torch.nn.Module, x: torch.Tensor, case: Case, sigma: float):
    """Per-member weights materialised, then a batched matmul per layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    members = case.population
    gen = torch.Generator(device=x.device).manual_seed(1)
    factors = []
    for lin in linears:
        m, n = lin.weight.shape
        a = torch.randn(members, m, case.rank, device=x.device, dtype=x.dtype, generator=gen)
        b = torch.randn(members, n, case.rank, device=x.device, dtype=x.dtype, generator=gen)
        factors.append((a * sigma / math.sqrt(case.rank), b))

    def run():
        h = x.view(members, case.rows_per_member, -1)
        for i, lin in enumerate(linears):
            a, b = factors[i]
            w = lin.weight.unsqueeze(0) + a @ b.transpose(1, 2)  # (N, m, n) materialised
            h = torch.baddbmm(lin.bias.view(1, 1, -1), h, w.transpose(1, 2))
            if i < len(linears) - 1:
                h = torch.tanh(h) if case.kind == "rl" else torch.relu(h)
        return h

    return run


def jax_reference(model: torch.nn.Module, case: Case, precision: str, sigma: float):
    """The JAX reference algorithm for ``model``'s linear layers, doing the work ours does.

    Returns a jitted ``forward(x, epoch)``: ``x`` of shape ``(population, rows_per_member,
    in_features)``. Member ``i`` draws, inside the call, the noise of pair ``i // 2``
    (``jax.random`` keyed by epoch, pair and layer) with sign ``+1`` for even ``i`` and
    ``-1`` for odd: low-rank factors ``B0 (n, r)``, ``A0 (m, r)`` scaled by
    ``sign * sigma / sqrt(r)`` on each weight and full-rank ``sign * sigma * eps`` on each
    bias, so ``out = h Wᵀ + b + (h B0)(s σ/√r A0)ᵀ + s σ eps_b`` per layer.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    jdtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    matmul_precision = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}[precision]
    params = [
        (jnp.asarray(m.weight.detach().float().cpu().numpy(), dtype=jdtype),
         jnp.asarray(m.bias.detach().float().cpu().numpy(), dtype=jdtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    rank, kind = case.rank, case.kind
    scale = sigma / math.sqrt(rank)

    def member_forward(key, sign, xi):
        h = xi  # (rows_per_member, n)
        for i, (w, b) in enumerate(params):
            m, n = w.shape
            factor_key, bias_key = jax.random.split(jax.random.fold_in(key, i))
            factors = jax.random.normal(factor_key, (n + m, rank), dtype=jdtype)
            eps_b = jax.random.normal(bias_key, (m,), dtype=jdtype)
            b0, a0 = factors[:n], factors[n:] * (sign * scale).astype(jdtype)
            h = h @ w.T + b + (h @ b0) @ a0.T + (sign * sigma).astype(jdtype) * eps_b
            if i < len(params) - 1:
                h = jnp.tanh(h) if kind == "rl" else jax.nn.relu(h)
        return h

    base_key = jax.random.PRNGKey(0)

    @jax.jit
    def forward(x, epoch):
        members = jnp.arange(case.population)
        epoch_key = jax.random.fold_in(base_key, epoch)
        keys = jax.vmap(lambda pair: jax.random.fold_in(epoch_key, pair))(members // 2)
        signs = jnp.where(members % 2 == 0, 1.0, -1.0)
        with jax.default_matmul_precision(matmul_precision):
            return jax.vmap(member_forward)(keys, signs, x.astype(jdtype))

    return forward


def _jax_forward(model: torch.nn.Module, x: torch.Tensor, case: Case, precision: str,
                 sigma: float) -> Callable[[], object]:
    """One call of :func:`jax_reference` on the same input rows as ours."""
    import jax.numpy as jnp

    forward = jax_reference(model, case, precision, sigma)
    xj = jnp.asarray(x.float().cpu().numpy().reshape(case.population, case.rows_per_member, -1),
                     dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)

    def run():
        return forward(xj, 0).block_until_ready()

    return run


def run_case(
    case: Case,
    precision: str,
    device: torch.device,
    *,
    warmup: int = 5,
    reps: int = 20,
    with_jax: bool = True,
    with_naive: bool = True,
    with_graph: bool = True,
    naive_limit_bytes: int = 8 << 30,
    backend: str = "triton",
) -> Result:
    """Time one case at one precision; see the module docstring for what is measured.

    ``backend`` is the strategy's (``"triton"``: the kernels; ``"auto"``: the kernels on
    CUDA, the plain-torch path on a CPU without Triton's interpreter; ``"torch"``). The
    layer cases' graph timing calls the kernels' op directly, so it needs ``"triton"`` or
    ``"auto"`` on CUDA."""
    from . import EggrollStrategy

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        torch.manual_seed(0)
        model = _build_model(case, device, dtype)
        x, ids = _inputs(case, device, dtype)
        sigma = 0.05
        plain_graph = graph = GraphTiming()
        with torch.no_grad():
            plain_ms = wall_ms(device, lambda: model(x), warmup, reps)
            strategy = EggrollStrategy(sigma=sigma, lr=1e-3, rank=case.rank, backend=backend)
            strategy.setup(model)
            with strategy.perturb(case.population, 0) as pop:
                def ours():
                    return pop.batched_forward(model, x, member_ids=ids)

                eggroll_ms = wall_ms(device, ours, warmup, reps)
                if with_graph:
                    plain_graph = graph_timing(device, lambda: model(x), warmup, reps)
                    # the member-id range check runs (and is remembered) in the warm-up
                    perturbed = _layer_call(model, x, ids, case, sigma) if case.kind == "layer" else ours
                    graph = graph_timing(device, perturbed, warmup, reps)

            fit = torch.randn(case.population, device=device)

            def open_and_close_a_context():
                with strategy.perturb(case.population):
                    pass

            with warnings.catch_warnings():
                # the update is timed alone, after contexts without a forward: the strategy's
                # warning about such fitnesses is expected here
                warnings.filterwarnings("ignore", message=r"step\(\) follows a perturb context")
                update_ms = wall_ms(device, lambda: strategy.step(fit), warmup, reps,
                                    before=open_and_close_a_context)

            naive_ms = None
            n_elems = sum(
                m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
            )
            if with_naive and case.population * n_elems * x.element_size() * 2 <= naive_limit_bytes:
                try:
                    naive_ms = wall_ms(device, _naive_forward(model, x, case, sigma), warmup, reps)
                except torch.OutOfMemoryError:
                    naive_ms = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        jax_ms = None
        if with_jax and device.type == "cuda":
            try:
                jax_ms = wall_ms(device, _jax_forward(model, x, case, precision, sigma), warmup, reps)
            except ImportError:
                jax_ms = None
        errors = [f"{what} graph capture failed: {t.error}"
                  for what, t in (("plain", plain_graph), ("our", graph)) if t.error]
        return Result(case.name, precision, plain_ms, eggroll_ms, update_ms, naive_ms, jax_ms,
                      plain_graph.wall_ms, graph.wall_ms, plain_graph.device_ms,
                      graph.device_ms, "; ".join(errors) or None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def run_lm_case(case: LMCase, precision: str, device: torch.device, *, warmup: int = 5,
                reps: int = 20, backend: str = "triton") -> LMResult:
    """Time the plain forward and ``pop.batched_forward`` of the LM case at one precision
    (``backend`` as in :func:`run_case`)."""
    from . import EggrollStrategy
    from .char_lm import CharGPT, CharVocab, make_text

    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: choose among fp32, tf32, bf16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    text = make_text(4096)
    vocab = CharVocab(text)
    data = vocab.encode(text)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = case.population * case.seqs_per_member
    starts = torch.randint(0, data.numel() - case.seq_len, (rows, 1), generator=g)
    x = data[starts + torch.arange(case.seq_len)].to(device)  # (rows, T): each row its own window
    ids = torch.arange(case.population).repeat_interleave(case.seqs_per_member).to(device)
    torch.manual_seed(0)
    model = CharGPT(len(vocab), case.seq_len, d_model=case.d_model, layers=case.layers,
                    heads=case.heads).to(device=device, dtype=dtype)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with torch.no_grad():
            plain_ms = wall_ms(device, lambda: model(x), warmup, reps)
            strategy = EggrollStrategy(sigma=0.05, lr=1e-3, rank=case.rank, backend=backend)
            strategy.setup(model)
            with strategy.perturb(case.population, 0) as pop:
                eggroll_ms = wall_ms(device, lambda: pop.batched_forward(model, x, member_ids=ids),
                                     warmup, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    return LMResult(case.name, precision, case.tokens, plain_ms, eggroll_ms)


def noise_throughput(device: torch.device, numel: int = 1 << 26, reps: int = 10) -> float:
    """Normals per second of device time generated by the noise kernel (one launch of
    ``numel`` elements over four noise indices; CUDA-event time, GPU only)."""
    from . import ops

    idx = torch.arange(4, device=device)
    ms = device_ms(lambda: ops.normal_block(0, 1, 0, idx, numel // 4), 2, reps)
    return numel / (ms * 1e-3)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _jax_version() -> Optional[str]:
    try:
        import jax
    except ImportError:
        return None
    return jax.__version__


def _environment(with_jax: bool = False) -> str:
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = f"torch {torch.__version__} | triton {triton.__version__}"
    if with_jax and _jax_version():
        versions += f" | jax {_jax_version()}"
    return f"card: {card} | {versions} | commit {commit}"


# (header, width, cell): every time column is wall-clock unless its header says "dev".
_COLUMNS: list[tuple[str, int, Callable[[Result], str]]] = [
    ("plain ms", 9, lambda r: _fmt(r.plain_ms)),
    ("ours ms", 9, lambda r: _fmt(r.eggroll_ms)),
    ("ratio", 8, lambda r: _fmt(r.ratio, 2)),
    ("update ms", 9, lambda r: _fmt(r.update_ms)),
    ("upd/fwd", 7, lambda r: _fmt(r.update_ratio, 2)),
    ("naive ms", 9, lambda r: _fmt(r.naive_ms)),
    ("jax ms", 8, lambda r: _fmt(r.jax_ms)),
    ("ours/jax", 8, lambda r: _fmt(r.vs_jax, 2)),
    ("g.plain ms", 10, lambda r: _graph_cell(r, r.plain_graph_ms)),
    ("graph ms", 8, lambda r: _graph_cell(r, r.graph_ms)),
    ("graph/jax", 9, lambda r: _fmt(r.graph_vs_jax, 2)),
    ("g.plain dev", 11, lambda r: _graph_cell(r, r.plain_graph_device_ms)),
    ("graph dev", 9, lambda r: _graph_cell(r, r.graph_device_ms)),
    ("dev ratio", 9, lambda r: _fmt(r.graph_ratio, 2)),
]

_LM_COLUMNS: list[tuple[str, int, Callable[[LMResult], str]]] = [
    ("tokens", 10, lambda r: str(r.tokens)),
    ("plain ms", 9, lambda r: _fmt(r.plain_ms)),
    ("ours ms", 9, lambda r: _fmt(r.eggroll_ms)),
    ("ratio", 8, lambda r: _fmt(r.ratio, 2)),
    ("plain tok/s", 11, lambda r: f"{r.plain_tokens_per_s:.3g}"),
    ("ours tok/s", 10, lambda r: f"{r.eggroll_tokens_per_s:.3g}"),
]

LM_TABLE_LEGEND = (
    "Times in ms, medians of wall-clock time of one eager call from a synchronised start to a "
    "synchronised end. 'plain': the unperturbed model on all the tokens; 'ours': "
    "pop.batched_forward, every member on its own sequences. tok/s: tokens of the call per "
    "second."
)

TABLE_LEGEND = (
    "Times in ms, medians. Wall-clock (every column but 'dev'): one call from a synchronised "
    "start to a synchronised end, host overhead included; jax is one jitted call. 'dev': "
    "device time (CUDA events) of one replay of a captured CUDA graph; 'dev ratio' = graph "
    "dev / g.plain dev. Ratios only divide times of the same kind."
)


def _graph_cell(r: Result, value: Optional[float]) -> str:
    return "FAILED" if value is None and r.graph_error else _fmt(value)


def _columns(r: Union[Result, LMResult]) -> list:
    return _LM_COLUMNS if isinstance(r, LMResult) else _COLUMNS


def format_rows(r: Union[Result, LMResult]) -> list[str]:
    """The table lines of one result: its row, and the reason of a failed graph capture."""
    cells = [f"{r.case:<30} {r.precision:<5}"]
    cells += [f"{cell(r):>{width}}" for _, width, cell in _columns(r)]
    lines = [" ".join(cells)]
    if getattr(r, "graph_error", None):
        lines.append(f"    ^ {r.graph_error}")
    return lines


def format_table(results: Union[list[Result], list[LMResult]]) -> str:
    """The table of ``results`` (all of one kind) with its legend."""
    lm = bool(results) and isinstance(results[0], LMResult)
    columns, legend = (_LM_COLUMNS, LM_TABLE_LEGEND) if lm else (_COLUMNS, TABLE_LEGEND)
    head = " ".join([f"{'case':<30} {'prec':<5}"] + [f"{h:>{w}}" for h, w, _ in columns])
    lines = [head, "-" * len(head)]
    for r in results:
        lines += format_rows(r)
    return "\n".join(lines + [""] + textwrap.wrap(legend, 100))


def capture_failures(results: list[Result]) -> list[str]:
    """``"case precision: reason"`` for every result whose graph capture failed."""
    return [f"{r.case} {r.precision}: {r.graph_error}" for r in results
            if getattr(r, "graph_error", None)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evotorch_eggroll.benchmark",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2] + "\nCases (--cases matches substrings):\n"
        + "\n".join(f"  {c.name}" for c in default_cases())
        + "\nwith tiny sizes: " + ", ".join(c.name for c in default_cases(small=True)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--precisions", default="fp32,tf32,bf16",
                        help="comma-separated precisions among fp32, tf32, bf16 (tf32 is "
                             "skipped without a GPU); default: %(default)s")
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings of case names; a case runs if its "
                             "name contains one of them (default: every case)")
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes (always on without a GPU)")
    parser.add_argument("--reps", type=int, default=20,
                        help="timed samples per measurement, the update included (at most "
                             "3 without a GPU); default: %(default)s")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before each measurement (default: 5, 2 with "
                             "tiny sizes)")
    parser.add_argument("--no-jax", action="store_true",
                        help="skip the JAX reference (it runs only on a GPU, when jax is "
                             "importable)")
    parser.add_argument("--no-naive", action="store_true",
                        help="skip the materialised per-member baseline")
    parser.add_argument("--no-graph", action="store_true",
                        help="skip the CUDA-graph timings")
    parser.add_argument("--csv", default="",
                        help="also write the results to this CSV file (one column per "
                             "Result field and ratio)")
    parser.add_argument("--lm", action="store_true",
                        help="time the character-level transformer LM instead of the cases: "
                             "population tokens/s of pop.batched_forward vs the plain forward "
                             "on the same tokens (--precisions, --small, --reps, --warmup and "
                             "--csv apply)")
    parser.add_argument("--rollout", action="store_true",
                        help="run the whole-generation RL rollout benchmark instead (env-steps/s; "
                             "see python -m evotorch_eggroll.rollout_benchmark --help)")
    return parser


def main(argv: Optional[list[str]] = None) -> Union[list[Result], list[LMResult]]:
    """Run the benchmark and print the table; returns the results (see :func:`cli` for the
    exit status)."""
    args = build_parser().parse_args(argv)
    if args.lm and args.cases:
        raise SystemExit("--lm times the LM alone: leave out --cases")

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            raise RuntimeError("no GPU: set TRITON_INTERPRET=1 before importing triton")
        os.environ["TRITON_INTERPRET"] = "1"
        print("No CUDA GPU found: running the kernels in Triton's interpreter at tiny sizes.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    cases = default_cases(small)
    if args.cases:
        wanted = [w for w in args.cases.split(",") if w]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - {"fp32", "tf32", "bf16"})
    if unknown:
        raise SystemExit(f"unknown precisions {unknown}: choose among fp32, tf32, bf16")
    if device.type != "cuda":
        precisions = [p for p in precisions if p != "tf32"]
    reps = args.reps if device.type == "cuda" else min(args.reps, 3)
    warmup = args.warmup if args.warmup is not None else (2 if small else 5)

    with_jax = not args.no_jax
    print(_environment(with_jax), flush=True)
    results: list = []
    for case in [lm_case(small)] if args.lm else cases:
        for precision in precisions:
            if args.lm:
                res = run_lm_case(case, precision, device, reps=reps, warmup=warmup)
            else:
                res = run_case(case, precision, device, reps=reps, warmup=warmup,
                               with_jax=with_jax, with_naive=not args.no_naive,
                               with_graph=not args.no_graph)
            results.append(res)
            print("\n".join(format_rows(res)), flush=True)
    if device.type == "cuda" and not args.lm:
        print(f"noise generation: {noise_throughput(device) / 1e9:.1f} G normals/s of device time")
    print()
    print(_environment(with_jax))
    print(format_table(results))
    if args.csv:
        if args.lm:
            fields = [f.name for f in dataclasses.fields(LMResult)]
            ratios = ["ratio", "plain_tokens_per_s", "eggroll_tokens_per_s"]
        else:
            fields = [f.name for f in dataclasses.fields(Result)]
            ratios = ["ratio", "update_ratio", "vs_jax", "graph_vs_jax", "graph_ratio"]
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(fields + ratios)
            for r in results:
                writer.writerow([getattr(r, f) for f in fields + ratios])
    return results


def cli(argv: Optional[list[str]] = None) -> int:
    """The command: 0, or 1 when a graph capture failed (the reasons are printed).

    ``--rollout`` runs the whole-generation RL benchmark instead
    (:mod:`evotorch_eggroll.rollout_benchmark`; its own options follow).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--rollout" in argv:
        from . import rollout_benchmark

        argv.remove("--rollout")
        return rollout_benchmark.main(argv)
    failures = capture_failures(main(argv))
    for line in failures:
        print(f"graph capture failed: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
