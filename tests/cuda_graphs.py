"""Test helper: capture a function in a CUDA graph the way PyTorch recommends."""

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
