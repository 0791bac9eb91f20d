"""A small synchronous client over the generated stubs."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class AsrClient:
    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float | None = 60.0, auth_token: str = "") -> None:
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES + 1024 * 1024),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = pb_grpc.AsrServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []

    def __enter__(self) -> AsrClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def transcribe_bytes(
        self,
        audio: bytes,
        *,
        audio_format: pb.AudioFormat | None = None,
        language: str = "",
        context: str = "",
        return_word_timestamps: bool = False,
        max_new_tokens: int = 0,
    ) -> pb.TranscribeResponse:
        config = pb.RecognitionConfig(
            audio_format=audio_format or pb.AudioFormat(),
            language=language,
            context=context,
            return_word_timestamps=return_word_timestamps,
            max_new_tokens=max_new_tokens,
        )
        response: pb.TranscribeResponse = self._stub.Transcribe(
            pb.TranscribeRequest(config=config, audio=audio), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    def transcribe_file(self, path: str | Path, **options: object) -> pb.TranscribeResponse:
        return self.transcribe_bytes(Path(path).read_bytes(), **options)  # type: ignore[arg-type]

    def health(self, service: str = "") -> str:
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def server_info(self) -> pb.GetServerInfoResponse:
        response: pb.GetServerInfoResponse = self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response
