"""Test helpers: capture a function in a CUDA graph the way PyTorch recommends, and a
stand-in for the package's captured stages that always runs them eagerly."""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` captured in a CUDA graph after one warm-up call on a side stream (kernels
    compile and caches fill outside the capture); returns the graph and the captured
    call's output, whose memory the graph's replays write."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class Eager:
    """Stands in for a ``GraphedCall`` (a searcher's fitness stage, a strategy's gradient
    stage): always eager, so a run with it is the never-captured twin of one without."""

    def __call__(self, fn: Callable[..., Any], key: Any, *inputs: torch.Tensor) -> Any:
        return fn(*inputs)
