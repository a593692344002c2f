"""Command line: run · chat · make-tiny · quantize · serve."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="thinktalk: fast self-hosted Qwen3-Omni.")
console = Console(stderr=True)
out = Console()

ModelOpt = typer.Option(None, "--model", "-m", help="checkpoint folder (default: the tiny random demo model)")


DTypeOpt = typer.Option(None, "--dtype", help="bfloat16 | float16 (default: bfloat16 on GPU, float32 on CPU)")
QuantOpt = typer.Option(
    None, "--quantization", help="fp8 | int8 | int4 (suffixes: -asym, -g64, -block128); pre-quantized checkpoints need none"
)


def _load(model: Optional[Path], device: Optional[str], talker: bool = True, dtype=None, quantization=None):
    from .api import RANDOM_WEIGHTS_NOTICE, Omni

    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        console.print(f"[red]error:[/red] --dtype {dtype}: expected bfloat16, float16 or float32")
        raise typer.Exit(2)
    with console.status("loading model..."):
        omni = Omni.load(model, device=device, talker=talker, progress=False, dtype=dtype, quantization=quantization)
    if omni.random_weights:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTICE}[/yellow]")
    return omni


def _sampling(preset, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, stop):
    return dict(
        preset=preset, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens, seed=seed, stop=list(stop) if stop else None,
    )


def _user_message(prompt: str, images, audios, videos) -> dict:
    content = [{"type": "image", "image": str(p)} for p in images or []]
    content += [{"type": "audio", "audio": str(p)} for p in audios or []]
    content += [{"type": "video", "video": str(p)} for p in videos or []]
    content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


def _write_wav(path: Path, audio, sample_rate: int) -> float:
    from .audio_out import write_wav

    write_wav(path, audio, sample_rate)
    return len(audio) / sample_rate


@app.command()
def run(
    prompt: str = typer.Argument(..., help="the text of the user's turn"),
    model: Optional[Path] = ModelOpt,
    image: list[Path] = typer.Option(None, "--image", help="image file (repeatable)"),
    audio: list[Path] = typer.Option(None, "--audio", help="audio file (repeatable)"),
    video: list[Path] = typer.Option(None, "--video", help="video file (repeatable)"),
    use_audio_in_video: bool = typer.Option(False, "--use-audio-in-video", help="also listen to the videos' sound"),
    speaker: Optional[str] = typer.Option(None, "--speaker", help="voice: Ethan, Chelsie or Aiden"),
    speech_out: Optional[Path] = typer.Option(None, "--speech-out", help="write the spoken answer to this WAV"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    preset: Optional[str] = typer.Option(None, "--preset", help="creative | factual | conversational"),
    temperature: Optional[float] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    repetition_penalty: Optional[float] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    dtype: Optional[str] = DTypeOpt,
    quantization: Optional[str] = QuantOpt,
):
    """Answer one prompt, with optional images, audio and video, and optionally speak it."""
    from .errors import InputError

    if speech_out and not speaker:
        speaker = "Ethan"
    omni = _load(model, device, talker=speaker is not None, dtype=dtype, quantization=quantization)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append(_user_message(prompt, image, audio, video))
    try:
        result = omni.generate(
            messages, speaker=speaker, use_audio_in_video=use_audio_in_video,
            **_sampling(preset, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, stop),
        )
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    if result.reasoning is not None:
        console.print("[dim]thinking:[/dim]")
        console.print(f"[dim]{result.reasoning}[/dim]")
    out.print(result.text, markup=False, highlight=False)
    if result.audio is not None:
        path = speech_out or Path("reply.wav")
        seconds = _write_wav(path, result.audio, result.sample_rate)
        console.print(f"speech: {path} ({seconds:.2f} s, {result.sample_rate} Hz)")


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    speaker: Optional[str] = typer.Option(None, "--speaker", help="speak each answer with this voice"),
    speech_dir: Path = typer.Option(Path("."), help="folder for the spoken answers (reply-N.wav)"),
    system: Optional[str] = typer.Option(None, "--system"),
    preset: Optional[str] = typer.Option(None, "--preset"),
    max_new_tokens: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    dtype: Optional[str] = DTypeOpt,
    quantization: Optional[str] = QuantOpt,
):
    """Interactive chat that keeps the conversation. Attach media with /image, /audio, /video PATH."""
    from .errors import InputError

    omni = _load(model, device, talker=speaker is not None, dtype=dtype, quantization=quantization)
    messages = [{"role": "system", "content": system}] if system else []
    attachments: list[dict] = []
    console.print("type a message; /image /audio /video PATH attach media, /reset clears, /quit leaves")
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            attachments = []
            continue
        kind, _, arg = line.partition(" ")
        if kind in ("/image", "/audio", "/video"):
            attachments.append({"type": kind[1:], kind[1:]: arg.strip()})
            console.print(f"attached {kind[1:]} {arg.strip()}")
            continue
        user = {"role": "user", "content": attachments + [{"type": "text", "text": line}]}
        try:
            result = omni.generate(messages + [user], speaker=speaker, preset=preset, max_new_tokens=max_new_tokens)
        except InputError as exc:
            # a bad file or parameter costs this turn only; the conversation goes on
            console.print(f"[red]error:[/red] {exc}")
            attachments = []
            continue
        attachments = []
        messages += [user, {"role": "assistant", "content": result.text}]
        if result.reasoning is not None:
            console.print(f"[dim]{result.reasoning}[/dim]")
        out.print(f"assistant> {result.text}", markup=False, highlight=False)
        if result.audio is not None:
            turn += 1
            path = speech_dir / f"reply-{turn}.wav"
            seconds = _write_wav(path, result.audio, result.sample_rate)
            console.print(f"speech: {path} ({seconds:.2f} s)")


@app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="folder to write (must not exist or be empty)"),
    variant: str = typer.Option("instruct", help="instruct | thinking | captioner"),
    seed: int = typer.Option(0),
):
    """Write a tiny random-weight checkpoint in the Hugging Face format."""
    from .weights.tiny import make_tiny

    path = make_tiny(out_dir, variant=variant, seed=seed)
    console.print(f"wrote tiny random {variant} checkpoint to {path}")


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="bf16 checkpoint folder"),
    dst: Path = typer.Argument(..., help="folder to write (must not exist or be empty)"),
    method: str = typer.Option(..., "--method", help="fp8 | int8 | int4"),
    group_size: int = typer.Option(128, "--group-size", help="int: columns per scale (0: per output channel)"),
    asym: bool = typer.Option(False, "--asym", help="int: asymmetric (zero points)"),
    fp8_block: int = typer.Option(0, "--fp8-block", help="fp8: 128 for 128x128 block scales (Qwen's format); 0: per channel"),
    include_encoders: bool = typer.Option(False, "--include-encoders", help="also quantize the audio/vision encoders"),
    device: Optional[str] = typer.Option(None, help="where to quantize (default: cuda if present)"),
):
    """Write a pre-quantized checkpoint (safetensors + quantization_config) that loads fast."""
    from .weights.quant import quantize_checkpoint

    path = quantize_checkpoint(
        src, dst, method, group_size or None, not asym, fp8_block=fp8_block or None,
        include=("encoders",) if include_encoders else (), device=device,
    )
    console.print(f"wrote {method} checkpoint to {path}")


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="checkpoint folder (default: the demo model)"),
    demo: bool = typer.Option(False, "--demo", help="serve the demo model: tiny random weights, meaningless output"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: list[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY",
                                      help="require 'Authorization: Bearer KEY' on /v1 (repeatable)"),
    served_model_name: Optional[str] = typer.Option(None, help="model id clients send (default: the folder name)"),
    cors_origin: list[str] = typer.Option(None, "--cors-origin", envvar="THINKTALK_CORS_ORIGINS",
                                          help="a browser origin allowed to call the API, e.g. https://app.example.com "
                                               "(repeat for several; '*' for any); default: none"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    no_talker: bool = typer.Option(False, "--no-talker", help="text output only; skips loading the talker"),
    max_queue: int = typer.Option(64, min=0, help="requests that may wait beyond --max-num-seqs; more get 429"),
    max_num_seqs: int = typer.Option(16, min=1, help="requests decoded together"),
    allow_remote_media: bool = typer.Option(False, "--allow-remote-media", help="fetch http(s) media URLs"),
    allowed_local_media_path: Optional[Path] = typer.Option(
        None, help="serve file:// and path media only from under this folder"),
    max_request_mb: float = typer.Option(128.0, min=0.001, help="largest request body (base64 media included); more: 413"),
    max_media_mb: float = typer.Option(64.0, min=0.001, help="largest media item (an image, audio, video), decoded"),
    max_image_pixels: int = typer.Option(50_000_000, min=1, help="largest image or video frame (width x height), "
                                         "checked from its header before decoding"),
    max_media_seconds: float = typer.Option(3600.0, min=0.1, help="longest audio or video input, in seconds"),
    max_speech_seconds: Optional[float] = typer.Option(
        None, min=0.1, help="longest spoken answer, in seconds (default: the talker's own limit)"),
    dtype: Optional[str] = DTypeOpt,
    quantization: Optional[str] = QuantOpt,
    kv_backend: Optional[str] = typer.Option(None, help="contiguous | paged (default: the engine's)"),
    max_model_len: Optional[int] = typer.Option(None, min=16, help="context length (default: the model's)"),
    gpu_memory_utilization: float = typer.Option(
        0.9, min=0.05, max=1.0, help="share of GPU memory for weights, activations and the KV cache"),
    max_prefill_tokens: int = typer.Option(
        16384, min=16, help="prompt tokens computed per step (longer prompts are chunked); smaller leaves more KV cache"),
    random_weights: bool = typer.Option(False, "--random-weights", hidden=True,
                                        help="full-size model with random weights (benchmarks; no checkpoint)"),
):
    """OpenAI-compatible HTTP server: chat (text, image, audio, video in; text and speech out), speech,
    transcriptions, translations; /health, /metrics and a web page at /."""
    from .server.app import ServeOptions
    from .server.app import serve as run_server

    if model is not None and demo:
        console.print("[red]error:[/red] give --model or --demo, not both")
        raise typer.Exit(2)
    if random_weights and (model is not None or demo):
        console.print("[red]error:[/red] --random-weights takes neither --model nor --demo")
        raise typer.Exit(2)
    if allowed_local_media_path is not None and not allowed_local_media_path.is_dir():
        console.print(f"[red]error:[/red] --allowed-local-media-path {allowed_local_media_path}: not a folder")
        raise typer.Exit(2)
    if model is not None and not model.is_dir():
        console.print(f"[red]error:[/red] --model {model}: not a folder")
        raise typer.Exit(2)
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        console.print(f"[red]error:[/red] --dtype {dtype}: expected bfloat16, float16 or float32")
        raise typer.Exit(2)
    if kv_backend is not None and kv_backend not in ("contiguous", "paged"):
        console.print(f"[red]error:[/red] --kv-backend {kv_backend}: expected contiguous or paged")
        raise typer.Exit(2)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    opts = ServeOptions(
        model=model, host=host, port=port, api_keys=[k for k in api_key or [] if k], served_model_name=served_model_name,
        cors_origins=[o for o in cors_origin or [] if o], device=device, talker=not no_talker, max_queue=max_queue, max_num_seqs=max_num_seqs,
        allow_remote_media=allow_remote_media, allowed_local_media_path=allowed_local_media_path,
        max_request_mb=max_request_mb, max_media_mb=max_media_mb, max_image_pixels=max_image_pixels,
        max_media_seconds=max_media_seconds, max_speech_s=max_speech_seconds, random_weights=random_weights, dtype=dtype, quantization=quantization,
        kv_backend=kv_backend, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
        max_prefill_tokens=max_prefill_tokens,
    )
    raise typer.Exit(run_server(opts))


# -- batch jobs, transcription, serving benchmark ------------------------------------------------
def _batch_backend(model, url, api_key, concurrency, device, max_num_seqs, max_speech_seconds, talker=True,
                   request_model=None):
    """An in-process engine (--model, default the demo model) or a running server (--url)."""
    from .batch import EngineBackend, HTTPBackend

    if url is not None:
        if model is not None:
            console.print("[red]error:[/red] give --model or --url, not both")
            raise typer.Exit(2)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        return HTTPBackend(url, api_key=api_key, concurrency=concurrency, model=request_model)
    from .api import RANDOM_WEIGHTS_NOTICE, Omni
    from .engine import EngineConfig

    with console.status("loading model..."):
        omni = Omni.load(model, device=device, talker=talker, progress=False,
                         engine_config=EngineConfig(max_num_seqs=max_num_seqs))
    if omni.random_weights:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTICE}[/yellow]")
    return EngineBackend(omni, max_speech_seconds=max_speech_seconds)


@app.command()
def batch(
    input_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="OpenAI Batch input (.jsonl)"),
    output: Path = typer.Option(..., "--output", "-o", help="results (.jsonl; appended to: a re-run resumes)"),
    model: Optional[Path] = ModelOpt,
    url: Optional[str] = typer.Option(None, "--url", help="send the items to this running server instead"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY", help="for --url"),
    concurrency: int = typer.Option(16, min=1, help="requests in flight at once (--url)"),
    request_model: Optional[str] = typer.Option(None, "--request-model", help="set every body's 'model' (--url)"),
    max_num_seqs: int = typer.Option(32, min=1, help="requests the engine decodes together (in-process)"),
    max_speech_seconds: Optional[float] = typer.Option(None, min=0.1, help="longest spoken answer (in-process)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (in-process)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="do the items whose result is an error again"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Run an OpenAI Batch file (chat completions, speech, transcriptions) in-process or against a server.

    Every item goes in flight at once (continuous batching in-process; --concurrency requests to a
    server). Bad lines and failed items become error lines and the job goes on; audio is saved in
    OUTPUT's stem + '.audio/' folder; items already in OUTPUT are skipped, so re-running resumes.
    """
    from .batch import BatchAborted, OutputFile, count_todo, run_batch

    existing = OutputFile(output, retry_failed=retry_failed)
    existing.close()
    todo = count_todo(input_file, existing.done_ids, existing.done_lines)
    if existing.dropped:
        console.print(f"retrying {existing.dropped} failed items")
    if existing.previous:
        console.print(f"resuming: {existing.previous} results already in {output}, {todo} to go")
    if todo == 0:
        console.print(f"[green]nothing to do[/green]: every line of {input_file} has its result in {output}")
        return
    backend = _batch_backend(model, url, api_key, concurrency, device, max_num_seqs, max_speech_seconds,
                             request_model=request_model)
    try:
        stats = run_batch(input_file, output, backend, progress=not no_progress)
    except BatchAborted as exc:
        console.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(3)
    audio = f", {stats.audio_seconds:.1f} s of audio" if stats.audio_seconds else ""
    colour = "red" if stats.errors else "green"
    console.print(f"[{colour}]{stats.done} done, {stats.errors} errors[/{colour}], {stats.skipped} skipped "
                  f"(already in the output) in {stats.elapsed:.1f} s: {stats.tokens} tokens "
                  f"({stats.tokens_per_s:.1f}/s){audio} -> {output}")
    if stats.errors:
        raise typer.Exit(1)


@app.command()
def transcribe(
    files: list[Path] = typer.Argument(..., exists=True, help="recordings, or folders of them"),
    fmt: str = typer.Option("txt", "--format", "-f", help="txt | srt | vtt | json"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="folder for the transcripts "
                                              "(default: beside each recording)"),
    model: Optional[Path] = ModelOpt,
    url: Optional[str] = typer.Option(None, "--url", help="use this running server instead"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY", help="for --url"),
    language: Optional[str] = typer.Option(None, "--language", help="spoken language (en, zh, de, ...)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="context for the model (names, terms)"),
    split_on_silence: bool = typer.Option(False, "--split-on-silence",
                                          help="cut at pauses: one cue per piece, with real times"),
    min_silence: float = typer.Option(0.5, help="shortest pause to cut at, seconds (--split-on-silence)"),
    concurrency: int = typer.Option(16, min=1, help="requests in flight at once (--url)"),
    max_num_seqs: int = typer.Option(32, min=1, help="requests the engine decodes together (in-process)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (in-process)"),
):
    """Recordings (files or folders) -> text, as txt, srt, vtt or json.

    The model gives no timestamps: srt/vtt have one cue per recording, or with --split-on-silence one cue
    per piece between pauses, timed by where the pauses are.
    """
    from .transcribe import FORMATS, find_recordings, output_path, render, transcribe_files

    if fmt not in FORMATS:
        console.print(f"[red]error:[/red] --format must be one of {', '.join(FORMATS)}")
        raise typer.Exit(2)
    recordings = find_recordings(files)
    if not recordings:
        console.print("[red]error:[/red] no recordings found")
        raise typer.Exit(2)
    backend = _batch_backend(model, url, api_key, concurrency, device, max_num_seqs, None, talker=False)
    transcripts, stats = transcribe_files(recordings, backend, language=language, prompt=prompt,
                                          split=split_on_silence, min_silence_s=min_silence)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for t in transcripts:
        if t.error:
            failed += 1
            console.print(f"[red]{t.path}:[/red] {t.error}")
            continue
        target = output_path(t.path, fmt, output_dir)
        target.write_text(render(t, fmt), encoding="utf-8")
        out.print(f"{target}: {t.text}", markup=False, highlight=False)
    console.print(f"{len(transcripts) - failed} transcribed, {failed} failed in {stats.elapsed:.1f} s")
    if failed:
        raise typer.Exit(1)


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
def bench_serve(
    url: Optional[str] = typer.Option(None, "--url", help="the server, e.g. http://127.0.0.1:8000"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY"),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="model id to send (default: the server's)"),
    request_rate: Optional[str] = typer.Option(None, "--request-rate",
                                               help="open loop: mean arrivals per second, a sweep like 1,2,4,inf"),
    concurrency: Optional[str] = typer.Option(None, "--concurrency",
                                              help="closed loop: users sending back to back, a sweep like 1,4,16"),
    max_concurrency: Optional[int] = typer.Option(None, min=1, help="cap on requests in flight (--request-rate)"),
    burstiness: float = typer.Option(1.0, min=0.01, help="1: Poisson arrivals; lower: burstier (gamma)"),
    num_prompts: int = typer.Option(32, min=1, help="requests per level"),
    kinds: str = typer.Option("text", help="synthetic prompt kinds, cycled: text,image,audio,video"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", exists=True, help="prompts from JSONL instead"),
    input_words: int = typer.Option(64, min=1, help="synthetic text length (words)"),
    max_tokens: int = typer.Option(64, min=1, help="max_tokens of each request"),
    image_size: int = typer.Option(448, min=28, help="synthetic image side (pixels)"),
    audio_seconds: float = typer.Option(3.0, min=0.1, help="synthetic audio length"),
    video_seconds: float = typer.Option(2.0, min=0.5, help="synthetic video length"),
    speech_ratio: float = typer.Option(0.0, min=0.0, max=1.0, help="share of requests asking for spoken answers"),
    voice: str = typer.Option("Ethan", help="voice of the spoken answers"),
    temperature: Optional[float] = typer.Option(0.0, help="sampling temperature sent with each request"),
    slo: list[str] = typer.Option(None, "--slo", help="goodput SLO NAME=VALUE (ms; rtf as ratio): "
                                  "ttft, tpot, itl, e2e, first_audio, rtf (repeatable)"),
    warmup: int = typer.Option(1, min=0, help="requests sent (and not counted) before the first level"),
    seed: int = typer.Option(0),
    result: Path = typer.Option(Path("bench-serve.json"), "--result", "-o", help="JSON results"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of latency and throughput against load "
                                             "(default: the result's name with .png)"),
    save_requests: bool = typer.Option(False, "--save-requests", help="keep every request's timings in the JSON"),
    compare_files: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", exists=True,
                                                             help="A.json B.json: print the change per metric, then stop"),
    no_progress: bool = typer.Option(False, "--no-progress"),
):
    """Serving benchmark against a running server, in the style of vLLM's benchmark_serving.

    Measures TTFT, first-audio latency, TPOT, ITL, RTF, throughput and goodput (p50/p90/p99) over a
    --request-rate or --concurrency sweep; writes JSON results and a PNG plot.
    """
    from .bench import report

    if compare_files:
        a, b = compare_files
        rows = report.print_compare(report.load(a), report.load(b), a.name, b.name, console=out)
        raise typer.Exit(0 if rows else 1)
    from .bench.data import load_jsonl, synthetic_prompts
    from .bench.serve import BenchConfig, parse_levels, parse_slos, run_bench, write_results

    if url is None:
        console.print("[red]error:[/red] give --url of a running server (or --compare A.json B.json)")
        raise typer.Exit(2)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if (request_rate is None) == (concurrency is None):
        console.print("[red]error:[/red] give one of --request-rate or --concurrency")
        raise typer.Exit(2)
    try:
        levels = parse_levels(request_rate or concurrency)
        slos = parse_slos(slo)
        if dataset is not None:
            prompts = load_jsonl(dataset, max_tokens=max_tokens)
        else:
            with console.status("making synthetic prompts..."):
                prompts = synthetic_prompts(
                    min(num_prompts * len(levels), 4096), [k.strip() for k in kinds.split(",") if k.strip()],
                    seed=seed, input_words=input_words, max_tokens=max_tokens, image_size=(image_size, image_size),
                    audio_seconds=audio_seconds, video_seconds=video_seconds)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    cfg = BenchConfig(url=url, model=served_model, api_key=api_key, mode="rate" if request_rate else "concurrency",
                      levels=levels, num_prompts=num_prompts, max_concurrency=max_concurrency, burstiness=burstiness,
                      speech_ratio=speech_ratio, voice=voice, temperature=temperature, warmup=warmup, seed=seed,
                      slos=slos)
    try:
        results = run_bench(cfg, prompts, progress=not no_progress, save_requests=save_requests)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    write_results(results, result)
    png = report.plot(results, plot_path or result.with_suffix(".png"))
    report.print_table(results, console=out)
    console.print(f"results: {result}   plot: {png}")


@app.command()
def talk(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="the server (its /v1/realtime is used)"),
    input_wav: Optional[Path] = typer.Option(None, "--input-wav", help="speak this audio file instead of the microphone"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="save the answers here (reply-N.wav) instead of playing them"),
    voice: Optional[str] = typer.Option(None, "--voice", help="Ethan, Chelsie or Aiden"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY", help="the server's API key"),
    instructions: Optional[str] = typer.Option(None, "--instructions", help="system prompt of the conversation"),
    max_output_tokens: Optional[int] = typer.Option(None, min=1, help="longest answer, in tokens"),
):
    """Voice conversation with a running server: microphone (extra 'sounddevice') or a WAV in, answers played or saved."""
    from .talk import run_talk

    raise typer.Exit(run_talk(url, input_wav=input_wav, output_dir=output_dir, voice=voice, api_key=api_key,
                              instructions=instructions, max_output_tokens=max_output_tokens))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
