"""JAX environments (Brax, MJX) as torch-native vector environments: shapes, dtypes and
same-step autoreset, the zero-copy DLPack hand-over in both directions, errors raised inside
JAX, and EGGROLL runs through ``EggrollVecGymNE``.

Most tests use a tiny pure-JAX environment written here (it compiles in well under a
second); the Brax ones need ``pip install 'evotorch-eggroll[brax]'``."""

import pickle
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from evotorch import SolutionBatch
from torch import nn

jax = pytest.importorskip("jax", reason="needs JAX: pip install 'evotorch-eggroll[brax]'")
jnp = jax.numpy

from evotorch_eggroll.algorithms import EGGROLL  # noqa: E402
from evotorch_eggroll.jax_envs import BraxVecEnv, JaxEnvError, JaxVecEnv  # noqa: E402
from evotorch_eggroll.neuroevolution import EggrollVecGymNE, _mix_seed  # noqa: E402


class _State(NamedTuple):
    obs: Any
    reward: Any
    done: Any
    info: dict


class Line:
    """A point on a line pushed by its action: obs ``(position, velocity)``, reward = the
    new position. The episode terminates when ``|position| > limit`` and is truncated after
    ``horizon`` steps; then it starts again on the same step from its first observation
    (Brax's episode and autoreset wrappers, in one). ``failing["on"]`` makes every step
    raise inside JAX (a host callback), as a simulator error would."""

    action_size = 1

    def __init__(self, horizon: int = 6, limit: float = 1.0, failing: dict | None = None) -> None:
        self.horizon, self.limit = horizon, limit
        self.failing = failing if failing is not None else {"on": False}

    def reset(self, rng):
        start = jnp.stack([jax.random.uniform(rng, (), minval=-0.1, maxval=0.1), jnp.float32(0.0)])
        info = {"steps": jnp.int32(0), "truncation": jnp.float32(0.0), "first_obs": start}
        return _State(start, jnp.float32(0.0), jnp.float32(0.0), info)

    def _check(self, x):
        if self.failing["on"]:
            raise FloatingPointError("the simulation diverged")
        return x

    def step(self, state, action):
        action = jax.pure_callback(self._check, jax.ShapeDtypeStruct(action.shape, action.dtype), action,
                                   vmap_method="broadcast_all")
        steps = jnp.where(state.done > 0, 0, state.info["steps"]) + 1
        vel = state.obs[1] + 0.1 * action[0]
        pos = state.obs[0] + vel
        terminated = jnp.abs(pos) > self.limit
        truncated = (steps >= self.horizon) & ~terminated
        done = terminated | truncated
        obs = jnp.where(done, state.info["first_obs"], jnp.stack([pos, vel]))
        info = dict(state.info, steps=steps, truncation=truncated.astype(jnp.float32))
        return _State(obs, pos, done.astype(jnp.float32), info)


def _line_env(num_envs, device="cpu", **kwargs):
    return JaxVecEnv(Line(**kwargs), num_envs, device=device, name="line")


def _reference_episode(first_obs, actions_of, horizon, limit):
    """Return and length of one episode of :class:`Line` in plain numpy, as
    EggrollVecGymNE counts it (up to and including the first ending step)."""
    pos, vel = (float(v) for v in first_obs)
    total = 0.0
    for t in range(1, horizon + 1):
        a = float(np.clip(actions_of(np.array([pos, vel], dtype=np.float32)), -1.0, 1.0))
        vel = np.float32(vel + np.float32(0.1) * np.float32(a))
        pos = np.float32(pos + vel)
        total += float(pos)
        if abs(pos) > limit:
            return total, t
    return total, horizon


# ------------------------------------------------------------------------ the environment


def test_spaces_shapes_dtypes_and_seeding():
    env = _line_env(3)
    assert env.num_envs == 3 and env.single_observation_space.shape == (2,)
    assert env.single_action_space.shape == (1,) and env.single_action_space.dtype == np.float32
    assert env.action_space.shape == (3, 1)
    assert (env.single_action_space.low == -1).all() and (env.single_action_space.high == 1).all()
    obs, info = env.reset(seed=7)
    assert info == {} and obs.shape == (3, 2) and obs.dtype == torch.float32 and obs.device.type == "cpu"
    assert obs[:, 1].eq(0).all() and obs[:, 0].abs().le(0.1).all() and len(set(obs[:, 0].tolist())) == 3
    again, _ = _line_env(3).reset(seed=7)
    other, _ = env.reset(seed=8)
    assert torch.equal(obs, again) and not torch.equal(obs, other)
    out = env.step(torch.full((3, 1), 0.5))
    obs, reward, terminated, truncated, info = out
    assert reward.shape == terminated.shape == truncated.shape == (3,)
    assert (reward.dtype, terminated.dtype, truncated.dtype) == (torch.float32, torch.bool, torch.bool)
    assert torch.equal(reward, obs[:, 0]) and info == {}
    bounded = JaxVecEnv(Line(), 2, device="cpu", action_bounds=(-0.5, [0.25]))
    assert bounded.single_action_space.low.tolist() == [-0.5] and bounded.single_action_space.high.tolist() == [0.25]


def test_same_step_autoreset_and_flags():
    """Truncation after ``horizon`` steps and termination past the limit: the ending step
    returns its reward and flags with the first observation of the next episode, which then
    runs like the first."""
    env = _line_env(2, horizon=3, limit=0.5)
    first, _ = env.reset(seed=1)
    actions = torch.tensor([[0.0], [1.0]])  # env 0 drifts nowhere (truncated), env 1 accelerates
    seen = [env.step(actions) for _ in range(6)]
    for t in (0, 1, 3, 4):
        assert not seen[t][2][0] and not seen[t][3][0]
    for t in (2, 5):
        assert not seen[t][2][0] and seen[t][3][0]  # truncated, not terminated
        assert torch.equal(seen[t][0][0], first[0])
    assert torch.equal(seen[0][0][0], seen[3][0][0])  # the second episode repeats the first
    # env 1: position 0.1 + 0.3 + 0.6 ... crosses 0.5 on its third step
    ends = [t for t in range(6) if seen[t][2][1]]
    assert ends and not any(seen[t][3][1] for t in ends)
    assert torch.equal(seen[ends[0]][0][1], first[1]) and seen[ends[0]][1][1] > 0.5


def test_bad_inputs():
    env = _line_env(2)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(torch.zeros(2, 1))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        env.step(torch.zeros(3, 1))
    with pytest.raises(TypeError, match="floating point"):
        env.step(torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="reset options"):
        env.reset(options={"reset_mask": np.ones(2, bool)})
    with pytest.raises(ValueError, match="num_envs"):
        JaxVecEnv(Line(), 0, device="cpu")
    with pytest.raises(TypeError, match="Brax's interface"):
        JaxVecEnv(object(), 2, device="cpu")
    with pytest.raises(ValueError, match="low must be <= its high"):
        JaxVecEnv(Line(), 2, device="cpu", action_bounds=(1.0, -1.0))
    obs, *_ = env.step(np.zeros((2, 1), dtype=np.float64))  # numpy and float64 are converted
    assert obs.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_device_without_jax_cuda_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"JAX has no CUDA backend.*jax\[cuda12\]"):
        _line_env(2, device="cuda")


# ------------------------------------------------------------------------ zero copy


def _record_step(env):
    """Wrap the jitted step so that the JAX arrays going in and out are kept."""
    seen = {}
    jitted = env._step_fn

    def step(state, actions):
        seen["actions"] = actions
        out = jitted(state, actions)
        seen["outputs"] = out[1:]
        return out

    env._step_fn = step
    return seen


def _check_zero_copy(env):
    env.reset(seed=0)
    seen = _record_step(env)
    shape = (env.num_envs, *env.single_action_space.shape)
    actions = torch.linspace(-1, 1, env.num_envs, device=env.device)[:, None].expand(shape).contiguous()
    outputs = env.step(actions)[:4]
    assert seen["actions"].unsafe_buffer_pointer() == actions.data_ptr()
    for tensor, array in zip(outputs, seen["outputs"]):
        assert tensor.device == env.device
        assert tensor.data_ptr() == array.unsafe_buffer_pointer()
        assert tuple(tensor.shape) == array.shape and torch.equal(tensor.cpu(), torch.from_numpy(np.asarray(array)))


def test_step_outputs_and_actions_cross_without_a_copy():
    """The tensors a step returns are the JAX arrays' buffers, and the action tensor is the
    buffer JAX computes on (same addresses)."""
    _check_zero_copy(_line_env(4))


def test_reset_observations_share_the_jax_buffer():
    env = _line_env(4)
    jitted = env._reset_fn
    seen = {}

    def reset(key):
        out = jitted(key)
        seen["obs"] = out[2]
        return out

    env._reset_fn = reset
    obs, _ = env.reset(seed=3)
    assert obs.data_ptr() == seen["obs"].unsafe_buffer_pointer()


@pytest.mark.gpu
def test_zero_copy_on_the_gpu():
    env = _line_env(8, device="cuda")
    assert env.jax_device.platform == "gpu"
    _check_zero_copy(env)


def test_reset_and_step_are_compiled_once():
    env = _line_env(3)
    env.reset(seed=0)
    for _ in range(3):
        env.step(torch.zeros(3, 1))
    env.reset(seed=1)
    env.step(torch.zeros(3, 1))
    assert env._reset_fn._cache_size() == 1 and env._step_fn._cache_size() == 1


# ------------------------------------------------------------------------ errors


def test_an_error_inside_jax_names_the_environment_and_keeps_its_state():
    failing = {"on": False}
    env = JaxVecEnv(Line(failing=failing), 2, device="cpu", name="line")
    env.reset(seed=0)
    env.step(torch.zeros(2, 1))
    state = env.state
    failing["on"] = True
    with pytest.raises(JaxEnvError, match="environment 'line': step failed") as err:
        env.step(torch.ones(2, 1))
    assert "the simulation diverged" in str(err.value.__cause__)
    assert env.state is state
    failing["on"] = False
    obs, *_ = env.step(torch.ones(2, 1))
    assert torch.equal(obs[:, 1], torch.full((2,), 0.1))


def test_a_tracing_error_is_raised_the_same_way():
    class BadShape(Line):
        def step(self, state, action):
            return super().step(state, action @ jnp.ones((3, 3)))  # (1,) @ (3, 3): shape error

    env = JaxVecEnv(BadShape(), 2, device="cpu", name="bad")
    env.reset(seed=0)
    with pytest.raises(JaxEnvError, match="environment 'bad': step failed with TypeError"):
        env.step(torch.zeros(2, 1))


def _line_problem(failing=None, **kwargs):
    def make(num_envs, device):
        return JaxVecEnv(Line(horizon=8, failing=failing), num_envs, device=device, name="line")

    torch.manual_seed(0)
    net = lambda obs_length, act_length: nn.Sequential(nn.Linear(obs_length, 4), nn.Tanh(),
                                                       nn.Linear(4, act_length))
    return EggrollVecGymNE(make, net, device="cpu", seed=3, **kwargs)


def _state(searcher, problem):
    return dict(center=searcher.status["center"].clone(), epoch=searcher.epoch, steps=searcher.step_count,
                opt=pickle.dumps(searcher.optimizer.state_dict()), counts=(problem.interaction_count,
                                                                           problem.episode_count))


def test_a_failing_generation_changes_nothing_and_the_run_continues():
    straight_problem = _line_problem()
    straight = EGGROLL(straight_problem, popsize=8, sigma=0.2, lr=0.05, rank=1, seed=2, backend="torch")
    straight.run(3)
    failing = {"on": False}
    problem = _line_problem(failing)
    searcher = EGGROLL(problem, popsize=8, sigma=0.2, lr=0.05, rank=1, seed=2, backend="torch")
    searcher.step()
    before = _state(searcher, problem)
    failing["on"] = True
    with pytest.raises(JaxEnvError, match="environment 'line': step failed") as err:
        searcher.step()
    assert "the simulation diverged" in str(err.value.__cause__)
    after = _state(searcher, problem)
    assert torch.equal(after.pop("center"), before.pop("center")) and after == before
    assert searcher.strategy._active is None
    failing["on"] = False
    searcher.run(2)
    assert torch.equal(searcher.status["center"], straight.status["center"])
    assert searcher.status["mean_eval"] == straight.status["mean_eval"]


# ------------------------------------------------------------------------ EggrollVecGymNE


def test_fitness_is_the_return_of_the_first_episode():
    problem = _line_problem()
    g = torch.Generator().manual_seed(0)
    center = problem.parameters_to_vector(problem.network).detach()
    values = center + 0.5 * torch.randn(4, problem.solution_length, generator=g)
    batch = SolutionBatch(problem, popsize=4, empty=True, device="cpu")
    batch.set_values(values)
    problem.evaluate(batch)
    first, _ = _line_env(4, horizon=8).reset(seed=_mix_seed(3, 0))
    for i in range(4):
        policy = problem.to_policy(values[i])
        act = lambda o: policy(torch.from_numpy(o)).item()  # noqa: E731
        expected, length = _reference_episode(first[i].numpy(), act, 8, 1.0)
        assert batch.evals[i, 0].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert problem.interaction_count > 0


def test_eggroll_on_a_jax_env_moves_the_center_and_improves():
    problem = _line_problem()
    searcher = EGGROLL(problem, popsize=16, sigma=0.3, lr=0.1, rank=1, seed=0, backend="torch")
    start = searcher.status["center"].clone()
    searcher.step()
    first = searcher.status["mean_eval"]
    searcher.run(7)
    assert not torch.equal(searcher.status["center"], start)
    assert searcher.status["mean_eval"] > first
    assert problem.episode_count == 8 * 16 and 0 < problem.interaction_count <= 8 * 16 * 8


# ------------------------------------------------------------------------ Brax


def _brax():
    return pytest.importorskip("brax.envs", reason="needs Brax: pip install 'evotorch-eggroll[brax]'")


def test_brax_env_by_name_and_its_errors():
    _brax()
    env = BraxVecEnv("brax::fast", 3, device="cpu", episode_length=4)
    assert env.name == "brax::fast" and env.single_observation_space.shape == (2,)
    obs, _ = env.reset(seed=0)
    steps = [env.step(torch.ones(3, 1)) for _ in range(4)]
    assert [bool(s[3].all()) for s in steps] == [False, False, False, True]
    assert not any(bool(s[2].any()) for s in steps)
    assert torch.equal(steps[3][0], obs) and (steps[3][1] > steps[2][1]).all()
    with pytest.raises(ValueError, match="unknown Brax environment 'nope'.*ant"):
        BraxVecEnv("nope", 2, device="cpu")
    with pytest.raises(ValueError, match="episode_length"):
        BraxVecEnv("fast", 2, device="cpu", episode_length=0)


def test_eggroll_trains_on_a_brax_id():
    """``"brax::fast"`` (reward = position; positive actions accelerate): EGGROLL learns to
    push forward."""
    _brax()
    torch.manual_seed(0)
    problem = EggrollVecGymNE("brax::fast", "Linear(obs_length, act_length)", device="cpu", seed=0,
                              env_config={"episode_length": 20})
    assert isinstance(problem._make_env(2), BraxVecEnv)
    searcher = EGGROLL(problem, popsize=8, sigma=0.5, lr=0.2, rank=1, seed=0, backend="torch")
    searcher.step()
    first = searcher.status["mean_eval"]
    searcher.run(4)
    assert searcher.status["mean_eval"] > first
    assert problem.interaction_count == 5 * 8 * 20
    assert isinstance(problem.get_env(), BraxVecEnv) and problem.get_env().num_envs == 8


def test_a_brax_physics_env_runs_under_eggroll():
    """A real Brax simulation (one compile of its reset and step, ~20 s on two CPU cores)."""
    _brax()
    torch.manual_seed(0)
    problem = EggrollVecGymNE("brax::inverted_pendulum", "Linear(obs_length, act_length)", device="cpu",
                              seed=0, env_config={"episode_length": 10})
    env = problem._make_env(2)
    assert env.single_action_space.low.tolist() == [-3.0] and env.single_action_space.high.tolist() == [3.0]
    searcher = EGGROLL(problem, popsize=4, sigma=0.3, lr=0.1, rank=1, seed=0, backend="torch")
    start = searcher.status["center"].clone()
    searcher.run(2)
    assert not torch.equal(searcher.status["center"], start)
    assert 0 < problem.interaction_count <= 2 * 4 * 10 and np.isfinite(searcher.status["mean_eval"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["generalized", "mjx"])
def test_brax_ant_on_the_gpu(backend):
    """Brax's ant (and the same model in MJX) at popsize 1024 under EGGROLL on a GPU: no
    CUDA-graph warning, the center moves, every step stays on the GPU."""
    import warnings

    _brax()
    torch.manual_seed(0)
    problem = EggrollVecGymNE("brax::ant", "Linear(obs_length, 32) >> Tanh() >> Linear(32, act_length)",
                              device="cuda", seed=0, env_config={"backend": backend, "episode_length": 100})
    searcher = EGGROLL(problem, popsize=1024, sigma=0.1, lr=0.05, rank=1, seed=0)
    start = searcher.status["center"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        searcher.run(2)
    assert not torch.equal(searcher.status["center"], start)
    env = problem.get_env()
    assert env.jax_device.platform == "gpu" and np.isfinite(searcher.status["mean_eval"])
    _check_zero_copy(env)
