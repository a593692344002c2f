"""System metrics for /metrics: GPU memory and utilisation (NVML) and this process (psutil).

    from thinktalk.monitoring import register_system_metrics
    register_system_metrics(metrics.registry)   # once, where the server builds its registry

Everything is read at scrape time by a prometheus_client collector, so there is no sampling
thread and nothing to stop. Without a GPU (no NVML library, no driver, no device, or
nvidia-ml-py not installed) the GPU families carry one series that says so:

    thinktalk_gpu_info{gpu="none",name="no GPU",driver_version="",status="no GPU: NVML Shared Library Not Found"} 1
    thinktalk_gpu_count 0

and the per-GPU gauges are simply empty. No failure of NVML or psutil ever fails a scrape: a
reading that raises is left out and logged once.

GPU numbering is NVML's (all GPUs of the machine, as nvidia-smi shows them), not the process's
CUDA_VISIBLE_DEVICES order; the `uuid` label of thinktalk_gpu_info ties the two together.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

log = logging.getLogger(__name__)

GPU_LABELS = ["gpu", "name"]
NO_GPU = "no GPU"


class _Nvml:
    """NVML initialised once, lazily; remembers why it is unavailable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self.nvml: Any = None
        self.reason = ""
        self.driver = ""

    def handles(self) -> list[tuple[int, Any]]:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._init()
        if self.nvml is None:
            return []
        try:
            count = self.nvml.nvmlDeviceGetCount()
            return [(i, self.nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as exc:  # noqa: BLE001 - a broken driver must not break /metrics
            self.reason = f"{NO_GPU}: {_text(exc)}"
            return []

    def _init(self) -> None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = f"{NO_GPU}: nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f"{NO_GPU}: {_text(exc)}"
            return
        self.nvml = pynvml
        try:
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001
            self.driver = ""
        if pynvml.nvmlDeviceGetCount() == 0:
            self.reason = f"{NO_GPU}: NVML sees no devices"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SystemMetricsCollector:
    """A prometheus_client collector of GPU (NVML) and process/host (psutil) gauges."""

    def __init__(self, pid: int | None = None, prefix: str = "thinktalk") -> None:
        self.prefix = prefix
        self.pid = pid or os.getpid()
        self._nvml = _Nvml()
        self._warned: set[str] = set()
        self._process = None
        self._psutil = None
        try:
            import psutil

            self._psutil = psutil
            self._process = psutil.Process(self.pid)
            self._process.cpu_percent(None)  # primes the counter; the next scrape reads since now
            psutil.cpu_percent(None)
        except ImportError:
            log.warning("psutil is not installed: no process metrics on /metrics")
        except Exception as exc:  # noqa: BLE001 - e.g. the process is gone
            log.warning("process metrics unavailable: %s", exc)
            self._process = None

    # -- prometheus_client protocol ----------------------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        """Names only (so registering never touches NVML); the registry uses them to catch clashes."""
        return [fam for fam, _ in self._families()]

    def collect(self) -> Iterable[Metric]:
        families = [fam for fam, _ in self._families()]
        by_name = {fam.name: fam for fam in families}
        self._read_gpus(by_name)
        self._read_process(by_name)
        return families

    # -- the families ------------------------------------------------------------------------------
    def _families(self) -> list[tuple[Metric, str]]:
        p = self.prefix
        g = lambda name, doc, labels=GPU_LABELS: (GaugeMetricFamily(f"{p}_{name}", doc, labels=labels), name)  # noqa: E731
        return [
            (InfoMetricFamily(f"{p}_gpu", "GPUs NVML sees; status says 'no GPU: why' when there are none",
                              labels=["gpu", "name", "uuid", "driver_version", "status"]), "gpu"),
            g("gpu_count", "Number of GPUs NVML sees (0: no GPU)", []),
            g("gpu_memory_used_bytes", "GPU memory in use, all processes (NVML)"),
            g("gpu_memory_total_bytes", "GPU memory in all (NVML)"),
            g("gpu_process_memory_used_bytes", "GPU memory used by this server process (NVML)"),
            g("gpu_utilization_percent", "Percent of time a kernel was running, last sample period (NVML)"),
            g("gpu_memory_bandwidth_utilization_percent", "Percent of time GPU memory was read or written (NVML)"),
            g("gpu_temperature_celsius", "GPU core temperature"),
            g("gpu_power_watts", "GPU power draw"),
            g("torch_cuda_memory_allocated_bytes", "Memory held by tensors in this process (torch allocator)",
              ["device"]),
            g("torch_cuda_memory_reserved_bytes", "Memory reserved by this process's torch caching allocator",
              ["device"]),
            g("process_cpu_percent", "CPU use of this process since the last scrape (100 = one core)", []),
            g("process_resident_memory_bytes", "Resident memory of this process", []),
            g("process_threads", "Threads of this process", []),
            g("process_open_fds", "Open file descriptors of this process", []),
            g("system_cpu_percent", "CPU use of the whole machine since the last scrape (100 = all cores)", []),
            g("system_memory_used_bytes", "Memory in use on the machine (total - available)", []),
            g("system_memory_total_bytes", "Memory of the machine", []),
        ]

    def _safe(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a reading that fails is left out, never the scrape
            if what not in self._warned:
                self._warned.add(what)
                log.info("metric %s unavailable: %s", what, _text(exc))
            return None

    def _read_gpus(self, fam: dict[str, Metric]) -> None:
        p = self.prefix
        info, count = fam[f"{p}_gpu"], fam[f"{p}_gpu_count"]
        handles = self._nvml.handles()
        count.add_metric([], len(handles))
        if not handles:
            reason = self._nvml.reason or f"{NO_GPU}: NVML sees no devices"
            info.add_metric(["none", NO_GPU, "", self._nvml.driver, reason], {})
            return
        nv = self._nvml.nvml
        for index, h in handles:
            name = _text(self._safe("gpu name", lambda: nv.nvmlDeviceGetName(h)) or "unknown")
            uuid = _text(self._safe("gpu uuid", lambda: nv.nvmlDeviceGetUUID(h)) or "")
            info.add_metric([str(index), name, uuid, self._nvml.driver, "ok"], {})
            labels = [str(index), name]
            mem = self._safe("gpu memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
            if mem is not None:
                fam[f"{p}_gpu_memory_used_bytes"].add_metric(labels, float(mem.used))
                fam[f"{p}_gpu_memory_total_bytes"].add_metric(labels, float(mem.total))
            util = self._safe("gpu utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
            if util is not None:
                fam[f"{p}_gpu_utilization_percent"].add_metric(labels, float(util.gpu))
                fam[f"{p}_gpu_memory_bandwidth_utilization_percent"].add_metric(labels, float(util.memory))
            temp = self._safe("gpu temperature", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            if temp is not None:
                fam[f"{p}_gpu_temperature_celsius"].add_metric(labels, float(temp))
            power = self._safe("gpu power", lambda: nv.nvmlDeviceGetPowerUsage(h))
            if power is not None:
                fam[f"{p}_gpu_power_watts"].add_metric(labels, power / 1000.0)
            procs = self._safe("gpu processes", lambda: nv.nvmlDeviceGetComputeRunningProcesses(h))
            if procs is not None:
                mine = sum((pr.usedGpuMemory or 0) for pr in procs if pr.pid == self.pid)
                fam[f"{p}_gpu_process_memory_used_bytes"].add_metric(labels, float(mine))
        self._read_torch(fam)

    def _read_torch(self, fam: dict[str, Metric]) -> None:
        torch = sys.modules.get("torch")  # never import torch or initialise CUDA from a scrape
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for dev in range(torch.cuda.device_count()):
            label = [f"cuda:{dev}"]
            alloc = self._safe("torch allocated", lambda: torch.cuda.memory_allocated(dev))
            reserved = self._safe("torch reserved", lambda: torch.cuda.memory_reserved(dev))
            if alloc is not None:
                fam[f"{self.prefix}_torch_cuda_memory_allocated_bytes"].add_metric(label, float(alloc))
            if reserved is not None:
                fam[f"{self.prefix}_torch_cuda_memory_reserved_bytes"].add_metric(label, float(reserved))

    def _read_process(self, fam: dict[str, Metric]) -> None:
        p, proc, ps = self.prefix, self._process, self._psutil
        if proc is None or ps is None:
            return
        readings = [
            ("process_cpu_percent", lambda: proc.cpu_percent(None)),
            ("process_resident_memory_bytes", lambda: proc.memory_info().rss),
            ("process_threads", lambda: proc.num_threads()),
            ("process_open_fds", lambda: proc.num_fds()),
            ("system_cpu_percent", lambda: ps.cpu_percent(None)),
        ]
        for name, fn in readings:
            value = self._safe(name, fn)
            if value is not None:
                fam[f"{p}_{name}"].add_metric([], float(value))
        vm = self._safe("system memory", ps.virtual_memory)
        if vm is not None:
            fam[f"{p}_system_memory_used_bytes"].add_metric([], float(vm.total - vm.available))
            fam[f"{p}_system_memory_total_bytes"].add_metric([], float(vm.total))


def register_system_metrics(registry, pid: int | None = None) -> SystemMetricsCollector:
    """Add GPU and process gauges to `registry` (a prometheus_client CollectorRegistry)."""
    collector = SystemMetricsCollector(pid=pid)
    registry.register(collector)
    return collector


def gpu_summary() -> dict[str, Any]:
    """One reading of the GPUs as a plain dict (for benchmark result files): name, memory, status."""
    nv = _Nvml()
    handles = nv.handles()
    if not handles:
        return {"status": nv.reason or f"{NO_GPU}", "gpus": []}
    gpus = []
    for index, h in handles:
        try:
            mem = nv.nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": index, "name": _text(nv.nvml.nvmlDeviceGetName(h)),
                         "memory_total_bytes": int(mem.total), "memory_used_bytes": int(mem.used)})
        except Exception as exc:  # noqa: BLE001
            gpus.append({"index": index, "error": _text(exc)})
    return {"status": "ok", "driver_version": nv.driver, "gpus": gpus}


__all__ = ["SystemMetricsCollector", "register_system_metrics", "gpu_summary", "NO_GPU"]
