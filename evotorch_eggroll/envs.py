"""Batched reinforcement-learning environments on torch tensors.

These environments keep their whole state in torch tensors on one device, so that a
population of thousands of policies can be evaluated on a GPU without a round trip to the
host per step. They follow Gymnasium's (>= 1.0) vector-environment interface: ``reset``
returns ``(obs, info)``, ``step`` returns ``(obs, reward, terminated, truncated, info)``,
and ``num_envs``, ``single_observation_space``, ``single_action_space``,
``observation_space`` and ``action_space`` describe the batch. Observations, rewards and
flags are torch tensors on the environment's device (not numpy arrays).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import batch_space

from .noise import philox4x32, philox4x32_numpy

try:  # Gymnasium >= 1.1 names its autoreset modes; 1.0 always resets on the next step.
    from gymnasium.vector import AutoresetMode
except ImportError:  # pragma: no cover - Gymnasium 1.0
    AutoresetMode = None  # type: ignore[assignment]

__all__ = ["CartPole", "evaluate_policy"]

TensorLike = Union[torch.Tensor, np.ndarray, list, tuple]


def _autoreset_value(name: str) -> Any:
    """Gymnasium's metadata value for an autoreset mode (the enum when it exists)."""
    if AutoresetMode is None:
        return name
    return AutoresetMode.NEXT_STEP if name == "next_step" else AutoresetMode.DISABLED


class CartPole(gym.vector.VectorEnv):
    """A batch of CartPole-v1 environments whose state lives in torch tensors.

    The dynamics, termination thresholds (|x| > 2.4, |theta| > 12 degrees), reward (+1 on
    every step, the terminating one included), initial-state distribution (each of the four
    state variables uniform in [-0.05, 0.05)) and the 500-step truncation are those of
    Gymnasium's ``CartPole-v1`` (Barto, Sutton & Anderson, 1983; explicit Euler with
    ``tau = 0.02``). The state is integrated in ``dtype`` (float64 by default, which is what
    Gymnasium uses, so trajectories agree with Gymnasium's to rounding); observations are
    float32 like Gymnasium's.

    Autoreset (``autoreset_mode``):

    * ``"next_step"`` (default, Gymnasium's default): the step on which an environment
      returns ``terminated or truncated`` ends its episode. On the following ``step`` call
      that environment ignores its action, draws a fresh initial state and returns that
      state's observation with ``reward = 0`` and ``terminated = truncated = False``; its
      next episode starts from there. Other environments are not affected.
    * ``"disabled"``: nothing is reset automatically. Reset finished environments with
      ``reset(options={"reset_mask": mask})``. An environment stepped after its episode
      ended keeps integrating the dynamics, earns reward 0 and reports ``terminated``
      from the thresholds and ``truncated`` from its step counter.

    ``reset(options={"reset_mask": mask})`` works in both modes: only the environments
    where ``mask`` is True get a new initial state (and a cleared pending autoreset); the
    others keep theirs, and the returned observation holds every environment's current
    observation.

    Initial states are a pure function of the seed, the environment's index and how many
    initial states that environment has drawn since it was seeded (:attr:`starts`):
    Philox4x32-10 keyed by the seed gives four 32-bit words ``w`` per start, and the state is
    ``low + (high - low) * (w * 2**-32)`` (see :mod:`evotorch_eggroll.kernels.cartpole`).
    ``reset(seed=...)`` (or the first ``reset``, with the constructor's ``seed``) restarts
    every count at zero. So the same seed gives the same initial states on every device and
    in every mode, and an environment's starts do not depend on when the others ended.

    On a CUDA device a step of the (default) float64 state is one fused kernel (the same
    expressions, rounded the same way, as the torch code that runs elsewhere). The state, step counters and episode-end
    flags, the start counts and the seed are updated in place and keep their addresses for
    the environment's lifetime, and a step draws from no ``torch.Generator``
    (:attr:`cuda_graph_generators` is empty), so that a rollout can capture steps in a CUDA
    graph and replay them (see :class:`~evotorch_eggroll.neuroevolution.EggrollVecGymNE`).

    Example:
        >>> env = CartPole(4, device="cpu")
        >>> obs, info = env.reset(seed=0)                    # obs: (4, 4) float32
        >>> obs, reward, terminated, truncated, info = env.step(torch.tensor([0, 1, 1, 0]))

    Args:
        num_envs: Number of environments in the batch.
        device: Device holding the state (default: CUDA when available, else the CPU).
        dtype: Floating dtype of the integrated state (default ``torch.float64``).
        max_episode_steps: Truncation length (default 500, as in CartPole-v1).
        autoreset_mode: ``"next_step"`` or ``"disabled"`` (see above).
        seed: Seed used by the first ``reset`` when that call gives none. ``None`` draws
            one from the operating system.

    Attributes:
        state: ``(num_envs, 4)`` physical state (x, x_dot, theta, theta_dot) in ``dtype``.
        steps: ``(num_envs,)`` int64 steps of each environment's current episode.
        prev_done: ``(num_envs,)`` bool: the environment's episode ended on its last step.
        starts: ``(num_envs,)`` int64 initial states drawn by each environment since the
            environment was last seeded.
    """

    metadata = {"render_modes": [], "autoreset_mode": _autoreset_value("next_step")}

    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masspole + masscart
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02  # seconds per step
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4

    def __init__(
        self,
        num_envs: int,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float64,
        max_episode_steps: int = 500,
        autoreset_mode: str = "next_step",
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if not (isinstance(max_episode_steps, (int, np.integer)) and max_episode_steps >= 1):
            raise ValueError(f"max_episode_steps must be a positive integer, got {max_episode_steps!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        mode = str(getattr(autoreset_mode, "value", autoreset_mode)).lower().replace("-", "_")
        mode = {"nextstep": "next_step", "next_step": "next_step", "disabled": "disabled"}.get(mode)
        if mode is None:
            raise ValueError(
                f"autoreset_mode must be 'next_step' or 'disabled', got {autoreset_mode!r}"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_episode_steps = int(max_episode_steps)
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": _autoreset_value(mode)}

        high = np.array(
            [self.x_threshold * 2, np.inf, self.theta_threshold_radians * 2, np.inf],
            dtype=np.float32,
        )
        self.single_observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._initial_seed = seed
        self._seed_value: Optional[int] = None  # the start stream's seed, once seeded
        # the seed's two 32-bit words on the device, rewritten in place by reset(seed=...)
        self._key = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._low, self._high = -0.05, 0.05
        self.state: Optional[torch.Tensor] = None  # (num_envs, 4): x, x_dot, theta, theta_dot
        self.steps = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self.prev_done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.starts = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self._cpu_words: Optional[np.ndarray] = None
        self._cpu_words_base: Optional[np.ndarray] = None
        # One fused kernel per step for a float64 state on a CUDA device (the torch code
        # elsewhere; Triton's float32 sine and cosine round differently from torch's).
        self._use_kernel = self.device.type == "cuda" and dtype == torch.float64
        # Initial states of resets in one launch on a CUDA device (any dtype).
        self._use_start_kernel = self.device.type == "cuda"
        self._consts: Optional[torch.Tensor] = None
        self._consts_values: list = []

    # ------------------------------------------------------------------ randomness

    def _seed(self, seed: Optional[int], on_device: bool = True) -> None:
        """Key the start stream with ``seed`` (taken modulo 2**64; None draws one from the
        operating system) and restart every environment's start count (``on_device=False``:
        the host's record only, for a reset whose kernel writes the key and the counts)."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._seed_value = int(seed) & 0xFFFFFFFFFFFFFFFF
        self._cpu_words = self._cpu_words_base = None  # see _cpu_start_words
        if not on_device:
            return
        lo, hi = self._seed_value & 0xFFFFFFFF, self._seed_value >> 32
        # in place (graphs read it), by fills: a copy from the host would wait for the device
        self._key[0].fill_(lo)
        self._key[1].fill_(hi)
        self.starts.zero_()

    def _initial_states(self, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next initial state of every environment where ``where`` is True (all of them
        when None): ``(num_envs, 4)`` in the state's dtype, those rows filled (the others are
        unspecified), and those environments' start counts advanced.

        On a CUDA device one kernel launch draws them (no host synchronisation); on the CPU
        the rows asked for come from :meth:`_cpu_start_words`.
        """
        from .kernels import cartpole as kernel

        e = self.num_envs
        consts = self._constants()
        if self._use_start_kernel:
            out = torch.empty((e, 4), dtype=self.dtype, device=self.device)
            return kernel.start_states_(self._key, self.starts, where, consts, out)
        low, span = consts[-2:]  # rounded to the state's dtype, as in the kernels
        if self.device.type == "cpu":
            idx = np.arange(e) if where is None else np.flatnonzero(where.numpy())
            u = torch.from_numpy(self._cpu_start_words(idx).astype(np.float64) * 2.0**-32)
            values = low + span * u.to(self.dtype)
            self.starts.numpy()[idx] += 1
            if where is None:
                return values
            out = torch.zeros((e, 4), dtype=self.dtype)
            out[torch.from_numpy(idx)] = values
            return out
        # another device without the kernel: every row drawn, ``where`` picks (no sync)
        rows = torch.arange(e, device=self.device)
        words = philox4x32(rows, self.starts, 0, kernel.START_STREAM_TAG, self._seed_value)
        values = low + span * (torch.stack(words, dim=1).to(torch.float64) * 2.0**-32).to(self.dtype)
        self.starts += 1 if where is None else where
        return values

    def _cpu_start_words(self, idx: np.ndarray) -> np.ndarray:
        """The start stream's words ``(len(idx), 4)`` of the next start of environments
        ``idx`` (on the CPU). They come from a block of every environment's next few starts,
        drawn at once and drawn again when an environment has used its share (the stream is
        a pure function of the counts, so this changes no value; it saves drawing a few
        rows at every step)."""
        starts = self.starts.numpy()
        words, base = self._cpu_words, self._cpu_words_base
        if words is not None:
            j = starts[idx] - base[idx]
            if not j.size or (j.min() >= 0 and j.max() < words.shape[1]):
                return words[idx, j]
        from .kernels.cartpole import START_STREAM_TAG

        e = self.num_envs
        per_env = max(2, min(16, (1 << 18) // e))
        base = starts.copy()
        counts = (base[:, None] + np.arange(per_env)).reshape(-1)
        words = philox4x32_numpy(np.repeat(np.arange(e), per_env), counts, 0, START_STREAM_TAG,
                                 self._seed_value).reshape(e, per_env, 4)
        self._cpu_words, self._cpu_words_base = words, base
        return words[idx, starts[idx] - base[idx]]

    @property
    def cuda_graph_generators(self) -> list:
        """The CUDA generators a step draws from, to register with a CUDA graph that captures
        steps: none (initial states come from the counter-based start stream, whose key and
        counts are device tensors updated in place)."""
        return []

    def _constants(self) -> torch.Tensor:
        """The kernel's constants (see ``kernels.cartpole.CONSTANT_NAMES``) in the state's
        dtype on the device, updated in place when the initial-state bounds change."""
        values = [self.gravity, self.masspole, self.total_mass, self.length,
                  self.polemass_length, self.force_mag, self.tau, self.theta_threshold_radians,
                  self.x_threshold, 4.0 / 3.0, self._low, self._high - self._low]
        if self._consts is None:
            self._consts = torch.tensor(values, dtype=self.dtype, device=self.device)
        elif values != self._consts_values:
            self._consts.copy_(torch.tensor(values, dtype=self.dtype))
        self._consts_values = values
        return self._consts

    def _write_state(self, state: torch.Tensor) -> None:
        """Keep ``self.state``'s storage (and address) once it exists."""
        if self.state is None or self.state.shape != state.shape:
            self.state = state.contiguous().clone()
        else:
            self.state.copy_(state)

    def _as_mask(self, mask: TensorLike) -> torch.Tensor:
        m = torch.as_tensor(mask, device=self.device)
        if m.dtype != torch.bool or m.shape != (self.num_envs,):
            raise ValueError(
                f"reset_mask must be a boolean array of shape ({self.num_envs},), "
                f"got dtype {m.dtype} and shape {tuple(m.shape)}"
            )
        return m

    # ------------------------------------------------------------------ interface

    def reset(
        self, *, seed: Optional[int] = None, options: Optional[dict] = None
    ) -> tuple[torch.Tensor, dict]:
        """Draw initial states.

        Args:
            seed: Reseeds the start stream first and restarts every environment's start
                count (None continues the current stream; the very first reset without a
                seed uses the constructor's ``seed``).
            options: Optional ``"low"``/``"high"`` bounds of the initial-state distribution
                (kept for later autoresets, as in Gymnasium) and ``"reset_mask"`` (bool array
                ``(num_envs,)``, torch or numpy): reset only those environments.

        Returns:
            ``obs (num_envs, 4)`` float32 on the device, and an empty info dict.
        """
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        low = float(options.pop("low", self._low))
        high = float(options.pop("high", self._high))
        if options:
            raise ValueError(f"unknown reset options: {sorted(options)}")
        if low > high:
            raise ValueError(f"Lower bound ({low}) must be lower than higher bound ({high}).")
        if mask is not None:  # checked before anything changes
            if self.state is None:
                raise RuntimeError("reset_mask needs a full reset() first")
            mask = self._as_mask(mask)
        reseed = seed is not None or self._seed_value is None
        if reseed:
            self._seed(self._initial_seed if seed is None else seed, on_device=not self._use_start_kernel)
        self._low, self._high = low, high

        if self._use_start_kernel:  # the whole reset in one launch
            from .kernels import cartpole as kernel

            if self.state is None:
                self.state = torch.empty((self.num_envs, 4), dtype=self.dtype, device=self.device)
            obs = kernel.reset_(self._key, self.starts, mask, self._constants(), self.state, self.steps,
                                self.prev_done, self._seed_value if reseed else None)
            return obs, {}
        if mask is None:
            self._write_state(self._initial_states())
            self.steps.zero_()
            self.prev_done.zero_()
        else:
            self._write_state(torch.where(mask[:, None], self._initial_states(mask), self.state))
            self.steps.masked_fill_(mask, 0)
            self.prev_done.masked_fill_(mask, False)
        return self.state.to(torch.float32), {}

    def _as_actions(self, actions: TensorLike) -> torch.Tensor:
        a = torch.as_tensor(actions)
        if a.dim() == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.shape != (self.num_envs,):
            raise ValueError(
                f"expected one action per environment, shape ({self.num_envs},); got {tuple(a.shape)}"
            )
        if a.is_floating_point() or a.is_complex():
            raise TypeError(f"CartPole actions are integers in {{0, 1}}, got dtype {a.dtype}")
        return a.to(self.device, non_blocking=True)

    def step(
        self, actions: TensorLike
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Advance every environment by one step.

        Args:
            actions: ``(num_envs,)`` integers (or bools): 1 pushes the cart right, 0 left.
                Torch tensors (any device), numpy arrays and lists are accepted. Values are
                not checked on the device: anything positive pushes right, as in Gymnasium's
                vectorised CartPole.

        Returns:
            ``obs (num_envs, 4)`` float32, ``reward (num_envs,)`` float32, ``terminated`` and
            ``truncated`` ``(num_envs,)`` bool, and an empty info dict; all on the device.
        """
        a = self._ready_to_step(actions)
        if self._use_kernel:
            from .kernels.cartpole import cartpole_step_

            obs, reward, terminated, truncated = cartpole_step_(*self._kernel_operands(a))
            return obs, reward, terminated, truncated, {}
        x, x_dot, theta, theta_dot = self.state.unbind(dim=1)
        force = torch.where(a > 0, self.force_mag, -self.force_mag).to(self.dtype)
        costheta = torch.cos(theta)
        sintheta = torch.sin(theta)

        # Same expressions, in the same order, as Gymnasium's CartPole (float64 there).
        temp = (force + self.polemass_length * (theta_dot * theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * (costheta * costheta) / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass

        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * xacc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * thetaacc
        state = torch.stack((x, x_dot, theta, theta_dot), dim=1)  # (num_envs, 4)

        terminated = (
            (x < -self.x_threshold)
            | (x > self.x_threshold)
            | (theta < -self.theta_threshold_radians)
            | (theta > self.theta_threshold_radians)
        )
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        reward = torch.ones(self.num_envs, dtype=torch.float32, device=self.device)

        if self.autoreset_mode == "next_step":
            # Environments whose episode ended on the previous step start a new one now.
            restart = self.prev_done
            state = torch.where(restart[:, None], self._initial_states(restart), state)
            self.steps.masked_fill_(restart, 0)
            reward.masked_fill_(restart, 0.0)
            terminated = terminated & ~restart
            truncated = truncated & ~restart
            self.prev_done.copy_(terminated | truncated)
        else:
            # Without autoreset an ended episode pays nothing until it is reset.
            reward.masked_fill_(self.prev_done, 0.0)
            self.prev_done |= terminated | truncated

        self.state.copy_(state)
        return state.to(torch.float32), reward, terminated, truncated, {}

    def _ready_to_step(self, actions: TensorLike) -> torch.Tensor:
        """The checked actions on the device, once a reset (or ``set_state``) has given a
        state and the start stream a seed."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        a = self._as_actions(actions)
        if self._seed_value is None:  # a state given by set_state() before any reset()
            self._seed(self._initial_seed)
        return a

    def _kernel_operands(self, a: torch.Tensor) -> tuple:
        """The step kernel's operands (see :func:`kernels.cartpole.cartpole_step_`)."""
        starts = self.starts if self.autoreset_mode == "next_step" else None
        return (self.state, self.steps, self.prev_done, a, starts, self._key, self._constants(),
                self.max_episode_steps)

    def _step_counting(self, actions: TensorLike, returns: torch.Tensor, alive: torch.Tensor,
                       active: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`step` and a rollout's per-environment counters in one launch, for
        :class:`~evotorch_eggroll.neuroevolution.EggrollVecGymNE`: ``(obs, ended)``, where
        ``ended`` is this step's ``terminated | truncated``, with ``returns`` (float64),
        ``alive`` (int64) and ``active`` (bool) updated in place while ``active``, as the
        rollout's own counters do it (:mod:`kernels.episode_step`; the values are
        bit-equal). None, with nothing done, when the step does not run in the kernel."""
        if not self._use_kernel:
            return None
        a = self._ready_to_step(actions)
        from .kernels.cartpole import cartpole_step_counting_

        return cartpole_step_counting_(returns, alive, active, *self._kernel_operands(a))

    def set_state(self, state: TensorLike) -> None:
        """Overwrite the physical state ``(num_envs, 4)`` (x, x_dot, theta, theta_dot).

        Step counters and pending autoresets are left as they are.
        """
        s = torch.as_tensor(state, dtype=self.dtype, device=self.device)
        if s.shape != (self.num_envs, 4):
            raise ValueError(f"state must have shape ({self.num_envs}, 4), got {tuple(s.shape)}")
        self._write_state(s)

    def __repr__(self) -> str:
        return (
            f"CartPole(num_envs={self.num_envs}, device={self.device}, dtype={self.dtype}, "
            f"autoreset_mode={self.autoreset_mode!r})"
        )


@torch.no_grad()
def evaluate_policy(policy: torch.nn.Module, device: Union[str, torch.device], episodes: int = 32,
                    seed: int = 12345) -> float:
    """Mean return of a plain (unperturbed) policy over full 500-step CartPole episodes.

    Args:
        policy: maps observations ``(episodes, 4)`` to action scores ``(episodes, 2)``.
        device: where the batched CartPole runs.
        episodes: episodes played at once.
        seed: seed of the initial states.
    """
    env = CartPole(episodes, device=device, autoreset_mode="disabled")
    obs, _ = env.reset(seed=seed)
    returns = torch.zeros(episodes, device=device)
    alive = torch.ones(episodes, dtype=torch.bool, device=device)
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, truncated, _ = env.step(policy(obs).argmax(dim=1))
        returns += reward * alive
        alive &= ~(terminated | truncated)
        if not bool(alive.any()):
            break
    return float(returns.mean())
