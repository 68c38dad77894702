"""The noise stream is deterministic and the same on every path.

Kernel tier: the Triton stream (``evotorch_eggroll.kernels``) against the plain-torch
reference of ``evotorch_eggroll.noise``. Philox words are compared bit-exactly; normals
within the per-dtype table below (the reference runs Box–Muller in float64 and rounds once,
the kernels run it in float32 with the device's log/sqrt/cos/sin). CPU cases run the
kernels through Triton's interpreter at small sizes; ``gpu`` cases run at real sizes.
"""

from __future__ import annotations

import pytest
import torch

from evotorch_eggroll import noise, ops
from evotorch_eggroll.kernels import normal_block as normal_block_kernel
from evotorch_eggroll.kernels import philox

# Normals vs the float64 reference, per output dtype. Box–Muller in float32: the angle
# 2*pi*u carries ~4e-7 absolute error and the radius is at most ~5.9. On the GPU the
# kernels use the hardware approximate log2/sin/cos (absolute errors about 2**-22 and
# 2**-21, a series for -ln(1 - v) near u = 1): at most ~4e-6 absolute, inside this table
# with 2x margin even at twice the documented hardware errors.
NORMAL_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}

# (seed, key, epoch): 64-bit and negative seeds, 32-bit keys, epochs up to 2**32 - 1.
STREAMS = [
    (0, 0, 0),
    (1234, noise.param_key("layer.weight"), 3),
    (2**64 - 1, 2**32 - 1, 2**31),
    (-7, 2**31, 2**32 - 1),
    (2**40 + 17, 5, 2**31 - 1),
]
# noise indices around the int32 / uint32 limits
BIG_INDICES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]


def _reference_words(seed, key, epoch, indices, first_element, numel):
    """Reference words of elements ``first_element ..`` (any element, int64-exact)."""
    elem = torch.arange(first_element, first_element + numel, dtype=torch.int64)[None, :]
    idx = torch.as_tensor(indices, dtype=torch.int64)[:, None]
    words = noise.philox4x32(elem // 4, idx, torch.tensor(key), torch.tensor(epoch), seed)
    lane = (elem % 4).expand(idx.shape[0], -1)
    return torch.gather(torch.stack(words), 0, lane[None])[0]


def _reference_normals(seed, key, epoch, indices, first_quad, quads):
    q = torch.arange(first_quad, first_quad + quads, dtype=torch.int64)[None, :]
    idx = torch.as_tensor(indices, dtype=torch.int64)[:, None]
    words = noise.philox4x32(q, idx, torch.tensor(key), torch.tensor(epoch), seed)
    z = torch.stack(noise.normals_from_words(*words), dim=-1)  # (K, Q, 4)
    return z.reshape(idx.shape[0], quads * 4)


# Known-answer vectors of Philox4x32-10 published with Random123 (tests/kat_vectors of
# github.com/DEShawResearch/random123): counter (4 words), key (2 words), output (4 words).
PHILOX4X32_10_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX4X32_10_KAT)
def test_reference_philox_matches_published_known_answers(counter, key, expected):
    """The reference is Philox4x32-10 itself, not only whatever the kernels compute."""
    seed = key[0] | (key[1] << 32)
    words = noise.philox4x32(*(torch.tensor([c]) for c in counter), seed)
    assert [int(w) for w in words] == list(expected)


@pytest.mark.parametrize("counter,key,expected", PHILOX4X32_10_KAT)
def test_kernel_philox_matches_published_known_answers(device, counter, key, expected):
    """The stream's counter is (element // 4, noise index, parameter key, epoch) and the
    Philox key is the seed's two 32-bit halves: one quad of the kernel stream is one block."""
    seed = key[0] | (key[1] << 32)
    idx = torch.tensor([counter[1]], device=device)
    got = philox.philox_words(seed, counter[2], counter[3], idx, 4, first_element=4 * counter[0])
    assert got.cpu()[0].tolist() == list(expected)


@pytest.mark.parametrize("seed,key,epoch", STREAMS)
@pytest.mark.parametrize(
    "numel", [1, 3, 7, 33, pytest.param(1 << 20, marks=pytest.mark.gpu)]
)
def test_philox_words_bit_exact(device, seed, key, epoch, numel):
    idx = torch.tensor(BIG_INDICES, device=device)
    got = philox.philox_words(seed, key, epoch, idx, numel)
    want = noise.philox_words(seed, key, epoch, BIG_INDICES, numel)
    assert got.dtype == torch.int64 and got.shape == (len(BIG_INDICES), numel)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize(
    "first_element", [2**31 - 8, 2**32 - 8, 2**34 - 16, pytest.param(2**33, marks=pytest.mark.gpu)]
)
def test_philox_words_large_elements(device, first_element):
    """Elements past the int32 / uint32 range (quads up to 2**32 - 1) stay exact."""
    seed, key, epoch = 99, 2**32 - 1, 2**31 + 5
    idx = torch.tensor([3, 2**32 - 1], device=device)
    got = philox.philox_words(seed, key, epoch, idx, 16, first_element=first_element)
    want = _reference_words(seed, key, epoch, [3, 2**32 - 1], first_element, 16)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("seed,key,epoch", STREAMS)
@pytest.mark.parametrize(
    "numel", [1, 3, 7, 33, 130, pytest.param(4096 * 17, marks=pytest.mark.gpu)]
)
def test_normal_block_matches_reference(device, seed, key, epoch, numel):
    idx = torch.tensor(BIG_INDICES, device=device)
    got = ops.normal_block(seed, key, epoch, idx, numel)
    want = noise.normal_stream(seed, key, epoch, BIG_INDICES, numel)
    assert got.dtype == torch.float32 and got.shape == (len(BIG_INDICES), numel)
    assert got.device == idx.device
    torch.testing.assert_close(got.cpu(), want, **NORMAL_TOL[torch.float32])


@pytest.mark.parametrize("first_element", [2**31 - 8, 2**32 - 8, 2**34 - 32])
def test_normal_block_large_elements(device, first_element):
    seed, key, epoch = 5, 11, 2**32 - 1
    got = normal_block_kernel.normal_block(
        seed, key, epoch, torch.tensor([0, 2**31], device=device), 32,
        first_element=first_element,
    )
    want = _reference_normals(seed, key, epoch, [0, 2**31], first_element // 4, 8)
    torch.testing.assert_close(got.cpu(), want, **NORMAL_TOL[torch.float32])


@pytest.mark.parametrize("epoch", [0, 7, 2**32 - 1])
def test_normal_block_with_the_epoch_in_memory_is_the_same_stream(device, epoch):
    """The draw that reads its epoch from device memory (what a captured draw replays)
    gives the stream's normals bit for bit, over odd lengths and large noise indices."""
    idx = torch.tensor([0, 3, 9, 2**31 + 5], device=device)
    for numel in (1, 5, 130, 1100):
        want = ops.normal_block(12345678901234, 77, epoch, idx, numel)
        got = normal_block_kernel.normal_block_epoch_in_memory(
            12345678901234, 77, torch.tensor([epoch], dtype=torch.int64, device=device), idx,
            numel, torch.empty(4, numel, device=device))
        assert torch.equal(got, want), numel


def test_normal_block_is_deterministic_and_batch_independent(device):
    """Same coordinates, same bits: twice in a row and whatever the other noise indices."""
    idx = torch.tensor([7, 0, 2**32 - 1, 7], device=device)
    a = ops.normal_block(3, 4, 5, idx, 37)
    b = ops.normal_block(3, 4, 5, idx, 37)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[3])
    for k in range(idx.numel()):
        assert torch.equal(ops.normal_block(3, 4, 5, idx[k:k + 1], 37)[0], a[k])
    # a prefix of the elements is the same numbers
    assert torch.equal(ops.normal_block(3, 4, 5, idx, 5), a[:, :5])


def test_normal_block_coordinates_matter(device):
    """Changing any coordinate changes the numbers."""
    idx = torch.tensor([1], device=device)
    base = ops.normal_block(1, 2, 3, idx, 64)
    for seed, key, epoch, i in [(2, 2, 3, 1), (1, 3, 3, 1), (1, 2, 4, 1), (1, 2, 3, 2),
                                (1 + 2**32, 2, 3, 1)]:
        other = ops.normal_block(seed, key, epoch, torch.tensor([i], device=device), 64)
        assert not torch.equal(base, other)


def test_normal_block_statistics(device):
    z = ops.normal_block(0, 1, 0, torch.arange(4, device=device), 4096).double()
    assert abs(z.mean().item()) < 0.03
    assert abs(z.std().item() - 1.0) < 0.03
    assert torch.isfinite(z).all()


@pytest.mark.gpu
def test_fast_transform_matches_reference_at_scale(device):
    """Millions of normals of the GPU transform (hardware log2/sin/cos) against float64,
    including the series branch near u = 1 and the largest radii."""
    from evotorch_eggroll.kernels import philox as philox_kernels

    assert philox_kernels.FAST_TRANSCENDENTALS  # the GPU tier checks the fast path
    idx = [0, 5, 2**31 + 3, 2**32 - 1]
    numel = 1 << 20
    got = ops.normal_block(77, 2**31 + 9, 12, torch.tensor(idx, device=device), numel).cpu()
    want = noise.normal_stream(77, 2**31 + 9, 12, idx, numel)
    torch.testing.assert_close(got, want, **NORMAL_TOL[torch.float32])
    assert want.abs().max() > 4.5  # the far tail was covered


@pytest.mark.gpu
def test_normal_block_statistics_large(device):
    z = ops.normal_block(0, 1, 0, torch.arange(64, device=device), 1 << 20).double()
    assert abs(z.mean().item()) < 2e-3
    assert abs(z.std().item() - 1.0) < 2e-3
    assert torch.isfinite(z).all()


def test_lowrank_factors_layout(device):
    """A0 is rows n..n+m-1 and B0 rows 0..n-1 of the (n + m, r) block (element row*r + k)."""
    m, n, r = 3, 7, 5
    idx = torch.tensor([2, 2**31 + 1], device=device)
    a0, b0 = ops.lowrank_factors(9, 10, 11, idx, m, n, r)
    assert a0.shape == (2, m, r) and b0.shape == (2, n, r)
    block = ops.normal_block(9, 10, 11, idx, (n + m) * r).view(2, n + m, r)
    assert torch.equal(a0, block[:, n:]) and torch.equal(b0, block[:, :n])
    ra, rb = noise.lowrank_factors(9, 10, 11, [2, 2**31 + 1], m, n, r)
    torch.testing.assert_close(a0.cpu(), ra, **NORMAL_TOL[torch.float32])
    torch.testing.assert_close(b0.cpu(), rb, **NORMAL_TOL[torch.float32])


def test_empty_requests(device):
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.normal_block(0, 0, 0, idx, 5).shape == (0, 5)
    assert ops.normal_block(0, 0, 0, torch.tensor([1], device=device), 0).shape == (1, 0)


@pytest.mark.parametrize(
    "bad,error",
    [
        (dict(key=-1), ValueError),
        (dict(key=2**32), ValueError),
        (dict(epoch=2**32), ValueError),
        (dict(epoch=-1), ValueError),
        (dict(numel=-1), ValueError),
        (dict(seed=1.5), TypeError),
    ],
)
def test_normal_block_rejects_bad_coordinates(device, bad, error):
    args = dict(seed=0, key=0, epoch=0, numel=4)
    args.update(bad)
    with pytest.raises(error):
        ops.normal_block(args["seed"], args["key"], args["epoch"],
                         torch.tensor([0], device=device), args["numel"])


def test_normal_block_rejects_float_indices(device):
    with pytest.raises(TypeError, match="integer"):
        ops.normal_block(0, 0, 0, torch.tensor([0.0], device=device), 4)


# -- strategy level: what keys the noise a strategy uses ---------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch.nn as nn  # noqa: E402

from evotorch_eggroll import EggrollStrategy  # noqa: E402


def _two_layer(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)).to(device)


def test_strategy_noise_depends_on_seed_name_epoch_and_member_only(device):
    model = _two_layer(device)
    s = EggrollStrategy(seed=5, rank=2).setup(model)
    ref = s._get_perturbation("1.weight", 2, 3).as_matrix()
    # parameter values do not matter
    with torch.no_grad():
        model[1].weight.mul_(10.0).add_(1.0)
    assert torch.equal(s._get_perturbation("1.weight", 2, 3).as_matrix(), ref)
    # another model object of the same architecture, another strategy object
    other = EggrollStrategy(seed=5, rank=2).setup(_two_layer(device, seed=1))
    assert torch.equal(other._get_perturbation("1.weight", 2, 3).as_matrix(), ref)
    # each coordinate does
    assert not torch.equal(EggrollStrategy(seed=6, rank=2).setup(model)
                           ._get_perturbation("1.weight", 2, 3).as_matrix(), ref)
    assert not torch.equal(s._get_perturbation("1.weight", 2, 4).as_matrix(), ref)
    assert not torch.equal(s._get_perturbation("1.weight", 4, 3).as_matrix(), ref)
    assert torch.equal(s._get_perturbation("1.weight", 3, 3).as_matrix(), -ref)  # its mirror
    # two parameters of the same shape get different noise (keyed by name)
    s2 = EggrollStrategy(seed=5, rank=2).setup(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
                                               .to(device))
    assert not torch.equal(s2._get_perturbation("0.weight", 2, 3).as_matrix(),
                           s2._get_perturbation("1.weight", 2, 3).as_matrix())


@pytest.mark.parametrize("reuse,same_as_epoch0", [
    (0, [True, True, True, True, True]),
    (1, [True, False, False, False, False]),
    (3, [True, True, True, False, False]),
])
def test_noise_reuse_sets_the_effective_epoch(device, reuse, same_as_epoch0):
    model = _two_layer(device)
    s = EggrollStrategy(noise_reuse=reuse).setup(model)
    base = s._get_perturbation("0.weight", 1, 0).as_matrix()
    for epoch, same in enumerate(same_as_epoch0):
        p = s._get_perturbation("0.weight", 1, epoch)
        assert p.epoch == epoch  # the requested epoch, not the effective one
        assert torch.equal(p.as_matrix(), base) is same


def test_noise_reuse_zero_keeps_one_draw_across_training_steps(device):
    model = _two_layer(device)
    s = EggrollStrategy(noise_reuse=0, sigma=0.2).setup(model)
    x = torch.randn(4, 3, device=device)
    factors = []
    for _ in range(3):
        with s.perturb(4) as pop:
            factors.append(pop.get_factors(1, "1.weight"))
            pop.batched_forward(model, x)
        s.step(torch.tensor([1.0, 0.0, 2.0, 3.0]))
    assert all(torch.equal(f[0], factors[0][0]) and torch.equal(f[1], factors[0][1])
               for f in factors)


def test_two_identical_runs_are_bit_identical(device):
    def run():
        model = _two_layer(device)
        s = EggrollStrategy(sigma=0.2, lr=0.05, seed=8).setup(model)
        x = torch.randn(4, 3, device=device, generator=None)
        outs = []
        for _ in range(2):
            with s.perturb(4) as pop:
                out = pop.batched_forward(model, x)
            outs.append(out)
            s.step(-out.pow(2).sum(1))
        return outs, [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(3)
    outs_a, params_a = run()
    torch.manual_seed(3)
    outs_b, params_b = run()
    assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_noise_does_not_depend_on_python_hash_seed(device):
    """Noise keys come from CRC-32 of names, not Python's salted hash: a fresh interpreter
    with another PYTHONHASHSEED reproduces the same perturbation bits."""
    model = _two_layer(device)
    s = EggrollStrategy(seed=12, rank=2).setup(model)
    here = s._get_perturbation("1.weight", 3, 2).as_matrix().cpu()
    code = (
        "import torch, torch.nn as nn\n"
        "from evotorch_eggroll import EggrollStrategy\n"
        f"m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)).to('{device.type}')\n"
        "s = EggrollStrategy(seed=12, rank=2).setup(m)\n"
        "p = s._get_perturbation('1.weight', 3, 2).as_matrix().cpu()\n"
        "print(p.view(torch.int32).flatten().tolist())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    bits = [int(v) for v in out.stdout.strip().strip("[]").split(",")]
    assert bits == here.view(torch.int32).flatten().tolist()


# -- determinism of a whole run under row order and population chunking ---------------------------------

def _whole_run(device, evaluate, generations=2):
    model = _two_layer(device)
    s = EggrollStrategy(sigma=0.2, lr=0.05, rank=2, seed=21).setup(model)
    x = torch.linspace(-1, 1, 18, device=device).reshape(6, 3)
    outs = []
    for _ in range(generations):
        with s.perturb(6) as pop:
            out = evaluate(pop, model, x)
        outs.append(out)
        s.step(-out.pow(2).sum(1))
    return outs, [p.detach().clone() for p in model.parameters()]


def test_whole_run_is_bit_identical_whatever_the_row_order_or_chunking(device):
    """The same seed gives bit-identical weights after a run whether the members' rows are
    evaluated in order, permuted (with permuted member_ids, outputs un-permuted before the
    fitness), or in two batched_forward calls. The update depends only on the fitnesses and
    the regenerated noise; the forward is row-independent (each row's output depends only on
    its own input and member), so the fitnesses, and hence the weights, agree bit for bit."""
    perm = torch.tensor([4, 1, 5, 0, 3, 2], device=device)
    inverse = torch.argsort(perm)

    def in_order(pop, model, x):
        return pop.batched_forward(model, x)

    def permuted(pop, model, x):
        return pop.batched_forward(model, x[perm], member_ids=perm)[inverse]

    def chunked(pop, model, x):
        first = pop.batched_forward(model, x[:2], member_ids=[0, 1])
        rest = pop.batched_forward(model, x[2:], member_ids=[2, 3, 4, 5])
        return torch.cat([first, rest])

    ref_outs, ref_params = _whole_run(device, in_order)
    for evaluate in (permuted, chunked):
        outs, params = _whole_run(device, evaluate)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs)), evaluate.__name__
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(params, ref_params)), evaluate.__name__
