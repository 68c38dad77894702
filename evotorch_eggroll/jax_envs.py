"""Functional JAX environments (Brax, MJX) as torch-native Gymnasium vector environments.

Brax and MJX describe an environment as two pure functions, ``reset(rng) -> state`` and
``step(state, action) -> state``, where ``state`` holds ``obs``, ``reward``, ``done`` and an
``info`` dict. :class:`JaxVecEnv` runs ``num_envs`` copies of such an environment side by
side (``jax.vmap``) behind Gymnasium's vector-environment interface, the way
:class:`~evotorch_eggroll.envs.CartPole` does for its own dynamics: observations, rewards and
the ``terminated``/``truncated`` flags come back as torch tensors on the environment's
device, and actions are taken as torch tensors.

Nothing crosses the host on the way: the outputs of a step are JAX arrays that torch wraps
through DLPack (``torch.from_dlpack``: the tensor *is* the JAX buffer), and the actions are
wrapped the other way (``jax.dlpack.from_dlpack(..., copy=False)``). Both consumers pass
their stream, so on a GPU the hand-over is stream-ordered and needs no synchronisation. The
environment state itself never leaves JAX. ``reset`` and ``step`` are each ``jax.jit``-ed
once per environment object and compiled on their first call (their outputs are made
strongly typed, so the state a reset returns has the types a step returns and the step is
not compiled twice).

The returned tensors share memory with JAX arrays, which JAX treats as immutable: read them,
or clone them before changing them in place.

:class:`BraxVecEnv` builds a Brax environment by name (``"ant"``, ``"halfcheetah"``, ...; with
``backend="mjx"`` its physics runs in MJX), and :class:`~evotorch_eggroll.neuroevolution.EggrollVecGymNE`
accepts EvoTorch's ``"brax::<name>"`` strings for it. Any other environment with Brax's
interface (a MuJoCo Playground environment with Brax's episode and autoreset wrappers, or
your own) goes straight into :class:`JaxVecEnv`.

JAX's GPU backend preallocates most of the GPU's memory when it starts, which leaves little
for torch. Importing this module sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` when the
variable is not set, which takes effect if JAX has not used the GPU yet.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import batch_space

try:  # Gymnasium >= 1.1 names its autoreset modes
    from gymnasium.vector import AutoresetMode
except ImportError:  # pragma: no cover - Gymnasium 1.0
    AutoresetMode = None  # type: ignore[assignment]

__all__ = ["BRAX_PREFIX", "BraxVecEnv", "JaxEnvError", "JaxVecEnv"]

BRAX_PREFIX = "brax::"

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DeviceLike = Optional[Union[str, torch.device]]


class JaxEnvError(RuntimeError):
    """A JAX environment failed in ``reset`` or ``step``; the message names the environment
    and the original exception is chained (``__cause__``). The environment's state is the
    one it had before the failing call."""


def _import_jax() -> Any:
    try:
        import jax
    except ImportError as err:
        raise ImportError(
            "JAX environments need JAX: pip install 'evotorch-eggroll[brax]' (CPU), and on a GPU "
            "the JAX build for its CUDA, e.g. pip install 'jax[cuda12]'"
        ) from err
    return jax


def _jax_device(jax: Any, device: torch.device) -> Any:
    """The JAX device that is the same memory as the torch ``device``."""
    if device.type == "cpu":
        return jax.devices("cpu")[0]
    if device.type != "cuda":
        raise ValueError(f"JAX environments run on 'cpu' or 'cuda' devices, got {device}")
    try:
        gpus = jax.devices("cuda")
    except RuntimeError as err:
        raise RuntimeError(
            f"device={str(device)!r}, but JAX has no CUDA backend here ({err}); install the JAX build "
            "for this CUDA (e.g. pip install 'jax[cuda12]') or use device='cpu'"
        ) from None
    index = device.index if device.index is not None else torch.cuda.current_device()
    for d in gpus:
        if getattr(d, "local_hardware_id", d.id) == index:
            return d
    raise RuntimeError(f"device={str(device)!r}: JAX sees no such GPU (it has {len(gpus)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _action_bounds(env: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The actuators' control range when the environment exposes one (Brax's
    ``sys.actuator.ctrl_range``, MJX/MuJoCo's ``mj_model.actuator_ctrlrange``), else [-1, 1]."""
    candidates = []
    try:
        candidates.append(env.sys.actuator.ctrl_range)
    except AttributeError:
        pass
    try:
        candidates.append(env.mj_model.actuator_ctrlrange)
    except AttributeError:
        pass
    for ranges in candidates:
        r = np.asarray(ranges, dtype=np.float32)
        if r.shape == (size, 2) and np.all(r[:, 0] < r[:, 1]):
            return r[:, 0].copy(), r[:, 1].copy()
    return np.full(size, -1.0, dtype=np.float32), np.full(size, 1.0, dtype=np.float32)


class JaxVecEnv(gym.vector.VectorEnv):
    """``num_envs`` copies of a functional JAX environment, as a torch-native vector environment.

    ``env`` has Brax's interface: ``reset(rng) -> state`` and ``step(state, action) -> state``
    for a single environment (this class ``vmap``-s them), ``action_size``, and states with
    ``obs`` (one array), ``reward``, ``done`` and ``info``. With Brax's ``EpisodeWrapper``,
    ``info["truncation"]`` tells a time limit from a termination; with its
    ``AutoResetWrapper`` an environment whose episode ends starts again on the same step
    (Gymnasium's same-step autoreset: that step returns the final reward and flags with the
    first observation of the next episode). :class:`BraxVecEnv` wraps both.

    ``reset`` and ``step`` return torch tensors on ``device`` that share memory with the JAX
    arrays (DLPack, no copy); ``step`` takes the actions the same way (a tensor on another
    device, or a numpy array, is first copied to ``device`` by torch). Observations are
    float32 ``(num_envs, *obs_shape)``, rewards float32 ``(num_envs,)``, flags bool; the info
    dict is empty.

    Example:
        >>> from brax import envs
        >>> env = JaxVecEnv(envs.create("ant"), 1024, device="cuda", name="brax::ant")
        >>> obs, _ = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, _ = env.step(torch.zeros(1024, 8, device="cuda"))

    Args:
        env: The single-environment functional JAX environment.
        num_envs: Number of environments run side by side.
        device: ``"cpu"`` or ``"cuda[:i]"`` (default: CUDA when torch has it): where the JAX
            computation runs and the tensors live. A CUDA device needs JAX's CUDA backend.
        name: Name used in errors and ``repr`` (default: the environment's class name).
        action_bounds: ``(low, high)`` of the action space, scalars or ``(action_size,)``
            arrays (default: the actuators' control range when the environment exposes it,
            else [-1, 1]). The bounds only describe the space; actions are not clipped here.
        seed: Seed of the first ``reset`` when that call gives none (``None``: drawn from
            the operating system).

    Raises:
        JaxEnvError: from ``reset``/``step`` when the JAX computation fails (tracing,
            compiling or running), naming the environment; the state is left as it was.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP if AutoresetMode else "same_step"}

    # The computation runs in JAX, which a torch CUDA graph cannot capture: the rollout of
    # EggrollVecGymNE runs step by step (None: "no CUDA graph", as opposed to a list).
    cuda_graph_generators = None

    def __init__(
        self,
        env: Any,
        num_envs: int,
        *,
        device: DeviceLike = None,
        name: Optional[str] = None,
        action_bounds: Optional[tuple[Any, Any]] = None,
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        for attr in ("reset", "step", "action_size"):
            if not hasattr(env, attr):
                raise TypeError(f"env must have Brax's interface (reset, step, action_size); "
                                f"{type(env).__name__} has no {attr!r}")
        jax = _import_jax()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._jax = jax
        self.env = env
        self.name = str(name) if name is not None else type(env).__name__
        self.num_envs = int(num_envs)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device  # with its index, like the tensors the steps return
        self.jax_device = _jax_device(jax, self.device)
        self._initial_seed = seed

        act_size = int(env.action_size)
        obs_shape = self._observation_shape()
        if action_bounds is None:
            low, high = _action_bounds(env, act_size)
        else:
            low = np.broadcast_to(np.asarray(action_bounds[0], dtype=np.float32), (act_size,)).copy()
            high = np.broadcast_to(np.asarray(action_bounds[1], dtype=np.float32), (act_size,)).copy()
            if not np.all(low <= high):
                raise ValueError(f"action_bounds: every low must be <= its high, got {low} and {high}")
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, obs_shape, dtype=np.float32)
        self.single_action_space = gym.spaces.Box(low, high, (act_size,), dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._reset_fn = jax.jit(self._batched_reset)
        self._step_fn = jax.jit(self._batched_step)
        self._key: Any = None
        self._state: Any = None

    # ------------------------------------------------------------------ JAX side

    def _observation_shape(self) -> tuple[int, ...]:
        """The observation shape of one environment, from an abstract trace of ``reset``."""
        jax = self._jax
        spec = jax.eval_shape(lambda key: self.env.reset(key).obs, jax.random.PRNGKey(0))
        if not hasattr(spec, "shape"):
            raise TypeError(f"{self.name}: only array observations are supported, got {type(spec).__name__}")
        return tuple(int(d) for d in spec.shape)

    @staticmethod
    def _strong(jax: Any, tree: Any) -> Any:
        """``tree`` with strongly typed leaves (a weakly typed leaf would make the state that
        reset returns differ in type from the one step returns, and step compile twice)."""
        return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)

    def _outputs(self, state: Any) -> tuple[Any, Any, Any, Any]:
        """Observations, rewards, terminated, truncated of a batched state (traced)."""
        jnp = self._jax.numpy
        done = state.done.astype(bool)
        trunc = state.info.get("truncation") if isinstance(state.info, dict) else None
        truncated = done & trunc.astype(bool) if trunc is not None else jnp.zeros_like(done)
        return state.obs.astype(jnp.float32), state.reward.astype(jnp.float32), done & ~truncated, truncated

    def _batched_reset(self, key: Any) -> tuple[Any, Any, Any]:
        jax = self._jax
        key, sub = jax.random.split(key)
        state = self._strong(jax, jax.vmap(self.env.reset)(jax.random.split(sub, self.num_envs)))
        return key, state, self._outputs(state)[0]

    def _batched_step(self, state: Any, actions: Any) -> tuple[Any, ...]:
        jax = self._jax
        state = self._strong(jax, jax.vmap(self.env.step)(state, actions))
        return (state, *self._outputs(state))

    # ------------------------------------------------------------------ DLPack hand-over

    def _to_torch(self, array: Any) -> torch.Tensor:
        """The JAX array as a torch tensor on the same memory."""
        return torch.from_dlpack(array)

    def _to_jax(self, tensor: torch.Tensor) -> Any:
        """The torch tensor as a JAX array on the same memory (a misaligned tensor is first
        cloned on its device: JAX needs aligned buffers)."""
        from_dlpack = self._jax.dlpack.from_dlpack
        try:
            return from_dlpack(tensor, copy=False)
        except ValueError:
            return from_dlpack(tensor.clone(), copy=False)

    def _as_actions(self, actions: Any) -> torch.Tensor:
        a = torch.as_tensor(actions)
        shape = (self.num_envs, *self.single_action_space.shape)
        if tuple(a.shape) != shape:
            raise ValueError(f"{self.name}: expected actions of shape {shape}, got {tuple(a.shape)}")
        if not a.is_floating_point():
            raise TypeError(f"{self.name}: actions must be floating point, got dtype {a.dtype}")
        return a.to(device=self.device, dtype=torch.float32).contiguous()

    # ------------------------------------------------------------------ interface

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """Start a new episode in every environment.

        Args:
            seed: Reseeds the environment's key (None continues its stream; the very first
                reset without a seed uses the constructor's ``seed``). Equal seeds give equal
                initial states.
            options: Not supported (an error when given).

        Returns:
            ``obs (num_envs, *obs_shape)`` float32 on the device, and an empty info dict.
        """
        if options:
            raise ValueError(f"{self.name}: unknown reset options {sorted(options)}")
        jax = self._jax
        key = self._key
        if seed is not None or key is None:
            if seed is None:
                seed = self._initial_seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            key = jax.device_put(jax.random.PRNGKey(int(seed) % 2**63), self.jax_device)
        try:
            key, state, obs = self._reset_fn(key)
            obs_t = self._to_torch(obs)
        except Exception as err:
            raise JaxEnvError(f"environment {self.name!r}: reset failed with {type(err).__name__}: "
                              f"{_first_line(err)}") from err
        self._key, self._state = key, state
        return obs_t, {}

    def step(self, actions: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Advance every environment by one step.

        Args:
            actions: ``(num_envs, action_size)`` floats (torch tensor on any device, numpy
                array or list); a float32 contiguous tensor on the device is handed to JAX
                as it is.

        Returns:
            ``obs``, ``reward`` (float32), ``terminated``, ``truncated`` (bool), all torch
            tensors on the device sharing memory with JAX's arrays, and an empty info dict.
        """
        if self._state is None:
            raise RuntimeError(f"{self.name}: call reset() before step()")
        a = self._as_actions(actions)
        try:
            state, *outputs = self._step_fn(self._state, self._to_jax(a))
            obs, reward, terminated, truncated = (self._to_torch(x) for x in outputs)
        except Exception as err:
            raise JaxEnvError(f"environment {self.name!r}: step failed with {type(err).__name__}: "
                              f"{_first_line(err)}") from err
        self._state = state
        return obs, reward, terminated, truncated, {}

    @property
    def state(self) -> Any:
        """The batched JAX state (None before the first reset)."""
        return self._state

    def close(self, **kwargs: Any) -> None:
        self._state = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, num_envs={self.num_envs}, device={self.device})"


class BraxVecEnv(JaxVecEnv):
    """A Brax environment by name, as a torch-native vector environment (see :class:`JaxVecEnv`).

    The environment is ``brax.envs.create(name, episode_length, action_repeat,
    auto_reset=True, **kwargs)`` run ``num_envs`` times side by side: episodes are truncated
    after ``episode_length`` steps and restart on the same step. ``backend="mjx"`` runs the
    physics in MJX (``"generalized"``, ``"positional"``, ``"spring"`` are Brax's own).

    Example:
        >>> env = BraxVecEnv("ant", 4096, device="cuda", backend="mjx")

    Args:
        name: A Brax environment name, with or without the ``"brax::"`` prefix.
        num_envs: Number of environments.
        device: As in :class:`JaxVecEnv`.
        episode_length: Steps after which an episode is truncated (Brax's default, 1000).
        action_repeat: Physics steps per environment step.
        seed: As in :class:`JaxVecEnv`.
        **kwargs: Keyword arguments of the Brax environment (``backend``, ...).
    """

    def __init__(
        self,
        name: str,
        num_envs: int,
        *,
        device: DeviceLike = None,
        episode_length: int = 1000,
        action_repeat: int = 1,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a Brax environment name, got {name!r}")
        short = name[len(BRAX_PREFIX):] if name.startswith(BRAX_PREFIX) else name
        _import_jax()
        try:
            from brax import envs as brax_envs
        except ImportError as err:
            raise ImportError("Brax environments need Brax: pip install 'evotorch-eggroll[brax]'") from err
        known: Sequence[str] = sorted(getattr(brax_envs, "_envs", {}))
        if known and short not in known:
            raise ValueError(f"unknown Brax environment {short!r}; Brax has {', '.join(known)}")
        if int(episode_length) < 1 or int(action_repeat) < 1:
            raise ValueError(f"episode_length and action_repeat must be positive integers, "
                             f"got {episode_length!r} and {action_repeat!r}")
        env = brax_envs.create(short, episode_length=int(episode_length), action_repeat=int(action_repeat),
                               auto_reset=True, batch_size=None, **kwargs)
        super().__init__(env, num_envs, device=device, name=BRAX_PREFIX + short, seed=seed)
