"""Reinforcement learning as an EGGROLL problem: maximise the episode return in a vectorised
environment, one environment per member."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from evotorch import Solution
from torch import nn

from .._host import start_read
from .._validation import check_int, check_optional_int
from ..envs import CartPole
from .baseneproblem import DeviceLike, EggrollNEProblem, NetworkLike, _indexed, _mix_seed, _resolve_device
from .forward import PopulationForward
from .obsnorm import RunningObsNorm, _ObsNormPolicy
from .rollout import _REPLAY_CHUNK, _REPLAY_WARMUP, _CapturedRollout, _episode_step, _RolloutBuffers

__all__ = ["EggrollVecGymNE"]


def _autoreset_disabled(env: gym.vector.VectorEnv) -> bool:
    """True when the vector environment does not reset ended sub-environments itself."""
    mode = env.metadata.get("autoreset_mode")
    return str(getattr(mode, "value", mode)).lower() == "disabled"


# Evaluations whose step counts may wait, being copied, for a read of the interaction count.
_MAX_PENDING_COUNTS = 64


class EggrollVecGymNE(EggrollNEProblem):
    """Maximise the mean episode return in a vectorised environment, one environment per member.

    Mirrors ``evotorch.neuroevolution.VecGymNE``. For ``K`` members, ``K`` environments run
    side by side; every step, the policy network computes all members' actions in one call
    (under EGGROLL, one ``batched_forward``). An environment's return stops accumulating at
    the end of its first episode (``terminated or truncated``, or ``episode_length`` steps):
    whatever the environment does afterwards (Gymnasium's next-step or same-step autoreset,
    or stepping past the end with autoreset disabled) is ignored. With ``num_episodes > 1``
    all environments are reset together for each further episode, and the fitness is the
    mean return over the episodes.

    Actions: for a ``Discrete(n)`` action space the network outputs ``n`` scores and the
    action is their argmax (with ``n == 2`` a single output ``> 0`` also works); for a
    ``Box`` space the output is reshaped to the action shape, converted to the space's
    dtype and clipped to its bounds.

    Every evaluation resets the environments with a fresh seed derived from ``seed`` and an
    episode counter, plus the id of the first evaluated member, so results are reproducible
    and pickled problems resume exactly. With Gymnasium's per-sub-environment seeding
    (``seed + i`` for sub-environment ``i``, e.g. ``vectorization_mode="sync"``) member
    ``m`` then always starts from the same state, whichever rank of a distributed EGGROLL
    run evaluates it; an environment seeded once for the whole batch (such as
    :class:`~evotorch_eggroll.envs.CartPole`, whose starts follow from the seed and the
    sub-environment's index) gives each rank's slice its own states.
    In a distributed run the interaction and episode counters and the observation
    statistics are summed over the ranks after each generation, so they are global and
    identical on every rank (within a generation each rank normalises with the statistics
    of the previous generations plus its own observations).

    Args:
        env: A Gymnasium id (built with ``gymnasium.make_vec(env, num_envs=K, **env_config)``),
            EvoTorch's ``"brax::<name>"`` for a Brax environment on the problem's device
            (:class:`~evotorch_eggroll.jax_envs.BraxVecEnv`, ``env_config`` its keywords), a
            callable ``(num_envs=K, **env_config) -> VectorEnv`` (it also gets ``device=`` when
            it accepts one and ``env_config`` has none, e.g. the
            :class:`~evotorch_eggroll.envs.CartPole` class), or a ``VectorEnv`` instance with
            at least as many environments as members (extra environments are run but
            ignored).
        network: ``nn.Module``, a callable returning one, or a network string such as
            ``"Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)"``; a callable may
            accept, and a string may use, ``obs_length``, ``act_length``, ``obs_shape``,
            ``act_shape``, ``obs_space``, ``act_space`` (and the names in ``network_args``).
        env_config: Keyword arguments for building the environment.
        num_episodes: Episodes per member and evaluation (default 1).
        episode_length: Optional cap on the steps of each episode.
        observation_normalization: Normalise observations with running statistics of all
            observations seen by active members (updated during evaluation).
        device: Device of the network (default: CUDA when available). Observations are moved
            there; torch-native environments should live there too.
        **kwargs: Further :class:`EggrollNEProblem` keywords (``include``, ``exclude``,
            ``seed``, ``network_args``, ...).

    Rollouts: each step runs the network for every member at once, steps the environments,
    and accumulates returns under an alive mask; "every environment ended" is checked
    every few steps, so a torch-native environment on the GPU is not synchronised with the
    host at every step. Under ``EGGROLL``, with a torch-native CUDA environment that keeps
    its state in place and says so (it has a ``cuda_graph_generators`` attribute listing
    the CUDA generators its step draws from, as :class:`~evotorch_eggroll.envs.CartPole`
    does) and resets itself, the steps are captured once in CUDA graphs (after two eager
    steps) and replayed in chunks, in this and later generations: the members' factors
    are drawn once per generation into fixed buffers, and nothing of the step runs on the
    host. Fitnesses are the same as those of the step-by-step loop. A capture that fails
    falls back to the step-by-step loop with one warning. ``last_rollout_steps`` holds the
    number of steps run in the latest evaluation (every environment, ended or not).
    """

    def __init__(
        self,
        env: Union[str, Callable[..., gym.vector.VectorEnv], gym.vector.VectorEnv],
        network: NetworkLike,
        *,
        env_config: Optional[Mapping[str, Any]] = None,
        num_episodes: int = 1,
        episode_length: Optional[int] = None,
        observation_normalization: bool = False,
        device: DeviceLike = None,
        **kwargs: Any,
    ) -> None:
        num_episodes = check_int("num_episodes", num_episodes, 1)
        episode_length = check_optional_int("episode_length", episode_length, 1)
        if observation_normalization and kwargs.get("num_actors") not in (None, 0):
            raise ValueError("observation_normalization is not supported together with num_actors")
        self._device_for_env = _resolve_device(device)
        self._env_maker = env
        self._env_config = dict(env_config or {})
        self._num_episodes = int(num_episodes)
        self._episode_length = None if episode_length is None else int(episode_length)
        self._observation_normalization = bool(observation_normalization)
        self._env: Optional[gym.vector.VectorEnv] = env if isinstance(env, gym.vector.VectorEnv) else None
        probe = self._env if self._env is not None else self._make_env(1)
        self._obs_space = probe.single_observation_space
        self._act_space = probe.single_action_space
        if probe is not self._env:
            probe.close()
        if not isinstance(self._obs_space, gym.spaces.Box):
            raise TypeError(f"only Box observation spaces are supported, got {self._obs_space}")
        if not isinstance(self._act_space, (gym.spaces.Discrete, gym.spaces.Box)):
            raise TypeError(f"only Discrete and Box action spaces are supported, got {self._act_space}")
        self._obs_stats: Optional[RunningObsNorm] = None
        self._interaction_count = 0
        self._pending_interactions: Optional[list] = None  # see _settle_interactions
        self._episode_count = 0
        self._num_resets = 0
        self.last_rollout_steps = 0
        super().__init__("max", network, device=device, **kwargs)
        self.after_eval_hook.append(self._extra_status)

    # ------------------------------------------------------------------ environment

    @property
    def _network_constants(self) -> dict:
        act = self._act_space
        act_length = int(act.n) if isinstance(act, gym.spaces.Discrete) else int(np.prod(act.shape))
        return {
            "obs_length": int(np.prod(self._obs_space.shape)),
            "act_length": act_length,
            "obs_shape": tuple(self._obs_space.shape),
            "act_shape": tuple(act.shape),
            "obs_space": self._obs_space,
            "act_space": act,
        }

    def _make_env(self, num_envs: int) -> gym.vector.VectorEnv:
        maker = self._env_maker
        if isinstance(maker, str) and maker.startswith("brax::"):  # EvoTorch's Brax ids
            from ..jax_envs import BraxVecEnv
            maker = functools.partial(BraxVecEnv, maker)
        if isinstance(maker, str):
            env = gym.make_vec(maker, num_envs=num_envs, **self._env_config)
        elif callable(maker):
            cfg = dict(self._env_config)
            try:
                takes_device = "device" in inspect.signature(maker).parameters
            except (TypeError, ValueError):
                takes_device = False
            if takes_device and "device" not in cfg:
                cfg["device"] = self._device_for_env
            env = maker(num_envs=num_envs, **cfg)
        else:
            raise TypeError(f"env must be a Gymnasium id, a callable or a VectorEnv, got {maker!r}")
        if not isinstance(env, gym.vector.VectorEnv):
            raise TypeError(f"the environment maker returned {type(env).__name__}, expected a gymnasium VectorEnv")
        if env.num_envs != num_envs:
            raise ValueError(f"asked for {num_envs} environments, got {env.num_envs}")
        return env

    def _get_env(self, num_members: int) -> gym.vector.VectorEnv:
        if isinstance(self._env_maker, gym.vector.VectorEnv):
            if self._env_maker.num_envs < num_members:
                raise ValueError(
                    f"the environment has {self._env_maker.num_envs} sub-environments but {num_members} "
                    "members are evaluated: give a Gymnasium id or a callable, or a larger VectorEnv"
                )
            return self._env_maker
        if self._env is None or self._env.num_envs != num_members:
            if self._env is not None:
                self._env.close()
            self._env = self._make_env(num_members)
        return self._env

    def _get_cloned_state(self, *, memo: dict) -> dict:
        self._settle_interactions()  # a copy or a pickle holds the plain count
        return super()._get_cloned_state(memo=memo)

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_env", "_captured", "_buffers", "_bounds_cache"]

    def get_env(self) -> Optional[gym.vector.VectorEnv]:
        """The environment of the most recent evaluation (None before the first)."""
        return self._env

    # ------------------------------------------------------------------ counters and stats

    @property
    def observation_normalization(self) -> bool:
        return self._observation_normalization

    def _ensure_obsnorm(self) -> None:
        if not self._observation_normalization:
            raise ValueError("observation statistics exist only with observation_normalization=True")

    def get_observation_stats(self) -> Optional[RunningObsNorm]:
        """The running observation statistics (None before any observation)."""
        self._ensure_obsnorm()
        return self._obs_stats

    def set_observation_stats(self, stats: Any) -> None:
        """Replace the running observation statistics, as EvoTorch's
        ``VecGymNE.set_observation_stats``: ``stats`` is a :class:`RunningObsNorm`, EvoTorch's
        ``RunningNorm`` (or anything with ``count``, ``sum`` and ``sum_of_squares``) whose
        sums have the observation shape, or None to forget them. The values are copied onto
        the network's device (normalisation keeps this package's formula: a ``RunningNorm``'s
        ``min_variance`` and ``clip`` are not carried over). Raises ValueError without
        ``observation_normalization=True`` or for a wrong shape."""
        self._ensure_obsnorm()
        if stats is None:
            self._obs_stats = None
            return
        self._obs_stats = RunningObsNorm.from_stats(stats, self._obs_space.shape, device=self.network_device)

    def update_observation_stats(self, stats: Any) -> None:
        """Add the counts of ``stats`` (what :meth:`set_observation_stats` accepts, not None)
        to the running observation statistics, as EvoTorch's ``update_observation_stats``."""
        self._ensure_obsnorm()
        extra = RunningObsNorm.from_stats(stats, self._obs_space.shape, device=self.network_device)
        if self._obs_stats is None:
            self._obs_stats = extra
            return
        current = self._obs_stats
        for name in ("count", "sum", "sum_of_squares"):
            getattr(current, name).add_(getattr(extra, name).to(getattr(current, name).device))

    def set_episode_count(self, n: int) -> None:
        """Set the number of completed episodes (as EvoTorch's ``VecGymNE``)."""
        self._episode_count = int(n)

    def set_interaction_count(self, n: int) -> None:
        """Set the number of environment steps taken (as EvoTorch's ``VecGymNE``)."""
        self._pending_interactions = None
        self._interaction_count = int(n)

    def _settle_interactions(self) -> int:
        """Adds the steps that evaluations counted on the device to the interaction count
        and returns the count. An evaluation starts copying its count to the host as soon as
        its rollout is queued (:func:`~evotorch_eggroll._host.start_read`), so that nothing
        after a rollout waits for it before the update is queued, and reading the count
        later waits for that rollout only, not for the update queued behind it."""
        pending = getattr(self, "_pending_interactions", None)
        if pending is not None:
            self._pending_interactions = None
            self._interaction_count += sum(int(read()[0]) for read, _ in pending)
        return self._interaction_count

    @property
    def interaction_count(self) -> int:
        """Environment steps taken by active members so far."""
        return self._settle_interactions()

    @property
    def episode_count(self) -> int:
        """Episodes completed so far."""
        return self._episode_count

    def _extra_status(self, batch: Any = None) -> dict:
        return {"total_interaction_count": self._settle_interactions(), "total_episode_count": self._episode_count}

    def _lowrank_status(self) -> dict:
        return self._extra_status()

    def to_policy(self, solution: Union[Solution, torch.Tensor, Iterable]) -> nn.Module:
        """A standalone policy module for ``solution`` (observation normalisation included)."""
        net = self.make_net(solution)
        if self._observation_normalization and self._obs_stats is not None:
            return _ObsNormPolicy(net, self._obs_stats.mean, self._obs_stats.stdev)
        return net

    def save_solution(self, solution: Union[Solution, torch.Tensor, Iterable], fname: Union[str, Path]) -> None:
        """Pickle ``solution`` into the file ``fname``, as EvoTorch's ``VecGymNE.save_solution``.

        The file holds one dict (read it back with ``pickle.load``): ``"solution"`` (the
        decision vector, a CPU tensor), ``"policy"`` (:meth:`to_policy` on the CPU,
        observation normalisation included), with observation normalisation and statistics
        ``"obs_mean"``, ``"obs_stdev"``, ``"obs_sum"``, ``"obs_sum_of_squares"``, then
        ``"interaction_count"``, ``"episode_count"``, ``"time"`` (a ``datetime``),
        ``"env"`` (when the environment was given as a Gymnasium id) and
        ``"architecture"`` (the network string when one was given, else a CPU copy of the
        network holding the initial solution).
        """
        vector = self._solution_vector(solution).detach().clone().cpu()
        result: dict[str, Any] = {"solution": vector, "policy": self.to_policy(vector).to("cpu")}
        stats = self._obs_stats
        if self._observation_normalization and stats is not None:
            result["obs_mean"] = stats.mean.cpu()
            result["obs_stdev"] = stats.stdev.cpu()
            result["obs_sum"] = stats.sum.cpu()
            result["obs_sum_of_squares"] = stats.sum_of_squares.cpu()
        result["interaction_count"] = self._settle_interactions()
        result["episode_count"] = self._episode_count
        result["time"] = datetime.now()
        if isinstance(self._env_maker, str):
            result["env"] = self._env_maker
        architecture = getattr(self, "_architecture", None)  # absent in problems pickled by older versions
        result["architecture"] = architecture if architecture is not None else copy.deepcopy(self._network).to("cpu")
        with open(fname, "wb") as f:
            pickle.dump(result, f)

    # ------------------------------------------------------------------ rollouts

    def _policy_actions(self, forward: PopulationForward, x: torch.Tensor, member_ids: Optional[torch.Tensor],
                        num_envs: int, torch_env: bool) -> Any:
        """The environments' actions for the policy's inputs ``x``: :meth:`_to_actions` of the
        forward's outputs. For a Discrete space with one output per action the argmax comes
        from the forward itself, which EGGROLL's one-launch MLP computes in the same launch
        (no reduction kernel per step); a two-action space with a single output (its sign)
        is noticed at the first step and remembered."""
        space = self._act_space
        if isinstance(space, gym.spaces.Discrete) and not self.__dict__.get("_sign_actions", False):
            act, width = forward._argmax(x, member_ids)
            if width == space.n:
                return self._finish_actions(act, num_envs, torch_env)
            self._sign_actions = space.n == 2 and width == 1  # otherwise _to_actions raises
        return self._to_actions(forward(x, member_ids), num_envs, torch_env)

    def _to_actions(self, out: torch.Tensor, num_envs: int, torch_env: bool) -> Any:
        k = out.shape[0]
        space = self._act_space
        if isinstance(space, gym.spaces.Discrete):
            if space.n == 2 and out.reshape(k, -1).shape[1] == 1:
                act = (out.reshape(k) > 0).to(torch.int64)
            else:
                scores = out.reshape(k, -1)
                if scores.shape[1] != space.n:
                    raise ValueError(
                        f"the network outputs {scores.shape[1]} values per member; "
                        f"the Discrete({space.n}) action space needs {space.n}"
                    )
                act = scores.argmax(dim=1)
        else:
            low, high = self._box_bounds(out)  # clipped in the space's dtype: exact bounds, numpy-ready
            act = torch.maximum(torch.minimum(out.reshape(k, *space.shape).to(low.dtype), high), low)
        return self._finish_actions(act, num_envs, torch_env)

    def _finish_actions(self, act: torch.Tensor, num_envs: int, torch_env: bool) -> Any:
        """Members' actions ``act (K, ...)`` as the environment takes them: offset by a Discrete
        space's start, padded to ``num_envs`` rows with the first member's, numpy unless the
        environment is torch-native."""
        k = act.shape[0]
        space = self._act_space
        if isinstance(space, gym.spaces.Discrete) and space.start:
            act = act + int(space.start)
        if num_envs > k:
            act = torch.cat([act, act[:1].expand(num_envs - k, *act.shape[1:])])
        if torch_env:
            return act
        act = act.cpu().numpy()
        return act.astype(space.dtype) if isinstance(space, gym.spaces.Box) else act

    def _box_bounds(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Box action bounds in the space's dtype on ``act``'s device (copied to the device
        once, so that a captured rollout step holds no host-to-device copy)."""
        cache = self.__dict__.setdefault("_bounds_cache", {})
        key = act.device
        if key not in cache:
            space = self._act_space
            cache[key] = (torch.as_tensor(space.low, device=act.device),
                          torch.as_tensor(space.high, device=act.device))
        return cache[key]

    def _obs_tensor(self, obs: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(obs, device=self.network_device).to(dtype)

    def _normalize(self, obs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if not self._observation_normalization:
            return obs
        if self._obs_stats is None:
            self._obs_stats = RunningObsNorm(obs.shape[1:], device=obs.device)
        self._obs_stats.update(obs, active)
        return self._obs_stats.normalize(obs)

    def distributed_merge(self, state: dict) -> None:
        """Sum this generation's interactions, episodes and observation statistics (what
        changed since ``state``, this generation's :meth:`generation_state`) over the ranks
        (one small collective); every rank then holds the same global values."""
        from .. import distributed as _dist

        interactions, episodes, (_, stats) = state["interactions"], state["episodes"], state["obs_stats"]
        # Nothing here reads a value back to the host: the sums stay on the device, and the
        # global interaction count is read when first asked for (see _settle_interactions).
        # This generation's counts: generation_state() settled the earlier ones.
        counts = [c for _, c in getattr(self, "_pending_interactions", None) or ()]
        current = self._obs_stats
        device = counts[0].device if counts else (current.count.device if current is not None else "cpu")
        parts = [torch.stack(counts).sum().to(torch.float64).reshape(1) if counts
                 else torch.zeros(1, dtype=torch.float64, device=device)]
        if current is not None:
            before = [torch.zeros_like(t) for t in (current.count, current.sum, current.sum_of_squares)]
            if stats is not None:
                before = [t.to(current.count.device) for t in stats]
            now = (current.count, current.sum, current.sum_of_squares)
            parts += [(a - b).reshape(-1).to(device, torch.float64) for a, b in zip(now, before)]
        total = _dist.sum_over_ranks(torch.cat(parts), like=self.device)
        self._interaction_count = interactions
        self._pending_interactions = [(start_read(total[:1]), total[:1])]
        # every rank evaluated an equal slice (the all-gather checked it): the same count each
        self._episode_count = episodes + (self._episode_count - episodes) * _dist.process_group_info()[1]
        if current is not None:
            offset = 1
            for name, b in zip(("count", "sum", "sum_of_squares"), before):
                delta = total[offset : offset + b.numel()].reshape(b.shape).to(b.device, b.dtype)
                getattr(current, name).copy_(b + delta)  # in place: captured rollouts read these
                offset += b.numel()
        self._lowrank_status_due = True  # formed when read: see status

    def generation_state(self) -> dict:
        """The base snapshot plus the reset and interaction counters and a copy of the
        observation statistics."""
        stats = self._obs_stats
        saved = None if stats is None else tuple(t.clone() for t in (stats.count, stats.sum, stats.sum_of_squares))
        return dict(super().generation_state(), resets=self._num_resets, interactions=self._settle_interactions(),
                    episodes=self._episode_count, rollout_steps=self.last_rollout_steps, obs_stats=(stats, saved))

    def restore_generation_state(self, state: dict) -> None:
        """Put back what :meth:`generation_state` took."""
        super().restore_generation_state(state)
        self._num_resets = state["resets"]
        self._pending_interactions = None
        self._interaction_count = state["interactions"]
        self._episode_count = state["episodes"]
        self.last_rollout_steps = state["rollout_steps"]
        stats, saved = state["obs_stats"]
        self._obs_stats = stats
        if stats is not None:
            for name, value in zip(("count", "sum", "sum_of_squares"), saved):
                getattr(stats, name).copy_(value)  # in place: captured rollouts read these

    def _rollout_step(self, buf: "_RolloutBuffers", forward: PopulationForward, env: gym.vector.VectorEnv,
                      member_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """One step of every environment; updates ``buf`` (returns, steps, alive mask and
        observations). Returns the ``(E,)`` end-of-episode flags of this step."""
        k, e = buf.num_members, buf.active.shape[0]
        x = self._normalize(self._obs_tensor(buf.obs, buf.dtype), buf.active)
        torch_env = isinstance(buf.obs, torch.Tensor)
        actions = self._policy_actions(forward, x[:k], member_ids, e, torch_env)
        if (isinstance(env, CartPole) and type(env).step is CartPole.step
                and buf.returns.device == env.steps.device):
            # the package's CartPole on its kernel: the counters in the step's own launch
            stepped = env._step_counting(actions, buf.returns, buf.alive, buf.active)
            if stepped is not None:
                buf.obs, ended = stepped
                return ended
        obs, reward, terminated, truncated, _ = env.step(actions)
        buf.obs = obs
        if buf.returns.is_cuda and _episode_step().supports(buf.returns, buf.alive, buf.active, reward,
                                                             terminated, truncated):
            # a torch-native GPU environment: the counters in one launch
            return _episode_step().episode_step_(buf.returns, buf.alive, buf.active, reward, terminated,
                                                 truncated)
        device = buf.returns.device
        reward = torch.as_tensor(reward, device=device).to(torch.float64)
        done = torch.as_tensor(terminated, device=device) | torch.as_tensor(truncated, device=device)
        buf.returns += torch.where(buf.active, reward, torch.zeros_like(reward))
        buf.alive += buf.active  # per environment: no reduction at every step
        buf.active &= ~done.to(torch.bool)
        return done

    def _replayable(self, env: gym.vector.VectorEnv, obs: Any, forward: PopulationForward) -> bool:
        """Whether this episode's steps can be captured in a CUDA graph and replayed: a
        torch-native environment on a CUDA device that keeps its state in place (it lists
        its generators in ``cuda_graph_generators``) and resets itself, and a forward that
        can be replayed (EGGROLL's own population slice)."""
        if not (isinstance(obs, torch.Tensor) and obs.is_cuda) or _autoreset_disabled(env):
            return False
        if getattr(self, "_replay_disabled", False) or not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return False
        if getattr(env, "cuda_graph_generators", ()) is None:  # declared not capturable (a JAX env)
            return False
        if not hasattr(env, "cuda_graph_generators"):
            if not getattr(self, "_warned_replay", False):
                self._warned_replay = True
                warnings.warn(
                    f"{type(env).__name__} runs on the GPU but does not declare that it updates its state in "
                    "place (a `cuda_graph_generators` attribute listing the CUDA generators its step draws "
                    "from), so its rollouts cannot be captured in a CUDA graph: they run step by step, bound "
                    "by host work",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        return forward.prepare_replay()

    def _episode_replayed(self, env: gym.vector.VectorEnv, obs: torch.Tensor, forward: PopulationForward,
                          buf: "_RolloutBuffers") -> bool:
        """Run one episode from ``obs`` through captured CUDA graphs (capturing them first if
        needed). False, with ``buf`` untouched, when nothing could be captured."""
        limit = self._episode_length
        chunk = min(limit, _REPLAY_CHUNK) if limit is not None else _REPLAY_CHUNK
        rollout: Optional[_CapturedRollout] = getattr(self, "_captured", None)
        t = 0
        if rollout is None or not rollout.matches(env, buf, forward, self):
            self._captured = rollout = None
            # eager steps first: they compile the kernels, create the observation statistics
            # and check the member ids (a tensor kept with the graphs) before the capture
            ids = forward.member_ids.clone()
            buf.obs = obs
            warm = min(_REPLAY_WARMUP, limit) if limit is not None else _REPLAY_WARMUP
            for _ in range(warm):
                self._rollout_step(buf, forward, env, ids)
                t += 1
            buf.executed = t
            if limit is not None and t >= limit:
                return True
            current = buf.obs
            try:
                rollout = _CapturedRollout.capture(self, env, forward, buf, chunk, ids)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager loop
                self._replay_disabled = True
                warnings.warn(
                    f"capturing the rollout in a CUDA graph failed ({type(err).__name__}: {err}); "
                    "rollouts of this problem run step by step from now on",
                    RuntimeWarning,
                    stacklevel=4,
                )
                buf.obs = current  # capturing ran nothing: the episode goes on from here
                return self._finish_eagerly(env, forward, buf, t)
            if rollout is None:
                return self._finish_eagerly(env, forward, buf, t)
            self._captured = rollout
        else:
            rollout.start(obs)
        buf.executed = rollout.run(t, limit, chunk)
        buf.obs = rollout.obs
        return True

    def _finish_eagerly(self, env: gym.vector.VectorEnv, forward: PopulationForward, buf: "_RolloutBuffers",
                        t: int) -> bool:
        """Continue an episode step by step from step ``t`` (checking the alive mask every 8 steps)."""
        limit = self._episode_length
        while limit is None or t < limit:
            self._rollout_step(buf, forward, env, None)
            t += 1
            if t % 8 == 0 and not bool(buf.active.any()):
                break
        buf.executed = t
        return True

    def _evaluate_members(self, forward: PopulationForward) -> torch.Tensor:
        k = forward.num_members
        first_member = forward.first_member if k else 0
        env = self._get_env(k)
        e = env.num_envs
        device = _indexed(self.network_device)  # "cuda" never equals the buffers' cuda:N
        dtype = next(self._network.parameters()).dtype
        episodes = self._num_episodes
        returns: Optional[torch.Tensor] = None  # float64 sums over the episodes, (k,)
        steps_taken: Optional[torch.Tensor] = None
        self.last_rollout_steps = 0
        for _ in range(episodes):
            # + the first member's id: member m gets the same start on whichever rank
            # evaluates it (with per-sub-environment seeding); 0 in a single process
            seed = _mix_seed(self._seed_value, self._num_resets) + first_member
            self._num_resets += 1
            obs, _ = env.reset(seed=seed)
            buf = self._rollout_buffers(e, k, device, dtype, obs)
            if self._replayable(env, obs, forward):
                self._episode_replayed(env, obs, forward, buf)
            else:
                self._episode_eager(env, forward, buf)
            alive = buf.alive.sum()
            if returns is None:  # a copy unless it is the only episode (the buffers restart)
                returns = buf.returns[:k] if episodes == 1 else buf.returns[:k].clone()
                steps_taken = alive
            else:
                returns += buf.returns[:k]
                steps_taken += alive
            self.last_rollout_steps += buf.executed
        pending = getattr(self, "_pending_interactions", None)
        if pending is not None and len(pending) >= _MAX_PENDING_COUNTS:
            self._settle_interactions()  # when nothing reads the count: the older copies arrived long ago
            pending = None
        count = steps_taken.reshape(1)
        self._pending_interactions = [*(pending or ()), (start_read(count), count)]
        self._episode_count += k * self._num_episodes
        # a new tensor either way (float64 to float32): the buffers restart in the next episode
        return (returns if episodes == 1 else returns / episodes).to(torch.float32)

    def _rollout_buffers(self, num_envs: int, num_members: int, device: torch.device, dtype: torch.dtype,
                         obs: Any) -> _RolloutBuffers:
        """The problem's rollout buffers, restarted for an episode from ``obs`` (new ones when
        the shape, device or dtype changed)."""
        buf = getattr(self, "_buffers", None)
        if buf is None or not buf.fits(num_envs, num_members, device, dtype):
            buf = self._buffers = _RolloutBuffers(num_envs, num_members, device, dtype, obs)
        else:
            buf.restart(obs)
        return buf

    def _episode_eager(self, env: gym.vector.VectorEnv, forward: PopulationForward, buf: "_RolloutBuffers") -> None:
        """One episode step by step. A torch-native environment on a CUDA device is checked for
        "all ended" every 8 steps (one synchronisation); others every step."""
        torch_env = isinstance(buf.obs, torch.Tensor)
        manual_reset = _autoreset_disabled(env)
        check_every = 8 if (torch_env and buf.obs.device.type == "cuda") else 1
        t = 0
        while True:
            done = self._rollout_step(buf, forward, env, None)
            t += 1
            if manual_reset and bool(done.any()):
                # Without autoreset, an ended sub-environment may not be stepped again.
                mask = done if torch_env else done.cpu().numpy()
                buf.obs, _ = env.reset(options={"reset_mask": mask})
            if self._episode_length is not None and t >= self._episode_length:
                break
            if t % check_every == 0 and not bool(buf.active.any()):
                break
        buf.executed = t

