"""One CartPole step for every environment of a batch, in one launch.

The batched :class:`~evotorch_eggroll.envs.CartPole` on a CUDA device steps through this
kernel instead of some forty elementwise torch operations. It evaluates the same
expressions in the same order in the state's dtype, with floating-point contraction
(fused multiply-add) switched off, so each operation rounds as the torch code does; the
constants arrive in a tensor of the state's dtype (a Python float literal would be a
float32 constant inside a Triton kernel). The state, step counters and end-of-episode flags
are updated in place, so their addresses never change (a captured CUDA graph can step the
environment again and again).

Autoreset draws an environment's next initial state inside the kernel from the
environment's start stream (:data:`START_STREAM_TAG`): the stream's key and each
environment's count of drawn starts live in device tensors, so a replayed graph draws what
an eager step would.

A rollout of :class:`~evotorch_eggroll.neuroevolution.EggrollVecGymNE` updates its episode
counters (returns, steps taken alive, the alive mask) in the same launch
(:func:`cartpole_step_counting_`), one launch per step fewer than the counters' own kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from evotorch_eggroll.kernels.compat import dependent_launch, wait_for_previous
from evotorch_eggroll.kernels.philox import PHILOX_ROUNDS, device_guard, stream_seed

# One environment per thread: the step is a chain of dependent float64 operations (sine,
# cosine, divisions), so more threads in flight beat more environments per thread (on an
# H200 at 65,536 environments: 4.4 us per step against 7.8 us with 256 per program).
BLOCK = 128
NUM_WARPS = 4

# Initial states: Philox4x32-10 keyed by the environment's 64-bit seed, counter
# (environment index, start count, 0, START_STREAM_TAG); word v gives state variable v as
# low + (high - low) * (w_v * 2**-32). The tag keeps these counters apart from the noise
# stream's (whose last word is an epoch).
START_STREAM_TAG = 0x43415254
_START_TAG = tl.constexpr(START_STREAM_TAG)

# Order of the constants in the ``consts`` tensor.
CONSTANT_NAMES = ("gravity", "masspole", "total_mass", "length", "polemass_length",
                  "force_mag", "tau", "theta_threshold_radians", "x_threshold", "four_thirds",
                  "low", "span")


@triton.jit
def start_words(seed, env, start):
    """The four Philox words of environment ``env``'s start number ``start`` (int64 blocks)."""
    c0 = env.to(tl.uint32)
    c1 = start.to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero, zero + _START_TAG, PHILOX_ROUNDS)


@triton.jit
def _start_value(w, low, span):
    # w * 2**-32 is exact in float64 (2**-32 is exact as Triton's float32 literal)
    return low + span * (w.to(tl.float64) * 2.3283064365386963e-10).to(low.dtype)


@triton.jit
def start_state(seed, env, start, consts_ptr):
    """Start number ``start`` of environments ``env`` (int64 blocks) under the stream key
    ``seed``: ``(x, x_dot, theta, theta_dot)`` in the constants' dtype."""
    low = tl.load(consts_ptr + 10)
    span = tl.load(consts_ptr + 11)
    w0, w1, w2, w3 = start_words(seed, env, start)
    return (_start_value(w0, low, span), _start_value(w1, low, span),
            _start_value(w2, low, span), _start_value(w3, low, span))


@triton.jit
def _cartpole_step_kernel(
    state_ptr,
    steps_ptr,
    prev_done_ptr,
    act_ptr,
    stride_act,
    key_ptr,
    starts_ptr,
    consts_ptr,
    obs_ptr,
    reward_ptr,
    term_ptr,
    trunc_ptr,
    returns_ptr,
    alive_ptr,
    active_ptr,
    num_envs,
    max_steps,
    NEXT_STEP: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)  # a rollout step launches it right behind the policy's kernel
    env = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = env < num_envs
    gravity = tl.load(consts_ptr + 0)
    masspole = tl.load(consts_ptr + 1)
    total_mass = tl.load(consts_ptr + 2)
    length = tl.load(consts_ptr + 3)
    polemass_length = tl.load(consts_ptr + 4)
    force_mag = tl.load(consts_ptr + 5)
    tau = tl.load(consts_ptr + 6)
    theta_limit = tl.load(consts_ptr + 7)
    x_limit = tl.load(consts_ptr + 8)
    four_thirds = tl.load(consts_ptr + 9)

    x = tl.load(state_ptr + env * 4 + 0, mask=ok, other=0.0)
    x_dot = tl.load(state_ptr + env * 4 + 1, mask=ok, other=0.0)
    theta = tl.load(state_ptr + env * 4 + 2, mask=ok, other=0.0)
    theta_dot = tl.load(state_ptr + env * 4 + 3, mask=ok, other=0.0)
    a = tl.load(act_ptr + env * stride_act, mask=ok, other=0)
    force = tl.where(a > 0, force_mag, -force_mag)
    costheta = tl.cos(theta)
    sintheta = tl.sin(theta)

    temp = (force + polemass_length * (theta_dot * theta_dot) * sintheta) / total_mass
    thetaacc = (gravity * sintheta - costheta * temp) / (
        length * (four_thirds - masspole * (costheta * costheta) / total_mass)
    )
    xacc = temp - polemass_length * thetaacc * costheta / total_mass

    x = x + tau * x_dot
    x_dot = x_dot + tau * xacc
    theta = theta + tau * theta_dot
    theta_dot = theta_dot + tau * thetaacc

    terminated = (x < -x_limit) | (x > x_limit) | (theta < -theta_limit) | (theta > theta_limit)
    steps = tl.load(steps_ptr + env, mask=ok, other=0) + 1
    truncated = steps >= max_steps
    reward = tl.full((BLOCK,), 1.0, tl.float32)
    prev = tl.load(prev_done_ptr + env, mask=ok, other=0) != 0
    if NEXT_STEP:
        # an environment whose episode ended on the previous step starts a new one now
        seed = stream_seed(tl.load(key_ptr), tl.load(key_ptr + 1))
        start = tl.load(starts_ptr + env, mask=ok, other=0)
        x0, x_dot0, theta0, theta_dot0 = start_state(seed, env, start, consts_ptr)
        x = tl.where(prev, x0, x)
        x_dot = tl.where(prev, x_dot0, x_dot)
        theta = tl.where(prev, theta0, theta)
        theta_dot = tl.where(prev, theta_dot0, theta_dot)
        tl.store(starts_ptr + env, start + 1, mask=ok & prev)
        steps = tl.where(prev, 0, steps)
        reward = tl.where(prev, 0.0, reward)
        terminated = terminated & ~prev
        truncated = truncated & ~prev
        done = terminated | truncated
    else:
        reward = tl.where(prev, 0.0, reward)
        done = prev | terminated | truncated

    tl.store(state_ptr + env * 4 + 0, x, mask=ok)
    tl.store(state_ptr + env * 4 + 1, x_dot, mask=ok)
    tl.store(state_ptr + env * 4 + 2, theta, mask=ok)
    tl.store(state_ptr + env * 4 + 3, theta_dot, mask=ok)
    tl.store(obs_ptr + env * 4 + 0, x.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 1, x_dot.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 2, theta.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 3, theta_dot.to(tl.float32), mask=ok)
    tl.store(steps_ptr + env, steps, mask=ok)
    tl.store(prev_done_ptr + env, done.to(tl.int8), mask=ok)
    if COUNT:  # the rollout's counters (kernels/episode_step.py's arithmetic); ended in term_ptr
        ended = terminated | truncated
        active = tl.load(active_ptr + env, mask=ok, other=0) != 0
        returns = tl.load(returns_ptr + env, mask=ok, other=0.0)
        alive = tl.load(alive_ptr + env, mask=ok, other=0)
        tl.store(returns_ptr + env, tl.where(active, returns + reward.to(tl.float64), returns),
                 mask=ok)
        tl.store(alive_ptr + env, alive + active.to(tl.int64), mask=ok)
        tl.store(active_ptr + env, (active & ~ended).to(tl.int8), mask=ok)
        tl.store(term_ptr + env, ended.to(tl.int8), mask=ok)
    else:
        tl.store(reward_ptr + env, reward, mask=ok)
        tl.store(term_ptr + env, terminated.to(tl.int8), mask=ok)
        tl.store(trunc_ptr + env, truncated.to(tl.int8), mask=ok)


@triton.jit
def _start_states_kernel(key_ptr, starts_ptr, where_ptr, consts_ptr, out_ptr, num_envs,
                         HAS_WHERE: tl.constexpr, BLOCK: tl.constexpr):
    env = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = env < num_envs
    if HAS_WHERE:
        ok = ok & (tl.load(where_ptr + env, mask=ok, other=0) != 0)
    seed = stream_seed(tl.load(key_ptr), tl.load(key_ptr + 1))
    start = tl.load(starts_ptr + env, mask=ok, other=0)
    x, x_dot, theta, theta_dot = start_state(seed, env, start, consts_ptr)
    tl.store(out_ptr + env * 4 + 0, x, mask=ok)
    tl.store(out_ptr + env * 4 + 1, x_dot, mask=ok)
    tl.store(out_ptr + env * 4 + 2, theta, mask=ok)
    tl.store(out_ptr + env * 4 + 3, theta_dot, mask=ok)
    tl.store(starts_ptr + env, start + 1, mask=ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _reset_kernel(seed_lo, seed_hi, key_ptr, starts_ptr, where_ptr, consts_ptr, state_ptr,
                  steps_ptr, prev_done_ptr, obs_ptr, num_envs,
                  HAS_WHERE: tl.constexpr, RESEED: tl.constexpr, BLOCK: tl.constexpr):
    env = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = env < num_envs
    chosen = ok
    if HAS_WHERE:
        chosen = ok & (tl.load(where_ptr + env, mask=ok, other=0) != 0)
    if RESEED:  # a new key: every start count restarts at 0
        lo = seed_lo.to(tl.uint32, bitcast=True).to(tl.int64)
        hi = seed_hi.to(tl.uint32, bitcast=True).to(tl.int64)
        if tl.program_id(0) == 0:
            tl.store(key_ptr, lo)
            tl.store(key_ptr + 1, hi)
        seed = stream_seed(lo, hi)
        start = env * 0
        tl.store(starts_ptr + env, chosen.to(tl.int64), mask=ok)
    else:
        seed = stream_seed(tl.load(key_ptr), tl.load(key_ptr + 1))
        start = tl.load(starts_ptr + env, mask=chosen, other=0)
        tl.store(starts_ptr + env, start + 1, mask=chosen)
    x, x_dot, theta, theta_dot = start_state(seed, env, start, consts_ptr)
    if HAS_WHERE:  # the others keep their state (and show it in the observations)
        x = tl.where(chosen, x, tl.load(state_ptr + env * 4 + 0, mask=ok, other=0.0))
        x_dot = tl.where(chosen, x_dot, tl.load(state_ptr + env * 4 + 1, mask=ok, other=0.0))
        theta = tl.where(chosen, theta, tl.load(state_ptr + env * 4 + 2, mask=ok, other=0.0))
        theta_dot = tl.where(chosen, theta_dot,
                             tl.load(state_ptr + env * 4 + 3, mask=ok, other=0.0))
    tl.store(state_ptr + env * 4 + 0, x, mask=chosen)
    tl.store(state_ptr + env * 4 + 1, x_dot, mask=chosen)
    tl.store(state_ptr + env * 4 + 2, theta, mask=chosen)
    tl.store(state_ptr + env * 4 + 3, theta_dot, mask=chosen)
    tl.store(steps_ptr + env, env * 0, mask=chosen)
    tl.store(prev_done_ptr + env, (env * 0).to(tl.int8), mask=chosen)
    tl.store(obs_ptr + env * 4 + 0, x.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 1, x_dot.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 2, theta.to(tl.float32), mask=ok)
    tl.store(obs_ptr + env * 4 + 3, theta_dot.to(tl.float32), mask=ok)


def reset_(key: torch.Tensor, starts: torch.Tensor, where: torch.Tensor | None,
           consts: torch.Tensor, state: torch.Tensor, steps: torch.Tensor,
           prev_done: torch.Tensor, seed: int | None) -> torch.Tensor:
    """A whole reset in one launch: the next initial state of every environment where
    ``where`` is True (all when None) written into ``state``, those environments' ``starts``
    advanced and their ``steps`` and ``prev_done`` cleared, and the observations of every
    environment returned. With ``seed`` (an unsigned 64-bit integer), the stream is keyed
    with it first: ``key`` receives its two words and every start count restarts at 0 (as
    fills of ``key`` and a zeroed ``starts`` before the draw would do, in the same launch).

    Args:
        key, starts, where, consts: as in :func:`start_states_`.
        state: ``(E, 4)`` contiguous floating tensor in ``consts``' dtype.
        steps: ``(E,)`` int64; prev_done: ``(E,)`` bool.

    Returns:
        ``obs (E, 4)`` float32: ``state`` after the reset, rounded to float32.
    """
    e = starts.shape[0]
    obs = torch.empty((e, 4), dtype=torch.float32, device=state.device)
    if e:
        # each word as the int32 of its bits: one compiled kernel whatever the values
        lo, hi = ((w - (1 << 32) if w >= 1 << 31 else w) for w in
                  ((0, 0) if seed is None else (seed & 0xFFFFFFFF, seed >> 32)))
        with device_guard(state):
            _reset_kernel[(triton.cdiv(e, BLOCK),)](
                lo, hi, key, starts, starts if where is None else where.view(torch.int8), consts,
                state, steps, prev_done.view(torch.int8), obs, e, HAS_WHERE=where is not None,
                RESEED=seed is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
    return obs


def start_states_(key: torch.Tensor, starts: torch.Tensor, where: torch.Tensor | None,
                  consts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the next initial state of every environment where ``where`` is True (all when
    None) into the rows of ``out`` and advance those environments' ``starts``, in one launch.

    Args:
        key: ``(2,)`` int64: the low and high 32-bit words of the start stream's seed.
        starts: ``(E,)`` int64 counts of the initial states drawn for each environment.
        where: ``(E,)`` bool, or None for every environment.
        consts: the constants of :data:`CONSTANT_NAMES` in ``out``'s dtype.
        out: ``(E, 4)`` contiguous floating tensor; the other rows are left as they are.

    Returns:
        ``out``.
    """
    e = starts.shape[0]
    if e:
        with device_guard(out):
            _start_states_kernel[(triton.cdiv(e, BLOCK),)](
                key, starts, starts if where is None else where.view(torch.int8), consts, out,
                e, HAS_WHERE=where is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
    return out


def cartpole_step_(
    state: torch.Tensor,
    steps: torch.Tensor,
    prev_done: torch.Tensor,
    actions: torch.Tensor,
    starts: torch.Tensor | None,
    key: torch.Tensor,
    consts: torch.Tensor,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance every environment by one step, updating ``state``, ``steps``,
    ``prev_done`` and (with autoreset) ``starts`` in place.

    Args:
        state: ``(E, 4)`` contiguous floating state (x, x_dot, theta, theta_dot).
        steps: ``(E,)`` int64 step counters.
        prev_done: ``(E,)`` bool: the episode ended on the previous step.
        actions: ``(E,)`` integer actions (positive pushes right).
        starts: ``(E,)`` int64 counts of the initial states drawn for each environment, for
            next-step autoreset (an environment that restarts draws start number
            ``starts[i]`` and counts it), or None without autoreset.
        key: ``(2,)`` int64: the low and high 32-bit words of the start stream's seed.
        consts: the constants of :data:`CONSTANT_NAMES` in the state's dtype.
        max_steps: truncation length.

    Returns:
        ``obs (E, 4)`` float32, ``reward (E,)`` float32, ``terminated`` and ``truncated``
        ``(E,)`` bool.
    """
    e = state.shape[0]
    dev = state.device
    reward = torch.empty((e,), dtype=torch.float32, device=dev)
    truncated = torch.empty((e,), dtype=torch.bool, device=dev)
    obs, terminated = _launch_step(state, steps, prev_done, actions, starts, key, consts,
                                   max_steps, reward, truncated, None)
    return obs, reward, terminated, truncated


def cartpole_step_counting_(
    returns: torch.Tensor, alive: torch.Tensor, active: torch.Tensor, *step: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cartpole_step_` and a rollout's episode counters in the same launch: for every
    environment ``i``, with this step's ``reward``, ``terminated`` and ``truncated``,
    ``returns[i] += reward[i]`` (float64) and ``alive[i] += 1`` while ``active[i]``, then
    ``active[i] &= ~(terminated[i] | truncated[i])`` -- the arithmetic of
    :func:`episode_step.episode_step_`, with bit-equal results.

    Args:
        returns, alive, active: ``(E,)`` contiguous float64, int64 and bool counters,
            updated in place.
        step: ``state, steps, prev_done, actions, starts, key, consts, max_steps``, as
            :func:`cartpole_step_` takes them.

    Returns:
        ``obs (E, 4)`` float32 and the ``(E,)`` bool flags ``terminated | truncated``.
    """
    return _launch_step(*step, None, None, (returns, alive, active))


def _launch_step(state, steps, prev_done, actions, starts, key, consts, max_steps, reward,
                 truncated, counters):
    """One launch of the step kernel; ``(obs, terminated)``, where with ``counters``
    (``returns, alive, active``) ``terminated`` holds ``terminated | truncated`` and
    ``reward``/``truncated`` are not written (None)."""
    e = state.shape[0]
    dev = state.device
    obs = torch.empty((e, 4), dtype=torch.float32, device=dev)
    terminated = torch.empty((e,), dtype=torch.bool, device=dev)
    if e == 0:
        return obs, terminated
    next_step = starts is not None
    count = counters is not None
    returns, alive, active = counters if count else (obs, steps, terminated)  # unread
    with device_guard(state):
        _cartpole_step_kernel[(triton.cdiv(e, BLOCK),)](
            state, steps, prev_done.view(torch.int8), actions, actions.stride(0), key,
            starts if next_step else steps, consts, obs, obs if reward is None else reward,
            terminated.view(torch.int8),
            terminated.view(torch.int8) if truncated is None else truncated.view(torch.int8),
            returns, alive, active.view(torch.int8), e, int(max_steps),
            NEXT_STEP=next_step, COUNT=count, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=False, **dependent_launch(dev),
        )
    return obs, terminated
