"""A per-generation function of CUDA tensors replayed from a CUDA graph.

Work that runs once per generation on a few small tensors (ranking the fitnesses, say) costs
the host a launch per operation, which at small populations is more than the device's time.
:class:`GraphedCall` runs such a function eagerly the first time it sees a signature (input
shapes, dtypes and devices, plus a key for everything else the function depends on),
captures it in a CUDA graph the second time in a row, and from then on copies the inputs
into the graph's own buffers and replays it: one copy per input and one graph launch.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Optional

import torch

__all__ = ["GraphedCall", "new_graph", "release_held_graphs"]

# Graphs dropped while a stream capture was under way on this thread, kept until
# :func:`release_held_graphs` runs outside any capture.
_HELD: list = []


class _ReleasedOutsideCaptures:
    """Mixin of the package's CUDA graphs: one whose last reference goes while this thread
    captures a stream (the garbage collector may free a dropped searcher's graphs in the
    middle of a user's ``torch.cuda.graph`` block) is kept alive instead, since destroying
    a graph is not permitted during a capture and would invalidate it."""

    def __del__(self) -> None:
        if _capturing():
            _HELD.append(self)  # resurrected once; freed by release_held_graphs


def _capturing() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001 - interpreter shutdown or a broken CUDA context
        return False


def new_graph() -> torch.cuda.CUDAGraph:
    """A ``torch.cuda.CUDAGraph`` that is never destroyed during a stream capture."""
    return _Graph()


def release_held_graphs() -> None:
    """Free the graphs kept by :class:`_ReleasedOutsideCaptures` (nothing while a capture
    is under way)."""
    if _HELD and not _capturing():
        _HELD.clear()


class _Graph(_ReleasedOutsideCaptures, torch.cuda.CUDAGraph):
    pass


class GraphedCall:
    """Replays ``fn(*inputs)`` from a CUDA graph once the same signature came twice in a row.

    The values returned by a replay are the graph's own output tensors: the same objects at
    every replay, overwritten by the next one (stream-ordered, so work queued on them before
    that replay sees this call's values). Callers use them within the generation and keep no
    reference beyond it. ``fn`` must queue device work only, the same operations for the
    same signature, and never read a value back to the host (in PyTorch a capture broken by
    a host read leaves the CUDA generator unusable, so such a function cannot be captured
    safely even with the fallback below).

    Eager (never captured) on the CPU, inside another capture or a ``torch.compile`` trace,
    and for good after a capture that raised (with one warning)."""

    def __init__(self, what: str) -> None:
        self._what = what  # named in the warning
        self._seen: Optional[tuple] = None  # the signature of the last eager call
        self._graph: Optional[tuple] = None  # (signature, graph, static inputs, outputs)
        self._disabled = False

    def __call__(self, fn: Callable[..., Any], key: Hashable, *inputs: torch.Tensor) -> Any:
        if _HELD:
            release_held_graphs()
        if (self._disabled or not inputs or any(not t.is_cuda for t in inputs)
                or torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()):
            return fn(*inputs)
        signature = (key, tuple((t.shape, t.dtype, t.device) for t in inputs))
        if self._graph is not None and self._graph[0] == signature:
            _, graph, static, outputs = self._graph
            torch._foreach_copy_(static, list(inputs))
            graph.replay()
            return outputs
        if self._seen != signature:  # first time: eager (it also compiles what fn launches)
            self._seen, self._graph = signature, None
            return fn(*inputs)
        static = [t.clone() for t in inputs]
        graph = new_graph()
        try:
            with torch.cuda.graph(graph):
                outputs = fn(*static)
        except Exception as err:  # noqa: BLE001 - anything fn cannot capture runs eagerly
            self._disabled, self._graph = True, None
            warnings.warn(f"capturing {self._what} in a CUDA graph failed ({type(err).__name__}: {err}); "
                          "it runs eagerly from now on", RuntimeWarning, stacklevel=3)
            return fn(*inputs)
        self._graph = (signature, graph, static, outputs)
        graph.replay()  # capturing ran nothing
        return outputs
