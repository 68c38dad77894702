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
"""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it in this module)

# Keyword options of every kernel launch (and of the sm_90 compile check).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def row_mask(block_ok, row_ok):
    """``block_ok & row_ok`` as a boolean block: a block mask (e.g. the columns in range)
    restricted to one batch row whose scalar predicate is ``row_ok``."""
    return (block_ok & row_ok) != 0
