"""The benchmark command runs end to end, says which kind of time each column is, reports a
failed CUDA-graph capture (and fails for it), and its JAX baseline draws the noise ours
does. No timing is asserted: only that the numbers exist and how they are labelled."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from evotorch_eggroll import benchmark

TINY = ["--cases", "layer_r4_16rows", "--precisions", "fp32", "--reps", "1", "--warmup", "1"]


def test_help_documents_every_option_and_the_kinds_of_time(capsys):
    parser = benchmark.build_parser()
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "wall" in out and "device" in out and "synchronised start" in out
    for case in benchmark.default_cases() + benchmark.default_cases(small=True):
        assert case.name in out


def test_runs_end_to_end_at_tiny_size(capsys, tmp_path):
    """Without a GPU: the kernels through Triton's interpreter, no graphs. With one: graphs
    are captured, and a capture failure fails this test through the exit status."""
    csv_path = tmp_path / "bench.csv"
    assert benchmark.cli(TINY + ["--small", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "layer_r4_16rows" in out and "ours ms" in out and "Wall-clock" in out
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("case,precision,plain_ms,eggroll_ms")


def test_failed_graph_capture_is_printed_and_fails_the_command(monkeypatch, capsys):
    def refuse(fn):
        fn()  # the eager call still works; only the capture fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(benchmark, "graphs_available", lambda device: True)
    monkeypatch.setattr(benchmark, "capture_graph", refuse)
    assert benchmark.cli(TINY + ["--small"]) == 1
    captured = capsys.readouterr()
    reason = "RuntimeError: operation not permitted when stream is capturing"
    assert f"our graph capture failed: {reason}" in captured.out
    assert f"plain graph capture failed: {reason}" in captured.out
    assert "FAILED" in captured.out
    assert "graph capture failed: layer_r4_16rows fp32" in captured.err


def test_graph_failure_reaches_the_result(monkeypatch, device):
    monkeypatch.setattr(benchmark, "graphs_available", lambda d: True)
    monkeypatch.setattr(benchmark, "capture_graph", lambda fn: 1 / 0)
    case = benchmark.default_cases(small=True)[-1]
    res = benchmark.run_case(case, "fp32", device, warmup=1, reps=1, with_jax=False,
                             with_naive=False)
    assert res.graph_ms is None and res.graph_device_ms is None and res.graph_ratio is None
    assert res.graph_error.count("ZeroDivisionError: division by zero") == 2
    assert benchmark.capture_failures([res]) == [f"{case.name} fp32: {res.graph_error}"]


@pytest.mark.gpu
def test_every_tiny_case_is_captured_in_a_graph_on_the_gpu():
    results = benchmark.main(["--small", "--precisions", "fp32,bf16", "--reps", "2",
                              "--no-jax", "--no-naive"])
    assert len(results) == 2 * len(benchmark.default_cases(small=True))
    for r in results:
        assert r.graph_error is None, (r.case, r.precision, r.graph_error)
        for value in (r.plain_graph_ms, r.graph_ms, r.plain_graph_device_ms, r.graph_device_ms):
            assert value is not None and value > 0


def test_jax_baseline_draws_antithetic_low_rank_and_bias_noise():
    """Members 2k and 2k+1 share a draw with opposite signs (their outputs average to the
    plain forward), biases are perturbed by sigma * eps, and the weights' low-rank term has
    the scale sigma / sqrt(r) * |x| per output, as ours."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def run(x, epoch):
        return torch.tensor(jax.device_get(forward(x, epoch)).tolist(), dtype=torch.float64)[:, 0]
    n_in, n_out, rank, population, sigma = 6, 4, 3, 1024, 0.05
    case = benchmark.Case("layer", "layer", population, 1, rank, (n_in, n_out))
    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, n_out)
    forward = benchmark.jax_reference(model, case, "fp32", sigma)
    w, b = model.weight.detach().double(), model.bias.detach().double()

    zeros = jnp.zeros((population, 1, n_in), dtype=jnp.float32)
    bias_noise = run(zeros, 0) - b
    unit = torch.zeros(population, 1, n_in)
    unit[:, 0, 0] = 1.0  # |x| = 1
    out = run(jnp.asarray(unit.numpy()), 0)
    weight_noise = out - (unit[:, 0].double() @ w.T + b) - bias_noise

    for noise_term in (bias_noise, weight_noise):
        pairs = noise_term.view(population // 2, 2, n_out)
        torch.testing.assert_close(pairs[:, 0], -pairs[:, 1], atol=1e-6, rtol=0)
        assert not torch.allclose(pairs[0, 0], pairs[1, 0])  # pairs draw their own noise
        assert math.isclose(float(noise_term.std()), sigma, rel_tol=0.1)
    # another epoch, another draw
    again = run(zeros, 1) - b
    assert not torch.allclose(again, bias_noise)


def test_rollout_benchmark_runs_through_the_benchmark_command(capsys):
    """``--rollout`` hands over to the whole-generation RL benchmark; at tiny size every row
    has a rate, and on a GPU the CartPole rollout is captured and replayed (not silently
    stepped one by one)."""
    from evotorch_eggroll import rollout_benchmark

    cuda = torch.cuda.is_available()
    args = ["--rollout", "--populations", "64" if cuda else "4", "--steps", "12" if cuda else "2",
            "--generations", "1", "--jax-reps", "0"]
    assert benchmark.cli(args) == 0
    out = capsys.readouterr().out
    assert "eggroll M/s" in out and "plain graph" in out
    device = torch.device("cuda" if cuda else "cpu")
    rows = rollout_benchmark.run([64 if cuda else 4], ["cartpole", "rl_mlp"], 12 if cuda else 2, 1, 0,
                                 device)
    assert [r["task"] for r in rows] == ["cartpole", "rl_mlp"]
    for row in rows:
        assert row["rate"] > 0 and row["eager_rate"] > 0 and row["steps"] == (12 if cuda else 2)
        assert row["replayed"] == cuda
        assert ("graph_rate" in row) == cuda


def test_run_case_times_the_plain_torch_path_on_a_cpu():
    """``backend="torch"``: the strategy's plain-torch path, on any device (the performance
    notebook's CPU size)."""
    case = benchmark.default_cases(small=True)[0]
    res = benchmark.run_case(case, "fp32", torch.device("cpu"), warmup=1, reps=1,
                             with_jax=False, with_graph=False, backend="torch")
    assert res.case == case.name and res.graph_ms is None and res.jax_ms is None
    for value in (res.plain_ms, res.eggroll_ms, res.update_ms, res.naive_ms):
        assert value is not None and value > 0 and math.isfinite(value)


def test_lm_case_prints_population_tokens_per_second(capsys, tmp_path):
    """``--lm``: the character LM's batched forward beside its plain forward on the same
    tokens, one row per precision, with the tokens of the call and their rates."""
    csv_path = tmp_path / "lm.csv"
    assert benchmark.cli(["--lm", "--small", "--precisions", "fp32", "--reps", "1", "--warmup", "1",
                          "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    case = benchmark.lm_case(small=True)
    rows = [line.split() for line in out.splitlines() if line.startswith(case.name)]
    assert len(rows) == 2  # printed as it ran, then in the table
    assert "ours tok/s" in out and "pop.batched_forward" in out
    name, precision, tokens, plain_ms, ours_ms, ratio, plain_rate, ours_rate = rows[-1]
    assert (name, precision, int(tokens)) == (case.name, "fp32", case.tokens)
    assert float(plain_ms) > 0 and float(ours_ms) > 0
    assert float(ratio) == pytest.approx(float(ours_ms) / float(plain_ms), rel=0.02)
    assert float(ours_rate) == pytest.approx(case.tokens / float(ours_ms) * 1e3, rel=0.02)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("case,precision,tokens,plain_ms,eggroll_ms")


def test_lm_case_through_the_plain_torch_path_at_bf16():
    case = benchmark.lm_case(small=True)
    assert case.tokens == case.population * case.seqs_per_member * case.seq_len
    res = benchmark.run_lm_case(case, "bf16", torch.device("cpu"), warmup=1, reps=1, backend="torch")
    assert (res.case, res.precision, res.tokens) == (case.name, "bf16", case.tokens)
    for value in (res.plain_ms, res.eggroll_ms, res.plain_tokens_per_s, res.eggroll_tokens_per_s):
        assert value > 0 and math.isfinite(value)
    assert res.eggroll_tokens_per_s == pytest.approx(case.tokens / (res.eggroll_ms * 1e-3))
    with pytest.raises(ValueError, match="precision"):
        benchmark.run_lm_case(case, "fp16", torch.device("cpu"))
    with pytest.raises(SystemExit, match="--cases"):
        benchmark.main(["--lm", "--cases", "rl_mlp"])
