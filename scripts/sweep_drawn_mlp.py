"""Time the drawn-factor policy kernels on a GPU: the one-launch MLP under a grid of
launch configurations, against the per-layer path and the plain unperturbed policy.

    python scripts/sweep_drawn_mlp.py --populations 4096,65536 --tasks cartpole,rl_mlp
    python scripts/sweep_drawn_mlp.py --tasks cartpole --block-m 32 --warps 4 \
        --maxnreg 128 --precisions tf32x3 --fma 0:0,16:4

Prints microseconds per policy call (CUDA events around 50 calls of one CUDA graph) and
the best configuration per case.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from evotorch_eggroll import EggrollStrategy, fused_mlp
from evotorch_eggroll.kernels import drawn_mlp
from evotorch_eggroll.rollout_benchmark import cartpole_policy, rl_mlp_policy

TASKS = {"cartpole": (cartpole_policy, 4, 2), "rl_mlp": (rl_mlp_policy, 17, 6)}


def timed(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (3 * reps)


def main() -> None:
    try_forward = fused_mlp.try_forward
    parser = argparse.ArgumentParser()
    parser.add_argument("--populations", default="4096,65536,262144")
    parser.add_argument("--tasks", default="cartpole,rl_mlp")
    parser.add_argument("--block-m", default="16,32,64,128")
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--block-n", default="32,64")
    parser.add_argument("--block-k", default="16,32,64")
    parser.add_argument("--precisions", default="ieee,tf32x3")
    parser.add_argument("--maxnreg", default="0,128",
                        help="register caps of the in-register kernel at rank 1 (0: none)")
    parser.add_argument("--fma", default="16:4",
                        help="in-register kernel: INPUTS:OUTPUTS pairs, the most (padded) "
                             "inputs of a first layer and outputs of a layer that take "
                             "CUDA-core products (0:0: none)")
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]
    for task, n in itertools.product(args.tasks.split(","), ints(args.populations)):
        make, obs, act = TASKS[task]
        torch.manual_seed(0)
        model = make(obs, act).cuda()
        strategy = EggrollStrategy(sigma=0.1, rank=1)
        strategy.setup(model)
        x = torch.randn(n, obs, device="cuda")
        with torch.no_grad(), strategy.perturb(n) as pop:
            pop.cache_factors()
            plain = timed(lambda: model(x))
            fused_mlp.try_forward = lambda *a: None  # the routed path: one kernel per layer
            per_layer_out = pop.batched_forward(model, x)
            per_layer = timed(lambda: pop.batched_forward(model, x))
            fused_mlp.try_forward = try_forward
            results = []
            regs = max(obs, act, *(m.out_features for m in model if isinstance(m, nn.Linear))) \
                <= drawn_mlp.REGS_MAX_FEATURES
            # for the in-register kernel the BN column holds the register cap
            grid = (itertools.product(ints(args.block_m), ints(args.warps), ints(args.maxnreg),
                                      args.fma.split(","), args.precisions.split(",")) if regs else
                    itertools.product(ints(args.block_m), ints(args.warps), ints(args.block_n),
                                      ints(args.block_k), args.precisions.split(",")))
            for bm, w, bn, bk, prec in grid:
                if regs:
                    drawn_mlp.REGS_BLOCK_M, drawn_mlp.REGS_NUM_WARPS = bm, w
                    drawn_mlp.REGS_MAXNREG = bn or None
                    drawn_mlp.REGS_FMA_MAX_INPUTS, drawn_mlp.REGS_FMA_MAX_OUTPUTS = map(
                        int, bk.split(":"))
                else:
                    drawn_mlp.BLOCK_M = drawn_mlp.SMALL_BLOCK_M = bm
                    drawn_mlp.NUM_WARPS = w
                    drawn_mlp.BLOCK_N_MAX, drawn_mlp.BLOCK_K_MAX = bn, bk
                drawn_mlp.FLOAT32_PRECISION = prec
                try:
                    out = pop.batched_forward(model, x)
                    err = (out - per_layer_out).abs().max().item()
                    results.append((timed(lambda: pop.batched_forward(model, x)), bm, w, bn, bk,
                                    prec, err))
                except Exception as e:  # a configuration the compiler rejects
                    print(f"  BLOCK_M={bm} warps={w} BN={bn} BK={bk} {prec}: "
                          f"{type(e).__name__}: {e}"[:200])
            results.sort()
        for r in results[:5]:
            third = (f"maxnreg={r[3] or None} fma={r[4]}" if regs
                     else f"BN={r[3]} BK={r[4]}")
            print(f"{task:8s} N={n:7d} fused {r[0]:8.1f} us  BLOCK_M={r[1]} warps={r[2]} "
                  f"{third} {r[5]} max|diff|={r[6]:.2e}")
        print(f"{task:8s} N={n:7d} plain {plain:8.1f} us  per-layer {per_layer:8.1f} us  worst fused {results[-1][0]:.1f} us")


if __name__ == "__main__":
    main()
