"""`asr-client`: transcribe files, check health, show what the server serves."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from asr_client.client import DEFAULT_TARGET, AsrClient


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr-client")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--auth-token", default="")
    commands = parser.add_subparsers(dest="command", required=True)
    transcribe = commands.add_parser("transcribe", help="transcribe audio files (WAV, FLAC, OGG, MP3)")
    transcribe.add_argument("files", nargs="+")
    transcribe.add_argument("--language", default="", help="name or ISO code; empty: detect")
    transcribe.add_argument("--context", default="", help="hotwords / context text")
    transcribe.add_argument("--json", action="store_true", help="print the full response as JSON")
    commands.add_parser("health", help="print the server's health status")
    commands.add_parser("info", help="print what the server serves")
    args = parser.parse_args(argv)

    with AsrClient(args.target, timeout_s=args.timeout_s, auth_token=args.auth_token) as client:
        try:
            if args.command == "health":
                print(client.health())
            elif args.command == "info":
                print(json.dumps(MessageToDict(client.server_info()), indent=2, ensure_ascii=False))
            else:
                for path in args.files:
                    response = client.transcribe_file(path, language=args.language, context=args.context)
                    if args.json:
                        print(json.dumps(MessageToDict(response), indent=2, ensure_ascii=False))
                    else:
                        for transcript in response.transcripts:
                            print(f"{path}\t[{transcript.language or '-'}]\t{transcript.text}")
        except grpc.RpcError as exc:
            print(f"asr-client: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
