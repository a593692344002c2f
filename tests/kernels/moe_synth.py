"""Random MoE inputs for the kernel tests (a uniquely named helper module, imported by the tests;
import it after setting TRITON_INTERPRET, as it imports thinktalk's router)."""

from __future__ import annotations

import torch

from thinktalk.layers.moe import route


def random_moe(n: int, hidden: int, inter: int, experts: int, top_k: int, seed: int = 0):
    """(x [n, H], gate_up [E, 2I, H], down [E, H, I], routing weights, expert ids), fp32 on the
    CPU, routed by a random router."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    weights, ids = route(x, torch.randn(experts, hidden, generator=g), top_k, normalize=True)
    return x, gate_up, down, weights, ids
