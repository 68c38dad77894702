"""What depends on the Triton release, in one place.

Tested with Triton 3.6 (compiled on the GPU and in the interpreter) and 3.9 (in the
interpreter, and compiled for sm_90 without a GPU by ``scripts/sm90_compile_check.py``).

Masks. Load and store masks must be boolean blocks. Triton's interpreter keeps the result
of a scalar comparison (``row < n_rows``) as an array of the operands' integer type under
the ``int1`` type, and broadcasting it onto a block keeps that integer type, so
``block_mask & row_ok`` is an integer block. Triton 3.6's interpreter accepted such a mask;
3.9's refuses it (``ValueError: mask has unsupported dtype``). :func:`row_mask` builds the
combined mask as a boolean block on every release; in compiled code the comparison of an
``i1`` with zero folds away, so the generated code is that of ``block_mask & row_ok``.

Floating-point contraction. Up to 3.9 Triton fuses multiplies and adds into FMAs unless
told otherwise; 3.9 warns that 3.10 will stop doing so by default. The kernels' results
(the Box–Muller transform, the products) are those of fused code, so every launch asks
for it explicitly with :data:`LAUNCH_OPTIONS` and keeps the same code on later releases.

Programmatic dependent launch. On sm_90 and later a kernel launched with ``launch_pdl`` may
be scheduled while the kernel before it on the stream finishes; the kernels that accept it
(a ``PDL`` constexpr) then wait for that kernel's completion with :func:`wait_for_previous`
before their first memory access, and never signal their own dependents early, so every
access happens after the previous kernel has finished and flushed, as in an ordinary
launch. What it saves is the launch latency between consecutive kernels (those of a
captured rollout step). :func:`dependent_launch` gives the launch keywords where the
release and the device support it.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it in this module)

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_wait

    _HAS_PDL = "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
except ImportError:  # a release without grid dependency control
    gdc_wait = None
    _HAS_PDL = False

# Keyword options of every kernel launch (and of the sm_90 compile check).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# dependent_launch's answer by CUDA device index
_dependent: dict[int, dict] = {}


def dependent_launch(device: torch.device) -> dict:
    """Launch keywords of a kernel with a ``PDL`` constexpr on ``device``: programmatic
    dependent launch (``PDL=True, launch_pdl=True``) on a CUDA device of compute capability
    9.0 or later with a Triton release that has it, compiled (not interpreted); else none."""
    if device.type != "cuda" or not _HAS_PDL or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _dependent.get(index)
    if found is None:
        found = _dependent[index] = (dict(PDL=True, launch_pdl=True)
                                     if torch.cuda.get_device_capability(index) >= (9, 0) else {})
    return found


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Under programmatic dependent launch, wait until the previous kernel on the stream has
    completed and its writes are visible (nothing otherwise)."""
    if PDL:
        gdc_wait()


@triton.jit
def row_mask(block_ok, row_ok):
    """``block_ok & row_ok`` as a boolean block: a block mask (e.g. the columns in range)
    restricted to one batch row whose scalar predicate is ``row_ok``."""
    return (block_ok & row_ok) != 0
