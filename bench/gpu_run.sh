#!/usr/bin/env bash
# Everything docs/PERFORMANCE.md reports, in one call on the GPU machine: the gpu tests, the CUDA bench
# (ceilings, kernels side by side, greedy / sampled / logits decode, state cache on/off, prefill), a profiled
# bench, a CUPTI trace of decode steps and a prefill, transformers eager on the same shapes (and alternated
# with ours twice), and `v4serve up` on
# the GPU answering the README's tool-call request and a seeded sampled one; and the kernels of a batch-1 and
# a batch-64 decode step timed by ncu (bench/ncu_step.py, appended to prof.txt). Logs go to $OUT (the device tool's
# output folder; ./gpu-out elsewhere): 8 files, as many as the device tool brings back, so send this
# script's own output somewhere other than $OUT.
# Prepare here: tools/gpu_bundle.sh build/default && cp build/default/bench/v4serve_cuda_bench
# bench/hf_decode_bench.py .gpu/ && strip .gpu/v4serve_cuda_bench (carry .gpu, or .gpuz as
# docs/PERFORMANCE.md's "Reproduce" says where .gpu is near the device tool's 64 MiB), then on the
# GPU machine, from the repository root: bash bench/gpu_run.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64 V4SERVE_SOURCE_DIR=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/tests.txt
for t in model_cuda_kernels_test model_cuda_backend_test model_cuda_kv_pages_test v4serve_engine_cuda_pages_test bench_kernel_trace_test \
  model_device_test v4serve_kv_transfer_nccl_gpu_test; do
  echo "== $t" >> $OUT/tests.txt; timeout 200 .gpu/$t >> $OUT/tests.txt 2>&1; echo "rc=$?" >> $OUT/tests.txt
done
# The workers' weights (--weights=fp8, the default), then the BF16 mode's decode and prefill for the FP8 / BF16
# rows, in the same call.
timeout 240 .gpu/v4serve_cuda_bench --batches=1,8,16,32,64 > $OUT/bench.txt 2>&1; echo "rc=$?" >> $OUT/bench.txt
# Long contexts (the paged KV cache: entries read in place through page tables), into the same file.
for cb in 8192:1,8 32768:1; do
  timeout 90 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill= --context=${cb%%:*} \
    --batches=${cb##*:} --compare-state-cache=0 --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 >> $OUT/bench.txt 2>&1
done
# The prefill with its expert GEMM on mma.sync instead of wgmma (same binary, V4SERVE_CUDA_WGMMA=0), into
# bench.txt: the wgmma kernel's share of the prefill, side by side with the main run's prefill rows.
V4SERVE_CUDA_WGMMA=0 timeout 90 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --batches= --compare-state-cache=0 \
  --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 >> $OUT/bench.txt 2>&1
# And with the compressors' GEMMs on cuBLAS's FP32 SGEMM instead of 3xTF32 (V4SERVE_CUDA_TF32X3=0).
V4SERVE_CUDA_TF32X3=0 timeout 90 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --batches= --compare-state-cache=0 \
  --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 >> $OUT/bench.txt 2>&1
timeout 90 .gpu/v4serve_cuda_bench --weights=bf16 --ceilings=0 --attention=0 --batches=1,8,64 --compare-state-cache=0 --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 > $OUT/bench_bf16.txt 2>&1
V4SERVE_CUDA_PROFILE=1 timeout 100 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill=8192 --compare-state-cache=0 --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 > $OUT/prof.txt 2>&1
# Where each step's wall time goes with graphs on, at the GPU's clocks and warm caches (CUPTI, --trace): host
# before and after the GPU, GPU busy and idle, the kernels by time; PDL off, so that each kernel's record is
# its own time, not also its wait for the one ahead. Appended to prof.txt.
V4SERVE_CUDA_PDL=0 timeout 100 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill=8192 --batches=1,8,64 \
  --trace=3 --compare-state-cache=0 --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 >> $OUT/prof.txt 2>&1
# Kernel by kernel (the machine has ncu, not nsys): one batch-1 and one batch-64 decode step, graphs off so
# each kernel is a launch; at the clocks the GPU runs at (ncu locks them to base by default, which slows
# latency- and compute-bound kernels more than the bandwidth-bound ones: tables before session 16 were so).
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
for B in 1 64; do
  V4SERVE_CUDA_GRAPHS=0 timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill= --batches=$B --steps=1 --compare-state-cache=0 \
    --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 > /tmp/ncu_step.csv 2>/dev/null
  echo "batch $B" >> $OUT/prof.txt; python3 bench/ncu_step.py /tmp/ncu_step.csv >> $OUT/prof.txt 2>&1
done
timeout 120 python3 .gpu/hf_decode_bench.py > $OUT/hf.txt 2>&1; echo "rc=$?" >> $OUT/hf.txt
# Ours and transformers alternated (both move between runs): the ratio table's medians.
for i in 1 2; do
  timeout 60 .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill= --batches=1,8,64 --steps=20 \
    --compare-state-cache=0 --compare-graphs=0 --compare-rows-gemm=0 --compare-pdl=0 > $OUT/alt_ours.txt 2>&1; cat $OUT/alt_ours.txt >> $OUT/alt.txt
  timeout 90 python3 .gpu/hf_decode_bench.py --steps 10 > $OUT/alt_hf.txt 2>&1; tail -3 $OUT/alt_hf.txt >> $OUT/alt.txt
done
rm -f /tmp/ready.json
.gpu/v4serve up --model $PWD/models/tiny-v4 --http_port 0 --grpc_port 0 --ready_file /tmp/ready.json > $OUT/up.log 2>&1 &
UP=$!
for i in $(seq 120); do [ -s /tmp/ready.json ] && break; sleep 1; done
python3 - > $OUT/up.txt 2>&1 <<'PY'
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
# Sampled decoding through the real binaries on the GPU (the candidates path): the same seed twice gives
# the same text.
python3 - >> $OUT/up.txt 2>&1 <<'PY'
import json, urllib.request
port = json.load(open("/tmp/ready.json"))["http_port"]
body = {"model": "tiny-v4", "messages": [{"role": "user", "content": "Write a title for a talk about compilers."}],
        "temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 24, "logprobs": True, "top_logprobs": 2}
out = []
for _ in range(2):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=60).read().decode())
    out.append(r["choices"][0]["message"]["content"])
    print(json.dumps(r["choices"][0])[:600])
print("same text for the same seed:", out[0] == out[1])
PY
kill -TERM $UP; wait $UP
grep -E "^==|FAIL|PASSED|rc=|SKIPPED \]" $OUT/tests.txt; grep -E "^\| |faster|^GPU|^stack" $OUT/bench.txt | head -90
grep -E "^\| (decode step, batch [0-9]+, context 512 \||prefill)|^stack" $OUT/bench_bf16.txt; tail -4 $OUT/hf.txt
grep -E "^\| decode step, batch [0-9]+, context 512 \||batch|ms" $OUT/alt.txt | grep -v "^ *$" | head -20; rm -f $OUT/alt_ours.txt $OUT/alt_hf.txt
grep -B1 phases $OUT/prof.txt | grep -v "^--"; grep -B1 -A14 "^ncu, forward" $OUT/prof.txt; grep "trace, " $OUT/prof.txt
grep "model runs" $OUT/up.log; head -c 400 $OUT/up.txt; tail -c 300 $OUT/up.txt
