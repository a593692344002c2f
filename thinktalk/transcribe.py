"""`thinktalk transcribe`: a folder of recordings -> text, as txt, srt, vtt or json.

The model gives no timestamps, so by default a recording is one cue from 0 to its end. With
`split_on_silence` the audio is first cut at pauses (a plain energy rule: frames 40 dB below
the recording's loud frames, for at least `min_silence_s`), every piece is transcribed on its own
(all pieces of all files in flight together, so the engine batches them), and each piece becomes
a cue with its real start and end. Cue boundaries are then as good as the pauses are clear; a
cue's text is never timed inside the piece.

The work goes through the batch backends (`EngineBackend` in-process, `HTTPBackend` against a
server), so both paths answer exactly as /v1/audio/transcriptions does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .asr import timestamp
from .audio_out import wav_bytes
from .batch import TRANSCRIBE, BatchItem, ItemError, MemorySink, ProgressView, Stats, CountingSink

RATE = 16000
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mp4", ".mkv", ".mov", ".wma"}
FORMATS = ("txt", "srt", "vtt", "json")


@dataclass
class Segment:
    start: float
    end: float
    text: str = ""


@dataclass
class Transcript:
    path: Path
    duration: float
    segments: list[Segment] = field(default_factory=list)
    error: str | None = None

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())


def find_recordings(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to the audio/video files in them, sorted."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        else:
            out.append(p)
    return out


# -- silence splitting ------------------------------------------------------------------------------
def split_on_silence(
    audio: np.ndarray, rate: int = RATE, *, min_silence_s: float = 0.5, threshold_db: float = -40.0,
    min_segment_s: float = 1.0, max_segment_s: float = 30.0, frame_s: float = 0.03,
) -> list[tuple[float, float]]:
    """(start, end) seconds of the spoken pieces of `audio`, cut in the middle of pauses.

    A frame is silent when its RMS is `threshold_db` below the 95th-percentile frame (and, in any
    case, below -60 dBFS counts as silence). Pieces shorter than `min_segment_s` join their
    neighbour; pieces longer than `max_segment_s` are cut at their quietest frame. All-silent
    audio gives no pieces.
    """
    hop = max(1, int(frame_s * rate))
    n = len(audio) // hop
    duration = len(audio) / rate
    if n == 0:
        return [(0.0, duration)] if duration > 0 else []
    frames = audio[: n * hop].reshape(n, hop).astype(np.float64)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.percentile(db, 95)
    silent = (db < loud + threshold_db) | (db < -60.0)
    if silent.all():
        return []
    # runs of silence long enough to cut at
    cuts: list[int] = []
    need = max(1, int(round(min_silence_s / frame_s)))
    i = 0
    while i < n:
        if silent[i]:
            j = i
            while j < n and silent[j]:
                j += 1
            if j - i >= need or i == 0 or j == n:
                cuts.append((i + j) // 2 if 0 < i and j < n else (i if i > 0 else j))
            i = j
        else:
            i += 1
    bounds = sorted({0, n, *cuts})
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a and not silent[a:b].all()]
    # too short: join the next (or the previous) piece
    merged: list[list[int]] = []
    for a, b in pieces:
        if merged and ((b - a) * frame_s < min_segment_s or (merged[-1][1] - merged[-1][0]) * frame_s < min_segment_s):
            merged[-1][1] = b
        else:
            merged.append([a, b])
    # too long: cut at the quietest frame, repeatedly
    out: list[tuple[int, int]] = []
    limit = max(2, int(max_segment_s / frame_s))
    stack = [tuple(m) for m in merged][::-1]
    while stack:
        a, b = stack.pop()
        if b - a <= limit:
            out.append((a, b))
            continue
        lo, hi = a + limit // 4, b - limit // 4
        lo, hi = (lo, hi) if hi > lo else (a + 1, b - 1)
        cut = lo + int(np.argmin(db[lo:hi])) if hi > lo else (a + b) // 2
        cut = min(max(cut, a + 1), a + limit)
        stack += [(cut, b), (a, cut)]
    return [(a * hop / rate, min(b * hop / rate, duration)) for a, b in out]


# -- formats ----------------------------------------------------------------------------------------
def render(t: Transcript, fmt: str) -> str:
    if fmt == "txt":
        return t.text + "\n"
    # a blank line ends a cue, so a cue's text is kept on one line
    cues = [(s, " ".join(s.text.split()).replace("-->", "->")) for s in t.segments if s.text.strip()]
    if fmt == "srt":
        return "".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{text}\n\n"
                       for i, (s, text) in enumerate(cues, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{text}\n\n"
                                      for s, text in cues)
    if fmt == "json":
        return json.dumps({"file": str(t.path), "duration": round(t.duration, 3), "text": t.text,
                           "segments": [{"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text.strip()}
                                        for i, s in enumerate(t.segments)]}, ensure_ascii=False, indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def output_path(recording: Path, fmt: str, out_dir: Path | None) -> Path:
    folder = out_dir if out_dir is not None else recording.parent
    return folder / f"{recording.stem}.{fmt}"


# -- the job ----------------------------------------------------------------------------------------
def transcribe_files(
    files: list[Path],
    backend,
    *,
    language: str | None = None,
    prompt: str | None = None,
    split: bool = False,
    min_silence_s: float = 0.5,
    max_tokens: int | None = None,
    progress: bool = True,
) -> tuple[list[Transcript], Stats]:
    """Transcribe `files` on `backend` (EngineBackend or HTTPBackend); one Transcript per file, in order."""
    from .multimodal.audio import load_audio

    transcripts: list[Transcript] = []
    items: list[BatchItem] = []
    fields: dict[str, Any] = {"response_format": "json", "temperature": 0.0}
    if language:
        fields["language"] = language
    if prompt:
        fields["prompt"] = prompt
    if max_tokens:
        fields["max_tokens"] = max_tokens
    for k, path in enumerate(files):
        t = Transcript(path.resolve(), 0.0)
        transcripts.append(t)
        try:
            audio = load_audio(str(path), RATE)
        except Exception as exc:  # noqa: BLE001 - a bad file is reported, the rest go on
            t.error = str(exc)
            continue
        t.duration = len(audio) / RATE
        spans = split_on_silence(audio, min_silence_s=min_silence_s) if split else [(0.0, t.duration)]
        for j, (a, b) in enumerate(spans):
            t.segments.append(Segment(a, b))
            ref: Any = str(path.resolve()) if not split else wav_bytes(audio[int(a * RATE): int(b * RATE)], RATE)
            items.append(BatchItem(0, f"{k}:{j}", TRANSCRIBE, {"file": ref, **fields}, path.parent.resolve()))
    stats = Stats(total=len(items))
    sink = MemorySink()
    with ProgressView(stats, enabled=progress, description="transcribe") as view:
        backend.run(items, CountingSink(sink, stats, view), stats)
    for cid, res in sink.results.items():
        k, j = (int(x) for x in cid.split(":"))
        t = transcripts[k]
        if isinstance(res, ItemError):
            t.error = res.message
        else:
            t.segments[j].text = str(res.get("text", res.get("content", "")))
    return transcripts, stats


__all__ = ["Transcript", "Segment", "find_recordings", "split_on_silence", "render", "transcribe_files", "FORMATS"]
