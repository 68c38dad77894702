"""The notebooks in notebooks/: they run at the CPU size, and the committed outputs of those
in ``GPU_OUTPUTS`` come from a GPU run.

Every notebook has one size switch in its first code cell: the GPU size on a CUDA GPU, the
CPU size without one or with ``CI`` set, and ``EGGROLL_NOTEBOOK_SIZE=cpu|gpu`` to choose.

* ``test_notebook_runs`` executes each notebook at the CPU size (``EGGROLL_NOTEBOOK_SIZE=cpu``,
  ``CI=true``) in a fresh Jupyter kernel of this very Python interpreter, on a copy held in
  memory: the committed file is never rewritten (its bytes are checked afterwards). Without
  a GPU the notebooks run the package's plain-torch CPU path: ``TRITON_INTERPRET``, which
  the test suite sets for its kernel tests, is left out of the kernel's environment. A cell
  that raises fails the test; so does a notebook that produced no ``image/png`` output.
* ``test_runner_executes_a_copy_without_jupyter`` runs ``scripts/run_notebooks.py`` (the
  script that writes the committed outputs, with no Jupyter) at the CPU size into a
  temporary folder, checks that Jupyter's nbformat reads what it wrote, and that the check
  below rejects it.
* ``test_committed_outputs_come_from_a_gpu_run`` checks the committed notebooks: outputs
  that name a GPU (the ``Mode: GPU (<card>)`` line of the first cell) at the GPU size, every
  code cell executed, no error, figures, and a README figure under docs/figures/ from the
  same kind of run. A notebook re-executed on a CPU fails it. The outputs are produced with
  ``python scripts/run_notebooks.py --size gpu --write`` on a GPU (docs/notebooks.md).
  ``GPU_OUTPUTS`` lists every notebook: a new one is run on a GPU before it is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
FIGURES_DIR = ROOT / "docs" / "figures"
RUNNER = ROOT / "scripts" / "run_notebooks.py"
NOTEBOOKS = ["01_quickstart.ipynb", "02_evotorch_cartpole.ipynb", "03_performance.ipynb",
             "04_char_lm.ipynb"]
# the notebooks whose committed outputs must come from a GPU-size run on a GPU
GPU_OUTPUTS = ["01_quickstart.ipynb", "02_evotorch_cartpole.ipynb", "03_performance.ipynb",
               "04_char_lm.ipynb"]
CELL_TIMEOUT_S = 600  # per cell; at the CPU size each notebook takes well under a minute
_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
_MODE_GPU = re.compile(r"Mode: GPU \(([^)\n]+)\)")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def cpu_size_env() -> dict:
    """Environment for a CPU-size run: EGGROLL_NOTEBOOK_SIZE=cpu, CI=true, this checkout's
    package first on the path, and, without a GPU, no TRITON_INTERPRET (the plain-torch
    path runs instead of the kernels in Triton's interpreter)."""
    env = dict(os.environ)
    env["CI"] = "true"
    env["EGGROLL_NOTEBOOK_SIZE"] = "cpu"
    if not _has_cuda():
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def kernel_env() -> dict:
    env = cpu_size_env()
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def _spec_runs_this_python(argv: list) -> bool:
    if not argv:
        return False
    exe = argv[0]
    if exe in _PYTHON_NAMES:  # jupyter_client substitutes sys.executable for these names
        return True
    try:
        return Path(exe).resolve() == Path(sys.executable).resolve() or os.path.samefile(exe, sys.executable)
    except OSError:
        return False


def kernel_name(workdir: str) -> str:
    """A kernelspec that starts this interpreter: ``python3`` if it does, else a private one.

    The private kernelspec is written under ``workdir`` and found through ``JUPYTER_PATH``,
    which this sets in ``os.environ`` (``execute_notebook`` restores the environment
    afterwards); nothing is installed for good.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if _spec_runs_this_python(list(spec.argv)):
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    name = "evotorch-eggroll-tests"
    install(kernel_name=name, display_name="Python (evotorch_eggroll tests)", prefix=workdir)
    share = str(Path(workdir) / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (share, os.environ.get("JUPYTER_PATH")) if p)
    spec = KernelSpecManager().get_kernel_spec(name)
    assert _spec_runs_this_python(list(spec.argv)), spec.argv
    return name


def execute_notebook(path: Path, workdir: str, timeout: int = CELL_TIMEOUT_S):
    """Run the notebook at ``path`` in a fresh kernel, at the CPU size; returns the executed
    notebook (in memory: nothing is written)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(kernel_env())  # the kernel process inherits this environment
    try:
        client = NotebookClient(
            nb,
            kernel_name=kernel_name(workdir),
            timeout=timeout,
            allow_errors=False,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def _code_cells(nb) -> list:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def _join(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def image_outputs(nb) -> int:
    return sum(
        1
        for cell in _code_cells(nb)
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


def cell_errors(nb) -> list:
    return [
        f"{out.get('ename')}: {out.get('evalue')}"
        for cell in _code_cells(nb)
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def output_text(nb) -> str:
    """The text a reader sees: streams and the text/plain of every output."""
    parts = []
    for cell in _code_cells(nb):
        for out in cell.get("outputs", []):
            parts.append(_join(out.get("text")))
            parts.append(_join(out.get("data", {}).get("text/plain")))
    return "\n".join(parts)


def run_problems(nb) -> list:
    """Why the outputs of ``nb`` (a notebook as a dict) are not those of one clean run, at
    either size: every code cell executed once, in order, no error, figures, and the first
    cell's ``Mode:`` and ``Size:`` lines; empty when they are."""
    problems = []
    text = output_text(nb)
    for line in ("Mode:", "Size:"):
        if not any(out_line.startswith(line) for out_line in text.splitlines()):
            problems.append(f"no {line!r} line in the outputs")
    counts = [cell.get("execution_count") for cell in _code_cells(nb) if _join(cell["source"]).strip()]
    if counts != list(range(1, len(counts) + 1)):
        problems.append(f"code cells not executed once each, in order: execution counts {counts}")
    if cell_errors(nb):
        problems.append(f"error outputs: {cell_errors(nb)}")
    if image_outputs(nb) < 1:
        problems.append("no image/png output")
    return problems


def gpu_run_problems(nb) -> list:
    """Why the outputs of ``nb`` (a notebook as a dict) are not those of a GPU-size run on a
    GPU; empty when they are."""
    problems = run_problems(nb)
    text = output_text(nb)
    mode = _MODE_GPU.search(text)
    if mode is None:
        first = next((line for line in text.splitlines() if line.startswith("Mode:")), None)
        problems.append(f"no 'Mode: GPU (<card>)' line in the outputs (found {first!r})")
    if "Size: GPU" not in text:
        problems.append("no 'Size: GPU' line in the outputs: not executed at the GPU size")
    size = nb.get("metadata", {}).get("evotorch_eggroll", {}).get("size")
    if size not in (None, "gpu"):
        problems.append(f"the notebook's metadata records a run at size {size!r}")
    return problems


def png_description(path: Path) -> str:
    """The ``Description`` tEXt chunk of a PNG file ('' if none)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            if key == b"Description":
                return value.decode("latin-1")
        pos += 12 + length
    return ""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    path = NOTEBOOKS_DIR / name
    assert path.is_file(), f"missing notebook {path}"
    committed = _digest(path)
    nb = execute_notebook(path, str(tmp_path))  # raises CellExecutionError on a failing cell
    assert not cell_errors(nb), cell_errors(nb)
    assert image_outputs(nb) >= 1, f"{name} produced no image/png output"
    assert "Size: CPU (EGGROLL_NOTEBOOK_SIZE=cpu)" in output_text(nb)
    assert _digest(path) == committed, f"executing {name} rewrote the committed notebook"


def test_runner_executes_a_copy_without_jupyter(tmp_path):
    pytest.importorskip("matplotlib")
    name = NOTEBOOKS[0]
    committed = _digest(NOTEBOOKS_DIR / name)
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--size", "cpu", "--output-dir", str(tmp_path), name],
        env=cpu_size_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "summary" in proc.stdout and name in proc.stdout.split("summary")[-1]
    assert _digest(NOTEBOOKS_DIR / name) == committed, "the runner rewrote the committed notebook"

    text = (tmp_path / name).read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n "cells": [\n')
    nb = json.loads(text)
    try:
        import nbformat
    except ImportError:
        pass
    else:
        nbformat.validate(nbformat.reads(text, as_version=4))
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["evotorch_eggroll"]["size"] == "cpu"
    assert not cell_errors(nb) and image_outputs(nb) >= 1
    assert "Size: CPU (EGGROLL_NOTEBOOK_SIZE=cpu)" in output_text(nb)
    counts = [cell["execution_count"] for cell in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1))

    figure = tmp_path / "figures" / f"{Path(name).stem}.png"
    assert "size cpu" in png_description(figure)
    assert run_problems(nb) == []  # one clean run
    # the committed-outputs check tells this CPU run apart from a GPU run
    problems = gpu_run_problems(nb)
    assert any("Mode: GPU" in p for p in problems) and any("Size: GPU" in p for p in problems), problems


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == NOTEBOOKS
    assert sorted(GPU_OUTPUTS) == NOTEBOOKS


@pytest.mark.parametrize("name", GPU_OUTPUTS)
def test_committed_outputs_come_from_a_gpu_run(name):
    path = NOTEBOOKS_DIR / name
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = gpu_run_problems(nb)
    figure = FIGURES_DIR / f"{path.stem}.png"
    if not figure.is_file():
        problems.append(f"no README figure {figure.relative_to(ROOT)}")
    else:
        description = png_description(figure)
        if "size gpu" not in description or description.endswith(" on CPU"):
            problems.append(f"{figure.relative_to(ROOT)} is not from a GPU-size run on a GPU "
                            f"({description!r})")
    assert not problems, (
        f"{name}: the committed outputs are not those of a GPU run; produce them on a GPU "
        f"with `python scripts/run_notebooks.py --size gpu --write` (docs/notebooks.md):\n  "
        + "\n  ".join(problems)
    )
