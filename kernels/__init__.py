"""Triton kernels of evotorch_eggroll, installed as ``evotorch_eggroll.kernels``.

One op per module: ``@triton.jit`` code plus a thin launch helper. Nothing here imports
the rest of the package but :mod:`evotorch_eggroll.noise`, which defines the noise stream
and its layout (the factor block of a weight, a member's noise index and sign); the device
side of that layout is in :mod:`evotorch_eggroll.kernels.philox`.
"""

if __name__ == "kernels":
    # This folder sits at the repository root, so `import kernels` would find it whenever
    # the root is on sys.path. That name belongs to another project (Hugging Face's
    # `kernels`): step aside and hand the import to the real package, or fail as if we
    # did not exist.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved_path = list(_sys.path)
    _sys.modules.pop("kernels", None)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _real = _importlib.import_module("kernels")
    finally:
        _sys.path[:] = _saved_path
    _sys.modules["kernels"] = _real
