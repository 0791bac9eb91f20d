"""`asr-server`: serve, build a tiny checkpoint, or run the aligner sidecar."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from asr_server.aligner.supervisor import EXIT_ALIGNER_MODEL
from asr_server.config import (
    ConfigError,
    add_log_level_argument,
    add_serve_arguments,
    add_sidecar_arguments,
    config_from_args,
    sidecar_config_from_args,
    version_text,
)
from asr_server.errors import AsrError
from asr_server.logs import setup_logging

logger = logging.getLogger(__name__)


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

    ray_command = commands.add_parser(
        "ray", help="scale out on Ray Serve (the optional extra .[ray]; docs/scale-out.md)"
    ).add_subparsers(dest="ray_command", required=True)
    ray_serve = ray_command.add_parser(
        "serve", help="serve the gRPC API through Ray Serve's gRPC proxy, one engine per replica"
    )
    ray_serve.add_argument(
        "--config", type=Path, required=True, help="the Ray Serve file, e.g. deploy/ray/serve.yaml"
    )

    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.command == "ray":
        return _ray_serve(args.config, ray_serve)
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
        try:
            asyncio.run(serve_sidecar(sidecar_config))
        except RuntimeError as exc:
            cause = exc.__cause__
            if not isinstance(cause, AsrError):
                raise  # a crash: the supervisor restarts the sidecar
            # A model that cannot load (bad path, not an aligner checkpoint) stays so: one line, and an exit code
            # that tells a supervising server not to restart it (aligner/supervisor.py).
            logger.debug("the aligner could not start", exc_info=exc)
            reason = f"cannot load --model {sidecar_config.model!r}: {cause}"
            print(f"asr-server aligner: error: {reason}", file=sys.stderr, flush=True)
            if sidecar_config.failure_file:
                Path(sidecar_config.failure_file).write_text(reason + "\n")
            return EXIT_ALIGNER_MODEL
        return 0
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    from asr_server.edge.server import StartupError
    from asr_server.edge.server import serve as run_server

    try:
        if config.server.front_processes > 1:
            from asr_server.edge.fronts import serve_fronts

            asyncio.run(serve_fronts(config, log_format=args.log_format))
        else:
            asyncio.run(run_server(config))
    except StartupError as exc:
        # The operator's to fix, said in one line; the traceback only for --log-level debug.
        logger.debug("start-up failed", exc_info=exc)
        print(f"asr-server: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


def _ray_serve(path: Path, parser: argparse.ArgumentParser) -> int:
    try:
        import ray  # noqa: F401 - only to say that the extra is missing, before anything else
    except ImportError:
        parser.error("Ray is not installed: pip install 'qwen-asr-server[ray]' (or `pip install .[ray]`)")
    from asr_server.edge.ray_serve import read_serve_file, serve_from_file

    try:
        serve_file = read_serve_file(path, os.environ)
    except (OSError, ValueError, ConfigError) as exc:
        parser.error(f"--config {path}: {exc}")
    serve_from_file(serve_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
