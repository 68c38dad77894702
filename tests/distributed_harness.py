"""Run a test scenario as several ranks of a real ``torch.distributed`` process group.

A test file using this harness is also a script: ``launch`` starts ``world`` copies of it
(``python <file> --worker <scenario> --rank r ...``) that rendezvous through a ``file://``
store in the test's temporary directory and call ``worker_main(SCENARIOS)`` from their
``__main__`` block. Each rank runs ``SCENARIOS[scenario](rank, world, device)`` and saves
the returned dict to ``result_<rank>.pt`` (tensors, numbers, strings, lists and dicts);
``launch`` returns those dicts, or fails the test with every rank's output when a rank
fails or the run outlives its timeout (so a rank left waiting in a collective cannot stall
CI).

Gloo runs hide CUDA and switch Triton's interpreter on before the ranks import Triton;
NCCL runs put rank ``r`` on GPU ``r``. Every computation on a model therefore belongs in the
ranks, never in the test process: on a CUDA machine that process runs without the
interpreter, so the kernels refuse CPU tensors there. ``worker_main(SCENARIOS, AFTER)``
also runs ``AFTER[scenario](rank, world, device, results)``, if given, once the process
group is destroyed (for what must work without one) and merges the dict it returns into
the rank's results.

A scenario in which a rank exits on purpose names it in ``launch(..., exits={rank: code})``:
that rank must end with ``code`` and saves no results (``None`` in the list), and the others
skip the final barrier (the group is broken). ``pg_timeout`` sets the process group's
timeout, so that a test can show that a rank ended long before it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

Scenario = Callable[[int, int, torch.device], dict]


def launch(script: Path, scenario: str, world: int, backend: str, workdir: Path,
           timeout: float = 240.0, *, exits: dict[int, int] | None = None,
           pg_timeout: float | None = None) -> list[dict | None]:
    """Run ``script --worker scenario`` as ``world`` ranks; return each rank's results.

    Each rank's output goes to ``workdir / f"log_{rank}.txt"``. ``exits``: rank -> the exit
    code that rank must end with (it saves no results: ``None``). ``pg_timeout``: the
    process group's timeout in seconds (default: torch's).
    """
    exits = dict(exits or {})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(TESTS), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    init = f"file://{workdir / 'rendezvous'}"
    procs = []
    for rank in range(world):
        log = open(workdir / f"log_{rank}.txt", "w")
        cmd = [sys.executable, str(script), "--worker", scenario, "--rank", str(rank),
               "--world", str(world), "--backend", backend, "--init", init, "--out", str(workdir)]
        if pg_timeout is not None:
            cmd += ["--pg-timeout", str(pg_timeout)]
        if exits:
            cmd += ["--no-barrier"]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(REPO)), log))
    deadline = time.monotonic() + timeout
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n"
                     f"{(workdir / f'log_{r}.txt').read_text()[-4000:]}"
                     for r, (p, _) in enumerate(procs))
    if timed_out:
        pytest.fail(f"distributed run {scenario!r} did not finish within {timeout} s:\n{logs}")
    if any(p.returncode != exits.get(r, 0) for r, (p, _) in enumerate(procs)):
        pytest.fail(f"distributed run {scenario!r} failed:\n{logs}")
    return [None if r in exits else torch.load(workdir / f"result_{r}.pt", weights_only=True)
            for r in range(world)]


def worker_main(scenarios: dict[str, Scenario],
                after_group: dict[str, Callable[[int, int, torch.device, dict], dict]] | None = None,
                ) -> None:
    """Entry point of a rank: init the process group, run the scenario, destroy the group,
    run the scenario's ``after_group`` step (if any), save the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pg-timeout", type=float, default=None)
    parser.add_argument("--no-barrier", action="store_true")
    args = parser.parse_args()
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.backend == "nccl":
        device = torch.device("cuda", args.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = {} if args.pg_timeout is None else {"timeout": datetime.timedelta(seconds=args.pg_timeout)}
    dist.init_process_group(args.backend, init_method=args.init, rank=args.rank, world_size=args.world,
                            **timeout)
    try:
        start = time.perf_counter()
        results = scenarios[args.worker](args.rank, args.world, device)
        print(f"rank {args.rank}: scenario {args.worker!r} took {time.perf_counter() - start:.1f} s",
              flush=True)
        if not args.no_barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    after = (after_group or {}).get(args.worker)
    if after is not None:
        results.update(after(args.rank, args.world, device, results))
    torch.save(results, Path(args.out) / f"result_{args.rank}.pt")


def expect_error(fn: Callable[[], object], exc_type: type) -> str:
    """Run ``fn``; return the message of the ``exc_type`` it raises (fail otherwise)."""
    try:
        fn()
    except exc_type as err:
        return str(err)
    raise AssertionError(f"expected {exc_type.__name__}")

