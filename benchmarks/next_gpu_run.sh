#!/usr/bin/env bash
# What the next GPU session should run first, in one device call (carry .whl and .whl-rt, the
# wheels the GPU machine lacks; see the README's benchmark section):
#   both -> first the CUDA tests of the decode fusions; stop if they fail (SKIP_TESTS=1: not again)
#   H200 -> #4's run: the thinker beside transformers (bench_thinker.py), defaults
#   H100 -> the thinker with the norm-folded GEMVs' one-row tiles (round 9's --sweep-norm, the
#           default) and with the plain GEMV's, one stream and 64 streams, same machine back to
#           back; the fused kernels' A/B (bench_quant_gemv --norm-ab); the logits check against
#           transformers (defaults)
# Results land in $OUT; add measured_commit by hand (the JSON's "git" field shows the copy's HEAD).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-rt/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
t0=$(date +%s)
# the decode fusions' CUDA tests first: no figure is taken from kernels that fail them
[[ -n "$SKIP_TESTS" ]] || timeout 150 python3 -m pytest -q -s -x tests/kernels/test_norm_gemv_cuda.py \
  > /tmp/cuda_tests.log 2>&1; rc=$?
grep -sE "passed|failed|rror|tokens=|lens=|moe" /tmp/cuda_tests.log | tail -14  # -s: none with SKIP_TESTS
echo "cuda tests (rc $rc) done at $(( $(date +%s) - t0 )) s"
if [[ $rc -ne 0 ]]; then tail -40 /tmp/cuda_tests.log; exit 1; fi
# RUN=ab forces the fusions' A/B (e.g. on an H200 after #4's run); RUN=h200 forces #4's run
RUN=${RUN:-$([[ "$GPU" == *H200* ]] && echo h200 || echo ab)}
TAG=$([[ "$GPU" == *H200* ]] && echo h200 || echo h100)
if [[ "$RUN" == h200 ]]; then
  timeout $(( 570 - ($(date +%s) - t0) )) python3 benchmarks/bench_thinker.py --out "$OUT/thinker_h200.json" \
    --concurrency 8 32 64 128 --engine-config '{"max_num_seqs":128,"max_prefill_tokens":4096}' --hf-decode-len 16 \
    --hf-concurrency 8 32 2>&1 | grep -v Warning | tail -30
else
  # the norm-folded GEMVs' one-row tiles (round 9's sweep) against the plain GEMV's, same machine back to back
  for plain in "" "--plain-norm-gemv-tiles"; do
    timeout 90 python3 benchmarks/bench_thinker.py --out "$OUT/norm_tiles${plain:+_plain}_$TAG.json" --skip-transformers \
      --video-seconds --concurrency 64 $plain \
      --engine-config '{"max_num_seqs":64,"max_prefill_tokens":4096,"gpu_memory_utilization":0.9}' 2>&1 | grep -E "rror" | tail -4
    echo "tiles ${plain:-sweep} done at $(( $(date +%s) - t0 )) s"
  done
  timeout 120 python3 benchmarks/bench_quant_gemv.py --methods --norm-ab --out "$OUT/norm_ab_$TAG.json" \
    2>&1 | grep -E "unfused|moe|qkv|router|paged_attention|rror" | cut -c1-600
  echo "kernel A/B done at $(( $(date +%s) - t0 )) s"
  timeout $(( 570 - ($(date +%s) - t0) )) python3 benchmarks/check_logits.py --out "$OUT/logits_check_$TAG.json" \
    2>&1 | grep -E "cosine|top1|rror" | tail -6
fi
echo "total $(( $(date +%s) - t0 )) s"
