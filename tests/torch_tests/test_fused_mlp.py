"""``batched_forward`` of a plain MLP through the one-launch drawn-MLP kernel.

Under ``torch.no_grad()``, with the context's factors drawn, an ``nn.Sequential`` (or an
EvoTorch ``MultiLayered``, what its network strings build) of ``nn.Linear`` layers and
Tanh/ReLU/Sigmoid activations runs as one kernel launch. Its output equals each member's
materialised network (``pop.iterate()``) to float32 rounding, equals the routed per-layer
path, is bit-equal across repeated calls, and the fast path steps aside for everything
else (gradients, hooks, other modules, other dtypes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evotorch_eggroll import EggrollStrategy, fused_mlp
from evotorch_eggroll.kernels import drawn_mlp


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "narrow":  # every width <= 64: activations kept in registers
        return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 33), nn.ReLU(),
                             nn.Linear(33, 2))
    if kind == "bottleneck":  # narrow, four layers, a middle one with few outputs
        return nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 3), nn.ReLU(),
                             nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2))
    if kind == "wide":  # a width above 64: chunked layers through scratch
        return nn.Sequential(nn.Linear(5, 70), nn.Sigmoid(), nn.Linear(70, 3), nn.Tanh())
    if kind == "wide3":  # three chunked layers: both scratch buffers
        return nn.Sequential(nn.Linear(3, 66), nn.Tanh(), nn.Linear(66, 70), nn.ReLU(),
                             nn.Linear(70, 2))
    if kind == "deep":  # more layers than one launch takes, nested, identities, no bias
        return nn.Sequential(nn.Linear(3, 9), nn.Tanh(),
                             nn.Sequential(nn.Linear(9, 9, bias=False), nn.Identity(), nn.ReLU(),
                                           nn.Linear(9, 9), nn.Tanh()),
                             nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 4))
    raise ValueError(kind)


def _launches(monkeypatch) -> list:
    """Record every drawn-MLP launch."""
    calls = []
    real = drawn_mlp.drawn_mlp

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(drawn_mlp, "drawn_mlp", spy)
    return calls


def _routed(pop, model, x, ids, monkeypatch):
    """The same forward through the per-op routed path."""
    with monkeypatch.context() as m:
        m.setattr(fused_mlp, "try_forward", lambda *a, **k: None)
        return pop.batched_forward(model, x, member_ids=ids)


@pytest.mark.parametrize("kind,rank,antithetic,evolve_bias", [
    ("narrow", 1, True, True), ("narrow", 3, False, True), ("wide", 2, True, True),
    ("wide3", 2, False, True),
    ("deep", 1, True, False), ("deep", 2, False, True), ("bottleneck", 1, True, True),
    ("bottleneck", 2, False, True)])
def test_fused_forward_equals_each_members_network(device, monkeypatch, kind, rank, antithetic,
                                                   evolve_bias):
    model = _net(kind).to(device)
    s = EggrollStrategy(sigma=0.2, rank=rank, antithetic=antithetic, seed=11,
                        evolve_bias=evolve_bias).setup(model)
    n_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    population, rows = 6, 13
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, n_in, generator=gen).to(device)
    ids = torch.randint(0, population, (rows,), generator=gen).to(device)
    calls = _launches(monkeypatch)
    with torch.no_grad(), s.perturb(population, epoch=3) as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
        again = pop.batched_forward(model, x, member_ids=ids)
        routed = _routed(pop, model, x, ids, monkeypatch)
        want = torch.empty_like(out)
        for k in pop.iterate():  # each member's materialised network
            rows_k = ids == k
            want[rows_k] = model(x[rows_k])
    assert len(calls) == 2  # one launch per call, groups of four layers inside it
    assert torch.equal(out, again)
    torch.testing.assert_close(out, routed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_few_feature_layers_take_cuda_core_products(device, monkeypatch):
    """In the in-register kernel a first layer with few inputs adds one input column at a
    time and a layer with few outputs sums over its inputs once per output, in float32 on
    the CUDA cores, their feature counts padded to powers of two rather than to the tensor
    cores' 16. The outputs equal those of tensor-core products for every layer to float32
    rounding."""
    model = _net("bottleneck").to(device)
    widths = (5, 32, 3, 20, 2)
    flags = tuple((True, True, True, act) for act in
                  (drawn_mlp.TANH, drawn_mlp.RELU, drawn_mlp.TANH, drawn_mlp.IDENTITY))
    values = drawn_mlp._config(widths, flags, 4, 1, True, "ieee", False, False, True, False)[0]
    const = dict(zip(drawn_mlp._REGS_CONSTEXPRS, values))
    assert [const[f"FM{i}"] for i in range(4)] == [2, 1, 0, 1]
    # the 3-wide activations feed a tensor-core layer: padded to 16
    assert [const[f"P{i}"] for i in range(5)] == [8, 32, 16, 32, 2] and const["PL"] == 2
    s = EggrollStrategy(sigma=0.2, rank=1, seed=5).setup(model)
    x = torch.randn(19, 5, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad(), s.perturb(8, epoch=1) as pop:
        out = pop.batched_forward(model, x, member_ids=torch.arange(19, device=device) % 8)
        monkeypatch.setattr(drawn_mlp, "REGS_FMA_MAX_INPUTS", 0)
        monkeypatch.setattr(drawn_mlp, "REGS_FMA_MAX_OUTPUTS", 0)
        cores = pop.batched_forward(model, x, member_ids=torch.arange(19, device=device) % 8)
    assert not torch.equal(out, cores)  # another computation ...
    torch.testing.assert_close(out, cores, atol=1e-5, rtol=1e-5)  # ... to float32 rounding


def test_default_member_ids_and_row_order(device, monkeypatch):
    """Default ids map row j to member j; a permutation of rows permutes the output."""
    model = _net("narrow").to(device)
    s = EggrollStrategy(sigma=0.1, rank=2).setup(model)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)).to(device)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4], device=device)
    with torch.no_grad(), s.perturb(8) as pop:
        out = pop.batched_forward(model, x)
        shuffled = pop.batched_forward(model, x[perm], member_ids=perm)
        routed = _routed(pop, model, x, None, monkeypatch)
    torch.testing.assert_close(shuffled, out[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, routed, atol=1e-5, rtol=1e-5)


def test_the_fast_path_steps_aside(device, monkeypatch):
    """Gradients, hooks, unsupported modules, a Linear subclass with its own forward, an
    activation first, float64, a 3-D input or the plain-torch backend take the routed path
    (and still compute)."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    cases = {
        "hook": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        "gelu": nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)),
        "subclass": nn.Sequential(Scaled(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        "act first": nn.Sequential(nn.Tanh(), nn.Linear(4, 2)),
        "two acts": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 2)),
    }
    cases["hook"][0].register_forward_hook(lambda mod, inp, out: out)
    calls = _launches(monkeypatch)
    x = torch.randn(6, 4, device=device)
    for name, model in cases.items():
        model.to(device)
        s = EggrollStrategy(sigma=0.1, rank=1).setup(model)
        with torch.no_grad(), s.perturb(6) as pop:
            out = pop.batched_forward(model, x)
        assert out.shape == (6, 2), name
    assert calls == []
    model = _net("narrow").to(device)
    s = EggrollStrategy(sigma=0.1, rank=1).setup(model)
    with s.perturb(6) as pop:
        out = pop.batched_forward(model, x)  # gradients on: autograd needs the routed ops
        out.sum().backward()
        with torch.no_grad():
            strided = torch.randn(4, 6, device=device).t()  # any strides are fine
            torch.testing.assert_close(pop.batched_forward(model, strided),
                                       _routed(pop, model, strided, None, monkeypatch),
                                       atol=1e-5, rtol=1e-5)
            pop.batched_forward(model, x.unsqueeze(1), member_ids=torch.arange(6))  # 3-D input
    assert model[0].weight.grad is not None
    assert calls == [3]  # only the plain 2-D no-grad call was fused
    model = _net("narrow").to(device, torch.float64)
    s = EggrollStrategy(sigma=0.1, rank=1).setup(model)
    with torch.no_grad(), s.perturb(6) as pop:
        assert pop.batched_forward(model, x.double()).dtype == torch.float64
    assert calls == [3]
    model = _net("narrow").to(device)
    s = EggrollStrategy(sigma=0.1, rank=1, backend="torch").setup(model)
    with torch.no_grad(), s.perturb(6) as pop:  # the plain-torch backend never launches it
        torch.testing.assert_close(pop.batched_forward(model, x),
                                   _routed(pop, model, x, None, monkeypatch),
                                   atol=1e-5, rtol=1e-5)
    assert calls == [3]


def test_plan_recognises_plain_stacks():
    assert [a for _, a in fused_mlp.plan(_net("narrow"))] == [1, 2, 0]
    assert [a for _, a in fused_mlp.plan(_net("deep"))] == [1, 2, 1, 1, 0]
    assert fused_mlp.plan(nn.Sequential(nn.Tanh(), nn.Linear(2, 2))) is None
    assert fused_mlp.plan(nn.Linear(2, 2)) is not None
    assert fused_mlp.plan(nn.Sequential(nn.Linear(2, 2), nn.Dropout())) is None
    assert drawn_mlp.fits([4, 64, 2]) and not drawn_mlp.fits([4, 1024, 2])


def test_evotorch_network_strings_take_the_one_launch_path(device, monkeypatch):
    """EvoTorch's network strings build ``MultiLayered`` stacks: those of linear layers and
    the kernel's activations run in one launch and equal each member's network; a stack
    with another EvoTorch layer, or a ``MultiLayered`` subclass with its own forward, does
    not qualify."""
    from evotorch.neuroevolution.net import MultiLayered, str_to_net

    torch.manual_seed(3)
    model = str_to_net("Linear(4, 12) >> Tanh() >> Linear(12, 7) >> ReLU() >> Linear(7, 2)").to(device)
    assert isinstance(model, MultiLayered)
    assert [a for _, a in fused_mlp.plan(model)] == [1, 2, 0]
    assert fused_mlp.plan(str_to_net("Linear(4, 3) >> Tanh() >> Clip(-0.5, 0.5)")) is None

    class Doubled(MultiLayered):
        def forward(self, x, h=None):
            return 2 * super().forward(x, h)

    assert fused_mlp.plan(Doubled(nn.Linear(2, 2))) is None
    s = EggrollStrategy(sigma=0.3, rank=2, seed=5).setup(model)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4)).to(device)
    calls = _launches(monkeypatch)
    with torch.no_grad(), s.perturb(10) as pop:
        out = pop.batched_forward(model, x)
        want = torch.stack([model(x[k:k + 1])[0] for k in pop.iterate()])
    assert calls == [3]
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_model_without_evolved_parameters_is_refused(device):
    """A plain MLP that holds none of the strategy's parameters qualifies for the one-launch
    path by its shape, but is refused at the first call and at later ones."""
    model = _net("narrow").to(device)
    other = _net("narrow").to(device)
    s = EggrollStrategy(sigma=0.1, rank=1).setup(model)
    x = torch.randn(3, 4).to(device)
    with torch.no_grad(), s.perturb(6) as pop:
        with pytest.raises(RuntimeError, match="holds none of this strategy"):
            pop.batched_forward(other, x)
        pop.batched_forward(model, x)
        with pytest.raises(RuntimeError, match="holds none of this strategy"):
            pop.batched_forward(other, x)


def test_launch_lists_the_kernels_constexprs_in_signature_order():
    """The launcher passes each kernel's constexprs positionally, in the order of
    ``_MLP_CONSTEXPRS``/``_REGS_CONSTEXPRS``: those must be the constexpr parameters that
    end the kernel's signature, in that order (the in-register kernel's ``PDL`` after them,
    passed by keyword)."""
    import inspect

    for kernel, names in ((drawn_mlp._drawn_mlp_kernel, drawn_mlp._MLP_CONSTEXPRS),
                          (drawn_mlp._drawn_mlp_regs_kernel, drawn_mlp._REGS_CONSTEXPRS + ("PDL",))):
        params = list(inspect.signature(kernel.fn).parameters.values())
        constexprs = [p.name for p in params if "constexpr" in str(p.annotation)]
        assert tuple(constexprs) == names
        assert [p.name for p in params[-len(names):]] == constexprs


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("widths", [(3, 16, 5), (3, 70, 4), (3, 6, 6, 6, 6, 6)])
def test_the_kernels_argmax_is_torchs_argmax_of_its_outputs(device, widths):
    """``drawn_mlp(..., argmax=True)`` (in the in-register kernel's last step for narrow
    networks; after the launch for a wide or a deep one) equals ``torch.argmax(dim=1)`` of
    the kernel's own outputs, also on exact ties (the first wins), NaN outputs (the first
    NaN wins), +-inf outputs and rows that are all -inf."""
    gen = torch.Generator().manual_seed(0)
    n_out = widths[-1]
    rows = 97
    layers = []
    for i in range(len(widths) - 1):
        w = torch.randn(widths[i + 1], widths[i], generator=gen)
        b = torch.randn(widths[i + 1], generator=gen)
        last = i == len(widths) - 2
        if last:
            w[1] = w[n_out - 2]  # outputs 1 and n_out - 2 tie exactly
            b[1] = b[n_out - 2] = 4.0
            w[n_out - 1, 0], w[n_out - 1, 1] = float("inf"), float("-inf")  # inf or NaN
        layers.append(drawn_mlp.Layer(w.to(device), b.to(device), None, None,
                                      drawn_mlp.IDENTITY if last else drawn_mlp.TANH))
    x = torch.randn(rows, widths[0], generator=gen)
    x[5] = float("nan")
    x[6, 0] = float("inf")
    x = x.to(device)
    ids = torch.arange(rows, device=device)
    kw = dict(rank=1, scale=0.1, bias_scale=0.1, antithetic=False, precision="ieee")
    out = drawn_mlp.drawn_mlp(x, layers, ids, **kw)
    picked = drawn_mlp.drawn_mlp(x, layers, ids, argmax=True, **kw)
    assert picked.dtype == torch.int64 and picked.shape == (rows,)
    assert torch.equal(picked, out.argmax(dim=1))
    kinds = (out.isnan().any(1), out.isinf().any(1), out[:, 1] == out[:, n_out - 2])
    assert all(k.any() for k in kinds)  # the cases above occur
    # every output -inf
    last = layers[-1]
    layers[-1] = drawn_mlp.Layer(last.weight, torch.full_like(last.bias, float("-inf")),
                                 None, None, drawn_mlp.IDENTITY)
    out = drawn_mlp.drawn_mlp(x[:8], layers, ids[:8], **kw)
    picked = drawn_mlp.drawn_mlp(x[:8], layers, ids[:8], argmax=True, **kw)
    assert torch.equal(picked, out.argmax(dim=1))
    assert drawn_mlp.drawn_mlp(x[:0], layers, ids[:0], argmax=True, **kw).shape == (0,)


def test_batched_argmax_equals_the_argmax_of_batched_forward(device):
    """The context's argmax (what discrete-action rollouts use) equals ``argmax`` of
    ``batched_forward``, through the one-launch kernel and through the routed path."""
    model = _net("narrow").to(device)
    s = EggrollStrategy(sigma=0.2, rank=1, seed=5).setup(model)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(3)).to(device)
    ids = torch.arange(40, device=device).flip(0)
    with torch.no_grad(), s.perturb(40) as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
        picked, width = pop._batched_argmax(model, x, member_ids=ids)
        calls = []
        real = fused_mlp.try_forward
        fused_mlp.try_forward = lambda *a, **k: calls.append(1)
        try:
            routed, routed_width = pop._batched_argmax(model, x, member_ids=ids)
        finally:
            fused_mlp.try_forward = real
    assert calls and width == routed_width == 2
    assert torch.equal(picked, out.argmax(dim=1))
    assert torch.equal(routed, out.argmax(dim=1))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e30 squared
def test_the_kernels_tanh_is_accurate_to_a_millionth_over_its_whole_range(device):
    """The policy kernels' tanh (the hardware's exp2 and fast division on the GPU, the
    portable quotient under the interpreter) against float64 tanh: within 16 float32 ulps
    (1e-6 relative) from 1e-30 to saturation, odd, exact at 0, +-1 at +-inf, NaN for NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(x_ptr, y_ptr, n, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(y_ptr + i, drawn_mlp._tanh(x, LIBDEVICE), mask=i < n)

    mag = torch.cat([torch.logspace(-30, 1.3, 3001, dtype=torch.float64),
                     torch.linspace(0.2, 0.3, 1001, dtype=torch.float64)])
    x = torch.cat([mag, -mag, torch.tensor([0.0, 9.0, 10.0, 50.0, 1e30], dtype=torch.float64)])
    x32 = x.float().to(device)
    y = torch.empty_like(x32)
    libdevice = device.type == "cuda" and drawn_mlp._libdevice is not None
    n, block = x32.numel(), 1024
    tanh_kernel[(-(-n // block),)](x32, y, n, libdevice, block)
    want = torch.tanh(x32.double().cpu())
    torch.testing.assert_close(y.cpu().double(), want, rtol=16 * 2.0**-24, atol=0.0)
    assert torch.equal(y[mag.numel():2 * mag.numel()], -y[:mag.numel()])
    special = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device)
    out = torch.empty_like(special)
    tanh_kernel[(1,)](special, out, 3, libdevice, 16)
    assert out[0].item() == 1.0 and out[1].item() == -1.0 and out[2].isnan()


def test_noise_offsets_narrow_to_32_bits_only_while_every_block_allows_it(monkeypatch):
    """The in-register kernel computes its factor and bias-noise offsets in 32 bits
    (``OFF32``) unless a layer's block has 2**31 elements or more."""
    launches = []

    class Fake:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    monkeypatch.setattr(drawn_mlp, "_drawn_mlp_regs_kernel", Fake())
    w = torch.zeros(3, 2)
    small = (torch.zeros(4 * 5), 0)
    huge = (torch.zeros(1).expand(2**31), 0)
    ids = torch.arange(4)
    x = torch.zeros(4, 2)
    flag = drawn_mlp._REGS_CONSTEXPRS.index("OFF32") - len(drawn_mlp._REGS_CONSTEXPRS)
    for cache, bias_cache, want in ((small, None, True), (huge, None, False),
                                    (small, huge, False), (None, None, True)):
        layer = drawn_mlp.Layer(w, None, cache, bias_cache, drawn_mlp.TANH)
        drawn_mlp.drawn_mlp(x, [layer], ids, rank=1, scale=0.1, bias_scale=0.1,
                            antithetic=False, precision="ieee")
        assert launches[-1][flag] is want


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cartpole", "rl_mlp"])
def test_fused_forward_at_real_sizes(kind, monkeypatch):
    """CartPole and RL-MLP policies at thousands of members: equal to the routed path to
    float32 rounding; a row's output does not depend on the batch it came in; a CUDA graph
    that captured the call replays it bit-equal."""
    from evotorch_eggroll.rollout_benchmark import cartpole_policy, rl_mlp_policy

    torch.manual_seed(0)
    obs, act = (4, 2) if kind == "cartpole" else (17, 6)
    model = (cartpole_policy if kind == "cartpole" else rl_mlp_policy)(obs, act).cuda()
    s = EggrollStrategy(sigma=0.1, rank=1).setup(model)
    n = 16384
    x = torch.randn(n, obs, device="cuda")
    calls = _launches(monkeypatch)
    with torch.no_grad(), s.perturb(n) as pop:
        out = pop.batched_forward(model, x)
        head = pop.batched_forward(model, x[:2048], member_ids=torch.arange(2048, device="cuda"))
        routed = _routed(pop, model, x, None, monkeypatch)
        graph = torch.cuda.CUDAGraph()
        static = x.clone()
        with torch.cuda.graph(graph):
            captured = pop.batched_forward(model, static)
        static.copy_(torch.randn(n, obs, device="cuda"))
        graph.replay()
        want = pop.batched_forward(model, static)
    torch.cuda.synchronize()
    assert len(calls) == 4
    assert torch.equal(head, out[:2048])
    torch.testing.assert_close(out, routed, atol=2e-5, rtol=2e-5)
    assert torch.equal(captured, want)


@pytest.mark.gpu
def test_device_guard_makes_the_tensors_device_current():
    """The launch guard is a no-op on the current device and switches to (then back from)
    another one."""
    from evotorch_eggroll.kernels.philox import device_guard

    current = torch.cuda.current_device()
    with device_guard(torch.empty(1, device="cuda")):
        assert torch.cuda.current_device() == current
    for index in range(torch.cuda.device_count()):
        with device_guard(torch.empty(1, device=f"cuda:{index}")):
            assert torch.cuda.current_device() == index
        assert torch.cuda.current_device() == current
    with device_guard(torch.empty(1)):
        assert torch.cuda.current_device() == current


def test_dependent_launch_is_asked_for_on_compiled_cuda_launches_only(monkeypatch):
    """Programmatic dependent launch (the rollout kernels' ``PDL``) is never asked for on
    the CPU or in Triton's interpreter, whatever the device (the GPU tier checks that it
    changes no result where it is used)."""
    from evotorch_eggroll.kernels import compat

    assert compat.dependent_launch(torch.device("cpu")) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compat.dependent_launch(torch.device("cuda", 0)) == {}
