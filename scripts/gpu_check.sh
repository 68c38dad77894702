#!/usr/bin/env bash
# Run the GPU tier on a CUDA machine whose Python already has torch and triton but no
# package registry: installs carried wheels (.whl/) and the package itself without
# dependencies, then runs the stages named on the command line, printing a short table.
#
#   scripts/gpu_check.sh tests sanitizer bench demo
#
# Stages: info, tests (whole suite on the GPU, `gpu` tests included), files (the test files
# in $TEST_FILES), gputests, rollout (env-steps/s of whole RL generations), profile (one
# CartPole generation under torch.profiler), sanitizer
# (compute-sanitizer memcheck over the kernel tests at odd shapes), bench (the performance
# table), demo (`python -m evotorch_eggroll.demo`), pgpe (EvoTorch's PGPE on the demo's
# problem), soak (scripts/soak.py: long runs, memory and repeatability). Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-./gpu-logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu/ray_stub ] && ! python3 -c "import ray" 2>/dev/null; then
  export PYTHONPATH=$PWD/.gpu/ray_stub:$PYTHONPATH
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1 \
  || { cat "$LOG/install.log"; exit 1; }

declare -a SUMMARY
stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(grep -E '[0-9]+ (passed|failed)|ERROR SUMMARY' "$LOG/$name.log" | tail -1)")")
  echo "== $name (rc=$rc) ==" && tail -n "${TAIL:-25}" "$LOG/$name.log"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(info tests)
for s in "${stages[@]}"; do
  case $s in
    info) stage info bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"' ;;
    tests) stage tests python3 -m pytest -q -p no:cacheprovider tests ${PYTEST_EXTRA:-} ;;
    gputests) stage gputests python3 -m pytest -q -p no:cacheprovider -m gpu tests ;;
    sanitizer) stage sanitizer compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 -m pytest -q -x -p no:cacheprovider -m "not gpu and not slow" \
        tests/torch_tests/test_low_rank_perturbations.py tests/torch_tests/test_forward_equivalence.py \
        tests/torch_tests/test_parameter_updates.py tests/torch_tests/test_deterministic_noise.py \
        tests/torch_tests/test_fused_mlp.py ;;
    bench) TAIL=40 stage bench python3 -m evotorch_eggroll.benchmark --csv "$LOG/bench.csv" ${BENCH_ARGS:-} ;;
    files) stage files python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests} ;;
    rollout) TAIL=40 stage rollout python3 -m evotorch_eggroll.rollout_benchmark ${ROLLOUT_ARGS:-} ;;
    profile) TAIL=60 stage profile python3 scripts/profile_rollout.py ${PROFILE_ARGS:-} ;;
    demo) stage demo python3 -m evotorch_eggroll.demo ${DEMO_ARGS:-} ;;
    soak) TAIL=40 stage soak python3 scripts/soak.py ${SOAK_ARGS:-} ;;
    pgpe) stage pgpe python3 -m evotorch_eggroll.demo --algorithm pgpe --generations "${PGPE_GENERATIONS:-60}" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo
echo "== summary =="
printf '%s\n' "${SUMMARY[@]}"
