"""`asr-client`: transcribe files, stream one live, check health, show what the server serves.

    asr-client transcribe a.wav b.flac --language en --format srt --timestamps
    asr-client transcribe call.ulaw --encoding mulaw --sample-rate 8000 --channels 2 --separate-channels
    asr-client stream call.wav --realtime
    asr-client align call.wav --text "hello world" --language en
    asr-client health
    asr-client info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from asr_client.audio import ENCODINGS, AudioLike, RawAudio
from asr_client.client import DEFAULT_TARGET, AsrClient
from asr_client.errors import AsrError, UnimplementedError
from asr_client.results import ASRTranscription, StreamingResult
from asr_client.subtitles import to_srt, to_vtt
from asr_client.tls import tls_credentials
from qwenasr.v1 import asr_pb2 as pb

FORMATS = ("text", "json", "jsonl", "srt", "vtt")
# Exit statuses: 0 every file transcribed; 1 a usage or connection error before any file; 2 some file failed.
EXIT_FILE_FAILED = 2
# Files transcribed at once: the server batches calls in flight together, and this bounds the client's memory.
MAX_CONCURRENT_FILES = 8


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        credentials = _credentials(args)
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        with AsrClient(args.target, credentials, timeout_s=args.timeout_s, auth_token=args.auth_token,
                       options=options) as client:
            if args.command == "health":
                status = client.health(args.service)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "info":
                print(json.dumps(MessageToDict(client.server_info()), indent=2, ensure_ascii=False))
                return 0
            if args.command == "stream":
                return _stream(client, args)
            if args.command == "align":
                return _align(client, args)
            return _transcribe(client, args)
    except UnimplementedError as exc:
        print(f"asr-client: this server does not serve {exc.method.split(' ')[0]} yet (UNIMPLEMENTED: "
              f"{exc.details}); for recorded audio use `asr-client transcribe`", file=sys.stderr)
        return 1
    except (AsrError, ValueError, OSError) as exc:
        print(f"asr-client: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-client", description="Client for the Qwen3-ASR gRPC server")
    parser.add_argument("--target", default=os.environ.get("ASR_TARGET", DEFAULT_TARGET),
                        help="server address host:port (env ASR_TARGET; default %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of each call")
    parser.add_argument("--auth-token", default=os.environ.get("ASR_AUTH_TOKEN", ""),
                        help="bearer token for servers started with --auth-token (env ASR_AUTH_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--tls-ca-file", "--ca-cert", dest="tls_ca_file", default="",
                        help="TLS, trusting the server certificates this CA bundle (PEM) signs")
    parser.add_argument("--tls-cert-file", default="", help="mTLS: this client certificate chain (PEM)")
    parser.add_argument("--tls-key-file", default="", help="mTLS: the client certificate's key (PEM)")
    parser.add_argument("--tls-server-name", default="",
                        help="TLS: the name to check the server certificate against, when not the target's host")
    commands = parser.add_subparsers(dest="command", required=True)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files or URLs (sent concurrently)")
    transcribe.add_argument("files", nargs="+", help="paths, http(s) or data: URLs, or - for standard input")
    transcribe.add_argument("--language", default="", help="name or ISO code, e.g. English or en; empty: detect")
    transcribe.add_argument("--context", default="", help="context text: topic, names, hotwords")
    transcribe.add_argument("--timestamps", action="store_true", help="word timestamps (the server needs an aligner)")
    transcribe.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    transcribe.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    transcribe.add_argument("--output-dir", default="", help="write <name>.<format> files here instead of stdout")
    transcribe.add_argument("--max-new-tokens", type=int, default=0, help="most tokens per chunk (0: server default)")
    _raw_arguments(transcribe)

    stream = commands.add_parser("stream", help="live recognition of one file over StreamingRecognize")
    stream.add_argument("file")
    stream.add_argument("--realtime", action="store_true",
                        help="send at real-time pace, like a microphone (default: as fast as the connection "
                             "takes it, as AsrClient.stream's realtime=False)")
    stream.add_argument("--language", default="")
    stream.add_argument("--context", default="")
    stream.add_argument("--timestamps", action="store_true")
    stream.add_argument("--no-interim", action="store_true", help="final results only")
    stream.add_argument("--format", choices=("text", "json", "jsonl"), default="text",
                        help="text, or one JSON object a line (json and jsonl are the same here)")
    _raw_arguments(stream)

    align = commands.add_parser("align", help="time the words of a known transcript in one audio file (Align)")
    align.add_argument("file", help="a path, an http(s) or data: URL, or - for standard input")
    given = align.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="the transcript to align")
    given.add_argument("--text-file", help="read the transcript from this UTF-8 file")
    align.add_argument("--language", default="English",
                       help="the transcript's language, one of the aligner's 11 by name or code (default: English)")
    align.add_argument("--format", choices=("text", "json"), default="text",
                       help="text: one 'start end word' line per word (seconds); json: the items")

    health = commands.add_parser("health", help="print the health status; exit status 0 only when SERVING")
    health.add_argument("--service", default="",
                        help="health service name: '' (the server), qwenasr.v1.AsrService, "
                             "qwenasr.v1.AsrService.WordTimestamps (the aligner)")
    commands.add_parser("info", help="print what the server serves (model, languages, limits) as JSON")
    return parser


def _raw_arguments(parser: argparse.ArgumentParser) -> None:
    raw = parser.add_argument_group("raw audio (headerless files: telephony .ulaw/.alaw, .pcm, .raw)")
    raw.add_argument("--encoding", choices=tuple(ENCODINGS), default="",
                     help="the files are raw samples in this encoding (linear16: signed 16-bit little-endian); "
                          "needs --sample-rate")
    raw.add_argument("--sample-rate", type=int, default=0, help="raw audio: samples per second per channel")
    raw.add_argument("--channels", type=int, default=1, help="raw audio: interleaved channels (default 1)")
    raw.add_argument("--separate-channels", action="store_true",
                     help="recognise every channel on its own (a stereo call: agent and customer), any file type")


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    tls_files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    if not args.tls and not any(tls_files) and not args.tls_server_name:
        return None
    return tls_credentials(*tls_files)


@dataclass(frozen=True)
class FileResult:
    """One input of `asr-client transcribe`: its results (one per channel with --separate-channels) or its error."""

    name: str
    results: list[ASRTranscription]
    error: str = ""


def _audio_input(name: str, args: argparse.Namespace) -> AudioLike:
    """What the CLI sends for one file argument: its bytes as raw audio with --encoding, else the path or URL."""
    if args.encoding:
        if args.sample_rate <= 0:
            raise ValueError("--encoding needs --sample-rate (e.g. --sample-rate 8000 for telephony audio)")
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        return RawAudio(data, args.encoding, args.sample_rate, args.channels)
    if args.sample_rate:
        raise ValueError("--sample-rate and --channels describe raw audio: give --encoding too")
    return sys.stdin.buffer.read() if name == "-" else name


def _transcribe_one(client: AsrClient, name: str, args: argparse.Namespace, progress: Progress) -> FileResult:
    try:
        audio = _audio_input(name, args)
        options: dict[str, Any] = {
            "context": args.context, "language": args.language or None, "return_time_stamps": args.timestamps,
            "max_new_tokens": args.max_new_tokens,
            # Subtitles want utterance-sized cues: without word timestamps to cut cues at, the server's endpointing
            # cuts the audio at pauses, one segment (cue) per utterance.
            "endpointing": pb.EndpointingConfig() if args.format in ("srt", "vtt") and not args.timestamps else None,
            "progress": progress.sent,
        }
        if args.separate_channels:
            (results,) = client.transcribe(audio, channel_mode="separate", **options)
        else:
            results = client.transcribe(audio, **options)
        return FileResult(name, list(results))
    except (AsrError, ValueError, OSError) as exc:
        return FileResult(name, [], _describe(exc))
    finally:
        progress.file_done()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AsrError):
        return f"{exc.code.name}: {exc.details}"
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        return str(exc)
    return str(exc) or type(exc).__name__


def _transcribe(client: AsrClient, args: argparse.Namespace) -> int:
    names: list[str] = args.files
    workers = min(MAX_CONCURRENT_FILES, len(names))
    with Progress(len(names), _total_bytes(names)) as progress, ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda n: _transcribe_one(client, n, args, progress), names))
    for outcome in outcomes:
        if outcome.error:
            print(f"asr-client: {_shown(outcome.name)}: {outcome.error}", file=sys.stderr)
    done = [o for o in outcomes if not o.error]
    if args.output_dir:
        _write_files(done, args)
    else:
        _print_results(done, args)
    return EXIT_FILE_FAILED if len(done) < len(outcomes) else 0


def _total_bytes(names: list[str]) -> int | None:
    """What the files will upload (each is sent as it is), when all are local files; else unknown."""
    try:
        return sum(Path(n).stat().st_size for n in names)
    except (OSError, ValueError):  # "-", URLs, base64, missing files: the bar counts without a total
        return None


def _shown(name: str) -> str:
    return name if len(name) < 200 else name[:200] + "..."


def _labelled(outcome: FileResult, args: argparse.Namespace) -> list[tuple[str, ASRTranscription]]:
    """(label, result) per result: the file's name, with ":ch<N>" per channel under --separate-channels."""
    if not args.separate_channels:
        return [(outcome.name, result) for result in outcome.results]
    return [(f"{outcome.name}:ch{r.channel_index}", r) for r in outcome.results]


def _write_files(done: list[FileResult], args: argparse.Namespace) -> None:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"text": "txt", "jsonl": "json"}.get(args.format, args.format)
    for index, outcome in enumerate(done):
        name = outcome.name
        stem = Path(name).stem if name != "-" and "://" not in name and ":" not in name[:6] else f"audio{index}"
        for result in outcome.results:
            channel = f".ch{result.channel_index}" if args.separate_channels else ""
            path = out_dir / f"{stem}{channel}.{suffix}"
            text = _render(result, args.format, name)
            path.write_text(text if args.format in ("srt", "vtt") else text + "\n", encoding="utf-8")
            print(path)


def _print_results(done: list[FileResult], args: argparse.Namespace) -> None:
    labelled = [item for outcome in done for item in _labelled(outcome, args)]
    if args.format == "json":
        items = [json.loads(_render(r, "json", label)) for label, r in labelled]
        print(json.dumps(items, indent=2, ensure_ascii=False))
    elif args.format == "jsonl":
        for label, result in labelled:
            print(_render(result, "json", label))
    elif args.format in ("srt", "vtt") and (len(labelled) > 1 or len(args.files) > 1):
        print("\n".join(f"==> {label} <==\n{_render(r, args.format, label)}" for label, r in labelled), end="")
    elif args.format in ("srt", "vtt"):
        print("".join(_render(r, args.format, label) for label, r in labelled), end="")
    else:
        for label, result in labelled:
            print(_render(result, "text", label))


class Progress:
    """A progress bar on stderr (tqdm) of the audio bytes uploaded and the files finished; only when stderr is a
    terminal, so pipes, logs and captured output stay clean."""

    def __init__(self, files: int, total_bytes: int | None = None) -> None:
        self._files = files
        self._finished = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             desc="uploading", dynamic_ncols=True, leave=False)
            self._bar.set_postfix_str(f"0/{files} files")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def sent(self, sent_bytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(sent_bytes)

    def file_done(self) -> None:
        with self._lock:
            self._finished += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self._finished}/{self._files} files")


def _render(result: ASRTranscription, fmt: str, name: str) -> str:
    """One result as `fmt`; `name` is the file's (with ":ch<N>" for a channel)."""
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    if fmt in ("json", "jsonl"):
        return json.dumps({"audio": _shown(name), **_as_dict(result)}, ensure_ascii=False)
    return f"{name}\t[{result.language or '-'}]\t{result.text}"


def _as_dict(result: ASRTranscription | StreamingResult) -> dict[str, Any]:
    data = asdict(result)
    if result.time_stamps is not None:
        data["time_stamps"] = [asdict(item) for item in result.time_stamps]
    return data


def _align(client: AsrClient, args: argparse.Namespace) -> int:
    audio: AudioLike = sys.stdin.buffer.read() if args.file == "-" else args.file
    text = args.text if args.text is not None else Path(args.text_file).read_text(encoding="utf-8")
    (result,) = client.align(audio, text, args.language)
    if args.format == "json":
        print(json.dumps([asdict(item) for item in result], indent=2, ensure_ascii=False))
    else:
        for item in result:
            print(f"{item.start_time:.3f}\t{item.end_time:.3f}\t{item.text}")
    return 0


def _stream(client: AsrClient, args: argparse.Namespace) -> int:
    audio = _audio_input(args.file, args)
    results = client.stream(audio, language=args.language or None, context=args.context,
                            return_time_stamps=args.timestamps, interim_results=not args.no_interim,
                            realtime=args.realtime, channel_mode="separate" if args.separate_channels else "downmix")
    for result in results:
        if args.format in ("json", "jsonl"):
            print(json.dumps(_as_dict(result), ensure_ascii=False), flush=True)
        else:  # finals as "[start-end] text", interims (later replaced) marked with "~"
            mark = " " if result.is_final else "~"
            channel = f"ch{result.channel_index} " if args.separate_channels else ""
            print(f"[{channel}{result.start_time:7.2f}-{result.end_time:7.2f}]{mark}{result.text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
