"""A whole CartPole episode of a population's MLP policies, in one launch.

A rollout of :class:`~evotorch_eggroll.envs.CartPole` under EGGROLL otherwise takes a few
launches per environment step (the policy, CartPole's step, the episode counters), and each
step reads every member's drawn factors again. Here a program owns ``BLOCK_M`` members, one
environment each, and loops over the steps with everything in registers: the member's
perturbed policy (the in-register layers of :mod:`drawn_mlp`, the same tiles and products),
its action (the outputs' argmax, or the sign of a single output), CartPole's step with
next-step autoreset (:func:`cartpole.cartpole_advance`, starts drawn from the environment's
start stream) and the episode counters (:mod:`episode_step`'s arithmetic). Each step's
results are those of the step-by-step rollout, computed the same way. A program stops when
all its members' episodes have ended or after ``t_max`` steps, and writes the state, the
counters and the number of steps it ran back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels import drawn_mlp as dm
from evotorch_eggroll.kernels.cartpole import cartpole_advance
from evotorch_eggroll.kernels.philox import device_guard, stream_seed


@triton.jit
def _cartpole_episode_kernel(
    ids_ptr, stride_ids, n_rows, base, scale, bias_scale,
    w0, sw0m, sw0k, b0, f0, e0, w1, sw1m, sw1k, b1, f1, e1,
    w2, sw2m, sw2k, b2, f2, e2, w3, sw3m, sw3k, b3, f3, e3,
    D0, D1, D2, D3, D4, n_out,
    state_ptr, steps_ptr, prev_done_ptr, key_ptr, starts_ptr, consts_ptr, max_steps,
    returns_ptr, alive_ptr, active_ptr, ran_ptr, t_max,
    LAYERS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
    HB0: tl.constexpr, WN0: tl.constexpr, BZ0: tl.constexpr, ACT0: tl.constexpr,
    HB1: tl.constexpr, WN1: tl.constexpr, BZ1: tl.constexpr, ACT1: tl.constexpr,
    HB2: tl.constexpr, WN2: tl.constexpr, BZ2: tl.constexpr, ACT2: tl.constexpr,
    HB3: tl.constexpr, WN3: tl.constexpr, BZ3: tl.constexpr, ACT3: tl.constexpr,
    PL: tl.constexpr, ANTITHETIC: tl.constexpr, PRECISION: tl.constexpr,
    LIBDEVICE: tl.constexpr, OFF32: tl.constexpr, ARGMAX: tl.constexpr,
):
    rows, row_ok, rel, sign = dm.program_rows(ids_ptr, stride_ids, n_rows, base, BLOCK_M,
                                              ANTITHETIC, OFF32)

    x = tl.load(state_ptr + rows * 4 + 0, mask=row_ok, other=0.0)
    x_dot = tl.load(state_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
    theta = tl.load(state_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
    theta_dot = tl.load(state_ptr + rows * 4 + 3, mask=row_ok, other=0.0)
    steps = tl.load(steps_ptr + rows, mask=row_ok, other=0)
    prev = tl.load(prev_done_ptr + rows, mask=row_ok, other=0) != 0
    start = tl.load(starts_ptr + rows, mask=row_ok, other=0)
    seed = stream_seed(tl.load(key_ptr), tl.load(key_ptr + 1))
    returns = tl.load(returns_ptr + rows, mask=row_ok, other=0.0)
    alive = tl.load(alive_ptr + rows, mask=row_ok, other=0)
    active = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0) & row_ok

    # in the loop: 32-bit counts of the steps taken alive, the rewards earned while alive
    # (CartPole's are 1 or 0, so the float64 return is exactly returns + earned) and the
    # starts drawn, added to the 64-bit totals at the end (fewer registers carried)
    taken = tl.zeros((BLOCK_M,), tl.int32)
    earned = tl.zeros((BLOCK_M,), tl.int32)
    drawn = tl.zeros((BLOCK_M,), tl.int32)
    steps = steps.to(tl.int32)  # below max_steps
    ks = tl.arange(0, P0)[:, None]
    t = t_max * 0
    left = tl.sum(active.to(tl.int32), axis=0)
    while (t < t_max) & (left > 0):
        # the observation: the state in float32, feature-major (features, rows)
        h = tl.where(ks == 0, x.to(tl.float32)[None, :],
                     tl.where(ks == 1, x_dot.to(tl.float32)[None, :],
                              tl.where(ks == 2, theta.to(tl.float32)[None, :],
                                       tl.where(ks == 3, theta_dot.to(tl.float32)[None, :],
                                                0.0))))
        h = dm.mlp_regs(h, row_ok, rel, sign, scale, bias_scale,
                        w0, sw0m, sw0k, b0, f0, e0, w1, sw1m, sw1k, b1, f1, e1,
                        w2, sw2m, sw2k, b2, f2, e2, w3, sw3m, sw3k, b3, f3, e3,
                        D0, D1, D2, D3, D4, LAYERS, R, BLOCK_M, P0, P1, P2, P3, P4,
                        HB0, WN0, BZ0, ACT0, HB1, WN1, BZ1, ACT1, HB2, WN2, BZ2, ACT2,
                        HB3, WN3, BZ3, ACT3, PRECISION, LIBDEVICE)
        if ARGMAX:
            a = dm.argmax_features(h, n_out, PL)
        else:  # one output: whether it is positive
            first = tl.sum(tl.where(tl.arange(0, PL)[:, None] == 0, h, 0.0), axis=0)
            a = (first > 0.0).to(tl.int32)
        restart = prev
        x, x_dot, theta, theta_dot, steps, done, reward, terminated, truncated = (
            cartpole_advance(x, x_dot, theta, theta_dot, steps, prev, a, rows, start + drawn,
                             seed, consts_ptr, max_steps, True))
        drawn += restart.to(tl.int32)
        prev = done
        earned += (active & (reward != 0.0)).to(tl.int32)
        taken += active.to(tl.int32)
        active = active & ~done
        t += 1
        left = tl.sum(active.to(tl.int32), axis=0)

    tl.store(state_ptr + rows * 4 + 0, x, mask=row_ok)
    tl.store(state_ptr + rows * 4 + 1, x_dot, mask=row_ok)
    tl.store(state_ptr + rows * 4 + 2, theta, mask=row_ok)
    tl.store(state_ptr + rows * 4 + 3, theta_dot, mask=row_ok)
    tl.store(steps_ptr + rows, steps.to(tl.int64), mask=row_ok)
    tl.store(prev_done_ptr + rows, prev.to(tl.int8), mask=row_ok)
    tl.store(starts_ptr + rows, start + drawn, mask=row_ok)
    tl.store(returns_ptr + rows, returns + earned.to(tl.float64), mask=row_ok)
    tl.store(alive_ptr + rows, alive + taken, mask=row_ok)
    tl.store(active_ptr + rows, active.to(tl.int8), mask=row_ok)
    tl.store(ran_ptr + tl.program_id(0), t)


def fits(layers: Sequence[dm.Layer]) -> bool:
    """Whether a policy with these layers takes this kernel: at most ``MAX_LAYERS`` layers
    of at most ``REGS_MAX_FEATURES`` features reading CartPole's 4 observations."""
    widths = [layers[0].weight.shape[1]] + [lay.weight.shape[0] for lay in layers] if layers else []
    return (0 < len(layers) <= dm.MAX_LAYERS and widths[0] == 4
            and max(widths) <= dm.REGS_MAX_FEATURES)


def cartpole_episode_(
    layers: Sequence[dm.Layer], member_ids: torch.Tensor, *, rank: int, scale: float,
    bias_scale: float, antithetic: bool, precision: str, argmax: bool,
    state: torch.Tensor, steps: torch.Tensor, prev_done: torch.Tensor, key: torch.Tensor,
    starts: torch.Tensor, consts: torch.Tensor, max_steps: int,
    returns: torch.Tensor, alive: torch.Tensor, active: torch.Tensor, t_max: int,
) -> torch.Tensor:
    """Run environment ``j`` (``j < K = member_ids.shape[0]``) with member
    ``member_ids[j]``'s policy for up to ``t_max`` steps, or until every environment of its
    program has ended its episode, updating CartPole's state (``state``, ``steps``,
    ``prev_done``, ``starts``; see :func:`cartpole.cartpole_step_`, next-step autoreset) and
    the rollout's counters (``returns``, ``alive``, ``active``; see
    :mod:`episode_step`) in place.

    Args:
        layers, member_ids, rank, scale, bias_scale, antithetic, precision: the policy, as
            :func:`drawn_mlp.drawn_mlp` takes it (see :func:`fits`).
        argmax: the action is the index of the largest output; else (one output) whether it
            is positive.
        state, steps, prev_done, key, starts, consts, max_steps: the environments (``K``
            rows), as :func:`cartpole.cartpole_step_` takes them.
        returns, alive, active: ``(K,)`` float64, int64 and bool rollout counters; the
            returns whole numbers (CartPole's rewards are 1 or 0, so a run's return is the
            count of rewarded steps added once, exactly as step-by-step sums give it).
        t_max: most steps to run.

    Returns:
        ``(programs,)`` int64: the steps each program ran (the rollout ran their maximum).
    """
    k = member_ids.shape[0]
    device = state.device
    ran = torch.zeros((max(1, -(-k // dm.REGS_BLOCK_M)),), dtype=torch.int64, device=device)
    if k == 0 or t_max <= 0:
        return ran
    base = next((c[1] for lay in layers for c in (lay.cache, lay.bias_cache) if c is not None),
                0)
    args, dims, flags, off32 = dm.layer_operands(layers, returns)
    n_layers = len(layers)
    libdevice = state.is_cuda and dm._libdevice is not None
    constexprs, block_m, options, regs = dm.launch_config(
        dims, flags, n_layers, rank, antithetic, precision, libdevice, k <= dm.SMALL_ROWS,
        off32, argmax)
    assert regs and block_m == dm.REGS_BLOCK_M, "the policy does not run in registers"
    with device_guard(state):
        _cartpole_episode_kernel[(ran.shape[0],)](
            member_ids, member_ids.stride(0), k, int(base), float(scale), float(bias_scale),
            *args, *dims, dims[n_layers], state, steps, prev_done.view(torch.int8), key,
            starts, consts, int(max_steps), returns, alive, active.view(torch.int8), ran,
            int(t_max), *constexprs, **options)
    return ran
