"""evotorch_eggroll: EGGROLL low-rank evolution strategies for PyTorch.

EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025) perturbs every
weight matrix by a low-rank product ``A @ B.T`` that is never materialised: the noise comes
from a counter-based Philox stream, is generated inside Triton kernels during the batched
forward, and is regenerated for the update.
"""

__version__ = "0.1.0"

from .context import PerturbationContext
from .distributed import RankFailedError
from .module import ESModule
from .perturbation import Perturbation, PerturbationSequence
from .shaping import (
    antithetic_baseline,
    antithetic_fold,
    centered_rank,
    rank_transform,
    replace_nonfinite,
    shape_fitnesses,
    zscore,
)
from .strategy import EggrollStrategy, EvolutionStrategy, OpenESStrategy

__all__ = [
    "EggrollStrategy",
    "OpenESStrategy",
    "EvolutionStrategy",
    "ESModule",
    "PerturbationContext",
    "RankFailedError",
    "Perturbation",
    "PerturbationSequence",
    "shape_fitnesses",
    "zscore",
    "rank_transform",
    "centered_rank",
    "antithetic_baseline",
    "antithetic_fold",
    "replace_nonfinite",
]
