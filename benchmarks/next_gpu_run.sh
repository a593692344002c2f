#!/usr/bin/env bash
# What the next GPU session should run first, in one device call (carry .whl and .whl-rt, the
# wheels the GPU machine lacks; see the README's benchmark section):
#   both -> first the CUDA tests of the decode fusions; stop if they fail (SKIP_TESTS=1: not again)
#   H200 -> #4's run: the thinker beside transformers (bench_thinker.py), defaults; then, as time
#           allows, the decode profile at bench_thinker's context (512-token prompts, 1 and 64
#           sequences: where the time goes for a target not met)
#   RUN=h200b (the next call, on the same warm H200; no tests) -> the fp8 thinker at 64 streams;
#           the fused MoE's decode tiles swept wider at 64 tokens (tune_fused_moe.py --wide) and,
#           if the best beats the default by 2%, the engine at 64 streams with it and without,
#           back to back; the expert sort's one-program tiles (tune_fused_moe.py --align)
#   H100 -> bf16 and fp8 thinker at 1 and 64 streams back to back (what 64 streams gain from
#           reading half the expert bytes), then the decode profile at 512-token prompts and the
#           expert sort's tiles (tune_fused_moe.py --align)
# Results land in $OUT; add measured_commit by hand (the JSON's "git" field shows the copy's HEAD).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-rt/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
t0=$(date +%s)
# the decode fusions' CUDA tests first: no figure is taken from kernels that fail them
[[ -n "$SKIP_TESTS" || "$RUN" == h200b ]] || timeout 150 python3 -m pytest -q -s -x tests/kernels/test_norm_gemv_cuda.py \
  > /tmp/cuda_tests.log 2>&1; rc=$?
grep -sE "passed|failed|rror|tokens=|lens=|moe" /tmp/cuda_tests.log | tail -14  # -s: none with SKIP_TESTS
echo "cuda tests (rc $rc) done at $(( $(date +%s) - t0 )) s"
if [[ $rc -ne 0 ]]; then tail -40 /tmp/cuda_tests.log; exit 1; fi
# RUN=ab forces the H100 path (e.g. on an H200 after #4's run); RUN=h200 forces #4's run
RUN=${RUN:-$([[ "$GPU" == *H200* ]] && echo h200 || echo ab)}
TAG=$([[ "$GPU" == *H200* ]] && echo h200 || echo h100)
left() { echo $(( 575 - ($(date +%s) - t0) )); }
ENGINE64='{"max_num_seqs":64,"max_prefill_tokens":4096,"gpu_memory_utilization":0.9}'
profile() {  # where a decode step's time goes at bench_thinker's context
  [[ $(left) -gt 90 ]] || return 0
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_decode.py --out "$OUT/profile_decode_512ctx_$TAG.txt" \
    --engine-config "$ENGINE64" --batch 1 64 --prompt-len 512 --prefill 2>&1 | grep -E "^===|GPU total|rror" | tail -8
  echo "profile done at $(( $(date +%s) - t0 )) s"
}
bench64() {  # bench_thinker at one and 64 streams, no transformers, no video: bench64 NAME [its flags]
  local name=$1; shift
  [[ $(left) -gt 80 ]] || return 0
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_thinker.py --out "$OUT/${name}_$TAG.json" --skip-transformers \
    --video-seconds --concurrency 64 --engine-config "$ENGINE64" "$@" 2>&1 | grep -E "rror|tok_s" | tail -4
  echo "$name done at $(( $(date +%s) - t0 )) s"
}
align_tiles() {  # the one-program expert sort's tiles
  [[ $(left) -gt 60 ]] || return 0
  timeout $(( $(left) - 5 )) python3 benchmarks/tune_fused_moe.py --out "$OUT/tune_moe_align_$TAG.json" --align \
    --tokens 64 128 2>&1 | grep -E "^align|rror" | cut -c1-400
}
if [[ "$RUN" == h200 ]]; then
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_thinker.py --out "$OUT/thinker_h200.json" \
    --concurrency 8 32 64 128 --engine-config '{"max_num_seqs":128,"max_prefill_tokens":4096}' --hf-decode-len 16 \
    --hf-concurrency 8 32 2>&1 | grep -v Warning | tail -30
  echo "bench_thinker done at $(( $(date +%s) - t0 )) s"
  profile
elif [[ "$RUN" == h200b ]]; then
  bench64 thinker_fp8_64 --quantization fp8  # half the bytes a 64-sequence step reads
  timeout 200 python3 benchmarks/tune_fused_moe.py --out "$OUT/tune_fused_moe_wide_$TAG.json" --wide --tokens 64 \
    2>&1 | grep -E "default|rror" | cut -c1-400
  echo "tune done at $(( $(date +%s) - t0 )) s"
  align_tiles
  TILES=$(python3 - "$OUT/tune_fused_moe_wide_$TAG.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["tokens"]["64"]
best = r["best"][0]
if best["us"] < 0.98 * r["default"]["us"]:  # a gain worth the engine's A/B
    print(json.dumps({k: v for k, v in best["config"].items() if k != "BLOCK_M"}))
PY
  )
  echo "tiles to try: ${TILES:-none}"
  if [[ -n "$TILES" ]]; then
    bench64 thinker_moe_tiles_wide --moe-decode-tiles "$TILES"
    bench64 thinker_moe_tiles
  fi
else
  bench64 thinker_bf16_64
  bench64 thinker_fp8_64 --quantization fp8
  profile
  align_tiles
fi
echo "total $(( $(date +%s) - t0 )) s"
