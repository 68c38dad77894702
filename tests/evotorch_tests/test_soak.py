"""Short soak on a GPU: no growth of live GPU memory over many generations, and equal
seeds give bit-identical runs (the long version: ``python scripts/soak.py``).

Parts: ``EGGROLL`` + ``EggrollVecGymNE`` with the rollout captured in CUDA graphs and with
the eager step-by-step loop, and the native API on a bfloat16 model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def _soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.parametrize("part, iterations, popsize, steps", [
    ("captured", 40, 1024, 50), ("eager", 25, 512, 30), ("native-bf16", 60, 256, 0)])
def test_memory_stays_flat_and_runs_repeat(part, iterations, popsize, steps):
    soak = _soak()
    device = torch.device("cuda")
    a = soak.run_part(part, iterations, device, popsize=popsize, steps=steps)
    b = soak.run_part(part, iterations, device, popsize=popsize, steps=steps)
    assert a.iterations == iterations and a.allocated_warm > 0
    # live tensors after the warm-up and at the end: the same bytes, generation after generation
    assert a.allocated_end == a.allocated_warm, (part, a.allocated_warm, a.allocated_end)
    assert b.allocated_end == b.allocated_warm, (part, b.allocated_warm, b.allocated_end)
    assert torch.equal(a.final, b.final), part
    assert bool(torch.isfinite(a.final).all())
