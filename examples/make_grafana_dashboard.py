"""Writes examples/grafana-thinktalk.json:  python examples/make_grafana_dashboard.py examples/grafana-thinktalk.json"""
import json

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'
RI = "$__rate_interval"
panels = []
pid = [0]


def nid():
    pid[0] += 1
    return pid[0]


def target(expr, legend="", ref="A"):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def ts(title, targets, x, y, w=12, h=8, unit="short", desc="", stack=False, maxv=None):
    p = {
        "id": nid(), "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 2, "fillOpacity": 10,
                                                               "stacking": {"mode": "normal" if stack else "none"}}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi"}},
        "targets": [target(e, l, chr(65 + i)) for i, (e, l) in enumerate(targets)],
    }
    if maxv is not None:
        p["fieldConfig"]["defaults"]["max"] = maxv
        p["fieldConfig"]["defaults"]["min"] = 0
    return p


def stat(title, expr, x, y, unit="short", desc="", thresholds=None, mappings=None, w=3, h=4, decimals=None):
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in (thresholds or [])]
    p = {
        "id": nid(), "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                                     "mappings": mappings or [], "color": {"mode": "thresholds"}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "textMode": "auto"},
        "targets": [target(expr, "", "A")],
    }
    if decimals is not None:
        p["fieldConfig"]["defaults"]["decimals"] = decimals
    return p


def row(title, y):
    return {"id": nid(), "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def q(metric, quant):
    return f"histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{{{M}}}[{RI}])))"


def quantiles(metric):
    return [(q(metric, v), f"p{int(v * 100)}") for v in (0.5, 0.9, 0.99)]


# -- at a glance ---------------------------------------------------------------------------------
y = 0
panels.append(row("At a glance", y)); y += 1
panels += [
    stat("Requests / s", f"sum(rate(thinktalk_requests_total{{{M}}}[{RI}]))", 0, y, "reqps", decimals=2),
    stat("Errors", f'sum(rate(thinktalk_requests_total{{{M},status=~"5.."}}[{RI}])) / '
                   f"clamp_min(sum(rate(thinktalk_requests_total{{{M}}}[{RI}])), 1e-9)",
         3, y, "percentunit", "Share of requests answered with a 5xx status", [(0.01, "orange"), (0.05, "red")]),
    stat("TTFT p90", q("thinktalk_time_to_first_token_seconds", 0.9), 6, y, "s",
         "Arrival to first generated token, 90th percentile", [(1, "orange"), (3, "red")]),
    stat("First audio p90", q("thinktalk_time_to_first_audio_seconds", 0.9), 9, y, "s",
         "Arrival to the first audio bytes sent, 90th percentile", [(1.5, "orange"), (4, "red")]),
    stat("RTF p90", q("thinktalk_speech_real_time_factor", 0.9), 12, y, "none",
         "Speech compute time / audio duration; above 1 the speech cannot keep up with playback",
         [(0.7, "orange"), (1, "red")], decimals=2),
    stat("Running", f"sum(thinktalk_num_requests_running{{{M}}})", 15, y, "short", "Requests in the engine's batch"),
    stat("Waiting", f"sum(thinktalk_num_requests_waiting{{{M}}})", 18, y, "short",
         "Requests queued for the engine", [(1, "orange"), (32, "red")]),
    stat("GPUs", "max(thinktalk_gpu_count)", 21, y, "short",
         "GPUs NVML sees on the server; 'no GPU' when there are none (see the info panel below for why)",
         mappings=[{"type": "value", "options": {"0": {"text": "no GPU", "color": "orange"}}}]),
]
y += 4

# -- traffic -------------------------------------------------------------------------------------
panels.append(row("Traffic", y)); y += 1
panels += [
    ts("Request rate by status", [(f"sum by (status) (rate(thinktalk_requests_total{{{M}}}[{RI}]))", "{{status}}")],
       0, y, unit="reqps", stack=True, desc="HTTP API requests per second, stacked by status code"),
    ts("Request rate by endpoint", [(f"sum by (endpoint) (rate(thinktalk_requests_total{{{M}}}[{RI}]))",
                                     "{{endpoint}}")], 12, y, unit="reqps", stack=True),
]
y += 8
panels += [
    ts("Queue and batch", [
        (f"sum(thinktalk_num_requests_running{{{M}}})", "running"),
        (f"sum(thinktalk_num_requests_waiting{{{M}}})", "waiting (queue)"),
        (f"sum(thinktalk_num_requests_in_flight{{{M}}})", "in flight (API)"),
    ], 0, y, desc="Running: in the engine's batch; waiting: queued for it; in flight: admitted by the API, not yet answered"),
    ts("Token and audio throughput", [
        (f"sum(rate(thinktalk_prompt_tokens_total{{{M}}}[{RI}]))", "prompt tokens/s"),
        (f"sum(rate(thinktalk_generation_tokens_total{{{M}}}[{RI}]))", "generated tokens/s"),
        (f"sum(rate(thinktalk_generated_audio_seconds_total{{{M}}}[{RI}]))", "audio seconds/s"),
    ], 12, y, desc="Audio seconds/s above 1 means speech is made faster than one listener plays it"),
]
y += 8

# -- latency -------------------------------------------------------------------------------------
panels.append(row("Latency", y)); y += 1
panels += [
    ts("Time to first token", quantiles("thinktalk_time_to_first_token_seconds"), 0, y, unit="s"),
    ts("Time to first audio", quantiles("thinktalk_time_to_first_audio_seconds"), 12, y, unit="s",
       desc="Arrival to the first audio bytes sent (spoken answers only)"),
]
y += 8
panels += [
    ts("Time per output token (TPOT)", quantiles("thinktalk_time_per_output_token_seconds"), 0, y, unit="s"),
    ts("End-to-end latency", quantiles("thinktalk_e2e_request_latency_seconds"), 12, y, unit="s"),
]
y += 8
panels += [
    ts("Speech real-time factor (RTF)", quantiles("thinktalk_speech_real_time_factor"), 0, y, unit="none",
       desc="Speech compute time / audio duration; keep it under 1"),
    ts("KV cache", [
        (f"sum(thinktalk_kv_cache_used_tokens{{{M}}})", "used tokens"),
    ], 12, y, desc="Tokens held in the KV cache"),
]
y += 8
panels += [
    ts("KV cache usage (paged engine)", [
        (f"1 - sum(thinktalk_kv_cache_free_blocks{{{M}}}) / sum(thinktalk_kv_cache_total_blocks{{{M}}})", "used"),
    ], 0, y, unit="percentunit", maxv=1, desc="Share of KV blocks in use; empty when the engine has no paged cache"),
]

# -- machine -------------------------------------------------------------------------------------
panels.append(ts("GPU memory", [
    ("thinktalk_gpu_memory_used_bytes", "GPU {{gpu}} used"),
    ("thinktalk_gpu_memory_total_bytes", "GPU {{gpu}} total"),
    ("thinktalk_gpu_process_memory_used_bytes", "GPU {{gpu}} this server"),
], 12, y, unit="bytes", desc="From NVML; empty on a machine without GPU (see 'GPUs')"))
y += 8
panels.append(row("Machine", y)); y += 1
panels += [
    ts("GPU utilisation", [
        ("thinktalk_gpu_utilization_percent", "GPU {{gpu}} kernels"),
        ("thinktalk_gpu_memory_bandwidth_utilization_percent", "GPU {{gpu}} memory bandwidth"),
    ], 0, y, unit="percent", maxv=100),
    ts("Server process", [
        ("thinktalk_process_cpu_percent", "CPU % (100 = one core)"),
        ("thinktalk_system_cpu_percent", "machine CPU %"),
    ], 12, y, unit="percent"),
]
y += 8
panels += [
    ts("Memory (host)", [
        ("thinktalk_process_resident_memory_bytes", "server RSS"),
        ("thinktalk_system_memory_used_bytes", "machine used"),
        ("thinktalk_system_memory_total_bytes", "machine total"),
    ], 0, y, unit="bytes"),
    {
        "id": nid(), "type": "table", "title": "GPU info", "datasource": DS,
        "description": "One row per GPU; on a machine without GPU the status column says 'no GPU: why'",
        "gridPos": {"x": 12, "y": y, "w": 12, "h": 8},
        "targets": [{"datasource": DS, "expr": "thinktalk_gpu_info", "format": "table", "instant": True,
                     "refId": "A"}],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True,
                                                                              "__name__": True}}}],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
    },
]

dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                  "pluginName": "Prometheus"}],
    "title": "thinktalk",
    "uid": "thinktalk-serving",
    "description": "thinktalk serving: traffic, latency (TTFT, first audio, TPOT), speech RTF, queue, KV cache, GPU and host",
    "tags": ["thinktalk", "llm", "speech"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "model_name", "label": "Model", "type": "query", "datasource": DS,
         "query": {"query": "label_values(thinktalk_num_requests_running, model_name)", "refId": "model"},
         "definition": "label_values(thinktalk_num_requests_running, model_name)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
import sys
json.dump(dash, open(sys.argv[1], "w"), indent=2)
print(len(panels), "panels")
