"""Whole CartPole episodes in one kernel launch (``kernels/cartpole_episode.py``): the same
fitnesses, interaction counts and search center as the step-by-step rollout.

On the CPU the kernels run in Triton's interpreter; CartPole's one-kernel step is forced on
there (it is the CUDA float64 default), so that both rollouts step the environments with
the same kernel code."""

import warnings

import pytest
import torch
from torch import nn

from evotorch_eggroll.algorithms import EGGROLL
from evotorch_eggroll.envs import CartPole
from evotorch_eggroll.kernels import cartpole_episode
from evotorch_eggroll.neuroevolution import EggrollVecGymNE
from evotorch_eggroll.neuroevolution import vecgymne


def _kernel_cartpole(num_envs, device=None):
    env = CartPole(num_envs, device=device)
    env._use_kernel = env._use_start_kernel = True
    return env


def _run(device, monkeypatch, fused, *, env, hidden, outputs, popsize, generations,
         episode_length, rank, sigma):
    """``generations`` EGGROLL steps on CartPole with a Tanh policy of two ``hidden``-wide
    layers, whole-episode kernel on or off: every evaluation's fitnesses, the center, the
    interaction count, the steps of the last rollout and the kernel's launches (their
    ``t_max``)."""
    launches, fitnesses = [], []
    real = cartpole_episode.cartpole_episode_
    evaluate = EggrollVecGymNE._evaluate_members
    with monkeypatch.context() as m:
        m.setattr(vecgymne, "FUSED_EPISODES", fused)
        m.setattr(cartpole_episode, "cartpole_episode_",
                  lambda *a, **k: launches.append(k["t_max"]) or real(*a, **k))
        m.setattr(EggrollVecGymNE, "_evaluate_members",
                  lambda self, fwd: fitnesses.append(evaluate(self, fwd)) or fitnesses[-1])
        torch.manual_seed(0)

        def policy(obs_length, act_length):
            return nn.Sequential(nn.Linear(obs_length, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, outputs))

        problem = EggrollVecGymNE(env, policy, episode_length=episode_length, seed=2, device=device)
        searcher = EGGROLL(problem, popsize=popsize, sigma=sigma, lr=0.1, rank=rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(generations):
                searcher.step()
    return dict(fitnesses=torch.stack(fitnesses), center=searcher.status["center"].clone(),
                interactions=problem.interaction_count, steps=problem.last_rollout_steps,
                launches=launches)


@pytest.mark.parametrize("outputs", [2, 1])
def test_fused_episodes_equal_the_step_by_step_rollout(device, monkeypatch, outputs):
    """Two programs (40 members), a three-layer policy, rank 2, antithetic pairs; two
    scores (argmax) or one output (its sign). Episodes of up to 24 steps, some of which end
    early (their environments then restart, unobserved)."""
    kw = dict(env=_kernel_cartpole, hidden=8, outputs=outputs, popsize=40, generations=2,
              episode_length=24, rank=2, sigma=0.5)
    fused = _run(device, monkeypatch, True, **kw)
    plain = _run(device, monkeypatch, False, **kw)
    assert fused["launches"] == [24, 24] and plain["launches"] == []
    assert torch.equal(fused["fitnesses"], plain["fitnesses"])
    assert torch.equal(fused["center"], plain["center"])
    assert fused["interactions"] == plain["interactions"]
    assert 0 < fused["steps"] <= 24
    returns = fused["fitnesses"]
    assert float(returns.min()) < 24 and float(returns.max()) > float(returns.min())


def test_fused_episodes_step_aside_when_the_rollout_does_not_allow_them(device, monkeypatch):
    """Observation normalisation, a policy wider than the in-register kernel's 64 features
    and the step kernel switched off each keep the step-by-step rollout."""
    launches = []
    monkeypatch.setattr(vecgymne, "FUSED_EPISODES", True)
    real = cartpole_episode.cartpole_episode_
    monkeypatch.setattr(cartpole_episode, "cartpole_episode_",
                        lambda *a, **k: launches.append(1) or real(*a, **k))
    cases = [
        dict(env=_kernel_cartpole, net="Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)",
             observation_normalization=True),
        dict(env=_kernel_cartpole, net="Linear(obs_length, 80) >> Tanh() >> Linear(80, act_length)"),
        dict(env=CartPole, net="Linear(obs_length, 8) >> Tanh() >> Linear(8, act_length)"),
    ]
    for case in cases:
        env, net = case.pop("env"), case.pop("net")
        problem = EggrollVecGymNE(env, net, episode_length=5, seed=0, device=device, **case)
        searcher = EGGROLL(problem, popsize=8, sigma=0.3, lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            searcher.step()
        assert problem.last_rollout_steps == 5
    on_cuda = torch.device(device).type == "cuda"
    assert launches == ([1] if on_cuda else [])  # CUDA float64 CartPole: its kernel is the default


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 4])
def test_fused_episodes_equal_the_captured_rollout_at_real_size(monkeypatch, rank):
    """4,096 members, the 4 -> 64 -> 64 -> 2 Tanh policy, 200-step episodes on the GPU:
    the same fitnesses, interaction counts and center as the rollout captured in CUDA
    graphs (CartPole's default one-kernel step)."""
    kw = dict(env=CartPole, hidden=64, outputs=2, popsize=4096, generations=3,
              episode_length=200, rank=rank, sigma=0.1)
    fused = _run("cuda", monkeypatch, True, **kw)
    captured = _run("cuda", monkeypatch, False, **kw)
    assert fused["launches"] == [200] * 3 and captured["launches"] == []
    assert torch.equal(fused["fitnesses"], captured["fitnesses"])
    assert torch.equal(fused["center"], captured["center"])
    assert fused["interactions"] == captured["interactions"]
