"""Greedy generation of our thinker equals transformers' on tiny checkpoints, for every input kind.

Both models get identical processor outputs (ours; their equality with transformers' processor is
tested in tests/multimodal), so a difference here is a model difference.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from thinktalk.api import Omni  # noqa: E402

N_TOKENS = 32


@pytest.fixture(scope="module")
def pair(tiny_instruct):
    hf = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_instruct, dtype=torch.float32).eval()
    ours = Omni.load(tiny_instruct, device="cpu", progress=False)
    return hf, ours


def _messages(media, kind):
    parts = {
        "text": [],
        "image": [{"type": "image", "image": str(media["image"])}],
        "two_images": [{"type": "image", "image": str(media["image"])}, {"type": "image", "image": str(media["image2"])}],
        "audio": [{"type": "audio", "audio": str(media["audio"])}],
        "video": [{"type": "video", "video": str(media["video"])}],
        "video_with_audio": [{"type": "video", "video": str(media["video"])}],
    }[kind]
    return [{"role": "user", "content": parts + [{"type": "text", "text": f"Tell me about this {kind}."}]}]


def _hf_greedy(hf, inputs, use_audio_in_video, n=N_TOKENS):
    kwargs = {k: v for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out = hf.thinker.generate(**kwargs, use_audio_in_video=use_audio_in_video, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["text", "image", "two_images", "audio", "video", "video_with_audio"])
def test_greedy_tokens_equal_transformers(pair, media, kind):
    hf, ours = pair
    use_aiv = kind == "video_with_audio"
    messages = _messages(media, kind)
    inputs = ours.processor.prepare_messages(messages, use_audio_in_video=use_aiv)
    expected = _hf_greedy(hf, inputs, use_aiv)
    got = ours.generate(messages, use_audio_in_video=use_aiv, temperature=0, max_new_tokens=N_TOKENS)
    assert got.token_ids == expected
    assert got.prompt_tokens == inputs["input_ids"].shape[1]


def test_batch_of_three_equals_each_alone(pair, media):
    _, ours = pair
    convs = [_messages(media, "text"), _messages(media, "image"), _messages(media, "audio")]
    convs[0][0]["content"][-1]["text"] = "A much longer question, so that the three prompts differ in length a lot."
    alone = [ours.generate(c, temperature=0, max_new_tokens=16).token_ids for c in convs]
    together = [r.token_ids for r in ours.generate(convs, temperature=0, max_new_tokens=16)]
    assert together == alone


@pytest.mark.parametrize("voice", ["Ethan", "Chelsie", "Aiden"])
def test_speech_codes_equal_transformers(pair, media, voice):
    """Greedy thinker and talker: identical codec codes; the waveform close to transformers'."""
    hf, ours = pair
    messages = _messages(media, "image")
    inputs = ours.processor.prepare_messages(messages)
    captured = {}
    original = hf.code2wav.chunked_decode

    def spy(codes, *a, **k):
        captured["codes"] = codes
        return original(codes, *a, **k)

    hf.code2wav.chunked_decode = spy
    try:
        with torch.no_grad():
            seqs, wav = hf.generate(
                **{k: v for k, v in inputs.items() if v is not None}, speaker=voice, thinker_max_new_tokens=12,
                thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=24,
            )
    finally:
        hf.code2wav.chunked_decode = original
    got = ours.generate(messages, speaker=voice, temperature=0, max_new_tokens=12, speech_max_frames=23)  # = talker_max_new_tokens - 1
    assert got.token_ids == seqs[0, inputs["input_ids"].shape[1]:].tolist()
    assert torch.equal(got.codes.cpu(), captured["codes"][0])
    ref = wav.flatten().numpy()
    assert got.audio.shape == ref.shape and got.audio.shape[0] > 0
    err = float(abs(got.audio - ref).max())
    print(f"{voice}: {got.codes.shape[1]} frames, waveform max abs error {err:.2e}")
    assert err < 1e-4
