"""Test helpers shared across layers: in-process servers, audio makers."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from asr_server.config import Config, EngineConfig, ServerConfig
from asr_server.edge.server import AsrServer
from asr_server.engine.core import EngineCore
from asr_server.transcription import AlignBackend

SAMPLE_RATE_HZ = 16_000


def tone(duration_s: float, *, freq_hz: float = 440.0, amplitude: float = 0.3, rate_hz: int = SAMPLE_RATE_HZ,
         seed: int | None = None) -> np.ndarray:
    t = np.arange(int(duration_s * rate_hz)) / rate_hz
    signal = amplitude * np.sin(2 * np.pi * freq_hz * t)
    if seed is not None:
        # Varying loudness gives the fake engine different words per half second.
        rng = np.random.default_rng(seed)
        envelope = np.repeat(rng.uniform(0.2, 1.0, size=int(np.ceil(duration_s * 2))), rate_hz // 2)[: t.size]
        signal = signal * envelope
    return signal.astype(np.float32)


def wav_bytes(samples: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ, channels: int = 1) -> bytes:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def fake_config(**engine: Any) -> Config:
    defaults: dict[str, Any] = {"kind": "fake", "max_batch_wait_ms": 20.0, "warmup": False}
    defaults.update(engine)
    return Config(server=ServerConfig(host="127.0.0.1", port=0, grace_period_s=5.0), engine=EngineConfig(**defaults))


@contextlib.asynccontextmanager
async def running_server(
    config: Config,
    *,
    core_factory: Callable[[], EngineCore] | None = None,
    aligner: AlignBackend | None = None,
) -> AsyncIterator[tuple[AsrServer, grpc.aio.Channel]]:
    server = AsrServer(config, core_factory=core_factory, aligner=aligner)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace_s=0.0)  # a failed start still holds the port and the engine thread
        raise
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 256 * 1024 * 1024)]
    )
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)


def with_limits(config: Config, **limits: Any) -> Config:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))


def with_server(config: Config, **server: Any) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **server))
