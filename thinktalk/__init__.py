"""thinktalk: fast self-hosted inference for the Qwen3-Omni-30B-A3B models."""

__version__ = "0.1.0"
