"""Packaging: the kernels folder ships only as ``evotorch_eggroll.kernels``.

Hugging Face publishes an importable top-level ``kernels`` package that ``transformers``
probes for, so neither our wheel nor our source tree may ever answer to that name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path, extra_path: list[str] | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH is dropped on purpose, so that sys.path holds only what each test puts there
    # (an unrelated ``kernels`` package on it would spoil the checks). The snippets import
    # only ``kernels`` and ``evotorch_eggroll.kernels``, which needs torch and Triton but not
    # evotorch or Gymnasium, so they also run where those come from PYTHONPATH only.
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_package_kernels_importable():
    import evotorch_eggroll.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"


def test_top_level_kernels_not_our_folder_from_repo_root():
    """With the repository root first on sys.path and no other ``kernels`` installed,
    ``import kernels`` gives an empty stand-in: no file, no version, none of our modules,
    and any name imported from it is an ImportError."""
    proc = _run(
        """
        import sys
        sys.path.insert(0, '.')
        import kernels
        print(kernels.__file__, getattr(kernels, '__version__', 'N/A'), getattr(kernels, 'philox', None))
        try:
            import kernels.philox
        except ModuleNotFoundError as e:
            print('MISSING', e.name)
        try:
            from kernels import get_kernel
        except ImportError:
            print('NO get_kernel')
        """,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["None N/A None", "MISSING kernels.philox", "NO get_kernel"], proc.stdout


def test_transformers_from_repo_root_sees_no_kernels_package():
    """``transformers`` probes for Hugging Face's ``kernels`` (find_spec, then an import when
    no metadata names it): from the repository root it must report the package missing and
    import its models, not fail on our folder."""
    pytest.importorskip("transformers")
    proc = _run(
        """
        import sys
        sys.path.insert(0, '.')
        from transformers.utils.import_utils import is_kernels_available
        import transformers
        transformers.GPT2Config  # noqa: B018 - a lazy import through the probe
        print(is_kernels_available())
        """,
        cwd=ROOT,
        extra_path=[p for p in sys.path if p and Path(p).resolve() != ROOT],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout


def test_top_level_kernels_resolves_to_the_other_project(tmp_path):
    """When another ``kernels`` package is installed, the import reaches it, not our folder."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("OWNER = 'someone else'\n")
    proc = _run(
        """
        import sys
        sys.path.insert(0, '.')
        import kernels
        print(kernels.OWNER, kernels.__file__)
        import evotorch_eggroll.kernels as ours
        print(ours.__name__)
        """,
        cwd=ROOT,
        extra_path=[str(site)],
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith("someone else ") and str(site) in first
    assert second == "evotorch_eggroll.kernels"


@pytest.mark.slow
def test_wheel_has_no_top_level_kernels(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    wheels = list(tmp_path.glob("evotorch_eggroll-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert "kernels" not in top, sorted(top)
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("evotorch_eggroll/kernels/")}
    in_tree = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert in_tree and shipped == in_tree
    assert "evotorch_eggroll/noise.py" in names
    package = {p.name for p in (ROOT / "evotorch_eggroll" / "neuroevolution").glob("*.py")}
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("evotorch_eggroll/neuroevolution/")}
    assert "vecgymne.py" in package and shipped == package
