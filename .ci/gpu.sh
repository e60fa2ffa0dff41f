#!/usr/bin/env bash
# What runs on the lent GPU machines (the device tool), stage by stage; CI has no GPU and
# never calls this. Logs and JSON land under $OUT. Usage: bash .ci/gpu.sh STAGE...
#   tests   integration suite (tiny model) on 1, 2 and 4 GPUs (NCCL, bf16) + splitllama check
#   real    the real-shape parity tests on 1, 2 and 4 GPUs + check on a real-shape checkpoint
#   bench   splitllama bench on 1 GPU, then TP scaling on 2 and 4 GPUs
#   head    the fused log-prob head alone vs the materialising one (benchmarks/fused_head.py)
#   recompute  splitllama bench's activation-recompute and head parts on 1 GPU
# STEP_TIMEOUT (seconds, default 280) bounds each step, so one slow step leaves time for the rest.
set -u
# NVLink multicast stays off: it can take the host's shared GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
# A rank that fails or stalls turns into an error on the others within 2 minutes.
export SPLITLLAMA_COLLECTIVE_TIMEOUT=${SPLITLLAMA_COLLECTIVE_TIMEOUT:-120}
# megatron overlaps TP communication with compute only when CUDA keeps one work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
OUT=${OUT:-/tmp/splitllama-out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # megatron-core is not installed on those machines: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$OUT/gpus.txt"
run() {  # run NAME CMD...: log to $OUT/NAME.log, print its tail, never stop the stage
  local name=$1; shift
  local start=$SECONDS
  timeout "${STEP_TIMEOUT:-280}" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
  grep -E "passed|failed|PASS|FAIL|Error" "$OUT/$name.log" | grep -v "^W" | tail -4
}
pytest_args="tests/integration -q -p no:cacheprovider -W ignore --durations=8 -rfE --tb=short"
for stage in "$@"; do
  case $stage in
    tests)
      [ "$gpus" -ge 2 ] && run check_tp2_sp python3 -m splitllama.cli check --tp 2 --sp --json "$OUT/check_tp2_sp.json"
      run check_1gpu_mlp_value env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli check --mlp --value \
        --json "$OUT/check_1gpu_mlp_value.json"
      run check_1gpu_lm env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli check --json "$OUT/check_1gpu_lm.json"
      run int_1gpu env CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $pytest_args -k "not real_shapes"
      if [ "$gpus" -ge 2 ]; then
        run int_2gpu env CUDA_VISIBLE_DEVICES=0,1 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m pytest $pytest_args -k "not real_shapes"
      fi
      if [ "$gpus" -ge 4 ]; then
        run int_4gpu python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m pytest $pytest_args -k "not real_shapes"
      fi
      ;;
    real)
      run real_1gpu env CUDA_VISIBLE_DEVICES=0 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $pytest_args -k real_shapes
      if [ "$gpus" -ge 2 ]; then
        run real_2gpu env CUDA_VISIBLE_DEVICES=0,1 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m pytest $pytest_args -k real_shapes
      fi
      if [ "$gpus" -ge 4 ]; then
        run real_4gpu python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m pytest $pytest_args -k real_shapes
        python3 -c "import torch; from tests.integration.test_gpu_real_shapes import real_shape_config as c; \
from splitllama.verify.random_checkpoints import TEST_CHECKPOINT_INIT as i, random_split_checkpoint as r; \
r(c(), '/tmp/real', dtype=torch.bfloat16, **i[torch.bfloat16])"
        run check_real_tp4_sp python3 -m splitllama.cli check /tmp/real --tp 4 --sp --json "$OUT/check_real_tp4_sp.json"
        run check_real_tp2_sp_pp2 python3 -m splitllama.cli check /tmp/real --tp 2 --sp --pp 2 --json "$OUT/check_real_tp2_sp_pp2.json"
      fi
      ;;
    bench)
      run bench_1gpu env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli bench --only ceiling,packing,backends --json "$OUT/bench_1gpu.json" --plot "$OUT/bench_1gpu.png"
      if [ "$gpus" -ge 2 ]; then
        run bench_2gpu env CUDA_VISIBLE_DEVICES=0,1 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
          -m splitllama.cli bench --only tp --json "$OUT/bench_2gpu.json"
      fi
      if [ "$gpus" -ge 4 ]; then
        run bench_4gpu python3 -m torch.distributed.run --standalone --nproc-per-node 4 \
          -m splitllama.cli bench --only tp --json "$OUT/bench_4gpu.json"
      fi
      ;;
    head)
      run fused_head env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/fused_head.py --json "$OUT/fused_head.json"
      run bench_head env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli bench --only ceiling,head,max_tokens \
        --json "$OUT/bench_head.json"
      ;;
    recompute)
      run bench_recompute env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli bench --only ceiling,recompute \
        --json "$OUT/bench_recompute.json"
      # 8 layers of the 70B shape: where recompute matters (the head and 4 layers dominate at 2+2)
      run bench_recompute_deep env CUDA_VISIBLE_DEVICES=0 python3 -m splitllama.cli bench --only ceiling,recompute \
        --lower-layers 2 --upper-layers 8 --json "$OUT/bench_recompute_deep.json"
      ;;
    *) echo "unknown stage $stage (tests, real, bench, head, recompute)"; exit 2 ;;
  esac
done
