#!/usr/bin/env python3
"""Execute the notebooks top to bottom and write their outputs, without Jupyter.

    python scripts/run_notebooks.py --size gpu --write                  # every notebook
    python scripts/run_notebooks.py --size gpu --write 03_performance   # one of them
    python scripts/run_notebooks.py --size cpu --output-dir /tmp/nb     # executed copies

Each notebook runs in a fresh Python process, as in a fresh kernel: its code cells run in
order in one ``__main__`` namespace, with the notebook's folder as working directory. Per
cell, the outputs a Jupyter kernel records are recorded: ``stream`` outputs (stdout and
stderr, consecutive writes merged), one ``display_data`` output (``image/png``) per
matplotlib figure, drawn with the Agg backend at ``plt.show()`` and, for figures still open,
at the end of the cell (then closed), and an ``execute_result`` for a trailing expression
(``text/plain``, plus ``text/html``/``text/markdown`` from ``_repr_html_``/
``_repr_markdown_``; none for ``None`` or a line ending in ``;``). ``execution_count``
numbers the executed cells from 1. A cell that raises stops the run: its traceback is
printed, nothing is written for that notebook, and the exit status is 1. IPython magics
are not supported, except ``%matplotlib`` lines, which are skipped.

``--size`` sets ``EGGROLL_NOTEBOOK_SIZE`` (``cpu`` or ``gpu``; ``auto`` leaves the
notebooks' own choice: the GPU size on a CUDA GPU unless ``CI`` is set). With ``--write``
the executed notebooks replace the ones in notebooks/ (valid nbformat 4 JSON as Jupyter
writes it: sorted keys, one-space indent, a trailing newline; other metadata kept) and one
figure per notebook (the one labelled ``"docs"`` with ``fig.set_label``, else the first) is
saved as docs/figures/<notebook>.png, with the run's size and device in its PNG text.
With ``--output-dir`` both go there instead (figures under ``figures/``). Without either,
the notebooks are only executed. A summary table ends the run.

Needs only the notebooks' own imports (and matplotlib for their figures); nbformat, when
importable, validates what is written.
"""

from __future__ import annotations

import argparse
import ast
import base64
import builtins
import copy
import datetime
import importlib.util
import io
import json
import linecache
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
DOCS_FIGURES = ROOT / "docs" / "figures"
DOCS_DPI = 110
DOCS_LABEL = "docs"
_SPLIT_MIMES = {"application/javascript", "image/svg+xml"}  # split into lines like text/*


# ----------------------------------------------------------------------------- writing


def dumps_notebook(nb: dict) -> str:
    """The notebook as nbformat writes it: multi-line strings split into lines, sorted
    keys, one-space indent, non-ASCII kept, a trailing newline."""
    nb = copy.deepcopy(nb)

    def split(value):
        return value.splitlines(True) if isinstance(value, str) else value

    for cell in nb.get("cells", []):
        cell["source"] = split(cell.get("source", ""))
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = split(output["text"])
            for key, value in output.get("data", {}).items():
                if key.startswith("text/") or key in _SPLIT_MIMES:
                    output["data"][key] = split(value)
    text = json.dumps(nb, sort_keys=True, indent=1, separators=(",", ": "), ensure_ascii=False)
    return text + "\n"


def validate(text: str) -> str:
    """Validate with nbformat when it is importable; returns what was done."""
    try:
        import nbformat
    except ImportError:
        return "not validated (no nbformat)"
    nbformat.validate(nbformat.reads(text, as_version=4))
    return "valid nbformat 4"


# --------------------------------------------------------------------------- executing


def _join(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


class _CellOutputs:
    """The outputs of the cell being executed, in Jupyter's shapes."""

    def __init__(self) -> None:
        self.items: list = []

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        last = self.items[-1] if self.items else None
        if last is not None and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        else:
            self.items.append({"output_type": "stream", "name": name, "text": text})

    def display(self, data: dict) -> None:
        self.items.append({"output_type": "display_data", "data": data, "metadata": {}})


class _Tee(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` that records into the current cell and echoes to the
    console. One object for the whole run, so handlers that kept a reference to it (logging)
    still write into the cell that is running."""

    def __init__(self, name: str, echo) -> None:
        self.name, self.echo, self.cell = name, echo, None

    @property
    def encoding(self):  # noqa: D401 - file protocol
        return getattr(self.echo, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.echo.fileno()

    def write(self, text: str) -> int:
        if self.cell is not None:
            self.cell.stream(self.name, text)
        self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        self.echo.flush()


class _Figures:
    """Matplotlib figures as ``display_data`` outputs, and the one kept for the docs."""

    def __init__(self) -> None:
        self.plt = None
        self.cell: _CellOutputs | None = None
        self.count = 0
        self.docs_png: bytes | None = None
        self.docs_labelled = False
        self.provenance = lambda: ""

    def install(self) -> None:
        os.environ["MPLBACKEND"] = "Agg"
        if importlib.util.find_spec("matplotlib") is None:
            return
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        plt.switch_backend("Agg")  # resolved now, so that pyplot keeps the show set below
        self.plt = plt

        def show(*args, **kwargs) -> None:
            """The notebooks' ``plt.show()``: the open figures become the cell's outputs."""
            self.flush()

        plt.show = show

    def flush(self) -> None:
        plt = self.plt
        if plt is None or self.cell is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            self.cell.display({"image/png": base64.b64encode(buf.getvalue()).decode("ascii") + "\n",
                               "text/plain": repr(fig)})
            self.count += 1
            labelled = fig.get_label() == DOCS_LABEL
            if self.docs_png is None or (labelled and not self.docs_labelled):
                buf = io.BytesIO()
                fig.savefig(buf, format="png", bbox_inches="tight", dpi=DOCS_DPI,
                            metadata={"Description": self.provenance()})
                self.docs_png, self.docs_labelled = buf.getvalue(), labelled
            plt.close(fig)


def _mime_bundle(value) -> dict:
    data = {"text/plain": repr(value)}
    for mime, method in (("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_")):
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                rendered = fn()
            except Exception:  # noqa: BLE001 - a failing rich repr falls back to text/plain
                rendered = None
            if isinstance(rendered, str):
                data[mime] = rendered
    return data


def _strip_magics(source: str, where: str) -> str:
    lines = []
    for line in source.splitlines(True):
        stripped = line.lstrip()
        if stripped.startswith("%matplotlib"):
            lines.append("\n")  # keep the line numbers of tracebacks
            continue
        if stripped.startswith(("%", "!")):
            raise SystemExit(f"{where}: IPython magics and shell escapes are not supported: {line.strip()}")
        lines.append(line)
    return "".join(lines)


def _imported_modules(sources: list) -> list:
    """Top-level modules that the cells import unconditionally (imports inside ``try``,
    ``if`` or functions are optional or lazy, and are left to the cells)."""
    names = []
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # reported when the cell runs
        for node in tree.body:
            if isinstance(node, ast.Import):
                names += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module.split(".")[0])
    return sorted(set(names))


def _check_package() -> None:
    """The notebooks need this checkout's package with its kernels, which are installed as
    ``evotorch_eggroll.kernels`` from the top-level kernels/ folder (``pip install -e .``)."""
    spec = importlib.util.find_spec("evotorch_eggroll.kernels")
    if spec is None or not spec.origin:
        print("evotorch_eggroll.kernels is not importable: install this checkout first "
              "(pip install --no-deps -e .)", file=sys.stderr)
        raise SystemExit(2)
    where = Path(spec.origin).resolve().parent
    if where != ROOT / "kernels":
        print(f"note: evotorch_eggroll.kernels comes from {where}, not from this checkout's "
              f"kernels/", file=sys.stderr)


def _device_name() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU"


def execute(path: Path, size: str) -> dict:
    """Run every code cell of the notebook at ``path`` in this process; returns the executed
    notebook and what the run produced. Exits with status 1 when a cell raises."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    if nb.get("nbformat") != 4:
        raise SystemExit(f"{path.name}: nbformat {nb.get('nbformat')}, expected 4")
    code_cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
    sources = [_strip_magics(_join(c.get("source")), f"{path.name}, code cell {i + 1}")
               for i, c in enumerate(code_cells)]
    missing = [m for m in _imported_modules(sources) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{path.name}: cannot run, these modules are not importable: {', '.join(missing)}",
              file=sys.stderr)
        raise SystemExit(2)
    _check_package()

    figures = _Figures()
    figures.install()
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins

    def size_chosen() -> str:
        chosen = main.__dict__.get("SIZE")  # the notebooks' own switch, once its cell ran
        return chosen if isinstance(chosen, str) else size

    figures.provenance = lambda: (f"notebooks/{path.name} executed at size {size_chosen()} on "
                                  f"{_device_name()}")
    sys.modules["__main__"] = main
    os.chdir(path.parent)
    if "" not in sys.path:
        sys.path.insert(0, "")  # like a kernel: the working directory is importable
    out, err = _Tee("stdout", sys.__stdout__), _Tee("stderr", sys.__stderr__)
    sys.stdout, sys.stderr = out, err

    count = 0
    start = time.perf_counter()
    try:
        for cell, source in zip(code_cells, sources):
            cell["outputs"] = []
            cell["execution_count"] = None
            if not source.strip():
                continue
            count += 1
            outputs = _CellOutputs()
            out.cell = err.cell = figures.cell = outputs
            filename = f"<{path.stem} cell {count}>"
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            tree = ast.parse(source, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";"):
                last = ast.Expression(tree.body.pop().value)
            try:
                exec(compile(tree, filename, "exec"), main.__dict__)
                value = eval(compile(last, filename, "eval"), main.__dict__) if last else None
                figures.flush()
            except BaseException:
                sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
                kind, exc, tb = sys.exc_info()
                while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                    tb = tb.tb_next  # start the traceback at the cell
                print(f"\n{path.name}: code cell {count} raised:", file=sys.stderr)
                traceback.print_exception(kind, exc, tb)
                raise SystemExit(1)
            if value is not None:
                outputs.items.append({"output_type": "execute_result", "execution_count": count,
                                      "data": _mime_bundle(value), "metadata": {}})
            cell["outputs"] = outputs.items
            cell["execution_count"] = count
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    seconds = time.perf_counter() - start

    torch = sys.modules.get("torch")
    triton = sys.modules.get("triton")
    info = nb.setdefault("metadata", {}).setdefault("language_info", {})
    info["version"] = platform.python_version()
    nb["metadata"]["evotorch_eggroll"] = {
        "size": size_chosen(),
        "device": _device_name(),
        "torch": getattr(torch, "__version__", None),
        "triton": getattr(triton, "__version__", None),
        "python": platform.python_version(),
        "executed": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1),
    }
    return {"notebook": nb, "seconds": seconds, "figures": figures.count,
            "device": _device_name(), "size": size_chosen(),
            "docs_png": base64.b64encode(figures.docs_png).decode() if figures.docs_png else None}


# ------------------------------------------------------------------------------ driving


def _resolve(names: list) -> list:
    if not names:
        found = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
        if not found:
            raise SystemExit(f"no notebooks in {NOTEBOOKS_DIR}")
        return found
    paths = []
    for name in names:
        p = Path(name)
        candidates = [p, NOTEBOOKS_DIR / p.name, NOTEBOOKS_DIR / f"{p.name}.ipynb"]
        hit = next((c for c in candidates if c.is_file() and c.suffix == ".ipynb"), None)
        if hit is None:
            raise SystemExit(f"no notebook {name!r} (looked for {', '.join(map(str, candidates))})")
        paths.append(hit.resolve())
    return paths


def _child_env(size: str) -> dict:
    env = dict(os.environ)
    if size != "auto":
        env["EGGROLL_NOTEBOOK_SIZE"] = size
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    # the notebooks import this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run(paths: list, size: str, out_dir: Path | None, figures_dir: Path | None,
        timeout: float | None, in_place: bool = False) -> int:
    """Execute each notebook in a child process; write it (in place, or into ``out_dir``)
    and its docs figure (into ``figures_dir``). Stops at the first failure; returns the exit
    status."""
    rows = []
    status = 0
    for path in paths:
        print(f"\n===== {path.name} (size {size}) =====", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--execute", str(path),
                   "--result", str(result_path), "--size", size]
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(cmd, env=_child_env(size), timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                print(f"{path.name}: stopped after {timeout:g} s", file=sys.stderr)
                rc = 124
            wall = time.perf_counter() - t0
            if rc != 0 or not result_path.is_file():
                rows.append((path.name, f"{wall:.1f}", "-", "-", "-", f"FAILED (exit status {rc})"))
                status = 1
                break
            result = json.loads(result_path.read_text(encoding="utf-8"))
        text = dumps_notebook(result["notebook"])
        check = validate(text)
        where = "not written"
        if in_place or out_dir is not None:
            target = path if in_place else out_dir / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            where = str(target)
            if figures_dir is not None and result["docs_png"]:
                figures_dir.mkdir(parents=True, exist_ok=True)
                fig_path = figures_dir / f"{path.stem}.png"
                fig_path.write_bytes(base64.b64decode(result["docs_png"]))
                where += f", {fig_path}"
        rows.append((path.name, f"{wall:.1f}", str(result["figures"]), result["size"],
                     result["device"], f"{where} ({check})"))

    print("\n===== summary =====")
    head = ("notebook", "seconds", "figures", "size", "device", "written")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
    total = sum(float(r[1]) for r in rows)
    print(f"total {total:.1f} s" + ("" if status == 0 else ", stopped at a failure"))
    return status


def main(argv: list | None = None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python scripts/run_notebooks.py",
        description=head.strip(),
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*",
                        help="notebooks (file names, with or without .ipynb); default: every "
                             "notebook in notebooks/")
    parser.add_argument("--size", choices=("cpu", "gpu", "auto"), default="auto",
                        help="EGGROLL_NOTEBOOK_SIZE for the notebooks (auto: their own "
                             "choice, the GPU size on a CUDA GPU unless CI is set); default: "
                             "%(default)s")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write", action="store_true",
                       help="write the outputs into the notebooks in notebooks/ and one "
                            "figure per notebook to docs/figures/")
    where.add_argument("--output-dir", type=Path, default=None,
                       help="write the executed notebooks here instead (figures under "
                            "figures/ in it)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed per notebook (default: no limit)")
    parser.add_argument("--execute", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.execute is not None:  # the child process: one notebook
        size = os.environ.get("EGGROLL_NOTEBOOK_SIZE", "auto")
        result = execute(args.execute.resolve(), size if args.size == "auto" else args.size)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0

    paths = _resolve(args.names)
    if args.write:
        out_dir, figures_dir = None, DOCS_FIGURES
    elif args.output_dir is not None:
        out_dir = args.output_dir.resolve()
        figures_dir = out_dir / "figures"
    else:
        out_dir = figures_dir = None
    return run(paths, args.size, out_dir, figures_dir, args.timeout, in_place=args.write)


if __name__ == "__main__":
    sys.exit(main())
