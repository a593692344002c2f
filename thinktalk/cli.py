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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
