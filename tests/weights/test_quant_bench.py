"""benchmarks/bench_quant.py runs end to end (tiny config, CPU dry run), so the GPU run the
integrator starts does not die on an API that moved: every variant (its own process) builds
layer by layer, is measured per layer and per quantized part, speaks one exchange with its KV
sized for it, and decodes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quant_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), "--tiny", "--out", str(out),
           "--variants", "bf16", "int4", "fp8", "--audio-seconds", "2", "--speech-seconds", "1",
           "--decode-len", "6", "--decode-len-many", "3", "--streams", "3", "--answer-tokens", "6",
           "--logit-tokens", "48", "--error-tokens", "24"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"bf16", "int4", "fp8"} and res["command"] and res["versions"]["torch"]
    int4 = res["variants"]["int4"]
    assert int4["weights_gib"] < res["variants"]["bf16"]["weights_gib"]
    assert len(int4["layer_errors"]["per_layer"]["thinker.model"]) == 4
    ex = int4["exchange"]
    assert ex["codec_frames"] == 12 and ex["answer_tokens"] == 6 and 0 < ex["first_audio_s"] < ex["seconds"]
    assert ex["sizing"]["max_num_seqs"] == 1 and ex["sizing"]["speech_slots"] == 1
    assert ex["sizing"]["kv_tokens"] >= ex["prompt_tokens"] + ex["answer_tokens"]
    assert int4["decode_3"]["tok_s"] > 0
    assert 0 <= int4["logits"]["top1_agreement"] <= 1
    # the parts outside the decoders were quantized and measured (int8 encoders/heads/embeddings)
    parts = int4["part_errors"]
    assert set(parts["summary"]) == {"encoders (int8)", "heads (int8)", "embeddings (int8)"}
    assert all(0 < e["max"] < 0.03 for e in parts["summary"].values())
    assert 0 < parts["audio_encoder_output"] < 0.05 and parts["lm_head_logits"]["top1_agreement"] > 0.9
    assert res["variants"]["fp8"]["part_errors"]["summary"]["encoders (fp8)"]["max"] < 0.1


def test_bench_quant_gemv_dry_run(tmp_path):
    """benchmarks/bench_quant_gemv.py end to end at tiny shapes on the CPU (Triton interpreter):
    every case runs, its kernel agrees with its reference, the JSON has what the GPU run reports."""
    out = tmp_path / "gemv.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quant_gemv.py"), "--tiny", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"] and res["device"] and res["versions"]["triton"]
    kernels = {(c["case"], c["method"], c["kernel"]) for c in res["cases"]}
    for case in ("qkv_fused", "q_proj", "k_proj", "o_proj", "lm_head"):
        assert {(case, m, "gemv") for m in ("int4", "int8", "fp8")} <= kernels and (case, "bf16", "cublas") in kernels
    assert {("moe", m, "gemv_moe") for m in ("int4", "int8", "fp8")} <= kernels and ("moe", "bf16", "fused_moe") in kernels
    assert all(c["rel_err"] < 0.02 and c["us"] > 0 and c["gb_s"] >= 0 for c in res["cases"])
    assert set(res["summary"]) >= {"bf16", "int4", "int8", "fp8"}
