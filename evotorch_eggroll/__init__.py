"""evotorch_eggroll: EGGROLL low-rank evolution strategies for PyTorch.

EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025) perturbs every
weight matrix by a low-rank product ``A @ B.T`` that is never materialised: the noise comes
from a counter-based Philox stream, is generated inside Triton kernels during the batched
forward, and is regenerated for the update.
"""

__version__ = "0.1.0"
