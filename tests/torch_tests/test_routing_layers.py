"""batched_forward through transformer-style code: batch-free inputs (positions), weights
used by matmul/addmm, attention and recurrent layers. Every case is compared with
member-by-member evaluation (``pop.iterate()`` writes each member's weights; the model's
plain forward gives the reference), with low ranks, odd sizes and antithetic on and off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from evotorch_eggroll import EggrollStrategy, OpenESStrategy

TOL = dict(rtol=1e-4, atol=1e-5)


def seeded(factory):
    torch.manual_seed(0)
    return factory()


def by_iterate(pop, model, x, batch_dim=0):
    """Member k's output on row k of x (rows along ``batch_dim``), stacked the same way."""
    outs = []
    for k in pop.iterate():
        outs.append(model(x.narrow(batch_dim, k, 1)))
    return torch.cat(outs, dim=batch_dim)


def check(model, x, *, rank=2, antithetic=True, cls=EggrollStrategy, n=None, sigma=0.3,
          batch_dim=0, exclude=None):
    """batched_forward equals iterate, and the members differ from the base model."""
    kwargs = {"rank": rank} if cls is EggrollStrategy else {}
    s = cls(sigma=sigma, antithetic=antithetic, seed=3, **kwargs).setup(model, exclude=exclude)
    n = x.shape[batch_dim] if n is None else n
    with s.perturb(n, epoch=1) as pop:
        out = pop.batched_forward(model, x)
        ref = by_iterate(pop, model, x, batch_dim)
    torch.testing.assert_close(out, ref, **TOL)
    with torch.no_grad():
        base = model(x)
    assert (out - base).abs().max() > 1e-3
    return s, out


# -- a nanoGPT-style model ---------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.size()
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # re-assemble the heads
        return self.proj(y)


class TinyGPT(nn.Module):
    """Token + position embedding (``wpe(torch.arange(T))``), one pre-norm block, head."""

    def __init__(self, vocab: int = 7, c: int = 6, heads: int = 2, block: int = 5,
                 linear_positions: bool = False):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        # positions through an embedding, or one-hot positions through a linear layer
        self.wpe = nn.Linear(block, c) if linear_positions else nn.Embedding(block, c)
        self.block_size = block
        self.ln_1, self.ln_2, self.ln_f = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = CausalSelfAttention(c, heads)
        self.fc, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.lm_head = nn.Linear(c, vocab, bias=False)

    unsqueeze_positions = False  # GPT-2's arange(T)[None] instead of nanoGPT's arange(T)

    def forward(self, idx):  # (B, T) int64
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (T,)
        if self.unsqueeze_positions:
            pos = pos[None]  # (1, T)
        if isinstance(self.wpe, nn.Linear):
            pos_emb = self.wpe(F.one_hot(pos, self.block_size).float())  # (T, C)
        else:
            pos_emb = self.wpe(pos)  # (T, C)
        x = self.wte(idx) + pos_emb  # (B, T, C)
        x = x + self.attn(self.ln_1(x))
        x = x + self.fc2(F.gelu(self.fc(self.ln_2(x))))
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


@pytest.mark.parametrize("rank,antithetic,linear_positions", [
    (1, True, False), (3, False, False), (2, True, True)])
def test_nanogpt_style_model_equals_iterate(device, rank, antithetic, linear_positions):
    model = seeded(lambda: TinyGPT(linear_positions=linear_positions)).to(device)
    idx = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(1)).to(device)
    check(model, idx, rank=rank, antithetic=antithetic)


def test_nanogpt_style_model_under_openes(device):
    model = seeded(TinyGPT).to(device)
    idx = torch.randint(0, 7, (4, 2), generator=torch.Generator().manual_seed(1)).to(device)
    check(model, idx, cls=OpenESStrategy, sigma=0.1)


class BatchFree(nn.Module):
    """Evolved layers applied to inputs without the batch: the input only sets R."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(5, 3), nn.Linear(4, 3)

    def forward(self, x):  # (R, 1)
        tokens = torch.tensor([4, 0, 2], device=x.device)
        return self.emb(tokens), self.lin(torch.linspace(-1, 1, 4, device=x.device))


def test_batch_free_inputs_get_the_batch_dimension(device):
    model = seeded(BatchFree).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    x = torch.zeros(4, 1, device=device)
    with s.perturb(4) as pop:
        rows, vec = pop.batched_forward(model, x)
        for k in pop.iterate():
            want_rows, want_vec = model(x)
            torch.testing.assert_close(rows[k], want_rows, **TOL)
            torch.testing.assert_close(vec[k], want_vec, **TOL)
    assert rows.shape == (4, 3, 3) and vec.shape == (4, 3)
    assert (rows[0] - rows[1]).abs().max() > 1e-3


class Unsqueezed(TinyGPT):
    """GPT-2's positions: ``arange(T)[None]``, a batch-free input with a leading size-1
    dimension that broadcasts against the batch."""

    unsqueeze_positions = True


@pytest.mark.parametrize("linear_positions", [False, True])
def test_leading_size_one_batch_free_input_takes_the_batch_in_its_place(device, linear_positions):
    model = seeded(lambda: Unsqueezed(linear_positions=linear_positions)).to(device)
    idx = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(1)).to(device)
    _, out = check(model, idx, rank=2)
    assert out.shape == (4, 3, 7)  # (R, T, vocab): the batch took the size-1 dimension's place


def test_ambiguous_batch_free_inputs_are_errors(device):
    """``arange(T)`` with ``T == R`` looks batched: added to the ``(R, T, C)`` embeddings it
    would pair row j with position j."""
    model = seeded(TinyGPT).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model)
    idx = torch.zeros(4, 4, dtype=torch.long, device=device)  # T == R: arange(T) looks batched
    with s.perturb(4) as pop:
        with pytest.raises(RuntimeError, match="lands in different dimensions"):
            pop.batched_forward(model, idx)


# -- evolved weights in matmul / addmm ----------------------------------------------------------

class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear layer with its weight stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class MatmulForms(nn.Module):
    """One evolved weight ``w (out, in)`` and one ``u (in, out)``, used as ``form`` says."""

    def __init__(self, form: str, n_in: int = 5, n_out: int = 3):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.u = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):  # (B, T, n_in)
        f, w, u, b = self.form, self.w, self.u, self.b
        if f == "x@W.T":
            return torch.tanh(x @ w.T) + x @ u
        if f == "matmul_t":
            return torch.matmul(x, w.t()) + torch.matmul(x, u.mT.transpose(0, 1))
        if f == "mm":
            flat = x.reshape(-1, x.shape[-1])  # (B*T, n_in)
            return (torch.mm(flat, u) + flat.mm(w.transpose(1, 0))).view(*x.shape[:-1], -1)
        if f == "rmatmul":
            return w.T.__rmatmul__(x) + u.__rmatmul__(x)
        if f == "addmm":
            flat = x.reshape(-1, x.shape[-1])
            y = torch.addmm(b, flat, w.t()) + b.addmm(flat, u, beta=0.5, alpha=2.0)
            return y.view(*x.shape[:-1], -1)
        if f == "batch_second":  # (T, B, n): the batch in dim 1
            return (x.transpose(0, 1) @ u + b).transpose(0, 1)
        raise ValueError(f)


@pytest.mark.parametrize("form", ["x@W.T", "matmul_t", "mm", "rmatmul", "addmm", "batch_second"])
@pytest.mark.parametrize("rank,antithetic", [(1, True), (3, False)])
def test_matmul_forms_equal_iterate(device, form, rank, antithetic):
    model = seeded(lambda: MatmulForms(form)).to(device)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)).to(device)
    exclude = ["b"] if form in ("x@W.T", "matmul_t", "mm", "rmatmul") else \
        ["w"] if form == "batch_second" else None
    check(model, x, rank=rank, antithetic=antithetic, exclude=exclude)


@pytest.mark.parametrize("form", ["x@W.T", "addmm"])
def test_matmul_forms_under_openes(device, form):
    model = seeded(lambda: MatmulForms(form)).to(device)
    x = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(2)).to(device)
    check(model, x, cls=OpenESStrategy, sigma=0.1, exclude=None if form == "addmm" else ["b"])


class GPT2Block(nn.Module):
    """Hugging Face GPT-2's attention and MLP layout: Conv1D projections (weights (in, out))."""

    def __init__(self, c: int = 6, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = Conv1D(3 * c, c), Conv1D(c, c)
        self.c_fc, self.c_fc_proj = Conv1D(2 * c, c), Conv1D(c, 2 * c)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).permute(0, 2, 1, 3) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.c_fc_proj(F.gelu(self.c_fc(self.ln_2(x))))


@pytest.mark.parametrize("rank,antithetic", [(2, True), (1, False)])
def test_gpt2_conv1d_block_equals_iterate(device, rank, antithetic):
    model = seeded(GPT2Block).to(device)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3)).to(device)
    check(model, x, rank=rank, antithetic=antithetic)


def test_a_step_after_batched_forward_is_the_step_after_iterate(device):
    """The fitnesses of both evaluations agree, so both strategies take the same step: the
    forward perturbs each weight exactly as the update regenerates it."""
    models = [seeded(GPT2Block).to(device) for _ in range(2)]
    x = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(3)).to(device)
    target = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(4)).to(device)
    strategies = [EggrollStrategy(sigma=0.2, lr=0.1, rank=2, optimizer="sgd", seed=5,
                                  fitness_transform="centered_rank").setup(m) for m in models]
    fitness = []
    for i, (s, m) in enumerate(zip(strategies, models)):
        with torch.no_grad(), s.perturb(4) as pop:
            out = pop.batched_forward(m, x) if i == 0 else by_iterate(pop, m, x)
        fitness.append(-((out - target) ** 2).mean(dim=(1, 2)))
        s.step(fitness[-1])
    torch.testing.assert_close(fitness[0], fitness[1], **TOL)
    assert torch.equal(fitness[0].argsort(), fitness[1].argsort())
    for (name, p0), p1 in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p0, p1), name
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(),
                                                     seeded(GPT2Block).to(device).parameters()))


@pytest.mark.parametrize("form,match", [
    ("left", "on the left"),
    ("both", "on the left"),
    ("view_elsewhere", "'w'"),
    ("conv_weight_matmul", "'conv.weight'"),
])
def test_other_matmul_uses_are_errors(device, form, match):
    class Misuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))
            self.conv = nn.Conv1d(3, 3, 1)

        def forward(self, x):  # (B, 3)
            if form == "left":
                return (self.w @ x.T).T
            if form == "both":
                return x @ (self.w @ self.w.T)
            if form == "view_elsewhere":
                return x * self.w.T.sum(0)
            return x @ self.conv.weight.squeeze(-1)

    model = seeded(Misuse).to(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError, match=match):
            pop.batched_forward(model, torch.randn(2, 3, device=device))


# -- attention modules ------------------------------------------------------------------------

class Attention(nn.Module):
    """nn.MultiheadAttention under the options ``case`` names; input (B, T, 6)."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        extra = {}
        if case == "cross_kdim":
            extra = dict(kdim=4, vdim=3)
        if case == "bias_kv_zero_attn":
            extra = dict(add_bias_kv=True, add_zero_attn=True)
        self.batch_first = case != "batch_second"
        self.attn = nn.MultiheadAttention(6, 2, batch_first=self.batch_first, **extra)
        self.mem = nn.Linear(6, 6)

    def forward(self, x):  # (B, T, 6)
        c = self.case
        if c == "batch_second":
            h = x.transpose(0, 1)  # (T, B, 6)
            out, w = self.attn(h, h, h)
            return torch.cat([out.transpose(0, 1), w], dim=-1)
        if c == "self_no_weights":
            return self.attn(x, x, x, need_weights=False)[0]
        if c == "cross_kdim":
            out, w = self.attn(x, x[..., :4], x[..., 3:], average_attn_weights=False)
            return torch.cat([out, w.transpose(1, 2).flatten(2)], dim=-1)  # (B, T, 6 + H*T)
        if c == "key_value_shared":
            mem = torch.tanh(self.mem(x))
            return self.attn(x, mem, mem, need_weights=False)[0]
        t = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        kpm = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        kpm[:, -1] = x[:, -1, 0] > 0  # per-row padding of the last position
        if c == "bias_kv_zero_attn":
            return self.attn(x, x, x, key_padding_mask=kpm, attn_mask=causal)[0]
        if c == "masks_causal":
            return self.attn(x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True,
                             need_weights=False)[0]
        if c == "causal_only":
            return self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        raise ValueError(c)


@pytest.mark.parametrize("case", ["batch_second", "self_no_weights", "cross_kdim",
                                  "key_value_shared", "bias_kv_zero_attn", "masks_causal",
                                  "causal_only"])
@pytest.mark.parametrize("grad_mode", ["train", "eval_no_grad"])
def test_multihead_attention_equals_iterate(device, case, grad_mode):
    model = seeded(lambda: Attention(case)).to(device)
    exclude = None if case == "key_value_shared" else ["mem.weight", "mem.bias"]
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(5)).to(device)
    if grad_mode == "train":
        check(model, x, rank=2, antithetic=case != "cross_kdim", exclude=exclude)
    else:
        model.eval()
        with torch.no_grad():  # the conditions of PyTorch's fused fast path
            check(model, x, rank=1, exclude=exclude)


class Encoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0,
                                           batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first)
        self.batch_first = batch_first

    def forward(self, x):  # (B, T, 6)
        kpm = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        kpm[:, -1] = x[:, -1, 0] > 0
        if self.batch_first:
            return self.enc(x, src_key_padding_mask=kpm)
        return self.enc(x.transpose(0, 1), src_key_padding_mask=kpm).transpose(0, 1)


@pytest.mark.parametrize("batch_first,norm_first,layers", [(True, False, 2), (False, True, 1)])
@pytest.mark.parametrize("grad_mode", ["train", "eval_no_grad"])
def test_transformer_encoder_equals_iterate(device, batch_first, norm_first, layers, grad_mode):
    model = seeded(lambda: Encoder(batch_first, norm_first, layers)).to(device)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(6)).to(device)
    if grad_mode == "train":
        check(model, x, rank=2, antithetic=False)
        return
    model.eval()
    s = EggrollStrategy(sigma=0.3, rank=3, seed=3).setup(model)
    with torch.no_grad(), s.perturb(4) as pop:
        out = pop.batched_forward(model, x)
        ref = by_iterate(pop, model, x)
    kept = ~(x[:, -1, 0] > 0)  # rows without a padded position
    assert 0 < int(kept.sum()) < 4
    torch.testing.assert_close(out[kept], ref[kept], **TOL)
    # PyTorch's nested-tensor fast path (taken by the plain model here) returns zeros at
    # padded positions; batched_forward computes them as the regular path does
    torch.testing.assert_close(out[:, :-1], ref[:, :-1], **TOL)
    if batch_first:
        assert torch.all(ref[~kept, -1] == 0)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(6, 2, dim_feedforward=8, dropout=0.0,
                                              batch_first=True)
        self.mem = nn.Linear(6, 6)

    def forward(self, x):  # (B, T, 6)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.dec(x, torch.tanh(self.mem(x)), tgt_mask=causal, tgt_is_causal=True)


@pytest.mark.parametrize("grad_mode", ["train", "eval_no_grad"])
def test_transformer_decoder_layer_equals_iterate(device, grad_mode):
    model = seeded(Decoder).to(device)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(7)).to(device)
    if grad_mode == "train":
        check(model, x, rank=2)
    else:
        model.eval()
        with torch.no_grad():
            check(model, x, rank=1, antithetic=False)


def test_attention_modules_are_accepted_at_setup(device):
    for module in (nn.MultiheadAttention(4, 2), nn.TransformerEncoderLayer(4, 2, 8),
                   nn.TransformerDecoderLayer(4, 2, 8)):
        names = [n for n, _ in EggrollStrategy().setup(module.to(device)).named_parameters()]
        assert names == [n for n, _ in module.named_parameters()]


# -- recurrent layers ---------------------------------------------------------------------------

class Recurrent(nn.Module):
    """nn.RNN/GRU/LSTM on a (B, T, 3) input, with the options given; returns output and the
    final states (batch first)."""

    def __init__(self, cls, batch_first=True, layers=1, bidirectional=False, bias=True,
                 initial=False, **extra):
        super().__init__()
        self.rnn = cls(3, 4, num_layers=layers, bidirectional=bidirectional, bias=bias,
                       batch_first=batch_first, **extra)
        self.batch_first, self.initial = batch_first, initial
        self.lstm = cls is nn.LSTM
        self.h0 = nn.Linear(3, 4 * layers * (2 if bidirectional else 1)) if initial else None

    def forward(self, x):  # (B, T, 3)
        hx = None
        if self.initial:  # initial states computed per row: (layers * dirs, B, 4)
            h = torch.tanh(self.h0(x[:, 0])).view(x.shape[0], -1, 4).transpose(0, 1)
            hx = (h.contiguous(), -h) if self.lstm else h.contiguous()
        seq = x if self.batch_first else x.transpose(0, 1)
        out, state = self.rnn(seq, hx)
        out = out if self.batch_first else out.transpose(0, 1)
        states = state if self.lstm else (state,)
        return torch.cat([out.flatten(1)] + [s.transpose(0, 1).flatten(1) for s in states], 1)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("options", [
    dict(),
    dict(batch_first=False, layers=2, initial=True),
    dict(bidirectional=True, bias=False),
    dict(batch_first=False, bidirectional=True, layers=2, initial=True),
])
def test_recurrent_layers_equal_iterate(device, cls, options):
    model = seeded(lambda: Recurrent(cls, **options)).to(device)
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(8)).to(device)
    check(model, x, rank=1 + len(options) % 3, antithetic=len(options) != 3)


def test_relu_rnn_with_dropout_in_eval_mode_equals_iterate(device):
    model = seeded(lambda: Recurrent(nn.RNN, layers=2, nonlinearity="relu", dropout=0.5))
    model = model.to(device).eval()
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        check(model, x, rank=2)


class Cells(nn.Module):
    """The three cells unrolled over the steps of a (B, T, 3) input."""

    def __init__(self, bias=True):
        super().__init__()
        self.rnn = nn.RNNCell(3, 4, bias=bias, nonlinearity="tanh")
        self.gru = nn.GRUCell(3, 4, bias=bias)
        self.lstm = nn.LSTMCell(3, 4, bias=bias)

    def forward(self, x):
        h1 = h2 = None
        state = None
        for t in range(x.shape[1]):
            h1 = self.rnn(x[:, t], h1)
            h2 = self.gru(x[:, t], h2)
            state = self.lstm(x[:, t], state)
        return torch.cat([h1, h2, *state], dim=1)


@pytest.mark.parametrize("bias,rank,antithetic", [(True, 2, True), (False, 3, False)])
def test_recurrent_cells_equal_iterate(device, bias, rank, antithetic):
    model = seeded(lambda: Cells(bias)).to(device)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(10)).to(device)
    check(model, x, rank=rank, antithetic=antithetic)


def test_recurrent_layers_under_openes(device):
    model = seeded(lambda: Recurrent(nn.GRU, layers=2)).to(device)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(11)).to(device)
    check(model, x, cls=OpenESStrategy, sigma=0.1)


def test_recurrent_modules_are_accepted_at_setup(device):
    for module in (nn.RNN(3, 4), nn.GRU(3, 4, 2), nn.LSTM(3, 4, bidirectional=True),
                   nn.RNNCell(3, 4), nn.GRUCell(3, 4), nn.LSTMCell(3, 4)):
        names = [n for n, _ in EggrollStrategy().setup(module.to(device)).named_parameters()]
        assert names == [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("case,match", [
    ("packed", "PackedSequence"),
    ("train_dropout", "dropout"),
    ("unbatched", "unbatched"),
])
def test_recurrent_uses_not_perturbed_are_errors(device, case, match):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, num_layers=2, dropout=0.5 if case == "train_dropout" else 0.0,
                              batch_first=True)

        def forward(self, x):  # (B, T, 3)
            if case == "packed":
                lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
                packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
                return nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0]
            if case == "unbatched":
                return self.rnn(torch.ones(2, 3, device=x.device))[0] + x.sum()
            return self.rnn(x)[0]

    model = seeded(Bad).to(device)
    s = EggrollStrategy().setup(model)
    with s.perturb(2) as pop:
        with pytest.raises(RuntimeError, match=match):
            pop.batched_forward(model, torch.randn(2, 3, 3, device=device))
    with pytest.raises(ValueError, match="proj_size"):
        EggrollStrategy().setup(nn.LSTM(3, 4, proj_size=2).to(device))


@pytest.mark.parametrize("factory", [TinyGPT, GPT2Block,
                                     lambda: Recurrent(nn.LSTM, batch_first=False),
                                     lambda: Attention("batch_second")])
def test_member_ids_map_rows_to_members_through_the_new_routes(device, factory):
    model = seeded(factory).to(device)
    s = EggrollStrategy(sigma=0.3, rank=2).setup(model, exclude=[
        n for n, _ in model.named_parameters() if n.startswith("mem.")])
    gen = torch.Generator().manual_seed(12)
    if isinstance(model, TinyGPT):
        x = torch.randint(0, 7, (5, 3), generator=gen)
    else:
        x = torch.randn(5, 3, 3 if isinstance(model, Recurrent) else 6, generator=gen)
    x = x.to(device)
    ids = torch.tensor([3, 3, 0, 1, 3], device=device)
    with s.perturb(4) as pop:
        mapped = pop.batched_forward(model, x, member_ids=ids)
        per_member = {k: model(x) for k in pop.iterate()}
    for j, k in enumerate(ids.tolist()):
        torch.testing.assert_close(mapped[j], per_member[k][j], **TOL)
