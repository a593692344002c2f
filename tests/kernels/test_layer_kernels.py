"""The fused layer kernels (RMSNorm + residual, q/k norm + rotary, router top-k) against their
torch references, run by Triton's CPU interpreter with small shapes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from thinktalk.kernels import rms_norm as rn
from thinktalk.kernels import rope, router
from thinktalk.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(rn.triton is None, reason="triton is not installed")

# bf16 results may differ by the rounding of one op (the sum of squares is reduced in another order)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 48), (3, 4, 32)])  # decode row, width off the block, heads
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(shape[-1], generator=g) * 0.1).to(dtype)
    torch.testing.assert_close(rn.rms_norm(x, w, 1e-6), rn.rms_norm_reference(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(7, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.rand(96, generator=g).to(dtype)
    out, total = rn.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_total = rn.add_rms_norm_reference(x, res, w, 1e-6)
    # one rounded add: exact in fp32; the interpreter's float -> bf16 cast truncates (the GPU's
    # rounds to nearest), so bf16 is one unit in the last place off here
    torch.testing.assert_close(total, ref_total, **({"rtol": 0, "atol": 0} if dtype == torch.float32 else TOL[dtype]))
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mrope", [None, [4, 2, 2]])
def test_qk_norm_rope(dtype, mrope):
    g = torch.Generator().manual_seed(2)
    n, hq, hk, d = 6, 8, 2, 16
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k = torch.randn(n, hk, d, generator=g).to(dtype)
    qw, kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype), (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    positions = torch.randint(0, 500, (3, n), generator=g) if mrope else torch.arange(40, 40 + n)
    cos, sin = RotaryEmbedding(d, 10000.0, mrope)(positions)
    got = rope.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    ref = rope.qk_norm_rope_reference(q, k, qw, kw, cos, sin, 1e-6)
    # bf16: five roundings, each truncated by the interpreter (rounded to nearest on the GPU), so
    # up to ~4 units in the last place at |x| ~ 2 here
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=4e-2, atol=7e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)


def test_qk_norm_rope_on_a_strided_view():
    """q and k come straight from the projections' views (stride of the packed rows)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 3 * 2 * 8, generator=g)
    q = qkv[:, :32].view(4, 4, 8)
    k = qkv[:, 32:40].view(4, 1, 8)
    cos, sin = RotaryEmbedding(8, 10000.0)(torch.arange(4))
    w = torch.ones(8)
    for a, b in zip(rope.qk_norm_rope(q, k, w, w, cos, sin, 1e-6), rope.qk_norm_rope_reference(q, k, w, w, cos, sin, 1e-6)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("experts,top_k", [(128, 8), (6, 2), (60, 4)])
def test_softmax_topk(experts, top_k, normalize):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, experts, generator=g).to(torch.bfloat16)
    w, ids = router.softmax_topk(logits, top_k, normalize)
    ref_w, ref_ids = router.softmax_topk_reference(logits, top_k, normalize)
    assert ids.dtype == ref_ids.dtype and w.dtype == ref_w.dtype
    # same experts in the same (descending) order; bf16 logits can tie, so compare as sets where tied
    for row in range(9):
        assert set(ids[row].tolist()) == set(ref_ids[row].tolist()) or torch.allclose(w[row].float(), ref_w[row].float())
    torch.testing.assert_close(w, ref_w, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_ties_signs_and_ragged_expert_counts(normalize):
    """Picked on keys that pack each logit with its index: negative and positive logits in order,
    equal logits taken lowest index first, a row of 100 experts (padded to 128) never picks the
    padding; weights equal the torch reference's to float32 rounding."""
    logits = torch.tensor([[-3.0, 2.5, -0.5, 2.5, 0.0, -7.0, 2.5, 1.0] + [-9.0] * 92,
                           [-1.0] * 50 + [-2.0] * 50,  # all tied within two levels
                           [float(-i) / 7 for i in range(100)]])
    w, ids = router.softmax_topk(logits, 5, normalize)
    assert ids.tolist() == [[1, 3, 6, 7, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    probs = torch.softmax(logits.double(), -1)
    ref = probs.gather(1, ids)
    if normalize:
        ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_stores_into_the_kv_cache(dtype):
    """With store=(k_cache, v_cache, slots) the kernel also writes the rotated keys and the values
    at the tokens' slots, and nothing else in the cache."""
    g = torch.Generator().manual_seed(4)
    n, hq, hk, d, slots_total = 3, 4, 2, 16, 10
    q, k, v = (torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    qw, kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype), (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(7, 7 + n))
    slots = torch.tensor([8, 2, 5])
    caches = {}
    for name, fn in (("triton", rope.qk_norm_rope), ("torch", rope.qk_norm_rope_reference)):
        kc, vc = torch.full((slots_total, hk, d), 9.0, dtype=dtype), torch.full((slots_total, hk, d), 9.0, dtype=dtype)
        qo, ko = fn(q, k, qw, kw, cos, sin, 1e-6, v, (kc, vc, slots))
        caches[name] = (qo, ko, kc, vc)
        untouched = torch.ones(slots_total, dtype=torch.bool)
        untouched[slots] = False
        assert (kc[untouched] == 9.0).all() and (vc[untouched] == 9.0).all()
        assert torch.equal(kc[slots], ko) and torch.equal(vc[slots], v)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=4e-2, atol=7e-2)
    for a, b in zip(caches["triton"], caches["torch"]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,inter", [(1, 48), (5, 1500)])  # a decode row; several column blocks
def test_silu_mul(dtype, n, inter):
    from thinktalk.kernels import activation

    g = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(n, 2 * inter, generator=g) * 3).to(dtype)
    got, ref = activation.silu_mul(gate_up), activation.silu_mul_reference(gate_up)
    # two roundings, each truncated by the interpreter where the GPU rounds to nearest
    torch.testing.assert_close(got, ref, **(TOL[dtype] if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)))


def test_fused_gate_up_mlp_equals_the_plain_one():
    from thinktalk.kernels import activation
    from thinktalk.layers.mlp import GatedMLP, fuse_gate_up

    torch.manual_seed(6)
    mlp = GatedMLP(32, 24)
    x = torch.randn(3, 32)
    want = mlp(x)
    gate_w, up_w = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone()
    assert fuse_gate_up(mlp) and mlp.gate_up_weight.shape == (48, 32)
    assert torch.equal(mlp.gate_proj.weight, gate_w) and torch.equal(mlp.up_proj.weight, up_w)
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()  # views, no copy
    torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
    mlp.act_mul_kernel = activation.silu_mul  # the Triton kernel (interpreter)
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    gelu = GatedMLP(32, 24, "gelu")
    assert not fuse_gate_up(gelu)  # only SiLU has a fused kernel
