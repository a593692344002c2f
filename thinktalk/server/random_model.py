"""Full-size Qwen3-Omni-30B-A3B with random weights: `thinktalk serve --random-weights` (hidden),
for GPU benchmarks of the serving path (latency, concurrency) without a checkpoint. The shapes,
the tokenizer and the chat template are the real ones (the package's assets); what it says is noise,
and the server reports random_weights=true like the demo model."""

from __future__ import annotations


def load_random_omni(*, device=None, talker: bool = True, engine_config=None, seed: int = 0):
    import torch

    from ..api import Omni, default_device
    from ..config import ASSETS, reference_config
    from ..multimodal.processor import OmniProcessor
    from ..weights.loader import build_model
    from ..weights.tiny import randomize_

    device = torch.device(device) if device is not None else default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = randomize_(build_model(reference_config(), device, dtype, with_talker=talker), seed)
    omni = Omni(model, OmniProcessor.from_pretrained(ASSETS), ASSETS, engine_config)
    omni.random_weights = True
    return omni
