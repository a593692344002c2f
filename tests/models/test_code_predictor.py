"""Parity of thinktalk's code predictor with transformers' Qwen3OmniMoeTalkerCodePredictor.

Tiny config (thinktalk.weights.tiny_config), float32, seeded random weights with norm weights away
from 1. Checks: state-dict names, per-codebook logits of every head on the same inputs, and the
greedy 15-step residual-code loop (batched over frames) against transformers' own generate().
Run with `-s` to see the max abs errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from thinktalk.config import config_from_dict
from thinktalk.layers.attention import ContiguousKV, SequenceKV
from thinktalk.models.code_predictor import CodePredictor, predict_residual_codes
from thinktalk.weights.tiny_config import tiny_config_dict

hf_cfg_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
hf_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

ATOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                value = 1.0 + 0.1 * noise if "norm" in name else 0.1 * noise
            elif "embed" in name:
                value = noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value)


@pytest.fixture(scope="module")
def pair():
    # tiny matrices: one thread is several times faster than two fighting over a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _build()
    finally:
        torch.set_num_threads(threads)


def _build():
    d = tiny_config_dict("instruct")
    hf_cfg = hf_cfg_mod.Qwen3OmniMoeConfig(**d).talker_config.code_predictor_config
    hf = hf_mod.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(hf_cfg).float().eval()
    _randomize(hf, seed=11)
    ours = CodePredictor(config_from_dict(d).talker_config.code_predictor_config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def test_state_dict_names_match(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert len(ours.lm_head) == len(ours.model.codec_embedding) == ours.num_code_groups - 1


@torch.no_grad()
def test_logits_every_head(pair):
    """Sequence [hidden, e1 .. e_{k+1}] of length k+2 -> lm_head[k], as transformers' prefill picks it."""
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    hidden_size = ours.cfg.hidden_size
    worst = 0.0
    for k in range(ours.num_code_groups - 1):
        x = torch.randn(k + 2, hidden_size, generator=g)
        ref = hf(inputs_embeds=x[None], use_cache=False).logits[0]
        h = ours(x, torch.arange(k + 2), ContiguousKV([SequenceKV()], [k + 2]))
        got = ours.logits(h, k + 1)
        err = (got - ref).abs().max().item()
        worst = max(worst, err)
        assert torch.allclose(got, ref, atol=ATOL, rtol=0), (k, err)
    print(f"[code_predictor] logits, all 15 heads: max abs err = {worst:.3e}")


@torch.no_grad()
def test_greedy_residual_codes_match_generate_batched(pair):
    """predict_residual_codes over 3 packed frames == transformers' generate() on each frame."""
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    b, hidden_size = 3, ours.cfg.hidden_size
    last_hidden = torch.randn(b, hidden_size, generator=g)
    first_embeds = torch.randn(b, hidden_size, generator=g)
    codes, embeds = predict_residual_codes(ours, last_hidden, first_embeds)
    assert codes.shape == (b, ours.num_code_groups - 1)
    for i in range(b):
        ref = hf.generate(
            inputs_embeds=torch.stack([last_hidden[i], first_embeds[i]])[None],
            max_new_tokens=ours.num_code_groups - 1, do_sample=False,
        )
        assert torch.equal(codes[i], ref[0]), (i, codes[i].tolist(), ref[0].tolist())
        for j in range(ours.num_code_groups - 1):
            assert torch.equal(embeds[i, j], hf.model.codec_embedding[j].weight[codes[i, j]])
