"""Pre-quantized checkpoints: quantize -> save -> load equals quantize-on-load, bit for bit; the
community formats (compressed-tensors pack-quantized AWQ-style, Qwen fp8 block) load from files
written here by independent code; broken or unsupported ones are named."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thinktalk.kernels.quant_format import FP8_DTYPE
from thinktalk.kernels.quant_gemm import use_backend
from thinktalk.layers.quant_linear import QuantEmbedding, QuantExperts, QuantLinear, QuantWeight
from thinktalk.weights.community_formats import QuantFormatError
from thinktalk.weights.loader import CheckpointError, load_model
from thinktalk.weights.quant import quantize_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _all_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _write_checkpoint(src, dst, tensors, quantization_config):
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("model", "config.json")):
            shutil.copyfile(f, dst / f.name)


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "method,kw,spec",
    [
        ("int4", dict(group_size=32), "int4-g32"),
        ("int4", dict(group_size=32, sym=False), "int4-g32-asym"),
        ("int8", dict(group_size=None, sym=False), "int8-channel-asym"),
        ("fp8", dict(), "fp8"),
        ("fp8", dict(fp8_block=16), "fp8-block16"),
    ],
)
def test_quantize_save_load_round_trip(tiny_instruct, tmp_path, method, kw, spec):
    out = quantize_checkpoint(tiny_instruct, tmp_path / "q", method, progress=False, device="cpu", **kw)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] in ("compressed-tensors", "fp8")
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.json").is_file()
    # bf16 as on the GPU: the checkpoint stores int scales in its dtype (bf16), so loading it equals
    # quantizing on load with bf16 scales (an fp32 model keeps fp32 scales on load, a finer grid)
    # the checkpoint holds the decoder stacks quantized (one community scheme); as stored it equals
    # quantizing the decoders only on load
    pre = load_model(out, progress=False, dtype=torch.bfloat16)  # pre-quantized, nothing else asked for
    on_load = load_model(tiny_instruct, progress=False, dtype=torch.bfloat16, quantization=spec + "-decoders")
    _assert_same(pre, on_load)
    assert isinstance(pre.thinker.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(pre.talker.model.layers[0].mlp.experts, QuantExperts)
    assert not isinstance(pre.thinker.lm_head, QuantLinear)
    # with --quantization as well, the parts it left in bf16 (encoders, heads, embeddings) are
    # quantized on load: the same model as quantizing a bf16 checkpoint on load
    pre_full = load_model(out, progress=False, dtype=torch.bfloat16, quantization=spec)
    full = load_model(tiny_instruct, progress=False, dtype=torch.bfloat16, quantization=spec)
    _assert_same(pre_full, full)
    assert isinstance(pre_full.thinker.lm_head, QuantLinear) and isinstance(pre_full.thinker.model.embed_tokens, QuantEmbedding)
    assert pre_full.thinker.audio_tower.layers[0].fc1.weight.fmt.method == ("fp8" if method == "fp8" else "int8")
    del pre_full, full
    text_only = load_model(out, progress=False, dtype=torch.bfloat16, with_talker=False)  # talker tensors skipped
    assert text_only.talker is None and isinstance(text_only.thinker.model.layers[0].mlp.experts, QuantExperts)
    src_bytes = sum(t.numel() * t.element_size() for t in _all_tensors(tiny_instruct).values())
    q_bytes = sum(t.numel() * t.element_size() for t in _all_tensors(out).values())
    print(f"{spec}: checkpoint {src_bytes / 2**20:.1f} MiB -> {q_bytes / 2**20:.1f} MiB "
          f"(the tiny model is mostly embeddings, which stay bf16)")
    assert q_bytes < src_bytes


def _pack_int4_words(v):
    """Independent compressed-tensors packing: signed int4 [R, C] -> int32 [R, ceil(C/8)], value+8,
    element j of a word at bits 4j."""
    u = (v.to(torch.int64) + 8)
    r, c = u.shape
    u = torch.nn.functional.pad(u, (0, (-c) % 8))
    words = torch.zeros(r, u.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= u[:, j::8] << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def test_loads_compressed_tensors_awq_style_checkpoint(tiny_instruct, tmp_path):
    """A thinker-only asymmetric int4 (group 16) pack-quantized checkpoint, as llm-compressor writes
    for AWQ W4A16 with the talker ignored: thinker experts/attention load packed, the talker stays
    bf16, or gets int8 when asked."""
    src = _all_tensors(tiny_instruct)
    tensors, expected = {}, {}
    g = 16
    for key, t in src.items():
        module = key[: -len(".weight")]
        if key.startswith("thinker.model.layers.") and key.endswith(("_proj.weight",)) and t.dim() == 2:
            w = t.float()
            n, k = w.shape
            wg = w.reshape(n, k // g, g)
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).to(torch.bfloat16)
            s = scale.float()
            zp = torch.round(-8 - lo / s).clamp(-8, 7)  # signed zero point: q_min - min / scale
            q = torch.clamp(torch.round(wg / s[..., None] + zp[..., None]), -8, 7)
            expected[key] = ((q - zp[..., None]) * s[..., None]).reshape(n, k)
            tensors[module + ".weight_packed"] = _pack_int4_words(q.reshape(n, k).to(torch.int8))
            tensors[module + ".weight_scale"] = scale
            tensors[module + ".weight_zero_point"] = _pack_int4_words(zp.to(torch.int8).t()).t().contiguous()
            tensors[module + ".weight_shape"] = torch.tensor([n, k])
        else:
            tensors[key] = t
    qc = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                                  "group_size": g, "dynamic": False, "actorder": None}}},
        "ignore": ["re:^talker\\..*", "re:.*lm_head$", "re:.*mlp\\.gate$"],
    }
    _write_checkpoint(tiny_instruct, tmp_path / "awq", tensors, qc)
    model = load_model(tmp_path / "awq", progress=False)
    assert model.checkpoint_quantization == "compressed-tensors/pack-quantized"
    q_proj = model.thinker.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and not q_proj.weight.fmt.sym
    torch.testing.assert_close(q_proj.weight.dequantize(torch.float32),
                               expected["thinker.model.layers.1.self_attn.q_proj.weight"], rtol=0, atol=0)
    experts = model.thinker.model.layers[2].mlp.experts
    for e in (0, 5):
        want = torch.cat([expected[f"thinker.model.layers.2.mlp.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj")])
        torch.testing.assert_close(experts.gate_up_proj[e].float(), want, rtol=0, atol=0)
        torch.testing.assert_close(experts.down_proj[e].float(), expected[f"thinker.model.layers.2.mlp.experts.{e}.down_proj.weight"], rtol=0, atol=0)
    assert not isinstance(model.talker.model.layers[0].self_attn.q_proj, QuantLinear)
    # the talker the checkpoint left in bf16 gets int8 on load; the thinker keeps the checkpoint's int4
    hybrid = load_model(tmp_path / "awq", progress=False, quantization="int8")
    assert hybrid.talker.model.layers[0].self_attn.q_proj.weight.fmt.method == "int8"
    assert hybrid.thinker.model.layers[1].self_attn.q_proj.weight.fmt.method == "int4"
    with use_backend("reference"):
        x = torch.randn(3, 64)
        ref = load_model(tiny_instruct, progress=False)
        a, b = ref.thinker.model.layers[2].mlp(x), model.thinker.model.layers[2].mlp(x)
        print(f"AWQ-style int4 asym g16 MoE layer: relative error vs bf16 {((a - b).norm() / a.norm()).item():.4f}")


def test_loads_qwen_fp8_block_checkpoint(tiny_instruct, tmp_path):
    """Qwen's native FP8 format: e4m3 weights + weight_scale_inv per 16x16 block (128 in real ones)."""
    src = _all_tensors(tiny_instruct)
    tensors, expected = {}, {}
    b = 16
    for key, t in src.items():
        if ".layers." in key and key.startswith(("thinker.model", "talker.model")) and key.endswith("_proj.weight") \
                and t.dim() == 2 and "shared_expert_gate" not in key:
            w = t.float()
            n, k = w.shape
            blocks = w.reshape(n // b, b, k // b, b)
            s = blocks.abs().amax(dim=(1, 3)) / 448
            q = (blocks / s[:, None, :, None]).reshape(n, k).to(FP8_DTYPE)
            expected[key] = (q.float().reshape(n // b, b, k // b, b) * s[:, None, :, None]).reshape(n, k)
            tensors[key] = q
            tensors[key + "_scale_inv"] = s
        else:
            tensors[key] = t
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [b, b]}
    _write_checkpoint(tiny_instruct, tmp_path / "fp8", tensors, qc)
    model = load_model(tmp_path / "fp8", progress=False)
    w = model.talker.model.layers[1].mlp.shared_expert.up_proj.weight
    assert w.fmt.method == "fp8" and (w.fmt.block_n, w.fmt.block_k) == (b, b)
    torch.testing.assert_close(w.dequantize(torch.float32), expected["talker.model.layers.1.mlp.shared_expert.up_proj.weight"], rtol=0, atol=0)
    ex = model.thinker.model.layers[0].mlp.experts
    torch.testing.assert_close(ex.down_proj[3].float(), expected["thinker.model.layers.0.mlp.experts.3.down_proj.weight"], rtol=0, atol=0)


def test_missing_and_mismatched_quantized_tensors_are_named(tiny_instruct, tmp_path):
    out = quantize_checkpoint(tiny_instruct, tmp_path / "q", "int4", group_size=32, progress=False, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    victim = "thinker.model.layers.1.self_attn.k_proj.weight_scale"
    shard = out / index["weight_map"][victim]
    with safe_open(str(shard), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    del tensors[victim]
    bad = "thinker.model.layers.2.self_attn.v_proj.weight_packed"
    if bad in tensors:
        tensors[bad] = tensors[bad][:, :1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"thinker\.model\.layers\.1\.self_attn\.k_proj\.scale"):
        load_model(out, progress=False)


def test_unsupported_formats_are_refused(tiny_instruct, tmp_path):
    for qc, pattern in (
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}}}}, "floats"),
    ):
        dst = tmp_path / pattern
        _write_checkpoint(tiny_instruct, dst, {"x": torch.zeros(1)}, qc)
        with pytest.raises(QuantFormatError, match=pattern):
            load_model(dst, progress=False)
    with pytest.raises(QuantFormatError, match="already quantized"):
        quantize_checkpoint(tmp_path / "gptq", tmp_path / "again", "int4", progress=False)


def test_dtype_cast_keeps_codes(tiny_instruct):
    model = load_model(tiny_instruct, progress=False, quantization="fp8")
    w: QuantWeight = model.thinker.model.layers[0].self_attn.o_proj.weight
    codes = w.qweight.clone()
    model.half()
    assert w.qweight.dtype == FP8_DTYPE and torch.equal(w.qweight.view(torch.uint8), codes.view(torch.uint8))
    assert w.scale.dtype == torch.float32


def test_cli_quantize_and_run(tiny_instruct, tmp_path):
    from typer.testing import CliRunner

    from thinktalk.cli import app

    runner = CliRunner()
    dst = tmp_path / "int8"
    r = runner.invoke(app, ["quantize", str(tiny_instruct), str(dst), "--method", "int8", "--group-size", "32",
                            "--asym", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert "thinker.lm_head" in qc["ignore"]
    with use_backend("reference"):
        r = runner.invoke(app, ["run", "hi", "-m", str(dst), "--max-new-tokens", "3", "--device", "cpu", "--dtype", "bfloat16"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["run", "hi", "-m", str(tiny_instruct), "--max-new-tokens", "3", "--device", "cpu",
                                "--quantization", "int4"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", "hi", "-m", str(tiny_instruct), "--dtype", "float8"])
    assert r.exit_code == 2
