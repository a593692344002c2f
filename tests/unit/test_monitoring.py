"""System metrics: CPU-only machines say "no GPU" and never fail a scrape; the dashboard's names exist."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from thinktalk import monitoring
from thinktalk.monitoring import NO_GPU, register_system_metrics

ROOT = Path(__file__).resolve().parents[2]


def scrape(registry) -> dict[str, list]:
    text = generate_latest(registry).decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def test_cpu_only_says_no_gpu(monkeypatch):
    # whatever this machine has, make NVML unavailable the way a CPU box has it
    fake = types.ModuleType("pynvml")

    def nvml_init():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = nvml_init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reg = CollectorRegistry()
    register_system_metrics(reg)
    for _ in range(2):  # repeated scrapes stay fine
        fams = scrape(reg)
    info = fams["thinktalk_gpu_info"]
    assert len(info) == 1
    assert info[0].labels["name"] == NO_GPU
    assert info[0].labels["status"].startswith(NO_GPU)
    assert "Library Not Found" in info[0].labels["status"]
    assert fams["thinktalk_gpu_count"][0].value == 0
    assert fams["thinktalk_gpu_memory_used_bytes"] == []
    assert fams["thinktalk_process_resident_memory_bytes"][0].value > 1e6
    assert fams["thinktalk_system_memory_total_bytes"][0].value > 0


def test_real_environment_never_crashes():
    reg = CollectorRegistry()
    register_system_metrics(reg)
    fams = scrape(reg)
    status = fams["thinktalk_gpu_info"][0].labels["status"]
    assert status == "ok" or status.startswith(NO_GPU)


def test_nvml_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    reg = CollectorRegistry()
    register_system_metrics(reg)
    info = scrape(reg)["thinktalk_gpu_info"][0]
    assert info.labels["status"] == f"{NO_GPU}: nvidia-ml-py is not installed"


def _fake_nvml(fail_util=False):
    m = types.ModuleType("pynvml")
    m.NVML_TEMPERATURE_GPU = 0
    m.nvmlInit = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "570.1"
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=10 * 2**30, total=80 * 2**30, free=70 * 2**30)

    def util(h):
        if fail_util:
            raise RuntimeError("Not Supported")
        return types.SimpleNamespace(gpu=87, memory=40)

    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetTemperature = lambda h, s: 51
    m.nvmlDeviceGetPowerUsage = lambda h: 350_000
    import os

    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * 2**30),
        types.SimpleNamespace(pid=1, usedGpuMemory=None),
    ]
    return m


def test_gpu_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    reg = CollectorRegistry()
    register_system_metrics(reg)
    fams = scrape(reg)
    assert fams["thinktalk_gpu_count"][0].value == 2
    assert [s.labels["gpu"] for s in fams["thinktalk_gpu_info"]] == ["0", "1"]
    assert fams["thinktalk_gpu_info"][0].labels["status"] == "ok"
    used = {s.labels["gpu"]: s.value for s in fams["thinktalk_gpu_memory_used_bytes"]}
    assert used == {"0": 10 * 2**30, "1": 10 * 2**30}
    assert fams["thinktalk_gpu_utilization_percent"][0].value == 87
    assert fams["thinktalk_gpu_power_watts"][0].value == 350
    assert fams["thinktalk_gpu_process_memory_used_bytes"][0].value == 3 * 2**30
    assert fams["thinktalk_gpu_memory_used_bytes"][0].labels["name"] == "NVIDIA H100 80GB HBM3"


def test_a_failing_reading_is_left_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_util=True))
    reg = CollectorRegistry()
    register_system_metrics(reg)
    fams = scrape(reg)
    assert fams["thinktalk_gpu_utilization_percent"] == []
    assert len(fams["thinktalk_gpu_memory_used_bytes"]) == 2


def test_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    reg = CollectorRegistry()
    register_system_metrics(reg)
    fams = scrape(reg)
    assert fams["thinktalk_process_resident_memory_bytes"] == []
    assert "thinktalk_gpu_info" in fams


def test_registering_touches_no_nvml(monkeypatch):
    calls = []
    fake = _fake_nvml()
    fake.nvmlInit = lambda: calls.append("init")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reg = CollectorRegistry()
    register_system_metrics(reg)
    assert calls == []
    scrape(reg)
    scrape(reg)
    assert calls == ["init"]  # once, lazily


def test_beside_the_server_metrics():
    """The server's registry takes the collector without name clashes."""
    from thinktalk.server.metrics import Metrics

    m = Metrics("demo")
    register_system_metrics(m.registry)
    text = m.render().decode()
    assert "thinktalk_gpu_info" in text and "thinktalk_num_requests_running" in text


def _exposed_names() -> set[str]:
    """Every series name the server's /metrics can show (histogram/counter suffixes included)."""
    from thinktalk.server.metrics import Metrics

    m = Metrics("demo")
    m.kv_blocks()  # the paged-cache gauges are made on demand
    register_system_metrics(m.registry)
    names = set()
    for collector in list(m.registry._collector_to_names):  # noqa: SLF001
        for fam in (collector.describe() if hasattr(collector, "describe") else collector.collect()):
            if fam.type == "histogram":
                names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
            elif fam.type == "counter":
                names |= {fam.name + "_total", fam.name + "_created"}
            elif fam.type == "info":
                names.add(fam.name + "_info")
            else:
                names.add(fam.name)
    return names


def test_grafana_dashboard_uses_real_metric_names():
    dash = json.loads((ROOT / "examples" / "grafana-thinktalk.json").read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    used = set()
    for e in exprs:
        used |= set(re.findall(r"\b(thinktalk_[a-z0-9_]+)", e))
    exposed = _exposed_names()
    assert used - exposed == set(), f"dashboard uses metrics the server does not expose: {used - exposed}"
    for want in ("thinktalk_requests_total", "thinktalk_time_to_first_token_seconds_bucket",
                 "thinktalk_time_to_first_audio_seconds_bucket", "thinktalk_time_per_output_token_seconds_bucket",
                 "thinktalk_num_requests_waiting", "thinktalk_num_requests_running",
                 "thinktalk_speech_real_time_factor_bucket", "thinktalk_gpu_memory_used_bytes"):
        assert want in used, want
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
