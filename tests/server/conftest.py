"""A real `thinktalk serve` subprocess on a free loopback port, shared per test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, python_prefix: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = python_prefix or [sys.executable, "-m", "thinktalk.cli"]
        self.cmd = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(log_path, "wb")
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if self.health().status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory):
    """Start servers (stopped at the end of the module)."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None, wait: bool = True, python_prefix: list[str] | None = None):
        log_path = tmp_path_factory.mktemp("serve") / "server.log"
        srv = ServerProcess(list(args), log_path, env, python_prefix)
        started.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()
