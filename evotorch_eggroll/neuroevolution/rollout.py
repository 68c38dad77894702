"""The state of a vectorised rollout, and rollout steps captured in CUDA graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import gymnasium as gym
import torch

from .._graphs import new_graph, release_held_graphs
from .forward import PopulationForward

if TYPE_CHECKING:
    from .vecgymne import EggrollVecGymNE

# Steps captured in one CUDA graph of a rollout, and eager steps before the first capture.
_REPLAY_CHUNK = 50
_REPLAY_WARMUP = 2


def _episode_step():
    """The counters' kernel module (imported on first use, so Triton is imported only then)."""
    from ..kernels import episode_step

    return episode_step


class _RolloutBuffers:
    """The per-episode state of a rollout: alive mask, returns, steps taken alive, current
    observations. A problem keeps one set and restarts it for each episode
    (:meth:`restart`), so the addresses stay those a captured rollout reads and writes."""

    def __init__(self, num_envs: int, num_members: int, device: torch.device, dtype: torch.dtype, obs: Any) -> None:
        self.num_members = num_members
        self.dtype = dtype
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.alive = torch.zeros(num_envs, dtype=torch.int64, device=device)  # steps taken alive
        self.active = torch.empty(num_envs, dtype=torch.bool, device=device)
        self._activate()
        self.obs = obs
        self.executed = 0  # steps run (every environment, ended or not)

    def _activate(self) -> None:
        """The members' environments active, the others (padding) not."""
        if self.num_members == self.active.shape[0]:
            self.active.fill_(True)
        else:
            self.active.fill_(False)
            self.active[: self.num_members] = True

    def fits(self, num_envs: int, num_members: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether these buffers serve an episode of that shape; ``device`` with its index
        (``cuda:N``, as the buffers' tensors report theirs)."""
        return (self.active.shape[0] == num_envs and self.num_members == num_members
                and self.returns.device == torch.device(device) and self.dtype == dtype)

    def restart(self, obs: Any) -> None:
        """Start a new episode from ``obs`` in the same buffers."""
        torch._foreach_zero_([self.returns, self.alive])
        self._activate()
        self.obs = obs
        self.executed = 0


class _CapturedRollout:
    """Rollout steps captured in CUDA graphs: ``chunk`` steps in one graph and one step in
    another, replayed until the episode ends. Everything the steps read and write lives at
    fixed addresses (the environment's in-place state, the drawn factors, the parameters,
    the observation statistics and the buffers here), so the graphs replay in later
    generations as long as :meth:`matches` holds."""

    def __init__(self, key: tuple, env: gym.vector.VectorEnv, buf: _RolloutBuffers, obs: torch.Tensor,
                 ids: torch.Tensor, graphs: dict[int, Any]) -> None:
        self.key = key
        self.env_ref = env
        self.buf = buf
        self.obs = obs  # the observations the next replay starts from
        self.ids = ids  # the member ids the captured forwards read
        self.graphs = graphs
        # "is any environment still running" after a chunk, read back one or two chunks late
        # (see run): two host slots, each with the event that says its copy arrived
        self._any_active = torch.zeros((), dtype=torch.bool, device=buf.active.device)
        self._any_active_host = torch.zeros(2, dtype=torch.bool, pin_memory=True)
        self._any_active_ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.lag: Optional[int] = 1
        self._unread: Optional[int] = None  # the slot of the last run's newest flag, not read yet

    @staticmethod
    def _key(problem: "EggrollVecGymNE", env: gym.vector.VectorEnv, buf: _RolloutBuffers,
             forward: PopulationForward) -> Optional[tuple]:
        fkey = forward.replay_key()
        if fkey is None:
            return None
        stats = problem._obs_stats
        stats_key = None if stats is None else tuple(t.data_ptr() for t in (stats.count, stats.sum, stats.sum_of_squares))
        return (id(env), env.num_envs, buf.num_members, buf.dtype, problem._observation_normalization, stats_key, fkey)

    def matches(self, env: gym.vector.VectorEnv, buf: _RolloutBuffers, forward: PopulationForward,
                problem: "EggrollVecGymNE") -> bool:
        if env is not self.env_ref or buf is not self.buf:  # the graphs read these very buffers
            return False
        return self._key(problem, env, buf, forward) == self.key

    @classmethod
    def capture(cls, problem: "EggrollVecGymNE", env: gym.vector.VectorEnv, forward: PopulationForward,
                buf: _RolloutBuffers, chunk: int, ids: torch.Tensor) -> Optional["_CapturedRollout"]:
        """Capture the graphs (nothing runs) from the state ``buf`` is in, the forward reading
        the member ids ``ids``, or return None when the forward cannot be replayed in later
        generations."""
        key = cls._key(problem, env, buf, forward)
        if key is None:
            return None
        release_held_graphs()
        obs = buf.obs.clone()  # the static observations every replay starts from
        torch.cuda.synchronize(obs.device)
        graphs: dict[int, Any] = {}
        pool = None
        for steps in sorted({chunk, 1}, reverse=True):
            graph = new_graph()
            for gen in env.cuda_graph_generators:
                graph.register_generator_state(gen)
            with torch.cuda.graph(graph, pool=pool):
                buf.obs = obs
                for _ in range(steps):
                    problem._rollout_step(buf, forward, env, ids)
                obs.copy_(buf.obs)
            pool = graph.pool()
            graphs[steps] = graph
        buf.obs = obs
        return cls(key, env, buf, obs, ids, graphs)

    def start(self, obs: torch.Tensor) -> None:
        """Point at a new episode whose buffers (the ones the graphs were captured with, see
        :meth:`matches`) were restarted: load the first observations."""
        self.obs.copy_(obs)

    def run(self, t: int, limit: Optional[int], chunk: int) -> int:
        """Replay from step ``t`` until ``limit`` steps or until every environment ended;
        returns the number of steps run.

        Whether every environment ended is known :attr:`lag` chunks late: after a chunk, the
        flag is computed and copied to pinned host memory behind it on the stream, and read
        once ``lag`` more chunks have been queued. The device therefore never idles while
        the host decides. A flag is never waited for once the last chunk is queued (it could
        stop nothing): the newest one is read when the next rollout starts, long after it
        arrived. A chunk that runs after every environment ended changes no result (ended
        environments are masked out of the returns, the step counts and the observation
        statistics); it is counted in the steps run.

        The lag is one chunk, and None (no flag waited for: the host queues every chunk at
        once and is free for the work that follows, such as queueing the update) after a
        capped rollout that ran to its cap. A rollout whose newest flag says that every
        environment had ended before its last chunk sets it back to one, as does an
        uncapped rollout."""
        self._settle_lag()
        lag = self.lag if limit is not None else 1  # without a cap, only a flag ends the episode
        pending: list[int] = []  # host slots of the flags in flight, oldest first
        queued = 0
        stopped = False
        while limit is None or t < limit:
            steps = chunk if limit is None or limit - t >= chunk else 1
            self.graphs[steps].replay()
            t += steps
            more = limit is None or t < limit
            if more and len(pending) == lag:
                slot = pending.pop(0)
                self._any_active_ready[slot].synchronize()
                if not bool(self._any_active_host[slot]):
                    stopped = True
                    break
            if steps == chunk and more:
                slot = queued % 2  # the slot read (or never needed) two flags ago
                queued += 1
                torch.any(self.buf.active, out=self._any_active)
                self._any_active_host[slot].copy_(self._any_active, non_blocking=True)
                self._any_active_ready[slot].record()
                pending.append(slot)
                del pending[:-2]  # unread flags older than the two slots say no more than the newest
        self._unread = None if stopped or not pending else pending[-1]
        self.lag = 1 if stopped or limit is None else None
        return t

    def _settle_lag(self) -> None:
        """Read the previous run's newest unread flag: if every environment had ended by then,
        that rollout ran chunks for nothing, and the lag goes back to one chunk."""
        slot, self._unread = self._unread, None
        if slot is not None:
            self._any_active_ready[slot].synchronize()  # copied behind a chunk long since done
            if not bool(self._any_active_host[slot]):
                self.lag = 1
