"""Shared fixtures: tiny random checkpoints written once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "instruct", variant="instruct", seed=0)


@pytest.fixture(scope="session")
def tiny_thinking(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "thinking", variant="thinking", seed=1)


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "captioner", variant="captioner", seed=2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The demo model and other caches go to a temp folder, never the user's."""
    os.environ["THINKTALK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
