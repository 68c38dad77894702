"""The character-level LM example (examples/char_lm.py): EGGROLL takes the loss of the
nanoGPT-shaped model clearly below the unigram entropy of the generated text, and the
trained center generates text. On the CPU at the example's CPU size through the plain-torch
path (the test suite runs Triton's interpreter, under which ``backend="auto"`` would pick
the kernels); on a GPU at population 16384 through the kernels."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from evotorch_eggroll import char_lm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "char_lm.py"
MARGIN_BITS = 0.5  # how far below the unigram entropy the center's loss must end


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("char_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_learned(out: dict) -> None:
    entropy = out["entropy"]
    first_center, last_center = out["history"][0][2], out["history"][-1][2]
    assert math.isfinite(last_center)
    assert last_center < entropy - MARGIN_BITS, (last_center, entropy, out["history"])
    assert last_center < first_center
    text = out["sample"]
    assert text.startswith("the ") and len(text) == 4 + 40
    assert set(text) <= set(out["vocab"].chars)


def test_cpu_size_learns_below_the_unigram_entropy_and_samples(example, capsys):
    threads = torch.get_num_threads()
    try:
        out = example.main(["--device", "cpu", "--backend", "torch", "--sample-chars", "40"])
    finally:
        torch.set_num_threads(threads)  # the example keeps the CPU to one thread
    args = example.parse_args(["--device", "cpu"])
    assert (args.popsize, args.generations, args.d_model, args.sigma) == (512, 60, 16, 0.05)
    assert out["history"][-1][0] == 60 and out["seconds"] > 0
    check_learned(out)
    printed = capsys.readouterr().out
    assert "unigram entropy" in printed and out["sample"] in printed


@pytest.mark.gpu
def test_gpu_population_16384_learns_below_the_unigram_entropy(example):
    args = example.parse_args(["--device", "cuda"])
    assert args.popsize == 16384  # the GPU default
    # the CPU size's model and settings with the GPU's population
    out = example.main(["--device", "cuda", "--generations", "60", "--seq-len", "8",
                        "--d-model", "16", "--layers", "1", "--batch-size", "8", "--sigma", "0.05",
                        "--lr", "0.03", "--sample-chars", "40"])
    assert out["searcher"].popsize == 16384
    check_learned(out)


def test_text_and_dataset():
    text = char_lm.make_text(500, seed=3)
    assert len(text) == 500 and text == char_lm.make_text(500, seed=3)
    assert text != char_lm.make_text(500, seed=4)
    vocab = char_lm.CharVocab(text)
    assert vocab.decode(vocab.encode(text)) == text
    x, y = char_lm.make_dataset(text, vocab, 8).tensors
    assert x.shape == y.shape == (500 - 8, 8)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    entropy = char_lm.unigram_entropy_bits(text)
    assert 0 < entropy < math.log2(len(vocab))
    assert char_lm.unigram_entropy_bits("abab") == pytest.approx(1.0)


def test_untrained_model_predicts_uniformly_and_validates_its_input():
    model = char_lm.CharGPT(5, 4, d_model=8, layers=1, heads=2)
    idx = torch.randint(0, 5, (3, 4))
    with torch.no_grad():
        loss = char_lm.sequence_loss(model(idx), idx)
    assert float(loss) == pytest.approx(math.log(5), abs=1e-6)  # the head starts at zero
    with pytest.raises(ValueError, match="block size"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        char_lm.CharGPT(5, 4, d_model=6, heads=4)


@pytest.mark.parametrize("call,match", [
    (lambda: char_lm.make_text(0), "num_chars"),
    (lambda: char_lm.CharVocab("ab").encode("abc"), "not in the vocabulary"),
    (lambda: char_lm.make_dataset("abc", char_lm.CharVocab("abc"), 3), "seq_len"),
    (lambda: char_lm.unigram_entropy_bits(""), "empty"),
])
def test_bad_inputs_are_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_command_lines_are_errors(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--popsize", "0"])
    with pytest.raises(SystemExit):
        example.parse_args(["--backend", "cuda"])
    with pytest.raises(SystemExit):
        example.parse_args(["--sigma", "0"])
