"""The norms folded into the decode GEMVs (kernels/norm_gemv.py) on the GPU, at the thinker's shapes:
the residual stream bit-equal to the unfused norm kernel's, the q/k/v product within bf16 rounding
of the exact math (and of the unfused path), the same bits with programmatic launch on and off and
from a CUDA graph; the MoE (router, gate-up with the norm, down) against the unfused kernels; an
engine's greedy tokens with it equal to those without (fp32 tiny model).

    pytest -q tests/kernels/test_norm_gemv_cuda.py   # on a CUDA machine, in its own process
"""

import pytest
import torch
from tiny_engine import greedy_tokens, tiny_model

from thinktalk.kernels import common
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.gemv import gemv
from thinktalk.kernels.norm_gemv import add_norm_gemv, add_norm_linear
from thinktalk.kernels.rms_norm import add_rms_norm

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(common.triton is None or interpreting(), reason="the kernels run in the Triton interpreter here"),
]

H, QKV = 2048, 5120
EPS = 1e-6


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    common.set_programmatic_launch(False)


def _inputs(rows: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    return rand(rows, H, scale=3), rand(rows, H, scale=5), 1 + rand(H, scale=0.2), rand(QKV, H, scale=H**-0.5)


@pytest.mark.parametrize("rows", [1, 2])
def test_fused_against_the_unfused_kernels_and_the_exact_math(rows):
    x, residual, norm_weight, weight = _inputs(rows)
    y, total = add_norm_gemv(x, residual, norm_weight, EPS, weight)
    normed, ref_total = add_rms_norm(x, residual, norm_weight, EPS)
    ref_y = gemv(normed, weight)
    assert torch.equal(total, ref_total)
    h = total.double()
    exact = (h * norm_weight.double() * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)) @ weight.double().T
    scale = exact.abs().max().item()
    fused_err = (y.double() - exact).abs().max().item()
    unfused_err = (ref_y.double() - exact).abs().max().item()
    print(f"rows={rows}: max abs err fused {fused_err:.3e}, unfused {unfused_err:.3e} (max |y| {scale:.2f})")
    assert ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-4 * scale).all()  # one round to nearest
    assert fused_err <= unfused_err + 1e-4 * scale


@pytest.mark.parametrize("rows", [1, 2])
def test_same_bits_with_programmatic_launch_and_in_a_graph(rows):
    x, residual, norm_weight, weight = _inputs(rows, 1)
    common.set_programmatic_launch(False)
    plain = add_norm_linear(x, residual, norm_weight, EPS, weight)
    common.set_programmatic_launch(True)
    pdl = add_norm_linear(x, residual, norm_weight, EPS, weight)
    static_x, static_r = x.clone(), residual.clone()
    add_norm_linear(static_x, static_r, norm_weight, EPS, weight)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = add_norm_linear(static_x, static_r, norm_weight, EPS, weight)
    for seed in range(3):
        nx, nr, _, _ = _inputs(rows, 10 + seed)
        static_x.copy_(nx)
        static_r.copy_(nr)
        graph.replay()
        common.set_programmatic_launch(False)
        want = add_norm_linear(nx, nr, norm_weight, EPS, weight)
        common.set_programmatic_launch(True)
        assert all(torch.equal(a, b) for a, b in zip(out, want))
    assert all(torch.equal(a, b) for a, b in zip(plain, pdl))


@pytest.mark.parametrize("tokens", [1, 2, 8])
def test_norm_in_the_moe_against_the_unfused_kernels(tokens):
    """The thinker's MoE shape (128 experts, top 8, I = 768) in fp32, so a top-k choice cannot flip
    on the rounding: the same experts, the residual bit-equal, outputs within fp32 sums' order."""
    from thinktalk.kernels import gemv as gm
    from thinktalk.kernels.norm_gemv import add_norm_moe
    from thinktalk.kernels.router import softmax_topk
    from thinktalk.layers.moe import SparseMoE

    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = SparseMoE(H, 768, 128, 8)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    x, residual, norm_weight, _ = (t.float() for t in _inputs(tokens, 2))
    out, total = add_norm_moe(x, residual, norm_weight, EPS, moe)
    normed, ref_total = add_rms_norm(x, residual, norm_weight, EPS)
    weights, ids = softmax_topk(gm.linear(normed, moe.gate.weight), 8, True)
    ref = gm.experts(normed, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
    assert torch.equal(total, ref_total)
    err = (out - ref).abs().max().item()
    print(f"moe tokens={tokens}: max abs err {err:.3e} (max |out| {ref.abs().max().item():.2f})")
    assert err < 1e-4 * ref.abs().max().item() + 1e-5


def test_engine_tokens_equal_with_and_without():
    from thinktalk.engine import EngineConfig

    model = tiny_model(torch.float32)
    requests = [(5, 40), (19, 25)]  # decode steps of 2 rows, then 1

    def run(fuse: bool):
        return greedy_tokens(model, EngineConfig(fuse_norm_gemv=fuse, num_kv_blocks=256, max_num_seqs=8), requests)

    assert run(True) == run(False)


@pytest.mark.parametrize("normalize", [True, False])
def test_router_top_k_kernel_picks_the_references_experts(normalize):
    """router.softmax_topk compiled (keys packing each logit with its index): the reference's
    experts in its order where the logits do not tie, ties lowest index first, weights to fp32
    rounding; also inlined in the gate-up GEMV with route_in_gate_up (the MoE test above)."""
    from thinktalk.kernels.router import softmax_topk, softmax_topk_reference

    g = torch.Generator(device="cuda").manual_seed(5)
    logits = (torch.randn(64, 128, device="cuda", generator=g) * 2).to(torch.bfloat16)
    logits[0, :] = 1.0  # all tied: experts 0..7
    logits[1, 100:] = 9.0  # 28 tied at the top: 100..107
    w, ids = softmax_topk(logits, 8, normalize)
    ref_w, ref_ids = softmax_topk_reference(logits, 8, normalize)
    assert ids[0].tolist() == list(range(8)) and ids[1].tolist() == list(range(100, 108))
    probs = torch.softmax(logits.float(), -1).gather(1, ids)
    want = probs / probs.sum(-1, keepdim=True) if normalize else probs
    torch.testing.assert_close(w.float(), want.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-3)
    top9 = logits.float().topk(9, -1).values
    untied = [r for r in range(2, 64) if top9[r].unique().numel() == 9]  # no tie within the top 8 + 1
    assert untied and all(ids[r].tolist() == ref_ids[r].tolist() for r in untied)
    torch.testing.assert_close(w[untied].float(), ref_w[untied].float(), rtol=2**-7, atol=1e-3)
