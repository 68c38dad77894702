"""Distribution (SPEC §7), in one process: the sharding of members over ranks, the
world-size check, and the all-gathered update, with the process group faked through the
strategy's ``_world_info`` / ``_all_gather_fitnesses`` hooks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy


def make_model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)


def fake_world(monkeypatch, strategy, rank: int, world: int, gathered=None) -> None:
    """Pretend to be ``rank`` of ``world``: the group query, the cross-rank agreement check
    and the fitness all-gather are replaced (the collectives are tested with real process
    groups elsewhere)."""
    monkeypatch.setattr(strategy, "_world_info", lambda: (rank, world))
    monkeypatch.setattr(strategy, "_check_ranks_agree", lambda *a, **k: None, raising=False)
    if gathered is not None:
        monkeypatch.setattr(strategy, "_all_gather_fitnesses",
                            lambda local, *a: gathered.to(local.device, local.dtype))


def test_without_distribution_the_whole_population_is_local(device):
    s = EggrollStrategy().setup(make_model(device))
    with s.perturb(6) as pop:
        assert pop.population_size == 6 and pop.local_population_size == 6
        assert pop.local_member_ids().tolist() == list(range(6))


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_ranks_get_contiguous_equal_slices_covering_the_population(device, monkeypatch, world):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 0, world)
    s.setup(make_model(device))
    seen = []
    for rank in range(world):
        fake_world(monkeypatch, s, rank, world)
        with s.perturb(12) as pop:
            ids = pop.local_member_ids().tolist()
            assert pop.local_population_size == 12 // world == len(ids)
            assert ids == list(range(rank * (12 // world), (rank + 1) * (12 // world)))
            assert list(pop.iterate()) == ids
        seen += ids
    assert seen == list(range(12))


def test_world_size_must_divide_the_population(device, monkeypatch):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 1, 4)
    s.setup(make_model(device))
    with pytest.raises(ValueError, match="world size"):
        s.perturb(6)
    with s.perturb(8) as pop:
        assert pop.local_member_ids().tolist() == [2, 3]


def test_distributed_needs_an_initialized_process_group(device):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        EggrollStrategy(distributed=True).setup(make_model(device))


def test_local_rows_default_to_this_ranks_members(device, monkeypatch):
    model = make_model(device)
    s = EggrollStrategy(distributed=True, sigma=0.3)
    fake_world(monkeypatch, s, 1, 2)
    s.setup(model)
    x = torch.randn(3, 3, device=device)
    with s.perturb(6) as pop:
        local = pop.batched_forward(model, x)
        explicit = pop.batched_forward(model, x, member_ids=pop.local_member_ids())
    assert torch.equal(local, explicit)
    plain = EggrollStrategy(sigma=0.3).setup(model)
    with plain.perturb(6) as pop:
        full = pop.batched_forward(model, torch.cat([torch.zeros_like(x), x]))
    assert torch.equal(local, full[3:])


def test_every_rank_computes_the_update_of_the_whole_population(device, monkeypatch):
    fitness = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.75])
    x = torch.randn(6, 3, device=device)

    def run(rank=None, world=None):
        model = make_model(device)
        s = EggrollStrategy(sigma=0.2, lr=0.1, seed=3, distributed=world is not None)
        if world is not None:
            fake_world(monkeypatch, s, rank, world, gathered=fitness)
        s.setup(model)
        with s.perturb(6) as pop:
            ids = pop.local_member_ids()
            pop.batched_forward(model, x[ids.to(device)])
            local = fitness[ids]
        metrics = s.step(local.to(device))
        return [p.detach().clone() for p in model.parameters()], metrics

    reference, ref_metrics = run()
    for rank in range(3):
        params, metrics = run(rank, 3)
        assert all(torch.equal(p, q) for p, q in zip(params, reference))
        assert metrics == ref_metrics


def test_all_values_on_every_rank_need_no_gather(device, monkeypatch):
    s = EggrollStrategy(distributed=True)
    fake_world(monkeypatch, s, 0, 2)

    def no_gather(*args):
        raise AssertionError("all N fitnesses were given: nothing to gather")

    monkeypatch.setattr(s, "_all_gather_fitnesses", no_gather)
    s.setup(make_model(device))
    with s.perturb(4):
        pass
    assert s.step(torch.arange(4.0))["population_size"] == 4
