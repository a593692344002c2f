"""What the pipeline preallocates follows the configured concurrency: the talker's paged KV pool
(2,048 tokens per request speaking at once, sized from the engine's max_num_seqs; at least 8,192)
and the share of the GPU budget the thinker's KV pool leaves for the speech stage."""

import pytest
import torch

from thinktalk.api import MAX_SPEECH_SLOTS, SPEECH_WORKING_SET, Omni, reserve_for_speech
from thinktalk.config import reference_config
from thinktalk.engine import EngineConfig
from thinktalk.speech_graphs import PagedTalker, plan_talker_blocks, talker_kv_bytes
from thinktalk.weights.loader import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_instruct):
    return load_model(tiny_instruct, progress=False)


def test_talker_kv_bytes_match_the_allocation(tiny_model):
    talker = tiny_model.talker
    runner = PagedTalker(talker, num_blocks=5, block_size=8, graphs=False)
    pool = runner.pool
    held = sum(t.numel() * t.element_size() for t in pool.k + pool.v)
    assert held == talker_kv_bytes(talker.cfg, 5, 8, runner.dtype)
    # the full talker: 20 KiB per token in bf16, 40 MiB per request's 2,048 tokens (+ the scratch
    # block); a single user still gets the floor of 8,192 tokens
    full = reference_config().talker_config
    block = 16 * 20 * 2**10
    assert talker_kv_bytes(full, plan_talker_blocks(full, torch.bfloat16, max_active=8), 16, torch.bfloat16) == 8 * 40 * 2**20 + block
    assert talker_kv_bytes(full, plan_talker_blocks(full, torch.bfloat16, max_active=1), 16, torch.bfloat16) == 160 * 2**20 + block
    with pytest.raises(ValueError, match="at least one block"):
        plan_talker_blocks(full, torch.bfloat16, num_blocks=0)


@pytest.mark.parametrize("max_num_seqs,slots,expected", [(1, None, 1), (16, None, 16), (256, None, MAX_SPEECH_SLOTS), (4, 2, 2)])
def test_speech_slots_follow_max_num_seqs(tiny_instruct, tiny_model, max_num_seqs, slots, expected):
    from thinktalk.multimodal.processor import OmniProcessor

    omni = Omni(tiny_model, OmniProcessor.from_pretrained(tiny_instruct), tiny_instruct,
                EngineConfig(max_num_seqs=max_num_seqs), speech_slots=slots)
    assert omni.speech_slots == expected
    assert omni.speech_stage.max_active == expected  # requests beyond it wait for a place


def test_speech_slots_validated(tiny_instruct, tiny_model):
    from thinktalk.multimodal.processor import OmniProcessor

    with pytest.raises(ValueError, match="speech_slots"):
        Omni(tiny_model, OmniProcessor.from_pretrained(tiny_instruct), tiny_instruct, speech_slots=0)


def test_kv_budget_keeps_room_for_speech():
    cfg = reference_config()
    total = 24 * 2**30  # a 24 GB card
    base = EngineConfig(max_num_seqs=1, gpu_memory_utilization=0.9)
    got = reserve_for_speech(base, cfg, 1, "cuda", total_memory=total)
    kept = (base.gpu_memory_utilization - got.gpu_memory_utilization) * total
    talker_kv = talker_kv_bytes(cfg.talker_config, 8192 // 16, 16, torch.bfloat16)  # the floor: one request
    assert kept == pytest.approx(talker_kv + SPEECH_WORKING_SET)
    assert base.gpu_memory_utilization == 0.9  # the caller's config is not changed
    # nothing to keep where the pool is not sized from the budget
    assert reserve_for_speech(base, cfg, 1, "cpu", total_memory=total) is base
    sized = EngineConfig(num_kv_blocks=64)
    assert reserve_for_speech(sized, cfg, 1, "cuda", total_memory=total) is sized
    contiguous = EngineConfig(kv_backend="contiguous")
    assert reserve_for_speech(contiguous, cfg, 1, "cuda", total_memory=total) is contiguous
    with pytest.raises(ValueError, match="no room for the speech stage"):
        reserve_for_speech(EngineConfig(gpu_memory_utilization=0.01), cfg, 64, "cuda", total_memory=total)
