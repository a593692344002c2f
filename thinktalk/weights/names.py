"""The one table from Hugging Face checkpoint tensor names to ours.

Our module tree mirrors the checkpoint (thinker.*, talker.*, code2wav.*), so every name maps to
itself except the MoE experts: the checkpoint stores each expert's gate/up/down projection as its
own tensor; we keep them stacked per layer for grouped GEMMs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (checkpoint pattern, our parameter, which part of it) — gate and up share one stacked tensor
_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter, optionally one expert's slot and row half."""

    name: str
    expert: int | None = None
    half: int | None = None  # 0: gate rows, 1: up rows of gate_up_proj

    def view(self, param):
        """The slice of `param` this tensor fills."""
        if self.expert is None:
            return param
        slot = param[self.expert]
        if self.half is None:
            return slot
        rows = slot.shape[0] // 2
        return slot[self.half * rows : (self.half + 1) * rows]


def to_ours(checkpoint_name: str) -> Target:
    m = _EXPERT.match(checkpoint_name)
    if m is None:
        return Target(checkpoint_name)
    expert, proj = int(m["expert"]), m["proj"]
    if proj == "down_proj":
        return Target(f"{m['prefix']}.down_proj", expert)
    return Target(f"{m['prefix']}.gate_up_proj", expert, 0 if proj == "gate_proj" else 1)


def to_checkpoint(our_name: str, shape: tuple[int, ...]) -> list[tuple[str, Target]]:
    """Inverse of `to_ours`: the checkpoint tensors that make up one of our parameters."""
    for stacked, projs in ((".mlp.experts.gate_up_proj", ("gate_proj", "up_proj")), (".mlp.experts.down_proj", ("down_proj",))):
        if our_name.endswith(stacked):
            prefix = our_name.rsplit(".", 1)[0]
            out = []
            for e in range(shape[0]):
                for proj in projs:
                    name = f"{prefix}.{e}.{proj}.weight"
                    out.append((name, to_ours(name)))
            return out
    return [(our_name, Target(our_name))]
