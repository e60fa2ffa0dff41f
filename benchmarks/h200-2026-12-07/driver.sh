#!/usr/bin/env bash
# Call-2 driver (issue 32): run from .xfer/kernels. Everything under $OUT.
set -u
START=$SECONDS
LIMIT=${LIMIT:-570}
left() { echo $(( LIMIT - (SECONDS - START) )); }
X=$(cd .. && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci SPLITLLAMA_COLLECTIVE_TIMEOUT=120 CUDA_DEVICE_MAX_CONNECTIONS=1
export CUDA_VISIBLE_DEVICES=0
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
P1=$X/p1/part1; [ -f "$P1" ] || P1=/tmp/k/part1
cat "$P1" "$X/p2/part2" > /tmp/fa4.tar.xz
(cd /tmp && sha256sum -c "$X/p2/sha256") || echo "SHA256 MISMATCH"
mkdir -p /tmp/fa4 /tmp/site
xz -dc -T0 /tmp/fa4.tar.xz | tar -x -C /tmp/fa4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$X"/p2/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:$X/stubs:/tmp/site:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
echo "setup done in $((SECONDS - START)) s"
{
  nvidia-smi -L
  python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|triton|hypothesis|pytest) "
  python3 - <<'EOF'
import torch
from splitllama.attention import flash_attn_4_varlen, select_backend
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("flash-attn 4:", flash_attn_4_varlen(), "default backend:", select_backend(torch.device("cuda"), torch.bfloat16))
a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
acc = torch.zeros(256, 256, device="cuda")
try:
    torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    print("addmm out_dtype=float32 out=acc: ok, err", float((acc - a.float() @ a.float()).abs().max()))
except Exception as e:
    print("addmm out_dtype: fallback", type(e).__name__, e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run() {  # run NAME SECONDS CMD...
  local name=$1 t=$2; shift 2
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - s)) s (limit $t)"
  grep -E "passed|failed|[0-9]+ error|Error|FAIL" "$OUT/logs/$name.log" | grep -v "^W" | tail -5
}
PA="tests/integration -v -p no:cacheprovider -W ignore --durations=15 -rfEs --tb=short --timeout 170"
T=$(( $(left) - 315 )); [ $T -gt 230 ] && T=230
run suite "$T" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $PA -k "not real_shapes" &
run real "$T" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m pytest $PA -k real_shapes &
run attn_errors 200 python3 benchmarks/attention_kernels.py --no-timing --json "$OUT/attention_errors.json" &
wait
echo "tests done at $((SECONDS - START)) s"
T=$(( $(left) - 205 )); [ $T -gt 115 ] && T=115
run head "$T" python3 benchmarks/fused_head.py --tokens 16384 --max-tokens 65536 --repeats 3 --warmup 1 \
  --paths fused_before,fused,fused@4096x32768,fused@4096x16384,verl,liger \
  --before "$X/before/logprobs_before.py" --json "$OUT/fused_head.json"
T=$(( $(left) - 8 ))
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run long "$T" python3 -c "
import logging, sys
logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
from splitllama.cli import main
sys.exit(main(['bench', '--only', 'ceiling,long', '--lower-layers', '2', '--upper-layers', '8', '--repeats', '2',
               '--warmup', '1', '--json', '$OUT/bench_long.json']))"
echo "all done at $((SECONDS - START)) s"
tar czf "$OUT/logs.tgz" -C "$OUT" logs
for f in suite real; do echo "--- $f"; grep -c PASSED "$OUT/logs/$f.log"; grep -E " passed| failed|^FAILED|^ERROR|^SKIPPED" "$OUT/logs/$f.log" | tail -12; done
echo "--- attn"; tail -8 "$OUT/logs/attn_errors.log"
echo "--- head"; grep -A40 "^path" "$OUT/logs/head.log" | tail -40
echo "--- long"; grep -E "splitllama.bench|vs torch|with flash|with torch|ceiling|^long" "$OUT/logs/long.log" | tail -40
rm -rf "$OUT/logs"
