"""Decode-GEMV micro-benchmark: bf16 (cuBLAS / fused MoE) against the int4 / int8 / fp8 weight-only
GEMVs (kernels/quant_gemv.py, quant_moe_gemv.py) at the Qwen3-Omni thinker's shapes, one GPU.

    python benchmarks/bench_quant_gemv.py --out benchmarks/results/quant_gemv_h200.json
    python benchmarks/bench_quant_gemv.py --out ... --sweep     # + a tile sweep of the int4 GEMVs
    python benchmarks/bench_quant_gemv.py --out ... --tiny      # CPU dry run (Triton interpreter)
    python benchmarks/bench_quant_gemv.py --out ... --methods --sweep-bf16   # bf16 only, + its tile sweep
    python benchmarks/bench_quant_gemv.py --out ... --methods --sweep-norm   # + the norm-folded GEMVs' tiles
    python benchmarks/bench_quant_gemv.py --out ... --methods --norm-ab      # the same at the default tiles only

Cases (M = 1 decode row by default, --rows for more):
  dense  qkv fused (N 4096+512+512, K 2048), q (4096 x 2048), k / v (512 x 2048), o (2048 x 4096),
         lm_head (151936 x 2048), router (128 x 2048): bf16 F.linear (cuBLAS) and the bf16 GEMV
         (kernels/gemv.py), int4 / int8 / fp8 GEMV; before this
         change's numbers: the int4 tile GEMM (quant_matmul; int8 too for the lm_head, which is
         int8 in every quantized variant) and fp8 W8A8 (torch._scaled_mm)
  moe    128 experts, hidden 2048, intermediate 768, top-8: bf16 fused MoE (kernels/fused_moe) and
         bf16 GEMV MoE (kernels/gemv.moe_gemv), int4 / int8 / fp8 GEMV MoE; before: the int4 tile fused MoE (quant_moe.quant_fused_moe)
int formats are group 128 symmetric, fp8 per-channel (what --quantization int4 / int8 / fp8 write).

Timing: each case is captured as a CUDA graph of `--calls` calls (decode steps replay graphs, so
host launch overhead is not what is measured) and the graph replayed; µs per call = the replays'
elapsed time / calls. A decode step reads weights that are not in L2 (48 layers of them), so the
calls cycle over copies of the weight whose total exceeds 4x the L2 cache, and every MoE call gets
its own random routing. GB/s = bytes one call must read (packed weight + scales + zeros, x; MoE:
the experts of its 8 pairs) / time. Every kernel's output is checked against its torch reference
(relative max error in the JSON). Needs torch + triton + this repository; ~1-2 minutes on an H200
(mostly Triton compiles).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--tiny" in sys.argv:  # the kernels decide between compiler and interpreter when imported
    os.environ["TRITON_INTERPRET"] = "1"

from thinktalk.kernels import gemv as fg  # noqa: E402
from thinktalk.kernels import quant_gemm as qg  # noqa: E402
from thinktalk.kernels import quant_gemv as gv  # noqa: E402
from thinktalk.kernels import quant_moe_gemv as mg  # noqa: E402
from thinktalk.kernels.fused_moe import fused_moe  # noqa: E402
from thinktalk.kernels.quant_format import quantize, resolve_format  # noqa: E402
from thinktalk.kernels.quant_moe import QuantTensor, quant_fused_moe, quant_moe_reference  # noqa: E402
from thinktalk.layers.moe import moe_reference  # noqa: E402

DENSE = [  # (name, N, K)
    ("qkv_fused", 4096 + 512 + 512, 2048),
    ("q_proj", 4096, 2048),
    ("k_proj", 512, 2048),  # v_proj has the same shape
    ("o_proj", 2048, 4096),
    ("lm_head", 151936, 2048),
    ("router", 128, 2048),
]
EXPERTS, HIDDEN, INTER, TOP_K = 128, 2048, 768, 8
LAYERS = 48
METHODS = ("int4", "int8", "fp8")
DEVICE = "cuda"
TINY_DENSE = [("qkv_fused", 96 + 16 + 16, 64), ("q_proj", 96, 64), ("k_proj", 16, 64), ("o_proj", 64, 96),
              ("lm_head", 200, 64), ("router", 8, 64)]


def use_tiny_shapes() -> None:
    """--tiny: small shapes on the CPU (Triton interpreter), timing one eager call: checks that
    the script runs end to end, nothing about speed."""
    global DENSE, EXPERTS, HIDDEN, INTER, TOP_K, DEVICE
    DENSE, EXPERTS, HIDDEN, INTER, TOP_K, DEVICE = TINY_DENSE, 8, 64, 32, 2, "cpu"


def fmt_of(method: str, k: int):
    return resolve_format(method, k, None if method == "fp8" else 128, True)


def time_graph(fn, calls: int, replays: int = 10) -> float:
    """µs per call of fn(i) for i in range(calls), captured once as a CUDA graph and replayed."""
    if DEVICE == "cpu":  # --tiny
        start = time.perf_counter()
        fn(0)
        return (time.perf_counter() - start) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):  # compile and warm up outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / (replays * calls) * 1e3


def copies_for(nbytes: int, l2: int) -> int:
    """Copies of a weight so that cycling over them misses L2 (total >= 4x L2); a graph makes at
    least this many calls, one per copy."""
    return min(512, max(1, -(-4 * l2 // max(1, nbytes))))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def dense_cases(name: str, n: int, k: int, rows: int, l2: int, calls: int, gen) -> list[dict]:
    out = []
    w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * k**-0.5
    x = torch.randn(rows, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    io = nbytes(x) + rows * n * 2

    def record(method, kernel, fn, weight_bytes, err, cfg=None):
        us = time_graph(fn, max(calls, copies_for(weight_bytes, l2)))
        row = {"case": name, "kind": "dense", "N": n, "K": k, "rows": rows, "method": method, "kernel": kernel,
               "us": round(us, 2), "gb_s": round((weight_bytes + io) / us / 1e3, 1), "rel_err": err}
        if cfg:
            row["config"] = cfg
        print(json.dumps(row), flush=True)
        out.append(row)

    ws = [w] + [w.clone() for _ in range(copies_for(nbytes(w), l2) - 1)]
    record("bf16", "cublas", lambda i: F.linear(x, ws[i % len(ws)]), nbytes(w), 0.0)
    exact = F.linear(x.float(), w.float())
    err = rel_err(fg.gemv(x, w), exact)
    record("bf16", "gemv", lambda i: fg.gemv(x, ws[i % len(ws)]), nbytes(w), err, fg.gemv_config(rows, n, k, 2))
    del ws
    for method in METHODS:
        fmt = fmt_of(method, k)
        q, s, z = quantize(w, fmt, scale_dtype=torch.bfloat16)
        wb = nbytes(q, s, z)
        copies = [(q, s, z)] + [(q.clone(), s.clone(), None if z is None else z.clone())
                                for _ in range(copies_for(wb, l2) - 1)]
        exact = qg.quant_matmul_reference(x.float(), q, s, z, fmt)
        cfg = gv.gemv_config(rows, n, k, fmt)
        err = rel_err(gv.quant_gemv(x, q, s, z, fmt), exact)
        record(method, "gemv", lambda i: gv.quant_gemv(x, *copies[i % len(copies)], fmt), wb, err, cfg)
        if method == "int4" or (method == "int8" and name == "lm_head"):  # the tile GEMM decode used before
            err = rel_err(qg.quant_matmul(x, q, s, z, fmt), exact)
            record(method, "tile_gemm (before)", lambda i: qg.quant_matmul(x, *copies[i % len(copies)], fmt), wb, err)
        if method == "fp8" and qg.fp8_w8a8_supported(x.device):  # the W8A8 decode used before
            err = rel_err(qg.w8a8_fp8_matmul(x, q, s, None, fmt), exact)
            record(method, "w8a8_scaled_mm (before)",
                   lambda i: qg.w8a8_fp8_matmul(x, copies[i % len(copies)][0], copies[i % len(copies)][1], None, fmt),
                   wb, err)
        del copies, q, s, z
    del w
    torch.cuda.empty_cache()
    return out


def moe_cases(tokens: int, calls: int, gen) -> list[dict]:
    out = []
    gu = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16) * HIDDEN**-0.5
    dn = torch.randn(EXPERTS, HIDDEN, INTER, device=DEVICE, generator=gen, dtype=torch.bfloat16) * INTER**-0.5
    x = torch.randn(tokens, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    # a fresh routing for every call of the graph: the experts it reads are not left in L2
    routes = []
    for _ in range(calls):
        ids = torch.stack([torch.randperm(EXPERTS, device=DEVICE, generator=gen)[:TOP_K] for _ in range(tokens)])
        wts = torch.softmax(torch.randn(tokens, TOP_K, device=DEVICE, generator=gen), -1).to(torch.bfloat16)
        routes.append((wts, ids))
    pairs = tokens * TOP_K

    def record(method, kernel, fn, expert_bytes, err, cfg=None):
        us = time_graph(fn, calls)
        read = pairs * expert_bytes + nbytes(x) * 2
        row = {"case": "moe", "kind": "moe", "experts": EXPERTS, "hidden": HIDDEN, "inter": INTER, "top_k": TOP_K,
               "rows": tokens, "method": method, "kernel": kernel, "us": round(us, 2),
               "gb_s": round(read / us / 1e3, 1), "rel_err": err}
        if cfg:
            row["config"] = cfg
        print(json.dumps(row), flush=True)
        out.append(row)

    wts0, ids0 = routes[0]
    exact_bf16 = moe_reference(x.float(), gu.float(), dn.float(), wts0.float(), ids0)
    err = rel_err(fused_moe(x, gu, dn, wts0, ids0), exact_bf16)
    del exact_bf16
    record("bf16", "fused_moe", lambda i: fused_moe(x, gu, dn, *routes[i]), nbytes(gu[0], dn[0]), err)
    exact_bf16 = moe_reference(x.float(), gu.float(), dn.float(), wts0.float(), ids0)
    err = rel_err(fg.moe_gemv(x, gu, dn, wts0, ids0), exact_bf16)
    del exact_bf16
    record("bf16", "gemv_moe", lambda i: fg.moe_gemv(x, gu, dn, *routes[i]), nbytes(gu[0], dn[0]), err,
           fg.moe_gemv_config(tokens, TOP_K, HIDDEN, INTER, 2))
    for method in METHODS:
        f1, f2 = fmt_of(method, HIDDEN), fmt_of(method, INTER)
        a = QuantTensor(*quantize(gu, f1, scale_dtype=torch.bfloat16), f1, HIDDEN)
        b = QuantTensor(*quantize(dn, f2, scale_dtype=torch.bfloat16), f2, INTER)
        per_expert = sum(nbytes(t.qweight[0], t.scale[0], None if t.zero is None else t.zero[0]) for t in (a, b))
        exact = quant_moe_reference(x.float(), a, b, wts0.float(), ids0)
        cfg = mg.moe_gemv_config(tokens, TOP_K, HIDDEN, INTER, method)
        err = rel_err(mg.quant_moe_gemv(x, a, b, wts0, ids0), exact)
        record(method, "gemv_moe", lambda i: mg.quant_moe_gemv(x, a, b, *routes[i]), per_expert, err, cfg)
        if method == "int4":  # the tile fused MoE decode used before
            err = rel_err(quant_fused_moe(x, a, b, wts0, ids0), exact)
            record(method, "tile_fused_moe (before)", lambda i: quant_fused_moe(x, a, b, *routes[i]), per_expert, err)
        del a, b
    torch.cuda.empty_cache()
    return out


def sweep(l2: int, calls: int, gen) -> list[dict]:
    """int4 GEMV tiles at one decode row: o_proj, q_proj, k_proj and the MoE kernels."""
    rows = []
    for name, n, k in [c for c in DENSE if c[0] in ("q_proj", "k_proj", "o_proj")]:
        fmt = fmt_of("int4", k)
        w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * k**-0.5
        x = torch.randn(1, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
        q, s, z = quantize(w, fmt, scale_dtype=torch.bfloat16)
        copies = [(q, s, z)] + [(q.clone(), s.clone(), None) for _ in range(copies_for(nbytes(q, s), l2) - 1)]
        exact = qg.quant_matmul_reference(x.float(), q, s, z, fmt)
        def run(cfg):
            return _time_config(rows, name, lambda i, c: gv.quant_gemv(x, *copies[i % len(copies)], fmt, config=c),
                                lambda c: rel_err(gv.quant_gemv(x, q, s, z, fmt, config=c), exact),
                                max(calls, len(copies)), cfg, read_bytes=nbytes(q, s))

        # tiles at 3 stages, then the pipeline depth of the best tile
        tried = []
        for bn, warps, split in itertools.product((2, 4, 8, 16), (1, 2, 4), (1, 2)):
            if split > 1 and -(-n // bn) >= 4 * 132:
                continue
            cfg = dict(BLOCK_N=bn, BLOCK_K=512, SPLIT_K=split, num_warps=warps, num_stages=3)
            tried.append((run(cfg), cfg))
        best_cfg = min(tried, key=lambda r: r[0])[1]
        for stages in (2, 4, 6):
            run(dict(best_cfg, num_stages=stages))
        best = _best(rows, name)
        print(json.dumps({"sweep": name, "default": gv.gemv_config(1, n, k, fmt), "best": best}), flush=True)
        del copies, q, s, z, w
    gu = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16) * HIDDEN**-0.5
    dn = torch.randn(EXPERTS, HIDDEN, INTER, device=DEVICE, generator=gen, dtype=torch.bfloat16) * INTER**-0.5
    f1, f2 = fmt_of("int4", HIDDEN), fmt_of("int4", INTER)
    a = QuantTensor(*quantize(gu, f1, scale_dtype=torch.bfloat16), f1, HIDDEN)
    b = QuantTensor(*quantize(dn, f2, scale_dtype=torch.bfloat16), f2, INTER)
    del gu, dn
    x = torch.randn(1, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    routes = [(torch.softmax(torch.randn(1, TOP_K, device=DEVICE, generator=gen), -1).to(torch.bfloat16),
               torch.randperm(EXPERTS, device=DEVICE, generator=gen)[:TOP_K][None]) for _ in range(calls)]
    exact = quant_moe_reference(x.float(), a, b, *routes[0])
    base = mg.moe_gemv_config(1, TOP_K, HIDDEN, INTER, "int4")

    def run(cfg):
        return _time_config(rows, "moe", lambda i, c: mg.quant_moe_gemv(x, a, b, *routes[i], config=c),
                            lambda c: rel_err(mg.quant_moe_gemv(x, a, b, *routes[0], config=c), exact), calls, cfg)

    # gate_up tiles (down at its default), down tiles (gate_up at its best), then pipeline depth
    tried = []
    for bn, w in itertools.product((4, 8, 16), (1, 2, 4)):
        cfg = dict(base, BLOCK_N_GU=bn, num_warps_gu=w)
        tried.append((run(cfg), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    tried = [(min(t[0] for t in tried), best_cfg)]
    for bn, w in itertools.product((2, 4, 8, 16), (1, 2, 4)):
        cfg = dict(best_cfg, BLOCK_N_D=bn, num_warps_d=w)
        tried.append((run(cfg), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    for stages in (2, 4, 6):
        run(dict(best_cfg, num_stages=stages))
    best = _best(rows, "moe")
    print(json.dumps({"sweep": "moe", "default": base, "best": best}), flush=True)
    return rows


def _time_config(rows: list, case: str, fn, check, calls: int, cfg: dict, read_bytes: int | None = None) -> float:
    """Time fn(i, cfg) from a CUDA graph; a row per config: its time (and GB/s for read_bytes
    a call) and check(cfg)'s error, or why it failed. Returns µs (1e9 for a failed tile)."""
    try:
        err = check(cfg)
        us = time_graph(lambda i: fn(i, cfg), calls)
    except Exception as exc:  # a tile the compiler rejects
        rows.append({"case": case, "config": cfg, "error": str(exc)[:160]})
        return 1e9
    row = {"case": case, "config": cfg, "us": round(us, 2)}
    if read_bytes is not None:
        row["gb_s"] = round(read_bytes / us / 1e3, 1)
    rows.append({**row, "rel_err": err})
    return us


def _best(rows: list, case: str, n: int = 3) -> list[dict]:
    """The n fastest configs timed for `case`."""
    return sorted((r for r in rows if r.get("case") == case and "us" in r), key=lambda r: r["us"])[:n]


def sweep_bf16(l2: int, calls: int, gen) -> list[dict]:
    """bf16 GEMV tiles at one decode row: qkv, o_proj, router, then the MoE's gate_up and down."""
    rows = []
    for name, n, k in [c for c in DENSE if c[0] in ("qkv_fused", "o_proj", "router")]:
        w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * k**-0.5
        x = torch.randn(1, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
        ws = [w] + [w.clone() for _ in range(copies_for(nbytes(w), l2) - 1)]
        exact = F.linear(x.float(), w.float())
        fn = lambda i, cfg: fg.gemv(x, ws[i % len(ws)], config=cfg)  # noqa: E731
        check = lambda cfg: rel_err(fg.gemv(x, w, config=cfg), exact)  # noqa: E731
        base = fg.gemv_config(1, n, k, 2)
        tried = []
        narrow = n < 1024  # the router: split-K (+ a reduction kernel) or not
        for bn, bk, warps, split in itertools.product((2, 4, 8) if narrow else (4, 8, 16), (128, 256),
                                                      (1, 2) if narrow else (1, 2, 4), (1, 4) if narrow else (1,)):
            cfg = dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, SPLIT_K=split)
            tried.append((_time_config(rows, name, fn, check, max(calls, len(ws)), cfg), cfg))
        best_cfg = min(tried, key=lambda r: r[0])[1]
        for stages in (2, 3, 6):
            _time_config(rows, name, fn, check, max(calls, len(ws)), dict(best_cfg, num_stages=stages))
        best = _best(rows, name)
        print(json.dumps({"sweep_bf16": name, "default": base, "best": best}), flush=True)
        del ws, w
    gu = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16) * HIDDEN**-0.5
    dn = torch.randn(EXPERTS, HIDDEN, INTER, device=DEVICE, generator=gen, dtype=torch.bfloat16) * INTER**-0.5
    x = torch.randn(1, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    routes = [(torch.softmax(torch.randn(1, TOP_K, device=DEVICE, generator=gen), -1).to(torch.bfloat16),
               torch.randperm(EXPERTS, device=DEVICE, generator=gen)[:TOP_K][None]) for _ in range(calls)]
    exact = moe_reference(x.float(), gu.float(), dn.float(), *routes[0])
    fn = lambda i, cfg: fg.moe_gemv(x, gu, dn, *routes[i], config=cfg)  # noqa: E731
    check = lambda cfg: rel_err(fg.moe_gemv(x, gu, dn, *routes[0], config=cfg), exact)  # noqa: E731
    base = fg.moe_gemv_config(1, TOP_K, HIDDEN, INTER, 2)
    tried = []
    for bn, bk, w in itertools.product((4, 8, 16), (128, 256), (2, 4)):  # gate_up, down at its default
        cfg = dict(base, BLOCK_N_GU=bn, BLOCK_K_GU=bk, num_warps_gu=w)
        tried.append((_time_config(rows, "moe", fn, check, calls, cfg), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    tried = [(min(t[0] for t in tried), best_cfg)]
    for bn, bk, w in itertools.product((4, 8, 16), (128, 256), (1, 2, 4)):  # down, gate_up at its best
        cfg = dict(best_cfg, BLOCK_N_D=bn, BLOCK_K_D=bk, num_warps_d=w)
        tried.append((_time_config(rows, "moe", fn, check, calls, cfg), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    for stages in (2, 3, 6):
        _time_config(rows, "moe", fn, check, calls, dict(best_cfg, num_stages=stages))
    best = _best(rows, "moe")
    print(json.dumps({"sweep_bf16": "moe", "default": base, "best": best}), flush=True)
    return rows


def sweep_norm(l2: int, calls: int, gen, quick: bool = False) -> list[dict]:
    """The GEMVs with the residual add + RMSNorm folded in (kernels/norm_gemv.py) at one decode
    row, each beside the unfused kernels it replaces: the q/k/v and router tiles
    (add_norm_gemv), then the MoE's gate-up tiles and its down tiles (add_norm_moe: router GEMV,
    gate-up with the top-k, down). Every call has its own row, so the MoE's routing changes.
    quick: the default tiles only (fused, unfused, and the MoE with the router's top-k kernel)."""
    from thinktalk.kernels import norm_gemv as ng
    from thinktalk.kernels.rms_norm import add_rms_norm
    from thinktalk.kernels.router import softmax_topk
    from thinktalk.layers.moe import SparseMoE

    eps, rows = 1e-6, []
    g = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, generator=gen)).to(torch.bfloat16)
    xs = [torch.randn(1, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16) for _ in range(calls)]
    rs = [2 * torch.randn(1, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16) for _ in range(calls)]
    h0 = (xs[0].float() + rs[0].float()).to(torch.bfloat16).float()
    normed0 = h0 * torch.rsqrt(h0.pow(2).mean(-1, keepdim=True) + eps) * g.float()

    def unfused_row(case, fn, n_calls):
        us = time_graph(fn, n_calls)
        rows.append({"case": case, "config": "unfused", "us": round(us, 2)})
        print(json.dumps(rows[-1]), flush=True)

    for name, n, k in [c for c in DENSE if c[0] in ("qkv_fused", "router")]:
        w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * k**-0.5
        ws = [w] + [w.clone() for _ in range(copies_for(nbytes(w), l2) - 1)]
        n_calls = max(calls, len(ws))
        exact = F.linear(normed0, w.float())
        unfused_row(name, lambda i: fg.gemv(add_rms_norm(xs[i % calls], rs[i % calls], g, eps)[0], ws[i % len(ws)]),
                    n_calls)
        fn = lambda i, cfg: ng.add_norm_gemv(xs[i % calls], rs[i % calls], g, eps, ws[i % len(ws)], config=cfg)  # noqa: E731
        check = lambda cfg: rel_err(ng.add_norm_gemv(xs[0], rs[0], g, eps, w, config=cfg)[0], exact)  # noqa: E731
        base = ng.norm_gemv_config(1, n, k, 2)
        _time_config(rows, name, fn, check, n_calls, base, read_bytes=nbytes(w))
        if quick:
            print(json.dumps(rows[-1]), flush=True)
            del ws, w
            continue
        tried = []
        narrow = n < 1024
        for bn, bk, warps in itertools.product((1, 2, 4) if narrow else (4, 8, 16), (128, 256, 512), (1, 2) if narrow else (2, 4)):
            cfg = dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
            tried.append((_time_config(rows, name, fn, check, n_calls, cfg, read_bytes=nbytes(w)), cfg))
        best_cfg = min(tried, key=lambda r: r[0])[1]
        for stages in (2, 3, 4, 6, 8):
            _time_config(rows, name, fn, check, n_calls, dict(best_cfg, num_stages=stages), read_bytes=nbytes(w))
        print(json.dumps({"sweep_norm": name, "default": base, "best": _best(rows, name)}), flush=True)
        del ws, w

    with torch.device(DEVICE):
        moe = SparseMoE(HIDDEN, INTER, EXPERTS, TOP_K).to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, device=DEVICE, generator=gen, dtype=torch.bfloat16) * p.shape[-1] ** -0.5)
    gu, dn, router = moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight
    wts0, ids0 = softmax_topk(F.linear(normed0.to(torch.bfloat16), router), TOP_K, True)
    exact = moe_reference(normed0, gu.float(), dn.float(), wts0.float(), ids0)

    def unfused_moe(i):
        normed, _ = add_rms_norm(xs[i], rs[i], g, eps)
        weights, ids = softmax_topk(fg.gemv(normed, router), TOP_K, True)
        return fg.moe_gemv(normed, gu, dn, weights, ids)

    unfused_row("moe", unfused_moe, calls)

    def fn(i, cfg):
        tiles = {k: v for k, v in cfg.items() if k != "route_in_gate_up"}
        return ng.add_norm_moe(xs[i], rs[i], g, eps, moe, config=tiles, route_in_gate_up=cfg["route_in_gate_up"])

    check = lambda cfg: rel_err(fn(0, cfg)[0], exact)  # noqa: E731
    base = dict(ng.norm_moe_config(1, TOP_K, HIDDEN, INTER, 2), route_in_gate_up=True)
    read = TOP_K * nbytes(gu[0], dn[0]) + nbytes(router)
    _time_config(rows, "moe", fn, check, calls, base, read_bytes=read)
    if quick:
        _time_config(rows, "moe, top-k kernel", fn, check, calls, dict(base, route_in_gate_up=False), read_bytes=read)
        print(json.dumps(rows[-2:]), flush=True)
        return rows
    tried = []
    for bn, bk, w in itertools.product((4, 8, 16), (64, 128, 256), (2, 4)):  # gate-up, down at its default
        cfg = dict(base, BLOCK_N_GU=bn, BLOCK_K_GU=bk, num_warps_gu=w)
        tried.append((_time_config(rows, "moe", fn, check, calls, cfg, read_bytes=read), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    tried = [(min(t[0] for t in tried), best_cfg)]
    for bn, bk, w in itertools.product((2, 4, 8), (128, 256, 512), (2, 4)):  # down, gate-up at its best
        cfg = dict(best_cfg, BLOCK_N_D=bn, BLOCK_K_D=bk, num_warps_d=w)
        tried.append((_time_config(rows, "moe", fn, check, calls, cfg, read_bytes=read), cfg))
    best_cfg = min(tried, key=lambda r: r[0])[1]
    for stages in (2, 3, 4, 6, 8):
        _time_config(rows, "moe", fn, check, calls, dict(best_cfg, num_stages=stages), read_bytes=read)
    best = _best(rows, "moe")
    for cfg in (base, best[0]["config"]):  # the router's top-k as a kernel of its own, for comparison
        _time_config(rows, "moe, top-k kernel", fn, check, calls, dict(cfg, route_in_gate_up=False), read_bytes=read)
    print(json.dumps({"sweep_norm": "moe", "default": base, "best": best,
                      "top_k_kernel": _best(rows, "moe, top-k kernel", 2)}), flush=True)
    return rows


def summary(cases: list[dict]) -> dict:
    """Matmul time of one thinker decode token (M = 1) per method, from the cases: 48 layers of
    qkv (one GEMM / GEMV: the engine's fuse_qkv stacks float and quantized projections alike), o
    and MoE, plus the lm_head, which is int8 in every quantized variant (the quantization
    policy's heads group). "(before)": the tile kernels this change replaces at decode, with
    q / k / v as three GEMMs (quantized projections were not stacked then)."""
    t = {(c["case"], c["method"], c["kernel"]): c["us"] for c in cases if c["rows"] == 1}
    out = {}
    for method, dense_k, moe_k in (("bf16", "cublas", "fused_moe"), ("bf16 gemv", "gemv", "gemv_moe"),
                                   ("int4", "gemv", "gemv_moe"),
                                   ("int8", "gemv", "gemv_moe"), ("fp8", "gemv", "gemv_moe"),
                                   ("int4 (before)", "tile_gemm (before)", "tile_fused_moe (before)")):
        m = method.split()[0]
        try:
            if "before" in method:
                qkv = t[("q_proj", m, dense_k)] + 2 * t[("k_proj", m, dense_k)]
                head = t[("lm_head", "int8", "tile_gemm (before)")]
            else:
                qkv = t[("qkv_fused", m, dense_k)]
                head = t[("lm_head", "bf16", "cublas")] if m == "bf16" else t[("lm_head", "int8", "gemv")]
                if method == "bf16 gemv":  # the engine keeps cuBLAS for the lm_head (one call a step)
                    head = t[("lm_head", "bf16", "cublas")]
            layer = qkv + t[("o_proj", m, dense_k)] + t[("moe", m, moe_k)]
        except KeyError:
            continue
        out[method] = {"layer_us": round(layer, 1), "lm_head_us": round(head, 1),
                       "token_ms": round((LAYERS * layer + head) / 1e3, 3),
                       "tok_s_if_only_matmuls": round(1e6 / (LAYERS * layer + head), 1)}
    return out


def main():
    global METHODS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="*", default=[1], help="decode rows (tokens) per call, each <= 8")
    ap.add_argument("--calls", type=int, default=24, help="calls per captured graph")
    ap.add_argument("--sweep", action="store_true", help="also sweep the int4 GEMV tiles (a few more minutes)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: small shapes, Triton interpreter")
    ap.add_argument("--methods", nargs="*", default=["int4", "int8", "fp8"],
                    help="quantized methods besides bf16 (the flag alone: bf16 only)")
    ap.add_argument("--sweep-bf16", action="store_true", help="also sweep the bf16 GEMV tiles")
    ap.add_argument("--sweep-norm", action="store_true",
                    help="also sweep the tiles of the GEMVs with the RMSNorm folded in (kernels/norm_gemv.py)")
    ap.add_argument("--norm-ab", action="store_true",
                    help="the GEMVs with the RMSNorm folded in against the unfused kernels, default tiles only")
    args = ap.parse_args()
    METHODS = tuple(args.methods)
    if args.tiny:
        use_tiny_shapes()
        device_name, sms, l2 = "cpu (dry run)", 0, 64 * 2**10
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny for a CPU dry run)")
    else:
        props = torch.cuda.get_device_properties(0)
        device_name, sms, l2 = torch.cuda.get_device_name(), props.multi_processor_count, props.L2_cache_size
    t0 = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = []
    with torch.inference_mode():
        for rows in args.rows:
            for name, n, k in DENSE:
                cases += dense_cases(name, n, k, rows, l2, args.calls, gen)
            cases += moe_cases(rows, args.calls, gen)
        sweep_rows = sweep(l2, args.calls, gen) if args.sweep else None
        if args.sweep_bf16:
            sweep_rows = (sweep_rows or []) + sweep_bf16(l2, args.calls, gen)
        if args.sweep_norm or args.norm_ab:
            sweep_rows = (sweep_rows or []) + sweep_norm(l2, args.calls, gen, quick=not args.sweep_norm)
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "device": device_name,
        "sms": sms,
        "l2_bytes": l2,
        "versions": {"torch": torch.__version__, "triton": gv.triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip(),
        "notes": [
            "us per call from CUDA-graph replays; weights cycled over copies exceeding 4x L2, "
            "a new MoE routing per call",
            "int4 / int8: group 128 symmetric; fp8: per-channel e4m3; GEMV defaults from quant_gemv.gemv_config / "
            "quant_moe_gemv.moe_gemv_config",
            "gb_s: bytes one call must read (packed weight + scales (+ zeros) + x; MoE: the 8 pairs' experts) / time",
            "summary: matmul kernels only (no attention, norms, router, sampling) of one decode token",
        ],
        "cases": cases,
        "summary": summary(cases),
        "seconds": round(time.time() - t0, 1),
    }
    if sweep_rows is not None:
        result["sweep"] = sweep_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
