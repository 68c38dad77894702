"""Hugging Face ``transformers`` causal LMs (GPT-2 and Llama configurations at tiny sizes,
random weights, nothing downloaded) under ``batched_forward``: every row's logits equal
those of its member evaluated alone (``pop.iterate()`` writes the member's weights into the
model; its plain forward is the reference), with several rows per member.

GPT-2 looks up its position embedding with ``position_ids = arange(T)[None]`` when none are
given: a batch-free input with a leading size-1 dimension, where ``batched_forward`` puts
the batch; the positions may also be given with the batch, ``arange(T).expand(B, T)``.
Llama's positions only feed its rotary embedding, which has no evolved parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evotorch_eggroll import EggrollStrategy

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-4, atol=1e-5)
VOCAB = 11


class Logits(nn.Module):
    """``input_ids (B, T)`` -> the causal LM's logits ``(B, T, vocab)``."""

    def __init__(self, lm: nn.Module, positions_with_the_batch: bool) -> None:
        super().__init__()
        self.lm = lm
        self.positions_with_the_batch = positions_with_the_batch

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = None
        if self.positions_with_the_batch:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        return self.lm(input_ids=input_ids, position_ids=pos).logits


def gpt2(attn: str, positions_with_the_batch: bool = False) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0,
                                     attn_implementation=attn)
    return Logits(transformers.GPT2LMHeadModel(config), positions_with_the_batch)


def llama(attn: str, positions_with_the_batch: bool = False) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return Logits(transformers.LlamaForCausalLM(config), positions_with_the_batch)


@pytest.mark.parametrize("factory,attn,rank,antithetic", [
    (gpt2, "eager", 2, True),
    (lambda attn: gpt2(attn, positions_with_the_batch=True), "sdpa", 1, False),
    (llama, "eager", 1, False),
    (lambda attn: llama(attn, positions_with_the_batch=True), "sdpa", 3, True),
], ids=["gpt2_eager", "gpt2_sdpa_positions_given", "llama_eager", "llama_sdpa_positions_given"])
def test_causal_lm_equals_member_by_member(device, factory, attn, rank, antithetic):
    torch.manual_seed(0)
    model = factory(attn).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (6, 5), generator=gen).to(device)
    ids = torch.tensor([0, 0, 3, 1, 3, 2], device=device)  # several rows per member, shuffled
    strategy = EggrollStrategy(sigma=0.3, rank=rank, antithetic=antithetic, seed=3).setup(model)
    with torch.no_grad(), strategy.perturb(4, epoch=1) as pop:
        out = pop.batched_forward(model, x, member_ids=ids)
        per_member = {k: model(x) for k in pop.iterate()}
        base = model(x)
    ref = torch.stack([per_member[k][j] for j, k in enumerate(ids.tolist())])
    assert out.shape == (6, 5, VOCAB)
    torch.testing.assert_close(out, ref, **TOL)
    assert (out - base).abs().max() > 1e-3  # the members are perturbed
    # every evolved parameter is perturbed: each member differs from the plain model
    for k, logits in per_member.items():
        assert (logits - base).abs().max() > 1e-3, k
