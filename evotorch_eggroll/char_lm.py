"""A character-level language model and the text it learns, generated here (no download).

Shared by ``examples/char_lm.py`` (training with EGGROLL), the benchmark's ``--lm`` case
and notebook 04:

* :func:`make_text`: sentences of a small seeded grammar (``<subject> <verb> <object>
  <ending>``), so that most characters follow from the ones before them: the text's
  unigram entropy (:func:`unigram_entropy_bits`, the loss of the best model that ignores
  context) is about 4 bits per character, while one character of context brings the
  conditional entropy near 2.3 bits and three characters near 0.4;
* :class:`CharVocab` and :func:`make_dataset`: characters to indices, and every window of
  the text as an input sequence with its next characters as targets;
* :class:`CharGPT`: a nanoGPT-shaped transformer (token and position embeddings, the
  positions as ``wpe(torch.arange(T))``; pre-norm blocks of causal self-attention through
  ``F.scaled_dot_product_attention`` and a GELU MLP; a final LayerNorm and a linear head),
  every op of which ``pop.batched_forward`` routes per row;
* :func:`sequence_loss` and :func:`sample`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["make_text", "unigram_entropy_bits", "CharVocab", "make_dataset", "CharGPT",
           "sequence_loss", "sample"]

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "a small bird", "the king"]
_VERBS = ["sees", "likes", "finds", "wants", "keeps", "hears"]
_OBJECTS = ["the red ball", "a green hat", "some bread", "the river", "a long song", "the moon"]
_ENDINGS = [".", ".", "!", " today.", " again."]


def make_text(num_chars: int = 4096, seed: int = 0) -> str:
    """``num_chars`` characters of sentences from a small grammar, deterministic in ``seed``:
    ``<subject> <verb> <object><ending>`` separated by single spaces."""
    if not isinstance(num_chars, int) or num_chars < 1:
        raise ValueError(f"num_chars must be a positive integer, got {num_chars!r}")
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < num_chars:
        sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                    f"{rng.choice(_ENDINGS)} ")
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:num_chars]


def unigram_entropy_bits(text: str) -> float:
    """Entropy of the text's character frequencies, in bits per character."""
    if not text:
        raise ValueError("the text is empty")
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


class CharVocab:
    """The characters of a text, each mapped to an index (in sorted order)."""

    def __init__(self, text: str) -> None:
        if not text:
            raise ValueError("the text is empty")
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        """The indices of ``s``'s characters, int64 ``(len(s),)``."""
        unknown = sorted(set(s) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown}")
        return torch.tensor([self.index[c] for c in s], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of the indices ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)


def make_dataset(text: str, vocab: CharVocab, seq_len: int) -> TensorDataset:
    """Every window of ``seq_len`` characters as input ``x (T,)``, with the characters one
    position later as target ``y (T,)``."""
    if not isinstance(seq_len, int) or not 1 <= seq_len < len(text):
        raise ValueError(f"seq_len must be an integer in [1, {len(text) - 1}] for a text of "
                         f"{len(text)} characters, got {seq_len!r}")
    data = vocab.encode(text)
    starts = torch.arange(0, data.numel() - seq_len)
    window = starts[:, None] + torch.arange(seq_len)  # (windows, T)
    return TensorDataset(data[window], data[window + 1])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, nh, T, hs)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class CharGPT(nn.Module):
    """Character transformer: ``idx (B, T)`` int64 -> logits ``(B, T, vocab_size)``.

    Linear and embedding weights start as N(0, ``init_std``²) and biases at zero; the head
    starts at zero, so the untrained model predicts the uniform distribution and the first
    generations of evolution can lower the loss through the head alone.
    """

    def __init__(self, vocab_size: int, block_size: int, d_model: int = 64, layers: int = 2,
                 heads: int = 4, init_std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size),
                            ("d_model", d_model), ("layers", layers), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList([Block(d_model, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} characters; the model's block size is {self.block_size}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)  # (T,): no batch dimension
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats: ``logits (B, T, V)``, ``targets (B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def sample(model: CharGPT, vocab: CharVocab, prompt: str, length: int, temperature: float = 0.0,
           seed: int = 0) -> str:
    """``prompt`` followed by ``length`` generated characters: the most likely one each time
    for ``temperature`` 0, otherwise drawn from the softmax at that temperature (seeded)."""
    if not prompt:
        raise ValueError("the prompt needs at least one character")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    idx = vocab.encode(prompt).to(device)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(length):
        logits = model(idx[:, -model.block_size:])[:, -1]  # (1, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    return vocab.decode(idx[0].tolist())
