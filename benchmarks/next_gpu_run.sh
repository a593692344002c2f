#!/usr/bin/env bash
# What the next GPU session should run first, in one device call (carry .whl and .whl-rt, the
# wheels the GPU machine lacks; see the README's benchmark section):
#   H200 -> #4's run: the thinker beside transformers (bench_thinker.py), defaults
#   H100 -> the CUDA tests of programmatic launch and of the norms folded into the GEMVs, then an
#           A/B of those two switches (EngineConfig.programmatic_launch, fuse_norm_gemv), one
#           stream and 64 streams, same machine back to back
# Results land in $OUT; add measured_commit by hand (the JSON's "git" field shows the copy's HEAD).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-rt/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
t0=$(date +%s)
if [[ "$GPU" == *H200* ]]; then
  timeout 450 python3 benchmarks/bench_thinker.py --out "$OUT/thinker_h200.json" --concurrency 8 32 64 128 \
    --engine-config '{"max_num_seqs":128,"max_prefill_tokens":4096}' --hf-decode-len 16 --hf-concurrency 8 32 \
    2>&1 | grep -v Warning | tail -30
else
  timeout 120 python3 -m pytest -q -s tests/kernels/test_programmatic_launch_cuda.py tests/kernels/test_norm_gemv_cuda.py \
    2>&1 | grep -E "passed|failed|error|rows=|tokens=|Error" | tail -12
  echo "cuda tests done at $(( $(date +%s) - t0 )) s"
  for cfg in '"programmatic_launch":false,"fuse_norm_gemv":false' '"programmatic_launch":true,"fuse_norm_gemv":true' \
             '"programmatic_launch":false,"fuse_norm_gemv":true' '"programmatic_launch":true,"fuse_norm_gemv":false'; do
    name=$(echo "$cfg" | tr -d '":,' | sed 's/programmatic_launch/pdl_/; s/fuse_norm_gemv/_fuse_/')
    timeout 110 python3 benchmarks/bench_thinker.py --out "$OUT/ab_$name.json" --skip-transformers --video-seconds \
      --concurrency 64 --engine-config '{"max_num_seqs":64,"max_prefill_tokens":4096,"gpu_memory_utilization":0.9,'"$cfg"'}' \
      2>&1 | tail -2
    echo "$name done at $(( $(date +%s) - t0 )) s"
  done
fi
echo "total $(( $(date +%s) - t0 )) s"
