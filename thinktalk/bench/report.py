"""Benchmark results read at a glance: a table per run, a PNG of latency and throughput against
load, and the change per metric between two runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (label, path into a level, unit, higher is better)
METRICS: list[tuple[str, tuple[str, ...], str, bool]] = [
    ("request throughput", ("request_throughput",), "req/s", True),
    ("output throughput", ("output_throughput",), "tok/s", True),
    ("audio throughput", ("audio_throughput",), "audio s/s", True),
    ("goodput", ("goodput",), "req/s", True),
    ("TTFT p50", ("ttft_ms", "p50"), "ms", False),
    ("TTFT p99", ("ttft_ms", "p99"), "ms", False),
    ("first audio p50", ("first_audio_ms", "p50"), "ms", False),
    ("first audio p99", ("first_audio_ms", "p99"), "ms", False),
    ("TPOT p50", ("tpot_ms", "p50"), "ms", False),
    ("TPOT p99", ("tpot_ms", "p99"), "ms", False),
    ("ITL p50", ("itl_ms", "p50"), "ms", False),
    ("ITL p99", ("itl_ms", "p99"), "ms", False),
    ("E2E p50", ("e2e_ms", "p50"), "ms", False),
    ("E2E p99", ("e2e_ms", "p99"), "ms", False),
    ("RTF p50", ("rtf", "p50"), "", False),
    ("RTF p90", ("rtf", "p90"), "", False),
    ("failed", ("failed",), "", False),
]


def load(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("kind") != "thinktalk-bench-serve":
        raise ValueError(f"{path}: not a thinktalk bench serve result")
    return data


def get(level: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = level
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, (int, float)) else None


def _x(level: dict[str, Any]) -> float:
    v = level["level"]
    return math.inf if v == "inf" else float(v)


def x_label(results: dict[str, Any]) -> str:
    return "concurrent users" if results["config"]["mode"] == "concurrency" else "request rate (req/s)"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        text = f"{v:,.0f}"
    elif abs(v) >= 10:
        text = f"{v:.1f}"
    else:
        text = f"{v:.3g}"
    return text


def print_table(results: dict[str, Any], console=None) -> None:
    """One column per load level, one row per metric (fits a terminal however many metrics)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    server = results.get("server", {})
    title = f"{server.get('model', '?')} @ {server.get('url', '?')}"
    if server.get("gpu"):
        title += f" ({server['gpu']})"
    table = Table(title=title, title_style="bold")
    table.add_column("users" if results["config"]["mode"] == "concurrency" else "req/s", style="bold")
    for lv in results["levels"]:
        table.add_column(str(lv["level"]), justify="right")
    for label, path, unit, _ in METRICS:
        values = [get(lv, path) for lv in results["levels"]]
        if all(v is None for v in values):
            continue
        cells = [_fmt(v) for v in values]
        if label == "failed":
            cells = [f"[red]{c}[/red]" if v else c for c, v in zip(cells, values)]
        table.add_row(f"{label} ({unit})" if unit else label, *cells)
    console.print(table)
    for lv in results["levels"]:
        if lv.get("errors"):
            console.print(f"[red]level {lv['level']} errors:[/red] {lv['errors']}")


def plot(results: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Latency (TTFT, first audio, TPOT, E2E percentiles) and throughput against load, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    xs_raw = [_x(lv) for lv in levels]
    finite = [x for x in xs_raw if not math.isinf(x)]
    inf_at = (max(finite) * 2 if finite else 1.0)
    xs = [inf_at if math.isinf(x) else x for x in xs_raw]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    (ax_lat, ax_tok), (ax_thr, ax_rtf) = axes

    def series(ax, path, label, color, dashed=False, marker="o"):
        ys = [get(lv, path) for lv in levels]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle="--" if dashed else "-",
                    marker=marker, label=label, linewidth=2, markersize=5)
        return bool(pts)

    # same colour per quantity, solid p50, dashed p99
    series(ax_lat, ("ttft_ms", "p50"), "TTFT p50", "C0")
    series(ax_lat, ("ttft_ms", "p99"), "TTFT p99", "C0", True)
    series(ax_lat, ("first_audio_ms", "p50"), "first audio p50", "C1", marker="s")
    series(ax_lat, ("first_audio_ms", "p99"), "first audio p99", "C1", True, marker="s")
    series(ax_lat, ("e2e_ms", "p50"), "end-to-end p50", "C2", marker="^")
    series(ax_lat, ("e2e_ms", "p99"), "end-to-end p99", "C2", True, marker="^")
    ax_lat.set_title("Latency: first token, first audio, whole answer")
    ax_lat.set_ylabel("ms")

    series(ax_tok, ("tpot_ms", "p50"), "TPOT p50", "C0")
    series(ax_tok, ("tpot_ms", "p99"), "TPOT p99", "C0", True)
    series(ax_tok, ("itl_ms", "p50"), "ITL p50", "C1", marker="s")
    series(ax_tok, ("itl_ms", "p99"), "ITL p99", "C1", True, marker="s")
    ax_tok.set_title("Time per output token / between tokens")
    ax_tok.set_ylabel("ms")

    series(ax_thr, ("output_throughput",), "output tokens/s (left)", "C0")
    ax_thr.set_ylabel("tokens/s")
    ax_thr.set_title("Throughput")
    twin = ax_thr.twinx()
    series(twin, ("request_throughput",), "requests/s (right)", "C1", marker="s")
    if any(lv.get("goodput") is not None for lv in levels):
        series(twin, ("goodput",), "goodput: req/s in SLO (right)", "C2", True, marker="^")
    twin.set_ylabel("requests/s")
    lines = ax_thr.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax_thr.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")

    has_rtf = series(ax_rtf, ("rtf", "p50"), "RTF p50 (left)", "C0")
    series(ax_rtf, ("rtf", "p90"), "RTF p90 (left)", "C0", True)
    if has_rtf:
        ax_rtf.axhline(1.0, color="red", linewidth=1, linestyle=":", label="real time (RTF 1)")
    twin2 = ax_rtf.twinx()
    series(twin2, ("audio_throughput",), "audio seconds/s (right)", "C3", marker="s")
    twin2.set_ylabel("audio seconds / second")
    ax_rtf.set_title("Speech: real-time factor (client side)")
    ax_rtf.set_ylabel("RTF (lower is better)")
    h1, l1 = ax_rtf.get_legend_handles_labels()
    h2, l2 = twin2.get_legend_handles_labels()
    if h1 or h2:
        ax_rtf.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    else:
        ax_rtf.text(0.5, 0.5, "no spoken answers in this run\n(--speech-ratio)", ha="center", va="center",
                    transform=ax_rtf.transAxes, color="gray")

    for ax in (ax_lat, ax_tok, ax_thr, ax_rtf):
        ax.set_xlabel(x_label(results))
        ax.grid(True, alpha=0.3)
        if len(set(xs)) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ticks = sorted({x: ("inf" if math.isinf(r) else f"{r:g}") for x, r in zip(xs, xs_raw)}.items())
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
    for ax in (ax_lat, ax_tok):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    twin.set_ylim(bottom=0)
    twin2.set_ylim(bottom=0)
    server = results.get("server", {})
    cfg = results["config"]
    where = ""
    if server.get("gpu"):
        where = " on CPU (no GPU)" if server["gpu"] == "no GPU" else f" on {server['gpu']}"
    fig.suptitle(title or f"thinktalk bench serve: {server.get('model', '?')}{where} - {cfg['num_prompts']} prompts/level, "
                 f"speech {int(100 * cfg.get('speech_ratio', 0))}%", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (level, metric, A, B, change %, better?) for the levels both runs have."""
    rows = []
    b_levels = {str(lv["level"]): lv for lv in b["levels"]}
    pairs = [(lv, b_levels[str(lv["level"])]) for lv in a["levels"] if str(lv["level"]) in b_levels]
    if not pairs and len(a["levels"]) == len(b["levels"]):
        pairs = list(zip(a["levels"], b["levels"]))  # different level values: compare in order
    for la, lb in pairs:
        for label, path, unit, higher_better in METRICS:
            va, vb = get(la, path), get(lb, path)
            if va is None and vb is None:
                continue
            change = None
            if va not in (None, 0) and vb is not None:
                change = 100.0 * (vb - va) / abs(va)
            better = None
            if change is not None and abs(change) >= 1.0:
                better = (change > 0) == higher_better
            rows.append({"level": f"{la['level']}" if la["level"] == lb["level"] else f"{la['level']}|{lb['level']}",
                         "metric": label, "unit": unit, "a": va, "b": vb, "change_pct": change, "better": better})
    return rows


def print_compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B", console=None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = compare(a, b)
    if not rows:
        console.print("[yellow]the two runs share no load levels to compare[/yellow]")
        return rows
    mode = "users" if a["config"]["mode"] == "concurrency" else "req/s"
    table = Table(title=f"{name_a} -> {name_b}  (green: better, red: worse, change under 1% not coloured)")
    for col in (mode, "metric", name_a, name_b, "change"):
        table.add_column(col, justify="right" if col not in ("metric",) else "left")
    last = None
    for k, r in enumerate(rows):
        change = "-" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        if r["better"] is True:
            change = f"[green]{change}[/green]"
        elif r["better"] is False:
            change = f"[red]{change}[/red]"
        unit = f" {r['unit']}" if r["unit"] else ""
        table.add_row(r["level"] if r["level"] != last else "", r["metric"], _fmt(r["a"]) + unit, _fmt(r["b"]) + unit,
                      change, end_section=k + 1 < len(rows) and rows[k + 1]["level"] != r["level"])
        last = r["level"]
    console.print(table)
    return rows
