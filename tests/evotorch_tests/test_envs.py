"""The torch CartPole against Gymnasium's CartPole-v1, step for step."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from evotorch_eggroll.envs import CartPole


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
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": np.array([1, 0])})


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
    assert env.cuda_graph_generators == []  # a CPU generator needs no registration
