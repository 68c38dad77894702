"""The torch CartPole against Gymnasium's CartPole-v1, step for step."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.kernels.cartpole import START_STREAM_TAG


def _gym_single(max_episode_steps=500):
    env = gym.make("CartPole-v1", max_episode_steps=max_episode_steps)
    env.reset(seed=0)
    return env


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_gymnasium_step_for_step(seed):
    n = 8
    env = CartPole(n, device="cpu", seed=seed)
    obs, info = env.reset()
    assert info == {}
    assert obs.shape == (n, 4) and obs.dtype == torch.float32
    start = env.state.clone()
    refs = [_gym_single() for _ in range(n)]
    for i, r in enumerate(refs):
        r.unwrapped.state = start[i].numpy().copy()
        r.unwrapped.steps_beyond_terminated = None

    rng = np.random.default_rng(seed)
    alive = np.ones(n, dtype=bool)
    steps = 0
    while alive.any():
        actions = rng.integers(0, 2, size=n)
        obs, reward, terminated, truncated, _ = env.step(torch.as_tensor(actions))
        assert obs.dtype == torch.float32 and reward.dtype == torch.float32
        assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
        for i in np.flatnonzero(alive):
            r_obs, r_rew, r_term, r_trunc, _ = refs[i].step(int(actions[i]))
            np.testing.assert_allclose(obs[i].numpy(), r_obs, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(env.state[i].numpy(), refs[i].unwrapped.state, rtol=1e-12, atol=1e-14)
            assert float(reward[i]) == r_rew
            assert bool(terminated[i]) == r_term
            assert bool(truncated[i]) == r_trunc
            if r_term or r_trunc:
                alive[i] = False
        steps += 1
        assert steps < 600
    assert steps > 5


def test_truncation_matches_time_limit():
    n = 4
    env = CartPole(n, device="cpu", seed=3, max_episode_steps=7)
    env.reset()
    refs = [_gym_single(max_episode_steps=7) for _ in range(n)]
    for i, r in enumerate(refs):
        r.unwrapped.state = env.state[i].numpy().copy()
    # Alternating pushes keep the pole up well past 7 steps.
    for t in range(7):
        actions = np.full(n, t % 2)
        _, _, term, trunc, _ = env.step(actions)
        for i in range(n):
            _, _, r_term, r_trunc, _ = refs[i].step(int(actions[i]))
            assert bool(term[i]) == r_term and bool(trunc[i]) == r_trunc
    assert bool(trunc.all()) and not bool(term.any())


def test_termination_thresholds():
    env = CartPole(4, device="cpu", seed=0)
    env.reset()
    # x just outside +2.4 after one step, theta just outside -12 degrees, one safe, x at -2.4 edge.
    thr = CartPole.theta_threshold_radians
    env.set_state([[2.399, 1.0, 0.0, 0.0], [0.0, 0.0, -thr + 1e-4, -1.0], [0.0, 0.0, 0.0, 0.0], [-2.4, 0.0, 0.0, 0.0]])
    _, reward, term, trunc, _ = env.step([1, 1, 1, 1])
    assert term.tolist() == [True, True, False, False]
    assert reward.tolist() == [1.0, 1.0, 1.0, 1.0]  # the terminating step pays +1
    assert not bool(trunc.any())


def test_next_step_autoreset_matches_gymnasium_vector_env():
    """Same flags and rewards as Gymnasium's vectorised CartPole (next-step autoreset)."""
    n = 6
    env = CartPole(n, device="cpu", seed=5, max_episode_steps=30)
    env.reset()
    ref = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point", max_episode_steps=30)
    ref.reset(seed=5)
    ref.unwrapped.state = env.state.T.numpy().copy()
    rng = np.random.default_rng(0)
    saw_reset = False
    prev_done = np.zeros(n, dtype=bool)
    for _ in range(80):
        actions = rng.integers(0, 2, size=n)
        obs, reward, term, trunc, _ = env.step(torch.as_tensor(actions))
        r_obs, r_rew, r_term, r_trunc, _ = ref.step(actions)
        np.testing.assert_array_equal(reward.numpy(), r_rew)
        np.testing.assert_array_equal(term.numpy(), r_term)
        np.testing.assert_array_equal(trunc.numpy(), r_trunc)
        # Reset steps: reward 0, no flags, observation is a fresh initial state.
        if prev_done.any():
            saw_reset = True
            assert (reward.numpy()[prev_done] == 0).all()
            assert (np.abs(obs.numpy()[prev_done]) <= 0.05).all()
            # The two generators differ: continue from our new initial states.
            ref.unwrapped.state = env.state.T.numpy().copy()
        else:
            np.testing.assert_allclose(obs.numpy(), r_obs, rtol=1e-6, atol=1e-7)
        prev_done = term.numpy() | trunc.numpy()
    assert saw_reset
    ref.close()


def test_disabled_autoreset_and_reset_mask():
    env = CartPole(3, device="cpu", seed=0, autoreset_mode="disabled")
    obs0, _ = env.reset()
    env.set_state([[2.399, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    _, reward, term, _, _ = env.step([1, 1, 1])
    assert term.tolist() == [True, False, False] and reward.tolist() == [1.0, 1.0, 1.0]
    _, reward, term, _, _ = env.step([1, 1, 1])
    assert reward.tolist() == [0.0, 1.0, 1.0]  # an ended episode pays nothing
    assert bool(term[0])
    kept = env.state[1:].clone()
    obs, _ = env.reset(options={"reset_mask": np.array([True, False, False])})
    assert torch.equal(env.state[1:], kept)
    assert float(env.state[0].abs().max()) <= 0.05
    assert int(env.steps[0]) == 0 and int(env.steps[1]) == 2
    _, reward, _, _, _ = env.step(torch.tensor([0, 0, 0]))
    assert reward.tolist() == [1.0, 1.0, 1.0]


def test_seeding_and_spaces():
    a = CartPole(5, device="cpu")
    b = CartPole(5, device="cpu")
    oa, _ = a.reset(seed=11)
    ob, _ = b.reset(seed=11)
    assert torch.equal(oa, ob)
    oc, _ = b.reset(seed=12)
    assert not torch.equal(oa, oc)
    assert float(oa.abs().max()) <= 0.05
    od, _ = a.reset(options={"low": -0.2, "high": 0.2})
    assert float(od.abs().max()) <= 0.2
    assert a.num_envs == 5
    assert a.single_observation_space.shape == (4,)
    assert a.single_action_space.n == 2
    assert a.observation_space.shape == (5, 4)
    assert a.action_space.shape == (5,)
    assert isinstance(a, gym.vector.VectorEnv)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_envs"):
        CartPole(0, device="cpu")
    with pytest.raises(ValueError, match="autoreset_mode"):
        CartPole(2, device="cpu", autoreset_mode="same_step")
    env = CartPole(2, device="cpu", seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step([0, 1])
    env.reset()
    with pytest.raises(ValueError, match="one action per environment"):
        env.step([0, 1, 1])
    with pytest.raises(TypeError, match="integers"):
        env.step(torch.tensor([0.0, 1.0]))
    before = (env.state.clone(), env.starts.clone(), env._seed_value)
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(seed=7, options={"reset_mask": np.array([1, 0])})
    assert torch.equal(env.state, before[0]) and torch.equal(env.starts, before[1])
    assert env._seed_value == before[2]  # the seed was not taken either


@pytest.mark.gpu
def test_runs_on_cuda():
    env = CartPole(1024, device="cuda", seed=0)
    obs, _ = env.reset()
    for _ in range(10):
        obs, reward, term, trunc, _ = env.step(torch.randint(0, 2, (1024,), device="cuda"))
    assert obs.is_cuda and reward.is_cuda and term.is_cuda


@pytest.mark.parametrize("mode", ["next_step", "disabled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_step_matches_the_torch_step(device, mode, dtype):
    """The one-kernel step (CUDA float64 by default; forced here for float32 and, on the
    CPU, through Triton's interpreter) evaluates the torch step's expressions with the same
    roundings: bit-equal in float64 on the GPU (same device math library). Elsewhere the
    sine and cosine may differ by an ulp (numpy's in the interpreter, the GPU's
    approximate float32 ones), so states agree to a few ulps, growing over steps."""
    n = 37
    plain = CartPole(n, device=device, seed=3, autoreset_mode=mode, dtype=dtype)
    fused = CartPole(n, device=device, seed=3, autoreset_mode=mode, dtype=dtype)
    plain._use_kernel, fused._use_kernel = False, True
    plain.reset()
    fused.reset()
    gen = torch.Generator().manual_seed(0)
    exact = device.type == "cuda" and dtype == torch.float64
    steps = 120 if mode == "disabled" else 300  # disabled: past the end the pole spins freely
    for _ in range(steps):
        act = torch.randint(0, 2, (n,), generator=gen).to(device)
        got, want = fused.step(act), plain.step(act)
        for g, w in zip(got[:4], want[:4]):
            assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
            if exact or g.dtype == torch.bool:
                assert torch.equal(g, w)
        assert torch.equal(fused.steps, plain.steps) and torch.equal(fused.prev_done, plain.prev_done)
        if not exact:
            tol = 1e-12 if dtype == torch.float64 else 1e-3
            torch.testing.assert_close(fused.state, plain.state, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["next_step", "disabled"])
def test_the_counting_step_equals_a_step_and_the_rollouts_counters(device, mode):
    """``CartPole._step_counting`` (the step kernel that also updates a rollout's returns,
    alive counts and active mask) gives bit for bit what a kernel step followed by the
    counters' own kernel gives: the same state, counters, observations and end flags, with
    members that end at different steps and some that start inactive. Without the kernel
    step it declines and changes nothing."""
    from evotorch_eggroll.kernels.episode_step import episode_step_

    n = 37
    envs = [CartPole(n, device=device, seed=4, autoreset_mode=mode, max_episode_steps=30)
            for _ in range(2)]
    counters = []
    for env in envs:
        env._use_kernel = True
        env.reset()
        active = torch.ones(n, dtype=torch.bool, device=device)
        active[::5] = False
        counters.append((torch.zeros(n, dtype=torch.float64, device=device),
                         torch.zeros(n, dtype=torch.int64, device=device), active))
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        act = torch.randint(0, 2, (n,), generator=gen).to(device)
        obs, ended = envs[0]._step_counting(act, *counters[0])
        want_obs, reward, terminated, truncated, _ = envs[1].step(act)
        want_ended = episode_step_(*counters[1], reward, terminated, truncated)
        assert torch.equal(obs, want_obs) and torch.equal(ended, want_ended)
        for got, want in zip(counters[0], counters[1]):
            assert torch.equal(got, want)
        for name in ("state", "steps", "prev_done", "starts"):
            assert torch.equal(getattr(envs[0], name), getattr(envs[1], name))
    returns, alive, active = counters[0]
    # every episode ended: some terminated, the others were truncated at 30 steps
    assert int(alive[alive > 0].min()) < 30 and int(alive.max()) == 30 and not bool(active.any())
    assert torch.equal(returns, alive.double()) and int(alive[::5].max()) == 0
    plain = CartPole(n, device=device, seed=4, autoreset_mode=mode)
    plain._use_kernel = False
    plain.reset()
    before = plain.state.clone()
    assert plain._step_counting(act, *counters[0]) is None
    assert torch.equal(plain.state, before) and torch.equal(counters[0][1], alive)


def test_state_keeps_its_storage():
    """State, step counters and end flags are updated in place (a captured CUDA graph keeps
    reading them), through steps, resets, masked resets and set_state."""
    env = CartPole(4, device="cpu", seed=0)
    env.reset()
    ptrs = (env.state.data_ptr(), env.steps.data_ptr(), env.prev_done.data_ptr())
    for _ in range(30):
        env.step(torch.tensor([1, 1, 0, 1]))
    env.reset(seed=5)
    env.reset(options={"reset_mask": np.array([True, False, True, False])})
    env.set_state(torch.zeros(4, 4))
    env.step([0, 0, 0, 0])
    assert (env.state.data_ptr(), env.steps.data_ptr(), env.prev_done.data_ptr()) == ptrs
    assert env.cuda_graph_generators == []  # a step draws from no generator


def _philox4x32_10(key: int, counter: tuple) -> list:
    """Philox4x32-10 on Python integers: the four output words."""
    m0, m1, w0, w1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key & mask, (key >> 32) & mask
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return [c0, c1, c2, c3]


def _start(seed: int, env: int, start: int, low: float = -0.05, high: float = 0.05) -> list:
    """Environment ``env``'s initial state number ``start`` under ``seed``, from the stream's
    definition: low + (high - low) * (w * 2**-32), the words of Philox4x32-10 keyed by the
    seed at counter (env, start, 0, START_STREAM_TAG), in float64."""
    words = _philox4x32_10(seed, (env, start, 0, START_STREAM_TAG))
    return [low + (high - low) * (w * 2.0**-32) for w in words]


def test_philox_reference_matches_the_published_vectors():
    """The test's own Philox against two known-answer values of Philox4x32-10 (zero key
    and counter; the digits of pi as key and counter)."""
    assert _philox4x32_10(0, (0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    pi_key = 0xA4093822 | (0x299F31D0 << 32)
    assert _philox4x32_10(pi_key, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_numpy_philox_equals_the_torch_one():
    """The CPU start stream's numpy Philox gives the words of the package's torch Philox."""
    from evotorch_eggroll.noise import philox4x32, philox4x32_numpy

    g = torch.Generator().manual_seed(0)
    c0 = torch.randint(0, 2**32, (257,), generator=g, dtype=torch.int64)
    c1 = torch.randint(0, 2**32, (257,), generator=g, dtype=torch.int64)
    seed = 0xFEDCBA9876543210
    want = torch.stack(philox4x32(c0, c1, 7, START_STREAM_TAG, seed), dim=1)
    got = philox4x32_numpy(c0.numpy(), c1.numpy(), 7, START_STREAM_TAG, seed)
    assert torch.equal(torch.from_numpy(got.astype(np.int64)), want)


def test_cpu_starts_are_drawn_ahead_without_changing_them():
    """On the CPU the words of the next few starts are drawn for every environment at once
    and drawn again when one has used its share: an environment that restarts 40 times
    (two refills) still gets exactly the stream's starts."""
    env = CartPole(3, device="cpu", seed=0)
    env.reset(seed=11)
    for k in range(1, 41):
        env.reset(options={"reset_mask": np.array([True, False, k % 20 == 0])})
        assert env.state[0].tolist() == _start(11, 0, k)
    assert env.state[1].tolist() == _start(11, 1, 0) and env.state[2].tolist() == _start(11, 2, 2)
    assert env.starts.tolist() == [41, 1, 3]


@pytest.mark.parametrize("fused", [False, True])
def test_initial_states_follow_the_start_stream(device, fused):
    """Every initial state, from reset(seed), a masked reset or an autoreset, is exactly the
    stream's value for (seed, environment, start count), and only the environments that
    start count: through the torch code, and through the kernels (the one-kernel step and
    the resets' launch; on the CPU through Triton's interpreter)."""
    seed = 3 + (7 << 32)  # both key words matter
    n = 5
    env = CartPole(n, device=device, seed=0)
    env._use_kernel = env._use_start_kernel = fused
    env.reset(seed=seed)
    want = torch.tensor([_start(seed, i, 0) for i in range(n)], dtype=torch.float64)
    assert torch.equal(env.state.cpu(), want)
    assert env.starts.tolist() == [1] * n
    # environments 1 and 3 end on the next step and start again on the one after
    state = env.state.clone()
    state[1, :2] = torch.tensor([2.39999, 1.0])
    state[3, 2:] = torch.tensor([-0.2094, -1.0])
    env.set_state(state)
    _, _, term, _, _ = env.step(torch.ones(n, dtype=torch.int64, device=device))
    assert term.tolist() == [False, True, False, True, False]
    obs, reward, _, _, _ = env.step(torch.ones(n, dtype=torch.int64, device=device))
    for i in (1, 3):
        assert env.state[i].cpu().tolist() == _start(seed, i, 1)
    assert reward.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert env.starts.tolist() == [1, 2, 1, 2, 1]
    env.reset(options={"reset_mask": torch.tensor([True, False, False, True, False]),
                       "low": -0.1, "high": 0.2})
    assert env.state[0].cpu().tolist() == _start(seed, 0, 1, -0.1, 0.2)
    assert env.state[3].cpu().tolist() == _start(seed, 3, 2, -0.1, 0.2)
    assert env.starts.tolist() == [2, 2, 1, 3, 1]
    env.reset()  # no seed: the stream goes on
    assert env.state[1].cpu().tolist() == _start(seed, 1, 2, -0.1, 0.2)
    assert env.starts.tolist() == [3, 3, 2, 4, 2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_reset_in_one_launch_is_the_step_by_step_reset(device, dtype):
    """A reset through the one-launch kernel (the CUDA default; on the CPU through Triton's
    interpreter) leaves the environment exactly as the step-by-step reset does: state, start
    counts, step counters, end flags, the stream's key and the observations, through seeded
    and unseeded, full and masked resets after steps, with key words of 2**31 and above."""
    n = 9
    envs = [CartPole(n, device=device, seed=5, dtype=dtype, autoreset_mode="disabled",
                     max_episode_steps=3) for _ in range(2)]
    envs[0]._use_start_kernel, envs[1]._use_start_kernel = True, False
    mask = torch.tensor([i % 3 == 1 for i in range(n)], device=device)
    resets = [{}, dict(seed=0xFFFFFFFF80000001), {}, dict(options={"reset_mask": mask}),
              dict(seed=7 + (0x9ABCDEF0 << 32), options={"reset_mask": mask}),
              dict(options={"low": -0.2, "high": 0.3}), dict(seed=2)]
    for kwargs in resets:
        got, want = (env.reset(**kwargs)[0] for env in envs)
        assert got.dtype == torch.float32 and torch.equal(got, want), kwargs
        for name in ("state", "starts", "steps", "prev_done", "_key"):
            assert torch.equal(getattr(envs[0], name), getattr(envs[1], name)), (kwargs, name)
        assert envs[0]._seed_value == envs[1]._seed_value
        for _ in range(4):  # ends every episode (3 steps at most) and moves the counters
            act = torch.ones(n, dtype=torch.int64, device=device)
            for env in envs:
                env.step(act)
        assert bool(envs[0].prev_done.all())


def test_initial_states_do_not_depend_on_the_batch():
    """Environment i's starts depend on the seed and i only: a larger batch begins with
    the same states, and they cover [low, high) evenly."""
    small, large = CartPole(3, device="cpu"), CartPole(4096, device="cpu")
    small.reset(seed=9)
    large.reset(seed=9)
    assert torch.equal(large.state[:3], small.state)
    s = large.state
    assert float(s.min()) >= -0.05 and float(s.max()) < 0.05
    assert abs(float(s.mean())) < 1e-3
    assert abs(float(s.std()) - 0.1 / 12 ** 0.5) < 1e-3
    other = CartPole(4096, device="cpu")
    other.reset(seed=9 + (1 << 32))
    assert not torch.equal(other.state, large.state)


@pytest.mark.gpu
def test_initial_states_are_the_same_on_every_device():
    """The same seed gives the same starts on the GPU (one-kernel autoreset) as on the CPU."""
    n = 1000
    gpu, cpu = CartPole(n, device="cuda", seed=4), CartPole(n, device="cpu", seed=4)
    assert torch.equal(gpu.reset()[0].cpu(), cpu.reset()[0])
    state = cpu.state.clone()
    state[::3, :2] = torch.tensor([2.39999, 1.0])  # a third of them end, then start again
    gpu.set_state(state)
    cpu.set_state(state)
    for _ in range(2):
        act = torch.ones(n, dtype=torch.int64)
        gpu.step(act.cuda())
        cpu.step(act)
    assert torch.equal(gpu.starts.cpu(), cpu.starts)
    restarted = torch.arange(n) % 3 == 0
    assert torch.equal(gpu.state.cpu()[restarted], cpu.state[restarted])
