"""A tiny random thinker on the GPU and the greedy tokens an engine gives it: the CUDA tests'
check that a kernel switch leaves an engine's output unchanged."""

from __future__ import annotations

import torch


def tiny_model(dtype: torch.dtype):
    from thinktalk.config import config_from_dict
    from thinktalk.weights.loader import build_model
    from thinktalk.weights.tiny import randomize_
    from thinktalk.weights.tiny_config import tiny_config_dict

    return randomize_(build_model(config_from_dict(tiny_config_dict()), "cuda", dtype, with_talker=False), 3)


def greedy_tokens(model, config, requests: list[tuple[int, int]]) -> list[list[int]]:
    """Output ids of (prompt length, new tokens) requests with seeded prompts, run together by an
    Engine with `config` (its decode steps replayed from CUDA graphs)."""
    from thinktalk.engine import Engine
    from thinktalk.request import Request, SamplingParams

    engine = Engine(model, [-1], config)
    reqs = []
    for seed, (n, new) in enumerate(requests):
        ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        reqs.append(Request(ids, torch.arange(n)[None].expand(3, -1).clone(), 0,
                            SamplingParams(temperature=0, max_new_tokens=new)))
        engine.add_request(reqs[-1])
    while engine.has_work():
        engine.step()
    assert engine.decode_graphs is not None
    return [r.output_ids for r in reqs]
