"""Python client for the Qwen3-ASR gRPC server, shaped like the `qwen_asr` library.

    from asr_client import AsrClient

    with AsrClient("localhost:50051") as client:
        results = client.transcribe("speech.wav", language="English", return_time_stamps=True)
        print(results[0].language, results[0].text)
        for word in results[0].time_stamps or []:
            print(word.text, word.start_time, word.end_time)

Over TLS: `AsrClient("asr.internal:443", tls_credentials(ca_file="ca.pem"))` (with `cert_file=`, `key_file=` for mTLS).
"""

from asr_client.aio import AsyncAsrClient
from asr_client.audio import AudioLike, RawAudio
from asr_client.client import DEFAULT_TARGET, AsrClient
from asr_client.errors import (
    AsrError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from asr_client.results import ASRTranscription, ForcedAlignItem, ForcedAlignResult, Segment, StreamingResult
from asr_client.tls import tls_credentials

__all__ = [
    "DEFAULT_TARGET",
    "ASRTranscription",
    "AsrClient",
    "AsrError",
    "AsyncAsrClient",
    "AudioLike",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "ForcedAlignItem",
    "ForcedAlignResult",
    "InvalidArgumentError",
    "OutOfRangeError",
    "RawAudio",
    "ResourceExhaustedError",
    "Segment",
    "StreamingResult",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "tls_credentials",
]
