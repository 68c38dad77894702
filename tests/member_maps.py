"""Row-to-member maps shared by the kernel tests (each with one antithetic setting)."""

from __future__ import annotations

import torch

# row-to-member maps, each with one antithetic setting (both settings appear twice)
MAPS = [("identity", True), ("repeated", False), ("shuffled", True), ("same", False)]


def member_ids(kind: str, rows: int, device, seed: int = 0) -> torch.Tensor:
    """Row-to-member maps: one member per row, runs of 3 rows, a shuffle, all one member."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "identity":
        ids = torch.arange(rows)
    elif kind == "repeated":
        ids = torch.arange(rows) // 3
    elif kind == "shuffled":
        ids = torch.randperm(rows, generator=gen) % max(1, rows // 2 + 1)
    elif kind == "same":
        ids = torch.full((rows,), 5)
    else:
        raise ValueError(kind)
    return ids.to(device)
