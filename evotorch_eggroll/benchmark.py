"""Performance table: ``python -m evotorch_eggroll.benchmark``.

Every case is timed against, in the same process and at the same precision:

* ``plain``: the unperturbed forward of the same model on the same rows — the limit;
* ``naive``: per-member weights ``W + A Bᵀ`` materialised, then a batched matmul (skipped
  when it would not fit in memory);
* ``graph``: device time alone (no host overhead) from replays of a captured CUDA graph,
  for the plain forward and the perturbed one (layer cases: the ``ops.perturbed_linear``
  call itself; other cases: the same ``batched_forward`` call as the eager timing, whose
  member-id range check ran once during warm-up); ``graph ratio`` is their quotient;
* ``jax``: the JAX reference algorithm (per-member forward vmapped, noise drawn in the
  call with ``jax.random``), when ``jax`` is importable.

Precisions: ``fp32`` (IEEE), ``tf32`` (``torch.backends.cuda.matmul.allow_tf32 = True``;
JAX with ``default_matmul_precision("tensorfloat32")``) and ``bf16``. Times are medians of
CUDA-event timings after warm-up. On a machine without a GPU the sizes shrink and the
kernels run in Triton's interpreter: those numbers only show that the code runs.
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
import time
from typing import Callable, Optional

import torch

__all__ = ["Case", "Result", "default_cases", "run_case", "main"]


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
    case: str
    precision: str
    plain_ms: float
    eggroll_ms: float
    update_ms: float
    naive_ms: Optional[float]
    jax_ms: Optional[float]
    plain_graph_ms: Optional[float] = None
    graph_ms: Optional[float] = None

    @property
    def graph_ratio(self) -> Optional[float]:
        if self.graph_ms is None or self.plain_graph_ms is None:
            return None
        return self.graph_ms / self.plain_graph_ms

    @property
    def ratio(self) -> float:
        return self.eggroll_ms / self.plain_ms

    @property
    def update_ratio(self) -> float:
        return self.update_ms / self.eggroll_ms

    @property
    def vs_jax(self) -> Optional[float]:
        return None if self.jax_ms is None else self.eggroll_ms / self.jax_ms


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


def _timer(device: torch.device, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    def bench(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return bench


def _graph_time(device: torch.device, fn: Callable[[], object], reps: int) -> Optional[float]:
    """Median device time of one replay of ``fn`` captured in a CUDA graph (None if it fails)."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile and warm up outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - capture is optional information
        torch.cuda.synchronize()
        return None
    return _timer(device, 3, reps)(graph.replay)


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


def _jax_forward(model: torch.nn.Module, case: Case, precision: str, sigma: float):
    """The JAX reference: per-member forward vmapped, noise drawn inside the call."""
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

    def member_forward(key, xi):
        h = xi  # (rows_per_member, n)
        for i, (w, b) in enumerate(params):
            m, n = w.shape
            lora = jax.random.normal(jax.random.fold_in(key, i), (m + n, rank), dtype=jdtype)
            bb, aa = lora[:n], lora[n:] * sigma
            h = h @ w.T + b + (h @ bb) @ aa.T
            if i < len(params) - 1:
                h = jnp.tanh(h) if kind == "rl" else jax.nn.relu(h)
        return h

    @jax.jit
    def forward(base_key, epoch, x):
        keys = jax.vmap(lambda t: jax.random.fold_in(jax.random.fold_in(base_key, epoch), t))(
            jnp.arange(case.population)
        )
        with jax.default_matmul_precision(matmul_precision):
            return jax.vmap(member_forward)(keys, x)

    g = torch.Generator().manual_seed(0)
    x = jnp.asarray(
        torch.randn(case.population, case.rows_per_member, case.layers[0], generator=g).numpy(),
        dtype=jdtype,
    )
    base_key = jax.random.PRNGKey(0)

    def run():
        return forward(base_key, 0, x).block_until_ready()

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
) -> Result:
    """Time one case at one precision; see the module docstring for what is measured."""
    from . import EggrollStrategy

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        torch.manual_seed(0)
        model = _build_model(case, device, dtype)
        x, ids = _inputs(case, device, dtype)
        bench = _timer(device, warmup, reps)
        sigma = 0.05
        with torch.no_grad():
            plain_ms = bench(lambda: model(x))
            strategy = EggrollStrategy(sigma=sigma, lr=1e-3, rank=case.rank)
            strategy.setup(model)
            with strategy.perturb(case.population, 0) as pop:
                eggroll_ms = bench(lambda: pop.batched_forward(model, x, member_ids=ids))
                plain_graph_ms = graph_ms = None
                if with_graph and device.type == "cuda":
                    plain_graph_ms = _graph_time(device, lambda: model(x), reps)
                    if case.kind == "layer":
                        graph_ms = _graph_time(device, _layer_call(model, x, ids, case, sigma),
                                               reps)
                    else:  # the member-id range check runs (and is remembered) in warm-up
                        graph_ms = _graph_time(
                            device, lambda: pop.batched_forward(model, x, member_ids=ids), reps)

            update_times = []
            fit = torch.randn(case.population, device=device)
            for i in range(max(2, reps // 4) + 1):
                with strategy.perturb(case.population):
                    pass
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                strategy.step(fit)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step warms up
                    update_times.append((time.perf_counter() - t0) * 1e3)
            update_ms = statistics.median(update_times)

            naive_ms = None
            n_elems = sum(
                m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
            )
            if with_naive and case.population * n_elems * x.element_size() * 2 <= naive_limit_bytes:
                try:
                    naive_ms = bench(_naive_forward(model, x, case, sigma))
                except torch.OutOfMemoryError:
                    naive_ms = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        jax_ms = None
        if with_jax and device.type == "cuda":
            try:
                jax_ms = _timer(torch.device("cpu"), warmup, reps)(
                    _jax_forward(model, case, precision, sigma)
                )
            except ImportError:
                jax_ms = None
        return Result(case.name, precision, plain_ms, eggroll_ms, update_ms, naive_ms, jax_ms,
                      plain_graph_ms, graph_ms)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def noise_throughput(device: torch.device, numel: int = 1 << 26, reps: int = 10) -> float:
    """Normals per second generated by the noise kernel (one noise index, ``numel`` elements)."""
    from . import ops

    idx = torch.arange(4, device=device)
    bench = _timer(device, 2, reps)
    ms = bench(lambda: ops.normal_block(0, 1, 0, idx, numel // 4))
    return numel / (ms * 1e-3)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _environment() -> str:
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"card: {card} | torch {torch.__version__} | triton {triton.__version__} | commit {commit}"


def format_table(results: list[Result]) -> str:
    head = (
        f"{'case':<30} {'prec':<5} {'plain ms':>9} {'eggroll ms':>10} {'ratio':>6} "
        f"{'update ms':>9} {'upd/fwd':>7} {'naive ms':>9} {'jax ms':>8} {'vs jax':>6} "
        f"{'graph ms':>8} {'g.ratio':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.case:<30} {r.precision:<5} {r.plain_ms:>9.3f} {r.eggroll_ms:>10.3f} "
            f"{r.ratio:>6.2f} {r.update_ms:>9.3f} {r.update_ratio:>7.2f} "
            f"{_fmt(r.naive_ms):>9} {_fmt(r.jax_ms):>8} {_fmt(r.vs_jax, 2):>6} "
            f"{_fmt(r.graph_ms):>8} {_fmt(r.graph_ratio, 2):>7}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--small", action="store_true", help="tiny sizes (default without a GPU)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--csv", default="", help="write the results to this CSV file")
    args = parser.parse_args(argv)

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
    if device.type != "cuda":
        precisions = [p for p in precisions if p != "tf32"]
    reps = args.reps if device.type == "cuda" else min(args.reps, 3)

    print(_environment(), flush=True)
    results = []
    for case in cases:
        for precision in precisions:
            res = run_case(case, precision, device, reps=reps, warmup=2 if small else 5,
                           with_jax=not args.no_jax, with_naive=not args.no_naive,
                           with_graph=not args.no_graph)
            results.append(res)
            print(format_table([res]).splitlines()[-1], flush=True)
    if device.type == "cuda":
        print(f"noise generation: {noise_throughput(device) / 1e9:.1f} G normals/s")
    print()
    print(_environment())
    print(format_table(results))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "precision", "plain_ms", "eggroll_ms", "ratio", "update_ms",
                             "naive_ms", "jax_ms", "vs_jax", "plain_graph_ms", "graph_ms",
                             "graph_ratio"])
            for r in results:
                writer.writerow([r.case, r.precision, r.plain_ms, r.eggroll_ms, r.ratio,
                                 r.update_ms, r.naive_ms, r.jax_ms, r.vs_jax, r.plain_graph_ms,
                             r.graph_ms, r.graph_ratio])
    return results


if __name__ == "__main__":
    main()
