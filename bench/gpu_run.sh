#!/usr/bin/env bash
# Everything docs/PERFORMANCE.md reports, in one call on the GPU machine: the gpu tests, the CUDA bench
# (ceilings, greedy and logits decode, state cache on/off, prefill), a profiled bench, the malloc-threshold
# variant, transformers eager on the same shapes, and `v4serve up` on the GPU answering the README's
# tool-call request. Logs go to $OUT (the device tool's output folder; ./gpu-out elsewhere).
# Prepare here: tools/gpu_bundle.sh build/default && cp bench/hf_decode_bench.py .gpu/ (carry .gpu), then on the
# GPU machine, from the repository root: bash bench/gpu_run.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64 V4SERVE_SOURCE_DIR=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/when.txt
for t in model_cuda_backend_test model_device_test v4serve_kv_transfer_nccl_gpu_test; do
  echo "== $t" >> $OUT/tests.txt; timeout 200 .gpu/$t >> $OUT/tests.txt 2>&1; echo "rc=$?" >> $OUT/tests.txt
done
timeout 150 .gpu/v4serve_cuda_bench --batches=1,8,16,32,64 > $OUT/bench.txt 2>&1; echo "rc=$?" >> $OUT/bench.txt
V4SERVE_CUDA_PROFILE=1 timeout 100 .gpu/v4serve_cuda_bench --ceilings=0 --prefill=8192 --compare-state-cache=0 > $OUT/prof.txt 2>&1
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648 timeout 100 .gpu/v4serve_cuda_bench --ceilings=0 --prefill= --batches=64,128 --compare-state-cache=0 > $OUT/malloc.txt 2>&1
timeout 100 .gpu/v4serve_cuda_bench --ceilings=0 --prefill= --batches=128 --compare-state-cache=0 >> $OUT/malloc.txt 2>&1
timeout 120 python3 .gpu/hf_decode_bench.py > $OUT/hf.txt 2>&1; echo "rc=$?" >> $OUT/hf.txt
rm -f /tmp/ready.json
.gpu/v4serve up --model $PWD/models/tiny-v4 --http_port 0 --grpc_port 0 --ready_file /tmp/ready.json > $OUT/up.log 2>&1 &
UP=$!
for i in $(seq 120); do [ -s /tmp/ready.json ] && break; sleep 1; done
python3 - > $OUT/up_request.txt 2>&1 <<'PY'
import json, urllib.request
port = json.load(open("/tmp/ready.json"))["http_port"]
tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression",
  "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
body = {"model": "tiny-v4", "messages": [{"role": "user", "content": "Use the calculator to compute 3141 * 59."}],
        "tools": tools, "temperature": 0}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=60).read().decode())
PY
kill -TERM $UP; wait $UP
grep -E "^==|FAIL|PASSED|rc=|SKIPPED \]" $OUT/tests.txt; grep -E "^\| |faster" $OUT/bench.txt | head -20; grep "^| decode" $OUT/malloc.txt; tail -4 $OUT/hf.txt; grep "model runs" $OUT/up.log; head -c 400 $OUT/up_request.txt
