"""GPU check: the engine's thinker logits beside transformers', full-size random weights, bf16.

    python benchmarks/check_logits.py --out benchmarks/results/logits_check_h200.json

transformers' `Qwen3OmniMoeThinkerForConditionalGeneration` is built from the Instruct config
with its own random init; our thinker is built on the meta device and takes transformers' very
tensors (the two state dicts have the same names and shapes, so nothing is copied). Our engine
(default GPU path: paged KV, Triton fused MoE and paged attention, CUDA-graphed decode, prefill in
piecewise CUDA graphs) runs a
prompt of random ids and 16 greedy decode steps, keeping the logits of every step. transformers
then runs one forward over the prompt and our 16 fed tokens (teacher forcing), whose logits at the
same 17 positions are compared row by row: max abs difference, that relative to the row's largest
logit, cosine similarity, and whether the top token agrees. The same is repeated with
`cuda_graphs=False` to show what the graphs change.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_thinker import reference_config_path, text_request  # noqa: E402

from thinktalk.config import reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.layers.rotary import RotaryEmbedding  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402


def our_thinker_sharing(hf_thinker, cfg, device):
    model = build_model(cfg, "meta", torch.bfloat16, with_talker=False)
    missing, unexpected = model.thinker.load_state_dict(hf_thinker.state_dict(), strict=True, assign=True)
    assert not missing and not unexpected
    text = cfg.thinker_config.text_config
    rope = text.get("rope_parameters") or {}
    head_dim = text.get("head_dim") or text.hidden_size // text.num_attention_heads
    with torch.device(device):  # the rotary table's buffers are not in the state dict
        model.thinker.model.rotary_emb = RotaryEmbedding(
            head_dim, rope.get("rope_theta", text.get("rope_theta", 10000.0)), rope.get("mrope_section")
        )
    for name, buf in model.named_buffers():
        assert not buf.is_meta, name
    return model.eval()


def engine_logits(model, prompt_len: int, steps: int, **config) -> tuple[list[int], list[int], torch.Tensor]:
    # overlapped decode steps sample inside `_launch`, past the `_run` this wraps: the check runs synchronously
    engine = Engine(model, eos_token_ids=[], config=EngineConfig(num_kv_blocks=2048, overlap_steps=False, **config))
    rows = []
    run = engine._run

    def keep(batch):
        logits = run(batch)
        rows.append(logits[-1].clone())  # the one request's row
        return logits

    engine._run = keep
    req = text_request(prompt_len, steps + 1, seed=123)
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    graphed = {"decode": engine.decode_graphs.steps if engine.decode_graphs is not None else 0,
               "prefill": engine.prefill_graphs.steps if engine.prefill_graphs is not None else 0}
    return req.prompt_ids, req.output_ids, torch.stack(rows).float(), graphed


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (ours - ref).abs()
    per_row = {
        "max_abs": diff.max(-1).values.tolist(),
        "max_abs_over_max_logit": (diff.max(-1).values / ref.abs().max(-1).values).tolist(),
        "cosine": torch.nn.functional.cosine_similarity(ours, ref, dim=-1).tolist(),
        "top1_equal": (ours.argmax(-1) == ref.argmax(-1)).tolist(),
    }
    # where the top tokens differ: how far apart transformers' own logits put the two (a near tie
    # is a small gap next to the logits' spread)
    ours_top, ref_top = ours.argmax(-1), ref.argmax(-1)
    rows = torch.nonzero(ours_top != ref_top).flatten()
    gaps = (ref[rows, ref_top[rows]] - ref[rows, ours_top[rows]]).tolist()
    return {
        "rows": ours.shape[0],
        "top1_gap_where_different": gaps,
        "max_abs": max(per_row["max_abs"]),
        "max_abs_over_max_logit": max(per_row["max_abs_over_max_logit"]),
        "min_cosine": min(per_row["cosine"]),
        "top1_agreement": f"{sum(per_row['top1_equal'])}/{ours.shape[0]}",
        "logit_std": ref.std().item(),
        "per_row": per_row,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="the tiny test config on the CPU (a smoke test of this script)")
    args = ap.parse_args()
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(0)
    if args.tiny:
        from thinktalk.config import config_from_dict
        from thinktalk.weights.tiny_config import tiny_config_dict

        raw, device = tiny_config_dict(), "cpu"
        cfg = config_from_dict(raw)
    else:
        raw, device = json.loads(reference_config_path().read_text()), "cuda"
        cfg = reference_config()
    hf_cfg = Qwen3OmniMoeConfig(**raw).thinker_config
    with torch.device(device):
        hf = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    ours = our_thinker_sharing(hf, cfg, device)

    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "model": "Qwen3-Omni-30B-A3B thinker, full-size random weights (transformers' init), bf16, shared by both",
        "tolerance": "bf16: cosine >= 0.999 and max |diff| <= 5% of the row's largest |logit|; top-1 may differ only on near ties",
    }
    with torch.inference_mode():
        # on the CPU "graphed" is the same static-buffer step run eagerly
        paged = {"kv_backend": "paged", "moe_kernel": "torch"} if device == "cpu" else {}
        for name, cfg in (("graphed", {"cuda_graphs": True, "prefill_graphs": True, **paged}),
                          ("eager", {"cuda_graphs": False, "prefill_graphs": False, **paged})):
            prompt, out, logits, graphed = engine_logits(ours, args.prompt_len, args.steps, **cfg)
            fed = torch.tensor(prompt + out[:-1], device=device)[None]
            ref = hf(input_ids=fed, attention_mask=torch.ones_like(fed)).logits[0, len(prompt) - 1 :].float()
            result[name] = {"graphed_steps": graphed, "tokens": out, **compare(logits, ref)}
            result[name]["vs_transformers_ok"] = (
                result[name]["min_cosine"] >= 0.999 and result[name]["max_abs_over_max_logit"] <= 0.05
            )
            print(name, {k: v for k, v in result[name].items() if k not in ("per_row", "tokens")}, flush=True)
            if name == "graphed":
                graphed_logits, graphed_tokens = logits, out
        result["graphed_vs_eager"] = {
            "same_tokens": graphed_tokens == out,
            "max_abs": (graphed_logits - logits).abs().max().item() if graphed_tokens == out else None,
        }
    print(result["graphed_vs_eager"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
