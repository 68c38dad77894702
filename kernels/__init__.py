"""Triton kernels of evotorch_eggroll, installed as ``evotorch_eggroll.kernels``.

One op per module: ``@triton.jit`` code plus a thin launch helper. Nothing here imports
the rest of the package but :mod:`evotorch_eggroll.noise`, which defines the noise stream
and its layout (the factor block of a weight, a member's noise index and sign); the device
side of that layout is in :mod:`evotorch_eggroll.kernels.philox`.
"""

if __name__ == "kernels":
    # This folder sits at the repository root, so `import kernels` would find it whenever
    # the root is on sys.path. That name belongs to another project (Hugging Face's
    # `kernels`): step aside and hand the import to the real package. Where that is not
    # installed, leave an empty stand-in with no file and no version, which is how
    # `transformers`' availability probe (find_spec, then an import) recognises a name that
    # only shadows a package, so that it reports the package missing instead of failing.
    import importlib as _importlib
    import importlib.machinery  # noqa: F401 - for _importlib.machinery
    import os as _os
    import sys as _sys
    import types as _types

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved_path = list(_sys.path)
    _sys.modules.pop("kernels", None)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _real = _importlib.import_module("kernels")
    except ModuleNotFoundError as _err:
        if _err.name != "kernels":
            raise
        _real = _types.ModuleType("kernels", "Stand-in: Hugging Face's `kernels` package is not installed.")
        _real.__file__ = None
        _real.__spec__ = _importlib.machinery.ModuleSpec("kernels", None)

        def _missing(name: str):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: Hugging Face's `kernels` package is not "
                f"installed (the name was found as the kernels/ folder of the checkout at {_root}, "
                "which is evotorch_eggroll.kernels and steps aside)"
            )

        _real.__getattr__ = _missing
    finally:
        _sys.path[:] = _saved_path
    _sys.modules["kernels"] = _real
