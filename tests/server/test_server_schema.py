"""schemathesis against the server's own OpenAPI schema (/openapi.json): requests generated from
it, valid ones and ones that break it, to every route; no answer may be a 5xx.

Bounded: a fixed number of examples per route and mode, derandomized (the same cases every run),
and a server with a short context so that no generated request decodes for long on CPU.
"""

from __future__ import annotations

import collections

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = 20  # per route and mode


@pytest.fixture(scope="module")
def server(serve_factory, tiny_instruct):
    return serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--max-model-len", "64",
                         "--max-num-seqs", "4", "--max-queue", "4", "--max-speech-seconds", "0.3",
                         "--max-request-mb", "8")


def test_generated_requests_never_get_a_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/chat/completions", "POST /v1/audio/speech", "POST /v1/audio/transcriptions"} <= {
        op.label for op in operations}
    seen: dict[str, collections.Counter] = {}
    failures = []
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            statuses = seen.setdefault(f"{op.label} {mode.value}", collections.Counter())

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode))
            def call(case):
                response = case.call(base_url=server.url, timeout=60)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} "
                                    f"{response.text[:200]}")

            try:
                call()
            except Unsatisfiable:  # a route without inputs has nothing to get wrong
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures)
    assert sum(seen["POST /v1/chat/completions positive"].values()) >= EXAMPLES // 2
    assert server.health().json()["status"] == "ready"
    assert "Traceback" not in server.log()
