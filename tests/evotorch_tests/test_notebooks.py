"""Execute the notebooks in notebooks/ top to bottom and check that each draws a figure.

Every notebook runs in a fresh Jupyter kernel of this very Python interpreter, with
``CI=true`` (so the notebooks shrink their sizes) and, without a CUDA GPU,
``TRITON_INTERPRET=1`` (so the kernels run in Triton's interpreter). A cell that raises
fails the test; so does a notebook that produced no ``image/png`` output.

The committed notebooks hold the outputs of such a run. To refresh them with the same code
path::

    python tests/evotorch_tests/test_notebooks.py --write            # every notebook
    python tests/evotorch_tests/test_notebooks.py --write 01_quickstart.ipynb
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_quickstart.ipynb", "02_evotorch_cartpole.ipynb", "03_performance.ipynb"]
CELL_TIMEOUT_S = 900  # per cell; the CPU-sized notebooks take about two minutes in all
_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def kernel_env() -> dict:
    """Environment for the kernel: CI=true, and the interpreter switched on without a GPU."""
    env = dict(os.environ)
    env["CI"] = "true"
    if not _has_cuda():
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
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
    """Run the notebook at ``path`` in a fresh kernel; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    saved = dict(os.environ)
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


def image_outputs(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


def cell_errors(nb) -> list:
    return [
        f"{out.get('ename')}: {out.get('evalue')}"
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    path = NOTEBOOKS_DIR / name
    assert path.is_file(), f"missing notebook {path}"
    nb = execute_notebook(path, str(tmp_path))  # raises CellExecutionError on a failing cell
    assert not cell_errors(nb), cell_errors(nb)
    assert image_outputs(nb) >= 1, f"{name} produced no image/png output"


def _write(names: list) -> None:
    import nbformat

    for name in names or NOTEBOOKS:
        path = NOTEBOOKS_DIR / name
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            nb = execute_notebook(path, workdir)
        nbformat.write(nb, str(path))
        print(f"{name}: executed in {time.perf_counter() - start:.1f} s, {image_outputs(nb)} figure(s), "
              f"{path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--write":
        sys.exit("usage: python tests/evotorch_tests/test_notebooks.py --write [NOTEBOOK ...]")
    _write(args[1:])
