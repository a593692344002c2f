"""Parity of thinktalk's talker and reference speech path with transformers' Qwen3-Omni.

transformers' Qwen3OmniMoeForConditionalGeneration is built from the tiny config with seeded
random weights (its own init leaves experts uninitialised, routers at zero and norms at one, so
every parameter is redrawn: norms 1 +- 0.1, routers / projections ~ 1/sqrt(fan_in)). Its talker
tensors load into our Talker by name (strict). Then:

* talker logits (M-RoPE positions that differ per axis) and the projections agree;
* our KV-cached incremental decode equals one full forward;
* the whole speech path: transformers' generate(return_audio=True) runs the thinker (greedy) and
  the talker; we capture the thinker's output (sequences + hidden_states) and the codes handed
  to code2wav, run our `speech.generate_codes` on the same thinker tensors, and require identical
  codes — greedy for all three voices, with stop tokens (thinker and codec eos), seeded sampling
  (transformers' defaults, global RNG), and with audio / image placeholders in the prompt.

Run with `-s` to see the max abs errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from thinktalk.config import config_from_dict
from thinktalk.errors import InputError
from thinktalk.layers.attention import ContiguousKV, SequenceKV
from thinktalk.models.talker import Talker, talker_step
from thinktalk.speech import TalkerSampling, build_talker_inputs, generate_codes, speaker_id, voices
from thinktalk.weights.tiny_config import tiny_config_dict

hf_cfg_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
hf_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

ATOL = 1e-5
THINKER_TOKENS = 8
TALKER_TOKENS = 12

# <|im_start|>system ..<|im_end|> user .. assistant .. user .. <|im_start|>assistant\n  (real token ids)
SYSTEM = [151644, 8948, 198, 2610, 525, 264, 151645, 198]
USER1 = [151644, 872, 198, 9707, 11, 1246, 151645, 198]
ASSISTANT1 = [151644, 77091, 198, 13048, 151645, 198]
USER2_HEAD = [151644, 872, 198]
USER2_TAIL = [3838, 374, 151645, 198]
GEN_PROMPT = [151644, 77091, 198]


def _prompt(media: list[int] = ()) -> list[int]:
    return SYSTEM + USER1 + ASSISTANT1 + USER2_HEAD + list(media) + USER2_TAIL + GEN_PROMPT


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                value = 1.0 + 0.1 * noise if "norm" in name else 0.1 * noise
            elif "embed" in name or "codebook" in name:
                value = noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value)


class Reference:
    """transformers' model with hooks that keep the thinker's output and the talker's codes."""

    def __init__(self):
        d = tiny_config_dict("instruct")
        self.cfg = config_from_dict(d)
        self.model = hf_mod.Qwen3OmniMoeForConditionalGeneration(hf_cfg_mod.Qwen3OmniMoeConfig(**d)).float().eval()
        _randomize(self.model, seed=7)
        self.captured = {}
        thinker_generate = self.model.thinker.generate

        def keep_thinker(*args, **kwargs):
            self.captured["thinker"] = out = thinker_generate(*args, **kwargs)
            return out

        def keep_codes(codes, **kwargs):  # stands in for code2wav: the codes are what we compare
            self.captured["codes"] = codes
            return torch.zeros(codes.shape[0], 1, 1)

        self.model.thinker.generate = keep_thinker
        self.model.code2wav.chunked_decode = keep_codes

    def run(self, prompt: list[int], speaker: str, **kwargs):
        kwargs.setdefault("thinker_max_new_tokens", THINKER_TOKENS)
        kwargs.setdefault("talker_max_new_tokens", TALKER_TOKENS)
        self.model.generate(
            torch.tensor([prompt]), speaker=speaker, return_audio=True, thinker_do_sample=False, **kwargs
        )
        return self.thinker_tensors(self.captured["thinker"]) + (self.captured["codes"][0],)

    def thinker_tensors(self, out):
        """(layer-0 embeddings, hidden_states[accept_hidden_layer], sequences) of a thinker generate()."""
        layer = self.cfg.talker_config.accept_hidden_layer
        embeds = torch.cat([h[0] for h in out.hidden_states], dim=1)[0]
        hidden = torch.cat([h[layer] for h in out.hidden_states], dim=1)[0]
        return embeds, hidden, out.sequences[0]


@pytest.fixture(scope="module")
def ref():
    # tiny matrices: one thread is several times faster than two fighting over a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Reference()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def talker(ref):
    ours = Talker(ref.cfg.talker_config).eval()
    ours.load_state_dict(_talker_state(ref), strict=True)
    return ours


def _talker_state(ref):
    return {k[len("talker."):]: v for k, v in ref.model.state_dict().items() if k.startswith("talker.")}


def _ours(ref, talker, embeds, hidden, ids, prompt, speaker, **kwargs):
    kwargs.setdefault("max_new_tokens", TALKER_TOKENS)
    return generate_codes(
        talker, embeds, hidden, ids, speaker, ref.cfg, embed_tokens=ref.model.thinker.get_input_embeddings(),
        prompt_len=len(prompt), **kwargs,
    )


# -- weights and logits -------------------------------------------------------------------------
def test_state_dict_names_equal_transformers(ref, talker):
    theirs = _talker_state(ref)
    assert set(talker.state_dict()) == set(theirs)
    for name, value in talker.state_dict().items():
        assert value.shape == theirs[name].shape, name
    assert talker.model.layers[0].mlp.experts.gate_up_proj.shape[0] == ref.cfg.talker_config.text_config.num_local_experts


@torch.no_grad()
def test_talker_logits_and_projections(ref, talker):
    hf = ref.model.talker
    g = torch.Generator().manual_seed(1)
    n, h = 13, ref.cfg.talker_config.text_config.hidden_size
    x = torch.randn(n, h, generator=g)
    # M-RoPE positions that differ per axis, as an image gives them
    positions = torch.stack([torch.arange(n), torch.arange(n) // 2 + 3, torch.arange(n) % 4 + 1])
    theirs = hf(inputs_embeds=x[None], position_ids=positions[:, None], use_cache=False).logits[0]
    hidden = talker(x, positions, ContiguousKV([SequenceKV()], [n]))
    ours = talker.logits(hidden)
    err = (ours - theirs).abs().max().item()
    print(f"[talker] codec logits: max abs err = {err:.3e}")
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)

    t = torch.randn(5, ref.cfg.talker_config.thinker_hidden_size, generator=g)
    for name in ("text_projection", "hidden_projection"):
        a, b = getattr(talker, name)(t), getattr(hf, name)(t)
        print(f"[talker] {name}: max abs err = {(a - b).abs().max().item():.3e}")
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decode_equals_full_forward(ref, talker):
    g = torch.Generator().manual_seed(2)
    n, h = 10, ref.cfg.talker_config.text_config.hidden_size
    x = torch.randn(n, h, generator=g)
    positions = torch.arange(n)[None].expand(3, -1)
    full = talker.logits(talker(x, positions, ContiguousKV([SequenceKV()], [n])))
    cache, prefill = SequenceKV(), 6
    _, first = talker_step(talker, x[:prefill], positions[:, :prefill], ContiguousKV([cache], [prefill]), [prefill])
    rows = [first[0]]
    for i in range(prefill, n):
        _, logits = talker_step(talker, x[i : i + 1], positions[:, i : i + 1], ContiguousKV([cache], [1]), [1])
        rows.append(logits[0])
    err = (torch.stack(rows) - full[prefill - 1 :]).abs().max().item()
    print(f"[talker] cached decode vs full forward: max abs err = {err:.3e}")
    assert err < ATOL


# -- speakers -----------------------------------------------------------------------------------
def test_speakers(ref):
    assert voices(ref.cfg) == ["Chelsie", "Ethan", "Aiden"] or set(voices(ref.cfg)) == {"Chelsie", "Ethan", "Aiden"}
    assert speaker_id(ref.cfg, "ETHAN") == speaker_id(ref.cfg, "ethan") == ref.cfg.talker_config.speaker_id["ethan"]
    with pytest.raises(InputError) as info:
        speaker_id(ref.cfg, "Bob")
    message = str(info.value)
    assert "'Bob'" in message and all(v in message for v in ("Ethan", "Chelsie", "Aiden"))
    assert info.value.param == "speaker"


# -- the speech path ----------------------------------------------------------------------------
@pytest.mark.parametrize("speaker", ["Ethan", "chelsie", "AIDEN"])
def test_codes_greedy_all_voices(ref, talker, speaker):
    prompt = _prompt()
    embeds, hidden, ids, theirs = ref.run(prompt, speaker, talker_do_sample=False)
    ours = _ours(ref, talker, embeds, hidden, ids, prompt, speaker, greedy=True)
    assert ours.shape == theirs.shape == (talker.num_code_groups, TALKER_TOKENS - 1)
    assert torch.equal(ours, theirs)


def test_codes_greedy_with_stop_tokens(ref, talker):
    """The thinker stops on a token it generates mid-answer (tts_eos moves there); the talker on codec_eos."""
    prompt = _prompt()
    answer = ref.model.thinker.generate(torch.tensor([prompt]), max_new_tokens=THINKER_TOKENS, do_sample=False)
    answer = answer[0, len(prompt):].tolist()
    stop = answer[3]
    assert stop not in answer[:3]
    # make codec_eos win where the talker's 6th code would: copy that code's head row, a bit larger
    out = ref.model.thinker.generate(
        torch.tensor([prompt]), max_new_tokens=THINKER_TOKENS, do_sample=False, eos_token_id=stop,
        output_hidden_states=True, return_dict_in_generate=True,
    )
    embeds, hidden, ids = ref.thinker_tensors(out)
    plain = _ours(ref, talker, embeds, hidden, ids, prompt, "Ethan", greedy=True, eos_token_ids=[stop])
    eos = ref.cfg.talker_config.codec_eos_token_id
    head = ref.model.talker.codec_head.weight
    saved = head[eos].clone()
    try:
        with torch.no_grad():
            head[eos] = 1.02 * head[int(plain[0, 5])]
            talker.codec_head.weight[eos] = head[eos]
        embeds, hidden, ids, theirs = ref.run(prompt, "Ethan", talker_do_sample=False, thinker_eos_token_id=stop)
        assert ids.shape[0] == len(prompt) + 4  # the thinker stopped on `stop`
        ours = _ours(ref, talker, embeds, hidden, ids, prompt, "Ethan", greedy=True, eos_token_ids=[stop])
    finally:
        with torch.no_grad():
            head[eos] = saved
            talker.codec_head.weight[eos] = saved
    assert theirs.shape[1] < TALKER_TOKENS - 1  # stopped on codec_eos, not on the length limit
    assert torch.equal(ours, theirs)


def test_codes_sampled_same_rng(ref, talker):
    """transformers' default talker sampling (temperature 0.9, top-k 50, repetition penalty 1.05;
    predictor top-k 50 / top-p 0.8), drawing from the global RNG in the same order."""
    prompt = _prompt()
    torch.manual_seed(1234)
    embeds, hidden, ids, theirs = ref.run(prompt, "Chelsie")
    torch.manual_seed(1234)
    ours = _ours(ref, talker, embeds, hidden, ids, prompt, "Chelsie", sampling=TalkerSampling())
    assert torch.equal(ours, theirs)


def test_codes_greedy_audio_in_prompt(ref, talker):
    """Audio placeholders take hidden_projection(thinker hidden); positions stay 1-D (no grids)."""
    th = ref.cfg.thinker_config
    frames = 200
    n = int(hf_mod._get_feat_extract_output_lengths(torch.tensor(frames), th.audio_config.n_window))
    prompt = _prompt([th.audio_start_token_id] + [th.audio_token_id] * n + [th.audio_end_token_id])
    feats = torch.randn(1, th.audio_config.num_mel_bins, frames, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, frames, dtype=torch.long)
    embeds, hidden, ids, theirs = ref.run(
        prompt, "Aiden", talker_do_sample=False, input_features=feats, feature_attention_mask=mask,
        thinker_max_new_tokens=6, talker_max_new_tokens=8,
    )
    ours = _ours(ref, talker, embeds, hidden, ids, prompt, "Aiden", greedy=True, max_new_tokens=8,
                 mm={"feature_attention_mask": mask})
    assert torch.equal(ours, theirs)


def test_codes_greedy_image_in_prompt(ref, talker):
    """Image placeholders: hidden_projection, and the talker's M-RoPE positions from the image grid."""
    th = ref.cfg.thinker_config
    vc = th.vision_config
    grid = torch.tensor([[1, 4, 6]])
    n = int(grid.prod()) // vc.spatial_merge_size**2
    prompt = _prompt([th.vision_start_token_id] + [th.image_token_id] * n + [th.vision_end_token_id])
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(int(grid.prod()), patch, generator=torch.Generator().manual_seed(6))
    embeds, hidden, ids, theirs = ref.run(
        prompt, "Ethan", talker_do_sample=False, pixel_values=pixels, image_grid_thw=grid,
        thinker_max_new_tokens=6, talker_max_new_tokens=8,
    )
    mm = {"image_grid_thw": grid}
    inputs = build_talker_inputs(
        talker, embeds, hidden, ids, "Ethan", ref.cfg, embed_tokens=ref.model.thinker.get_input_embeddings(),
        prompt_len=len(prompt), mm=mm,
    )
    assert not torch.equal(inputs.positions[0], inputs.positions[2])  # really 3-D
    assert inputs.rope_delta == float(ref.model.talker.rope_deltas.flatten()[0])
    ours = _ours(ref, talker, embeds, hidden, ids, prompt, "Ethan", greedy=True, max_new_tokens=8, mm=mm)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_talker_inputs_layout(ref, talker):
    """User turns only (system and history assistant turns dropped), then the 9 assistant positions."""
    prompt = _prompt()
    n_gen = 5
    g = torch.Generator().manual_seed(9)
    ids = torch.tensor(prompt + [100, 101, 102, 103, ref.cfg.im_end_token_id])
    s = len(prompt) + n_gen - 1  # positions fed to the thinker
    embeds = torch.randn(s, ref.cfg.talker_config.thinker_hidden_size, generator=g)
    inputs = build_talker_inputs(
        talker, embeds, embeds, ids, "Ethan", ref.cfg, embed_tokens=ref.model.thinker.get_input_embeddings(),
        prompt_len=len(prompt),
    )
    user = USER1 + USER2_HEAD + USER2_TAIL
    assert inputs.input_ids.tolist() == user + [ref.cfg.tts_pad_token_id] * 9
    assert inputs.embeds.shape[0] == len(user) + 9
    assert inputs.trailing.shape[0] == n_gen - 1  # answer tokens 2..n-1, then tts_eos
    assert torch.equal(inputs.positions, torch.arange(len(user) + 9)[None].expand(3, -1))
    special = torch.tensor([ref.cfg.tts_eos_token_id])
    tts_eos = talker.text_projection(ref.model.thinker.get_input_embeddings()(special))[0]
    assert torch.allclose(inputs.trailing[-1], tts_eos, atol=ATOL)
    assert torch.allclose(inputs.trailing[0], talker.text_projection(embeds[len(prompt) + 1]), atol=ATOL)


def test_only_stop_token_gives_no_frames(ref, talker):
    prompt = _prompt()
    ids = torch.tensor(prompt + [ref.cfg.im_end_token_id])
    embeds = torch.randn(len(prompt), ref.cfg.talker_config.thinker_hidden_size)
    codes = generate_codes(talker, embeds, embeds, ids, "Ethan", ref.cfg,
                           embed_tokens=ref.model.thinker.get_input_embeddings(), prompt_len=len(prompt))
    assert codes.shape == (talker.num_code_groups, 0)


@torch.no_grad()
def test_talker_step_packed_batch_equals_each_alone(ref, talker):
    """Two requests packed in one step (prefill, then one decode token each) == each run alone."""
    g = torch.Generator().manual_seed(10)
    h = ref.cfg.talker_config.text_config.hidden_size
    lens = [7, 4]
    seqs = [torch.randn(n + 1, h, generator=g) for n in lens]
    pos = [torch.arange(n + 1)[None].expand(3, -1) for n in lens]
    alone = []
    for x, p, n in zip(seqs, pos, lens):
        cache = SequenceKV()
        h0, l0 = talker_step(talker, x[:n], p[:, :n], ContiguousKV([cache], [n]), [n])
        h1, l1 = talker_step(talker, x[n:], p[:, n:], ContiguousKV([cache], [1]), [1])
        alone.append((h0[0], l0[0], h1[0], l1[0]))
    caches = [SequenceKV(), SequenceKV()]
    x0 = torch.cat([x[:n] for x, n in zip(seqs, lens)])
    p0 = torch.cat([p[:, :n] for p, n in zip(pos, lens)], dim=1)
    h0, l0 = talker_step(talker, x0, p0, ContiguousKV(caches, lens), lens)
    x1 = torch.cat([x[n:] for x, n in zip(seqs, lens)])
    p1 = torch.cat([p[:, n:] for p, n in zip(pos, lens)], dim=1)
    h1, l1 = talker_step(talker, x1, p1, ContiguousKV(caches, [1, 1]), [1, 1])
    for i in range(2):
        for got, want in zip((h0[i], l0[i], h1[i], l1[i]), alone[i]):
            assert torch.allclose(got, want, atol=ATOL, rtol=0)
