"""`asr-client`: transcribe files, stream one live, check health, show what the server serves.

    asr-client transcribe a.wav b.flac --language en --format srt --timestamps
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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from asr_client.audio import AudioLike
from asr_client.client import DEFAULT_TARGET, AsrClient
from asr_client.errors import AsrError, UnimplementedError
from asr_client.results import ASRTranscription, StreamingResult
from asr_client.subtitles import to_srt, to_vtt
from asr_client.tls import tls_credentials

FORMATS = ("text", "json", "srt", "vtt")


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

    stream = commands.add_parser("stream", help="live recognition of one file over StreamingRecognize")
    stream.add_argument("file")
    stream.add_argument("--realtime", action="store_true", help="send at real-time pace, like a microphone")
    stream.add_argument("--language", default="")
    stream.add_argument("--context", default="")
    stream.add_argument("--timestamps", action="store_true")
    stream.add_argument("--no-interim", action="store_true", help="final results only")
    stream.add_argument("--format", choices=("text", "json"), default="text", help="text, or one JSON object a line")

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


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    tls_files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    if not args.tls and not any(tls_files) and not args.tls_server_name:
        return None
    return tls_credentials(*tls_files)


def _transcribe(client: AsrClient, args: argparse.Namespace) -> int:
    inputs: list[AudioLike] = [sys.stdin.buffer.read() if f == "-" else f for f in args.files]
    results = client.transcribe(inputs, context=args.context, language=args.language or None,
                                return_time_stamps=args.timestamps)
    rendered = [(name, _render(result, args.format, name)) for name, result in zip(args.files, results, strict=True)]
    if args.output_dir:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, (name, text) in enumerate(rendered):
            stem = Path(name).stem if name != "-" and "://" not in name and ":" not in name[:6] else f"audio{index}"
            path = out_dir / f"{stem}.{'txt' if args.format == 'text' else args.format}"
            path.write_text(text if args.format in ("srt", "vtt") else text + "\n", encoding="utf-8")
            print(path)
    elif args.format == "json":
        print(json.dumps([json.loads(text) for _, text in rendered], indent=2, ensure_ascii=False))
    elif args.format in ("srt", "vtt") and len(rendered) > 1:
        print("\n".join(f"==> {name} <==\n{text}" for name, text in rendered), end="")
    else:
        print("\n".join(text for _, text in rendered), end="\n" if args.format == "text" else "")
    return 0


def _render(result: ASRTranscription, fmt: str, name: str) -> str:
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    if fmt == "json":
        return json.dumps({"audio": name if len(name) < 200 else name[:200] + "...", **_as_dict(result)},
                          ensure_ascii=False)
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
    results = client.stream(args.file, language=args.language or None, context=args.context,
                            return_time_stamps=args.timestamps, interim_results=not args.no_interim,
                            realtime=args.realtime)
    for result in results:
        if args.format == "json":
            print(json.dumps(_as_dict(result), ensure_ascii=False), flush=True)
        else:  # finals as "[start-end] text", interims (later replaced) marked with "~"
            mark = " " if result.is_final else "~"
            print(f"[{result.start_time:7.2f}-{result.end_time:7.2f}]{mark}{result.text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
