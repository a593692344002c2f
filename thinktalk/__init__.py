"""thinktalk: fast self-hosted inference for the Qwen3-Omni-30B-A3B models."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from thinktalk import Omni` without importing torch for every `thinktalk --help`
    if name == "Omni":
        from .api import Omni

        return Omni
    raise AttributeError(name)
