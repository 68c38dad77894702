"""Compile the factor kernels for sm_90 without a GPU and summarise their SASS.

Run (no TRITON_INTERPRET): ``.venv/bin/python scripts/sm90_compile_check.py [--sass DIR]``.
Compiles the project/expand kernels at the constexpr configurations their launchers pick
for the benchmark shapes (4096 x 4096 at r = 1/4/16, the RL MLP 17->256->256->6 at r = 4)
in fp32 and bf16, and every other kernel (dense noise and its update, the update's factor
matrices, the normal block, the Philox words) at its launcher's configuration, the
drawn-factor variant (``_drawn``) of each project/expand configuration, the one-launch
narrow-layer kernel at the rollout benchmark's layer shapes, the one-launch MLP kernels
(in registers and through scratch, their integer arguments specialised as Triton's
launcher specialises them at run time) and the environment kernels of a rollout step, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and the launch options
of ``evotorch_eggroll.kernels.compat``, and prints per configuration: SASS instructions,
registers, local memory (spill/stack), shared memory, barriers (BAR), warp shuffles (SHFL),
shared loads/stores (LDS/STS), local loads/stores (LDL/STL). Fails (exit 1) if any
configuration does not compile.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from evotorch_eggroll.kernels import cartpole as cp  # noqa: E402
from evotorch_eggroll.kernels import dense_noise as dn  # noqa: E402
from evotorch_eggroll.kernels import drawn_linear as dl  # noqa: E402
from evotorch_eggroll.kernels import drawn_mlp as dm  # noqa: E402
from evotorch_eggroll.kernels import episode_step as es  # noqa: E402
from evotorch_eggroll.kernels import lowrank_expand as ex  # noqa: E402
from evotorch_eggroll.kernels import lowrank_project as pr  # noqa: E402
from evotorch_eggroll.kernels import lowrank_update as up  # noqa: E402
from evotorch_eggroll.kernels import normal_block as nb  # noqa: E402
from evotorch_eggroll.kernels import philox as ph  # noqa: E402
from evotorch_eggroll.kernels.compat import LAUNCH_OPTIONS  # noqa: E402
from evotorch_eggroll.kernels.philox import bias_tile_plan, row_tile_plan  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "*fp32", "bf16": "*bf16"}
# The drawn-factor cache arguments of the project/expand kernels.
CACHE_SIG = dict(cache_ptr="*fp32", cache_base="i32", cache_rows="i32")


def _compile(fn, signature: dict, constexprs: dict, options: dict, ints: dict | None = None):
    """sm_90 build of ``fn``. ``ints``: representative run-time values of integer arguments,
    specialised as Triton's launcher specialises them (a value of 1 becomes a constant, a
    nonzero multiple of 16 is marked divisible by 16); other integers stay generic."""
    ints = ints or {}
    # constexprs left out take their defaults, as at a launch that does not pass them
    defaults = {p.name: p.default for p in inspect.signature(fn.fn).parameters.values()
                if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}
    constexprs = dict(defaults, **constexprs, **{n: 1 for n, v in ints.items() if v == 1})
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    names = list(fn.arg_names)
    sig = {n: sig[n] for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    # pointers 16-byte aligned, as torch allocations are
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if (isinstance(sig[n], str) and sig[n].startswith("*"))
             or (sig[n] != "constexpr" and ints.get(n, 0) and ints[n] % 16 == 0)}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET,
                          options={**LAUNCH_OPTIONS, **options})


def _sass_summary(cubin: bytes, dump_to: str | None, label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], check=True,
                              capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                             check=True, capture_output=True, text=True).stdout
    if dump_to:
        os.makedirs(dump_to, exist_ok=True)
        with open(os.path.join(dump_to, label + ".sass"), "w") as f:
            f.write(sass)
    instrs = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    ops = [re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", ln).split()[0] for ln in instrs]

    def count(prefix):
        return sum(1 for o in ops if o.startswith(prefix))

    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    shared = re.search(r"SHARED:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    return dict(instrs=len(ops), regs=int(reg.group(1)) if reg else -1,
                stack=int(stack.group(1)) if stack else -1,
                local=int(local.group(1)) if local else -1,
                shared=int(shared.group(1)) if shared else -1,
                bar=count("BAR"), shfl=count("SHFL"), lds=count("LDS"), sts=count("STS"),
                ldl=count("LDL"), stl=count("STL"), mufu=count("MUFU"))


def project_configs():
    # (label, D, rank, row_offset, block_rows)
    for r in (1, 4, 16):
        for off, what in ((0, "fwd"), (4096, "bwd")):
            for br in (4, 16):
                yield f"4096_r{r}_{what}_br{br}", 4096, r, off, br
    for n, m in ((17, 256), (256, 256), (256, 6)):
        for off, d, what in ((0, n, "fwd"), (n, m, "bwd")):
            yield f"rl{n}x{m}_r4_{what}_br16", d, 4, off, 16


def expand_configs():
    # (label, D, rank, row_offset, block_rows, has_bias)
    for r in (1, 4, 16):
        for off, d, what, bias in ((4096, 4096, "fwd", True), (0, 4096, "bwd", False)):
            for br in (4, 16):
                yield f"4096_r{r}_{what}_br{br}", d, r, off, br, bias
    for n, m in ((17, 256), (256, 256), (256, 6)):
        for off, d, what, bias in ((n, m, "fwd", True), (0, n, "bwd", False)):
            yield f"rl{n}x{m}_r4_{what}_br16", d, 4, off, 16, bias


def other_rows():
    """The remaining kernels, one configuration each (fp32, plus bf16 where the output dtype
    follows the parameter's): ``(label, plan, signature, constexprs, kernel, options)``, the
    options those a launcher passes (``num_warps``, ...)."""
    seeds = dict(seed_lo="i64", seed_hi="i64", key="i64", epoch="i64")
    for dname, ptr in DTYPES.items():
        sig = dict(out_ptr=ptr, ids_ptr="*i64", n_rows="i32", D="i32", stride_om="i32",
                   stride_od="i32", stride_ids="i32", **seeds, scale="fp32")
        yield (f"dense_add_{dname}_br16", None, sig,
               dict(BLOCK_E=dn.BLOCK_E, BLOCK_ROWS=16, ANTITHETIC=True),
               dn._dense_noise_add_kernel, dict(num_warps=dn.NUM_WARPS))
        sig = dict(idx_ptr="*i64", coef_ptr="*fp32", a_ptr=ptr, b_ptr=ptr, m="i32", n="i32",
                   stride_am="i32", stride_bn="i32", **seeds)
        yield (f"factors_{dname}_r4", None, sig, dict(R=4, BLOCK_E=up.BLOCK_E),
               up._factor_matrices_kernel, dict(num_warps=up.NUM_WARPS))
    sig = dict(idx_ptr="*i64", coef_ptr="*fp32", partial_ptr="*fp32", K="i32",
               k_per_split="i32", numel="i32", **seeds)
    yield ("dense_update_fp32", None, sig, dict(BLOCK_E=dn.BLOCK_E), dn._dense_update_kernel,
           dict(num_warps=dn.NUM_WARPS))
    sig = dict(idx_ptr="*i64", out_ptr="*fp32", numel="i32", first_quad="i64", **seeds)
    yield ("normal_block_fp32", None, sig, dict(BLOCK_E=nb.BLOCK_E), nb._normal_block_kernel,
           dict(num_warps=4))
    sig = dict(idx_ptr="*i64", out_ptr="*i64", numel="i32", first_quad="i64", **seeds)
    yield ("philox_words", None, sig, dict(BLOCK_Q=64), ph._philox_words_kernel,
           dict(num_warps=4))
    yield from drawn_mlp_rows()
    yield from environment_rows()


def _drawn_mlp_signature(fn, constexprs: dict) -> dict:
    """Argument types of a drawn-MLP kernel: layer slots ``w/b/f/e0..3`` and the input,
    output and scratch buffers are float32 pointers, the ids int64, scales float32."""
    ptrs = {"x_ptr", "out_ptr", "s0_ptr", "s1_ptr"} | {f"{p}{i}" for p in "wbfe"
                                                         for i in range(dm.MAX_LAYERS)}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        sig[name] = ("*i64" if name == "ids_ptr" else "*fp32" if name in ptrs
                     else "fp32" if name in ("scale", "bias_scale") else "i32")
    return sig


def drawn_mlp_rows():
    """The one-launch MLP kernels at the launcher's configuration for the rollout policies:
    4 -> 64 -> 64 -> 2 in registers (rank 1, with the action's argmax, as a CartPole rollout
    launches it, and rank 4) and 17 -> 256 -> 256 -> 6 through scratch (rank 4), Tanh between
    the layers, every layer with bias, factors and bias noise, the integer arguments
    specialised for contiguous inputs and 65,536 rows."""
    for widths, rank, argmax in (((4, 64, 64, 2), 1, True), ((4, 64, 64, 2), 4, False),
                                 ((17, 256, 256, 6), 4, False)):
        layers = len(widths) - 1
        flags = tuple((used, used, used, dm.TANH if used and i < layers - 1 else dm.IDENTITY)
                      for i in range(dm.MAX_LAYERS) for used in [i < layers])
        dims = tuple(widths) + (1,) * (dm.MAX_LAYERS + 1 - len(widths))
        label = "drawn_mlp_fp32_" + "x".join(map(str, widths)) + f"_r{rank}"
        # the launcher's own configuration (float32 products, the device's tanh, a large
        # batch, 32-bit noise offsets)
        values, _, options, regs = dm._config(dims, flags, layers, rank, True, "ieee", True,
                                              False, True, argmax)
        names = dm._REGS_CONSTEXPRS if regs else dm._MLP_CONSTEXPRS
        const = dict(zip(names, values))
        fn = dm._drawn_mlp_regs_kernel if regs else dm._drawn_mlp_kernel
        ints = dict(stride_xm=widths[0], stride_xk=1, stride_om=widths[-1], stride_on=1,
                    stride_ids=1, n_rows=65536, n_out=widths[-1],
                    **{f"D{i}": d for i, d in enumerate(dims)},
                    **{f"sw{i}m": widths[i] for i in range(layers)},
                    **{f"sw{i}k": 1 for i in range(layers)})
        yield label, None, _drawn_mlp_signature(fn, const), const, fn, options, ints
        if argmax:  # as a rollout on sm_90 launches it: a programmatic dependent launch
            yield (label + "_pdl", None, _drawn_mlp_signature(fn, const), dict(const, PDL=True), fn,
                   dict(options, launch_pdl=True), ints)


def environment_rows():
    """The environment kernels of a rollout: CartPole's step with and without next-step
    autoreset, alone and with the rollout's counters, its reset's initial states and its
    one-launch reset (float64 state, no floating-point contraction), and the episode counters."""
    sig = dict(state_ptr="*fp64", steps_ptr="*i64", prev_done_ptr="*i8", act_ptr="*i64",
               stride_act="i32", key_ptr="*i64", starts_ptr="*i64", consts_ptr="*fp64",
               obs_ptr="*fp32", reward_ptr="*fp32", term_ptr="*i8", trunc_ptr="*i8",
               returns_ptr="*fp64", alive_ptr="*i64", active_ptr="*i8", num_envs="i32",
               max_steps="i32")
    for next_step in (True, False):
        for count in (False, True):
            yield (f"cartpole_step{'_autoreset' if next_step else ''}{'_counting' if count else ''}",
                   None, sig, dict(NEXT_STEP=next_step, COUNT=count, BLOCK=cp.BLOCK),
                   cp._cartpole_step_kernel, dict(num_warps=cp.NUM_WARPS, enable_fp_fusion=False))
    yield ("cartpole_step_autoreset_counting_pdl", None, sig,
           dict(NEXT_STEP=True, COUNT=True, BLOCK=cp.BLOCK, PDL=True), cp._cartpole_step_kernel,
           dict(num_warps=cp.NUM_WARPS, enable_fp_fusion=False, launch_pdl=True))
    sig = dict(key_ptr="*i64", starts_ptr="*i64", where_ptr="*i8", consts_ptr="*fp64",
               out_ptr="*fp64", num_envs="i32")
    yield ("cartpole_start_states", None, sig, dict(HAS_WHERE=True, BLOCK=cp.BLOCK),
           cp._start_states_kernel, dict(num_warps=cp.NUM_WARPS, enable_fp_fusion=False))
    sig = dict(seed_lo="i32", seed_hi="i32", key_ptr="*i64", starts_ptr="*i64", where_ptr="*i8",
               consts_ptr="*fp64", state_ptr="*fp64", steps_ptr="*i64", prev_done_ptr="*i8",
               obs_ptr="*fp32", num_envs="i32")
    for reseed in (True, False):
        yield (f"cartpole_reset{'_reseed' if reseed else ''}", None, sig,
               dict(HAS_WHERE=True, RESEED=reseed, BLOCK=cp.BLOCK), cp._reset_kernel,
               dict(num_warps=cp.NUM_WARPS, enable_fp_fusion=False))
    sig = dict(returns_ptr="*fp64", alive_ptr="*i64", active_ptr="*i8", done_ptr="*i8",
               reward_ptr="*fp32", term_ptr="*i8", trunc_ptr="*i8", n="i32")
    yield ("episode_step", None, sig, dict(BLOCK=es.BLOCK), es._episode_step_kernel,
           dict(num_warps=es.NUM_WARPS))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", default=None, help="folder to write the SASS listings to")
    ap.add_argument("--only", default="", help="substring filter on the labels")
    args = ap.parse_args()
    failures = 0
    rows = []
    for dname, ptr in DTYPES.items():
        for label, d, r, off, br in project_configs():
            label = f"project_{dname}_{label}"
            if args.only not in label:
                continue
            plan = row_tile_plan(r, off, d, pr.BLOCK_E)
            sig = dict(v_ptr=ptr, ids_ptr="*i64", t_ptr="*fp32", n_rows="i32", D="i32",
                       stride_vm="i32", stride_vd="i32", stride_ids="i32", stride_tm="i32",
                       seed_lo="i64", seed_hi="i64", key="i64", epoch="i64", row_offset="i32",
                       **CACHE_SIG)
            for cached in (False, True):
                const = dict(plan, BLOCK_ROWS=br, ANTITHETIC=True, CACHED=cached)
                const.update(getattr(pr, "extra_constexprs", lambda p, b: {})(plan, br))
                rows.append((label + ("_drawn" if cached else ""), plan, sig, const,
                             pr._lowrank_project_kernel, dict(num_warps=pr.NUM_WARPS)))
        for label, d, r, off, br, bias in expand_configs():
            label = f"expand_{dname}_{label}"
            if args.only not in label:
                continue
            plan = row_tile_plan(r, off, d, ex.BLOCK_E)
            sig = dict(out_ptr=ptr, t_ptr="*fp32", ids_ptr="*i64", n_rows="i32", D="i32",
                       stride_om="i32", stride_od="i32", stride_tm="i32", stride_tk="i32",
                       stride_ids="i32", seed_lo="i64", seed_hi="i64", key="i64", epoch="i64",
                       row_offset="i32", scale="fp32", bias_key="i64", bias_scale="fp32",
                       **CACHE_SIG, **{"bias_" + k: v for k, v in CACHE_SIG.items()})
            for cached in (False, True):
                const = dict(plan, HAS_BIAS=bias,
                             **bias_tile_plan(plan["ROWS"], plan["TILE_ROWS"]),
                             BLOCK_ROWS=br, ANTITHETIC=True, CACHED=cached,
                             BIAS_CACHED=cached and bias)
                rows.append((label + ("_drawn" if cached else ""), plan, sig, const,
                             ex._lowrank_expand_kernel, dict(num_warps=ex.NUM_WARPS)))
        for n, m, r in ((4, 64, 1), (64, 64, 1), (64, 2, 1), (17, 256, 4), (256, 256, 4)):
            label = f"drawn_linear_{dname}_{n}x{m}_r{r}"
            if dname != "fp32" or args.only not in label:
                continue
            sig = dict(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, ids_ptr="*i64", f_ptr="*fp32",
                       e_ptr="*fp32", out_ptr=ptr, n_rows="i32", N_IN="i32", M_OUT="i32",
                       stride_xm="i32", stride_xk="i32", stride_wm="i32", stride_wk="i32",
                       stride_ids="i32", stride_om="i32", stride_on="i32", base="i32",
                       scale="fp32", bias_scale="fp32")
            rp = 1 << max(r - 1, 0).bit_length()
            const = dict(R=r, RP=rp, BLOCK_M=dl.BLOCK_M, **dl.block_sizes(n, m), HAS_BIAS=True,
                         WEIGHT_NOISE=True, BIAS_NOISE=True, ANTITHETIC=True, PRECISION="ieee")
            plan = dict(R=r, RP=rp, TILE_ROWS=dl.BLOCK_M, BLOCK_Q=0, DIRECT=False)
            rows.append((label, plan, sig, const, dl._drawn_linear_kernel,
                         dict(num_warps=dl.NUM_WARPS)))
    rows += [r for r in other_rows() if args.only in r[0]]
    print(f"{'kernel':44s} {'plan':34s} instr regs stack local smem BAR SHFL LDS STS LDL STL MUFU")
    for label, plan, sig, const, fn, options, *ints in rows:
        p = "-" if plan is None else (
            f"R{plan['R']} T{plan['TILE_ROWS']}x{plan['RP']} Q{plan['BLOCK_Q']} D{int(plan['DIRECT'])}")
        try:
            k = _compile(fn, sig, const, options, *ints)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"{label:44s} {p:34s} COMPILE FAILED: {type(exc).__name__}: {exc}"[:400])
            continue
        s = _sass_summary(k.asm["cubin"], args.sass, label)
        print(f"{label:44s} {p:34s} {s['instrs']:5d} {s['regs']:4d} {s['stack']:5d} "
              f"{s['local']:5d} {s['shared']:4d} {s['bar']:3d} {s['shfl']:4d} {s['lds']:3d} "
              f"{s['sts']:3d} {s['ldl']:3d} {s['stl']:3d} {s['mufu']:4d}", flush=True)
    print("compile failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
