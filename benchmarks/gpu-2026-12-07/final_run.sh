#!/usr/bin/env bash
# The GPU runs of the final tree (2026-12-07), in two device calls on one warm machine:
#   STAGE=1  carries the first part of flash-attn 4's archive (.xfer/a1) and the wheels the
#            machine lacks (.xfer/gw: megatron-core, verl, mbridge and their small
#            dependencies), with import stand-ins for ray and datasets (.xfer/stubs, which
#            verl's modules import and the engine path never calls); runs `splitllama
#            rollout` in bf16, verl's engine step with use_fused_kernels off and on
#            (benchmarks/verl_engine.py; H200 only) and the integration suite on the tiny
#            models (bf16, NCCL, worlds of one under pytest-xdist). *_LIMIT: each step's
#            seconds; VERL_ARGS: benchmarks/verl_engine.py's search flags; VERL_SMALL=1: on a
#            card under 100 GB (an H100), verl's step at 1 + 1 layers instead of none.
#   STAGE=2  carries the archive's second part (.xfer/a2), joins and checks it, then runs
#            flash-attn 4's kernel tests, planted bugs and the real-shape parity tests with
#            flash-attn 4 as the default backend, then the bench's long-context part.
# Logs and JSON land in $OUT (a tar of the logs plus the JSON files). NVLink multicast off.
#
# Not run in the session that wrote it: no GPU machine could be started for it (five tries),
# and its device time went on the tries. What .xfer/ (ignored by git) must hold, made on a
# CPU machine with pip (cp312, manylinux, --no-deps, as the device tool's notes say):
#   .xfer/gw     megatron-core 0.16.1, verl 0.9.1, mbridge 0.15.1, tensordict 0.10.0,
#                codetiming, orjson, pyvers, importlib_metadata, omegaconf 2.3.1 and
#                antlr4-python3-runtime 4.9.3 (`pip wheel`: sdist only), hydra-core,
#                fastapi, starlette, annotated-doc, uvicorn, h11, click, torchdata, pydantic,
#                pydantic-core, typing-inspection, annotated-types, anyio, sniffio
#   .xfer/stubs  import stand-ins named ray and datasets (any attribute a callable placeholder)
#   .xfer/a1, a2 flash-attn 4's set installed into one folder (`pip install --target DIR
#                --no-deps --platform manylinux_2_28_x86_64 --python-version 3.12
#                --only-binary=:all: flash-attn-4==4.0.0b36 quack-kernels apache-tvm-ffi
#                torch-c-dlpack-ext nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base
#                nvidia-cutlass-dsl-libs-core nvidia-cutlass-dsl-libs-cu13`), packed with
#                `tar -cJ -C DIR . > fa4.tar.xz` (66 MiB), `sha256sum fa4.tar.xz > a2/sha256`,
#                split in two (`split -b 50000000`: a1/part1, a2/part2) so that each call's
#                carry stays under the 64 MiB limit
# Call 1: carry .xfer/a1 .xfer/gw .xfer/stubs; call 2 within the machine's 30 s warm time:
# carry .xfer/a2, STAGE=2.
set -u
X=$PWD/.xfer
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci SPLITLLAMA_COLLECTIVE_TIMEOUT=120 CUDA_DEVICE_MAX_CONNECTIONS=1
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
export PYTHONPATH=$PWD:$X/stubs:/tmp/site:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
run() {  # run NAME SECONDS CMD...: log to $OUT/logs/NAME.log, print its verdict lines
  local name=$1 t=$2; shift 2
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - s)) s (limit $t)"
  grep -E "passed|failed|[0-9]+ error|PASS|FAIL|Error|target|on_vs_off" "$OUT/logs/$name.log" | grep -v "^W\|Warning" | tail -6
}
PA="-q -p no:cacheprovider -W ignore --durations=10 -rfEs --tb=short"
case ${STAGE:-1} in
  1)
    [ -f "$X/a1/part1" ] && mkdir -p /tmp/k && cp "$X/a1/part1" /tmp/k/part1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$X"/gw/*.whl 2>&1 | tail -2
    { nvidia-smi -L; python3 -c "import torch, transformers, megatron.core, verl; print(torch.__version__, \
transformers.__version__, megatron.core.__version__, verl.__version__, torch.cuda.get_device_name())"; } 2>&1 \
      | grep -v Warn | tee "$OUT/env.txt"
    run rollout ${ROLLOUT_LIMIT:-60} python3 -m splitllama.cli rollout --device cuda --dtype bfloat16 --json "$OUT/rollout_bf16_tp1.json"
    # verl's step at 2 + 2 layers holds ~68 GiB of weights, gradients and Adam state before
    # any activation: an H200's ~140 GiB, not an H100's ~80
    MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if [ "$MIB" -gt 100000 ]; then
      run verl_2p2 ${VERL_LIMIT:-150} python3 benchmarks/verl_engine.py --lower 2 --upper 2 --tokens 16384 \
        ${VERL_ARGS:---max-tokens} --repeats 3 --warmup 1 --json "$OUT/verl_engine_2p2.json"
    elif [ -n "${VERL_SMALL:-}" ]; then
      # an H100: 1 + 1 layers (2.683e9 parameters, 45 GiB of weights, float32 gradients and Adam
      # state) leave room for activations
      run verl_1p1 ${VERL_LIMIT:-150} python3 benchmarks/verl_engine.py --lower 1 --upper 1 --tokens 8192 \
        ${VERL_ARGS:---max-tokens} --repeats 3 --warmup 1 --json "$OUT/verl_engine_1p1.json"
    else
      echo "== verl_2p2: not run, $MIB MiB of GPU memory"
    fi
    run suite ${SUITE_LIMIT:-220} python3 -m pytest -n 6 tests/integration -k "not real_shapes" $PA
    ;;
  2)
    cat /tmp/k/part1 "$X/a2/part2" > /tmp/fa4.tar.xz && (cd /tmp && sha256sum -c "$X/a2/sha256") || exit 1
    mkdir -p /tmp/fa4 && xz -dc -T0 /tmp/fa4.tar.xz | tar -x -C /tmp/fa4
    python3 -c "import torch; from splitllama.attention import flash_attn_4_varlen, select_backend; \
print('flash-attn 4:', flash_attn_4_varlen() is not None, 'default:', select_backend(torch.device('cuda'), torch.bfloat16))" \
      2>&1 | grep -v Warn | tee -a "$OUT/env2.txt"
    run fa4 150 python3 -m pytest -n 3 tests/integration/test_attention_backends.py tests/integration/test_gpu_real_shapes.py \
      tests/integration/test_planted_bugs.py -k "kernel or real_shapes or flash_attn_4" $PA
    # the long-context part again, with the fused head's final 16,384-row vocabulary blocks
    run bench_long ${LONG_LIMIT:-240} python3 -m splitllama.cli bench --only ceiling,long --lower-layers 2 \
      --upper-layers 8 --repeats 2 --warmup 1 --json "$OUT/bench_long.json"
    ;;
esac
tar -czf "$OUT/logs_stage${STAGE:-1}.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
