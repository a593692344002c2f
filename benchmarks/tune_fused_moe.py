"""Tile sizes of the fused MoE kernel for the Qwen3-Omni thinker's shapes, measured on the GPU.

    python benchmarks/tune_fused_moe.py --out benchmarks/results/tune_fused_moe_h200.json [--down | --wide]

For each token count (decode batches of 1, 8, 64, and a 512-token prefill chunk) every config is
timed as a CUDA graph of 20 calls (the engine replays decode steps as graphs, so launch overhead is
not what is being measured). `kernels/fused_moe._pick_config` takes its table from the result.
--down keeps the chosen gate_up tiles and sweeps the down projection's own (BLOCK_N_D, BLOCK_K_D,
num_warps_d, num_stages_d): its K (= I = 768) is a few steps of the K loop. --wide sweeps the
decode regime's gate_up tiles (16-row blocks) further: 256-column K steps, 8 warps, up to 6 stages
in flight, where the shared memory holds them; `bench_thinker.py --moe-decode-tiles` tries the best
in the engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.kernels import fused_moe as fused_moe_module  # noqa: E402
from thinktalk.kernels.fused_moe import _pick_config, fused_moe  # noqa: E402
from thinktalk.layers.moe import route  # noqa: E402


def time_graph(fn, reps: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps) * 1000  # us per call


# Shared memory a program may fill with its pipelined tiles (an H100/H200 SM has 228 KiB)
SMEM_BUDGET = 220 << 10


def wide_decode_configs() -> list[dict]:
    """gate_up tiles of 16-row blocks whose stages fit the shared memory: per stage a 16 x BLOCK_K
    slice of the tokens and a BLOCK_K x BLOCK_N slice of the gate and of the up half (bf16)."""
    out = []
    for bn, bk, warps, stages in itertools.product([32, 64, 128], [128, 256], [4, 8], [3, 4, 5, 6]):
        stage_bytes = (16 * bk + 2 * bk * bn) * 2
        if (stages - 1) * stage_bytes <= SMEM_BUDGET:
            out.append(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return out


def sweep_align(tokens: list[int], router, hidden: int, top_k: int, g) -> dict:
    """µs of moe_align's one program per token count and tiles (fused_moe.ALIGN_ONE_PROGRAM_TILES)."""
    out = {}
    table = dict(fused_moe_module.ALIGN_ONE_PROGRAM_TILES)
    for n in tokens:
        x = torch.randn(n, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        _, ids = route(x, router, top_k, True)
        default = fused_moe_module.align_one_program_tiles(n * top_k)
        rows = []
        for blocks, warps in itertools.product([16, 32, 64], [1, 2, 4, 8, 16]):
            tiles = dict(default, BLOCKS=blocks, num_warps=warps)
            fused_moe_module.ALIGN_ONE_PROGRAM_TILES = {fused_moe_module.ALIGN_ONE_PROGRAM: tiles}
            try:
                us = time_graph(lambda: fused_moe_module.moe_align(ids, router.shape[0], 16))
            except Exception as exc:
                rows.append({"tiles": tiles, "error": str(exc)[:120]})
                continue
            rows.append({"tiles": tiles, "us": us, "default": tiles == default})
        fused_moe_module.ALIGN_ONE_PROGRAM_TILES = table
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        out[str(n)] = {"default": next((r for r in rows if r.get("default")), None), "best": ok[:5]}
        print("align", n, "default", out[str(n)]["default"], "best", ok[0], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 64, 512])
    ap.add_argument("--down", action="store_true", help="sweep the down projection's tiles only")
    ap.add_argument("--wide", action="store_true", help="sweep the decode regime's gate_up tiles wider (BLOCK_M 16)")
    ap.add_argument("--align", action="store_true", help="time the one-program expert sort's tiles instead")
    args = ap.parse_args()
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    router = torch.randn(experts, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    bytes_per_expert = (gate_up[0].numel() + down[0].numel()) * 2
    configs = [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in itertools.product([16, 32, 64], [32, 64, 128], [64, 128], [4], [3, 4])
    ]
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": dict(experts=experts, hidden=hidden, inter=inter, top_k=top_k), "tokens": {}}
    if args.align:
        result["align"] = sweep_align(args.tokens, router, hidden, top_k, g)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    for n in args.tokens:
        x = torch.randn(n, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        w, ids = route(x, router, top_k, True)
        hit = torch.unique(ids).numel()
        rows = []
        if args.down:
            base = _pick_config(n * top_k, experts, hidden, inter)
            candidates = [{**base, "BLOCK_N_D": bn, "BLOCK_K_D": bk, "num_warps_d": w, "num_stages_d": st}
                          for bn, bk, w, st in itertools.product([64, 128], [64, 128, 256], [4, 8], [2, 3, 4])]
        elif args.wide:
            candidates = wide_decode_configs()
        else:
            candidates = [c for c in configs if c["BLOCK_M"] <= max(16, 4 * n * top_k // experts * 2)]
        for cfg in [None] + candidates:
            try:
                us = time_graph(lambda: fused_moe(x, gate_up, down, w, ids, config=cfg))
            except Exception as exc:  # a config the compiler rejects (shared memory)
                rows.append({"config": cfg, "error": str(exc)[:120]})
                continue
            rows.append({"config": cfg or {"default": _pick_config(n * top_k, experts, hidden, inter)}, "us": us,
                         "tb_s": hit * bytes_per_expert / us / 1e6})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        result["tokens"][str(n)] = {"experts_hit": hit, "default": rows[0], "best": ok[:5]}
        print(n, "default", rows[0].get("us"), "best", ok[0], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
