"""`thinktalk.api.Omni` on a tiny checkpoint: what a request refused mid-run does to its caller."""

from __future__ import annotations

import pytest
import torch

from thinktalk.errors import OutOfMemoryError


@pytest.fixture(scope="module")
def omni(tiny_instruct):
    from thinktalk.api import Omni

    return Omni.load(tiny_instruct, device="cpu", progress=False)


@pytest.fixture
def encoder_out_of_memory(omni, monkeypatch):
    """The vision encoder raises torch.OutOfMemoryError, as CUDA would for a too-large video."""
    def forward(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(omni.engine.thinker.visual), "forward", forward)
    yield
    monkeypatch.undo()


def _image_chat(media):
    return [{"role": "user", "content": [{"type": "image", "image": str(media["image"])},
                                         {"type": "text", "text": "What is it?"}]}]


def test_generate_raises_the_engines_refusal_and_the_engine_carries_on(omni, media, encoder_out_of_memory, request):
    text = [{"role": "user", "content": "Hello"}]
    with pytest.raises(OutOfMemoryError, match="more accelerator memory"):
        omni.generate([_image_chat(media), text], max_new_tokens=3, temperature=0)  # the batch fails together
    assert not omni.engine.has_work()
    with pytest.raises(OutOfMemoryError):
        list(omni.stream(omni.make_request(_image_chat(media), omni_sampling())))
    assert not omni.engine.has_work()
    request.getfixturevalue("monkeypatch").undo()  # the encoder works again
    assert len(omni.generate(_image_chat(media), max_new_tokens=3, temperature=0).token_ids) == 3


def test_speech_stream_raises_it_and_stops_the_talker(omni, media, encoder_out_of_memory):
    if not omni.can_speak:
        pytest.skip("no talker")
    with pytest.raises(OutOfMemoryError):
        list(omni.stream_speech(_image_chat(media), speaker="Ethan", max_new_tokens=3, temperature=0))
    assert not omni.engine.has_work() and not omni.speech_stage.jobs


def omni_sampling():
    from thinktalk.request import SamplingParams

    return SamplingParams(temperature=0, max_new_tokens=3)
