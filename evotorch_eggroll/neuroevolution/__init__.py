"""EvoTorch problem adapters for neuroevolution with EGGROLL.

Each adapter is a valid ``evotorch.Problem`` whose decision vector is the concatenation of
the network's evolved parameters, so stock EvoTorch searchers (PGPE, SNES, CMA-ES, ...) run
on it through the usual materialised path: every solution vector becomes a set of network
parameters, and with a batched evaluation each network call runs all solutions at once
(``torch.func.vmap`` over their parameters). Next to that, every adapter offers a low-rank
side channel that the :class:`~evotorch_eggroll.algorithms.EGGROLL` searcher uses:
:meth:`EggrollNEProblem.evaluate_population` evaluates a whole population inside an
``EggrollStrategy`` perturbation context, where each network call is one
``pop.batched_forward`` over the rows of all members and no member's weights are ever
materialised.

Both paths run the same evaluation code. An adapter describes its evaluation once, in
:meth:`EggrollNEProblem._evaluate_members`, in terms of a :class:`PopulationForward` (a
callable that runs the network for many members at once, one member per input row); the
searcher decides whether that callable is backed by low-rank perturbations or by
materialised parameter vectors.

Adapters:

* :class:`EggrollNEProblem`: the base class (give ``batched_eval_func`` or
  ``network_eval_func``, or subclass and override ``_evaluate_members``).
* :class:`EggrollSupervisedNE`: minimise a loss over minibatches of a dataset.
* :class:`EggrollVecGymNE`: maximise the episode return in a Gymnasium vector environment
  (or the torch-native :class:`~evotorch_eggroll.envs.CartPole`), one environment per member.

Modules (laid out like EvoTorch's ``evotorch.neuroevolution``):

* :mod:`.baseneproblem`: :class:`EggrollNEProblem` and the helpers every adapter shares.
* :mod:`.forward`: :class:`PopulationForward` and the materialised members behind it.
* :mod:`.supervisedne`: :class:`EggrollSupervisedNE`.
* :mod:`.vecgymne`: :class:`EggrollVecGymNE`.
* :mod:`.obsnorm`: :class:`RunningObsNorm`, the running observation statistics.
* :mod:`.rollout`: a rollout's buffers and its steps captured in CUDA graphs.

The public names, and the classes that pickles written when all adapters lived in one
module refer to, are importable from this package as before the split. Pickles name a class
by the module that defines it (e.g. ``evotorch_eggroll.neuroevolution.vecgymne``); pickles
written before name ``evotorch_eggroll.neuroevolution`` and load through the names
re-exported here.
"""

from ..envs import CartPole  # noqa: F401 - importable from here as before the split
from .baseneproblem import DeviceLike, EggrollNEProblem, NetworkLike, _mix_seed  # noqa: F401
# classes that pickles written before the split refer to by this module's name
from .forward import PopulationForward, _MaterialisedMembers  # noqa: F401
from .obsnorm import RunningObsNorm, _ObsNormPolicy  # noqa: F401
from .rollout import _CapturedRollout, _RolloutBuffers  # noqa: F401
from .supervisedne import EggrollSupervisedNE
from .vecgymne import EggrollVecGymNE

__all__ = [
    "PopulationForward",
    "EggrollNEProblem",
    "EggrollSupervisedNE",
    "EggrollVecGymNE",
    "RunningObsNorm",
]
