"""The whole Qwen3-Omni model: thinker, and for Instruct checkpoints the talker and code2wav."""

from __future__ import annotations

from torch import nn

from ..config import OmniConfig


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig, with_talker: bool | None = None):
        super().__init__()
        from .thinker import Thinker

        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker_config)
        self.has_talker = cfg.has_talker if with_talker is None else (with_talker and cfg.has_talker)
        if self.has_talker:
            from .code2wav import Code2Wav
            from .talker import Talker

            self.talker = Talker(cfg.talker_config)
            self.code2wav = Code2Wav(cfg.code2wav_config)
        else:
            self.talker = None
            self.code2wav = None
