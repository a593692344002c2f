"""Command line: run · chat · make-tiny · serve."""

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


def _load(model: Optional[Path], device: Optional[str], talker: bool = True):
    from .api import RANDOM_WEIGHTS_NOTICE, Omni

    with console.status("loading model..."):
        omni = Omni.load(model, device=device, talker=talker, progress=False)
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
):
    """Answer one prompt, with optional images, audio and video, and optionally speak it."""
    from .errors import InputError

    if speech_out and not speaker:
        speaker = "Ethan"
    omni = _load(model, device, talker=speaker is not None)
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
):
    """Interactive chat that keeps the conversation. Attach media with /image, /audio, /video PATH."""
    from .errors import InputError

    omni = _load(model, device, talker=speaker is not None)
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
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="checkpoint folder (default: the demo model)"),
    demo: bool = typer.Option(False, "--demo", help="serve the demo model: tiny random weights, meaningless output"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: list[str] = typer.Option(None, "--api-key", envvar="THINKTALK_API_KEY",
                                      help="require 'Authorization: Bearer KEY' on /v1 (repeatable)"),
    served_model_name: Optional[str] = typer.Option(None, help="model id clients send (default: the folder name)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    no_talker: bool = typer.Option(False, "--no-talker", help="text output only; skips loading the talker"),
    max_queue: int = typer.Option(64, min=0, help="requests that may wait beyond --max-num-seqs; more get 429"),
    max_num_seqs: int = typer.Option(16, min=1, help="requests decoded together"),
    allow_remote_media: bool = typer.Option(False, "--allow-remote-media", help="fetch http(s) media URLs"),
    allowed_local_media_path: Optional[Path] = typer.Option(
        None, help="serve file:// and path media only from under this folder"),
    max_speech_seconds: Optional[float] = typer.Option(
        None, min=0.1, help="longest spoken answer, in seconds (default: the talker's own limit)"),
):
    """OpenAI-compatible HTTP server: chat (text, image, audio, video in; text and speech out), speech,
    transcriptions, translations; /health, /metrics and a web page at /."""
    from .server.app import ServeOptions
    from .server.app import serve as run_server

    if model is not None and demo:
        console.print("[red]error:[/red] give --model or --demo, not both")
        raise typer.Exit(2)
    if allowed_local_media_path is not None and not allowed_local_media_path.is_dir():
        console.print(f"[red]error:[/red] --allowed-local-media-path {allowed_local_media_path}: not a folder")
        raise typer.Exit(2)
    if model is not None and not model.is_dir():
        console.print(f"[red]error:[/red] --model {model}: not a folder")
        raise typer.Exit(2)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    opts = ServeOptions(
        model=model, host=host, port=port, api_keys=[k for k in api_key or [] if k], served_model_name=served_model_name,
        device=device, talker=not no_talker, max_queue=max_queue, max_num_seqs=max_num_seqs,
        allow_remote_media=allow_remote_media, allowed_local_media_path=allowed_local_media_path,
        max_speech_s=max_speech_seconds,
    )
    raise typer.Exit(run_server(opts))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
