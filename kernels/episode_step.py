"""An environment step's effect on the rollout's per-environment counters, in one launch.

For every environment ``i``: ``returns[i] += reward[i]`` (float64) and ``alive[i] += 1``
while ``active[i]``; then ``done[i] = terminated[i] | truncated[i]`` and
``active[i] &= ~done[i]``. The same arithmetic as the torch expressions it replaces
(``returns += where(active, reward.double(), 0)``, ...): the float64 additions round the
same way, so the results are bit-equal; one launch instead of about eight for the
elementwise ops of every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS
from evotorch_eggroll.kernels.philox import device_guard

# One environment per thread (H200: 1.1 / 1.7 us per step at 4,096 / 65,536 environments,
# against 2.2 / 2.4 us with 1,024 per program).
BLOCK = 128
NUM_WARPS = 4


@triton.jit
def _episode_step_kernel(returns_ptr, alive_ptr, active_ptr, done_ptr, reward_ptr, term_ptr,
                         trunc_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    active = tl.load(active_ptr + i, mask=ok, other=0) != 0
    reward = tl.load(reward_ptr + i, mask=ok, other=0.0).to(tl.float64)
    done = (tl.load(term_ptr + i, mask=ok, other=0) != 0) | (tl.load(trunc_ptr + i, mask=ok,
                                                                       other=0) != 0)
    returns = tl.load(returns_ptr + i, mask=ok, other=0.0)
    alive = tl.load(alive_ptr + i, mask=ok, other=0)
    tl.store(returns_ptr + i, tl.where(active, returns + reward, returns), mask=ok)
    tl.store(alive_ptr + i, alive + active.to(tl.int64), mask=ok)
    tl.store(active_ptr + i, (active & ~done).to(tl.int8), mask=ok)
    tl.store(done_ptr + i, done.to(tl.int8), mask=ok)


def supports(returns: torch.Tensor, alive: torch.Tensor, active: torch.Tensor,
             reward: object, terminated: object, truncated: object) -> bool:
    """Whether :func:`episode_step_` takes these tensors (same device, contiguous ``(E,)``,
    float64 returns, int64 alive, bool flags, a float32/float64 reward)."""
    e = returns.shape[0]
    tensors = (returns, alive, active, reward, terminated, truncated)
    return (all(isinstance(t, torch.Tensor) and t.device == returns.device
                and tuple(t.shape) == (e,) and t.is_contiguous() for t in tensors)
            and returns.dtype == torch.float64 and alive.dtype == torch.int64
            and active.dtype == torch.bool and terminated.dtype == torch.bool
            and truncated.dtype == torch.bool
            and reward.dtype in (torch.float32, torch.float64))


def episode_step_(returns: torch.Tensor, alive: torch.Tensor, active: torch.Tensor,
                  reward: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor
                  ) -> torch.Tensor:
    """Update ``returns``, ``alive`` and ``active`` in place (see the module); returns the
    ``(E,)`` bool end-of-episode flags of this step. Inputs as :func:`supports` accepts."""
    e = returns.shape[0]
    done = torch.empty((e,), dtype=torch.bool, device=returns.device)
    if e:
        with device_guard(returns):
            _episode_step_kernel[(triton.cdiv(e, BLOCK),)](
                returns, alive, active.view(torch.int8), done.view(torch.int8), reward,
                terminated.view(torch.int8), truncated.view(torch.int8), e, BLOCK=BLOCK,
                num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
    return done
