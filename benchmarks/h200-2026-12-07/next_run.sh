#!/usr/bin/env bash
# What this session could not run on the GPU at the final tree (issue 32). Same set-up as
# driver.sh (run from .xfer/kernels, wheels under ../p2 and the cutlass archive's first part
# under ../p1 or /tmp/k, import stand-ins under ../stubs). STAGE=tests (about 5 min: the
# integration suite and the real-shape tests side by side, FA4 planted bugs included) or
# STAGE=bench (about 4 min: the long-context part with the final head blocks).
set -u
X=$(cd .. && pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=ci SPLITLLAMA_COLLECTIVE_TIMEOUT=120 CUDA_DEVICE_MAX_CONNECTIONS=1 CUDA_VISIBLE_DEVICES=0
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
if [ ! -d /tmp/fa4/flash_attn ]; then
  P1=$X/p1/part1; [ -f "$P1" ] || P1=/tmp/k/part1
  cat "$P1" "$X/p2/part2" > /tmp/fa4.tar.xz && (cd /tmp && sha256sum -c "$X/p2/sha256") || exit 1
  mkdir -p /tmp/fa4 /tmp/site && xz -dc -T0 /tmp/fa4.tar.xz | tar -x -C /tmp/fa4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$X"/p2/*.whl
fi
export PYTHONPATH=$PWD:$X/stubs:/tmp/site:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
PA="tests/integration -v -p no:cacheprovider -W ignore --durations=15 -rfEs --tb=short --timeout 170"
case ${STAGE:-tests} in
  tests)
    timeout 500 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $PA -k "not real_shapes" > "$OUT/suite.log" 2>&1 &
    timeout 500 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $PA -k real_shapes > "$OUT/real.log" 2>&1 &
    wait
    for f in suite real; do echo "--- $f"; grep -E "^FAILED|^ERROR|flash_attn_4| passed| failed" "$OUT/$f.log" | tail -15; done ;;
  bench)
    timeout 500 python3 -m splitllama.cli bench --only ceiling,long --lower-layers 2 --upper-layers 8 --repeats 2 \
      --warmup 1 --json "$OUT/bench_long.json" 2>&1 | tail -25 ;;
esac
