"""GPU check of the engine's overlapped decode steps on the full-size thinker (random weights, bf16):
greedy tokens with `overlap_steps` on equal those with it off, for a batch of requests of
different lengths where one stops on an eos token mid-batch, and every KV block comes back.
(The CPU tests check the same logic through the eager static-buffer step.)

    python benchmarks/check_overlap_steps.py --out benchmarks/results/overlap_check_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_thinker import text_request  # noqa: E402

from thinktalk.config import reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402

LENGTHS = [(64, 40), (300, 12), (128, 33), (17, 25)]  # (prompt tokens, new tokens)


def run(engine: Engine, eos: list[int]) -> list:
    engine.eos_token_ids = set(eos)
    reqs = [text_request(n, new, seed=i) for i, (n, new) in enumerate(LENGTHS)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    return [(r.output_ids, r.finish_reason) for r in reqs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    # no prefix reuse: each run computes its prompts as the first did (cached rows round differently)
    ap.add_argument("--engine-config", default='{"enable_prefix_caching": false}')
    args = ap.parse_args()
    model = randomize_(build_model(reference_config(), "cuda", torch.bfloat16, with_talker=False), 0)
    engine = Engine(model, eos_token_ids=[], config=EngineConfig(**json.loads(args.engine_config)))
    result = {"device": torch.cuda.get_device_name(), "overlap_default": engine.overlap_steps}
    engine.overlap_steps = False
    plain = run(engine, [])
    eos = plain[0][0][20]  # request 0 stops at its 21st token (others wherever they sample it)
    plain_eos = run(engine, [eos])
    engine.overlap_steps = True
    steps_before = engine.decode_graphs.steps
    overlapped = run(engine, [])
    overlapped_eos = run(engine, [eos])
    bm = engine.block_manager
    result.update(
        tokens_equal=overlapped == plain, tokens_equal_with_eos=overlapped_eos == plain_eos,
        finish_reasons=[f for _, f in overlapped_eos], lengths=[len(t) for t, _ in overlapped_eos],
        graphed_steps=engine.decode_graphs.steps - steps_before,
        free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
    )
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = result["tokens_equal"] and result["tokens_equal_with_eos"] and bm.num_free_blocks == bm.num_blocks
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
