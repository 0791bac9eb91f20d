"""`asr-server`: serve, build a tiny checkpoint, or run the aligner sidecar."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from asr_server.config import (
    ConfigError,
    add_log_level_argument,
    add_serve_arguments,
    add_sidecar_arguments,
    config_from_args,
    sidecar_config_from_args,
    version_text,
)
from asr_server.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr-server", description="Qwen3-ASR gRPC inference server")
    parser.add_argument("--version", action="version", version=version_text())
    add_log_level_argument(parser, os.environ)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the gRPC API")
    add_serve_arguments(serve)

    tiny = commands.add_parser(
        "build-tiny-checkpoint", help="write tiny random-weight checkpoints (ASR and aligner, both layouts)"
    )
    tiny.add_argument("--out", type=Path, required=True, help="directory to write tiny-asr-hf, ... into")
    tiny.add_argument("--seed", type=int, default=0)

    aligner = commands.add_parser(
        "aligner", help="run the forced-aligner sidecar (word timestamps) on a unix socket or a TCP port"
    )
    add_sidecar_arguments(aligner)

    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.command == "build-tiny-checkpoint":
        from asr_server.models.tiny_checkpoint import build_all

        paths = build_all(args.out, seed=args.seed)
        print(f"tiny random-weight checkpoints (gibberish transcripts) written: {paths}")
        return 0
    if args.command == "aligner":
        from asr_server.aligner.sidecar import serve_sidecar

        try:
            sidecar_config = sidecar_config_from_args(args, os.environ)
        except ConfigError as exc:
            aligner.error(str(exc))
        asyncio.run(serve_sidecar(sidecar_config))
        return 0
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    from asr_server.edge.server import serve as run_server

    asyncio.run(run_server(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
