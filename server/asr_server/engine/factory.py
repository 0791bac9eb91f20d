"""Building the engine from the config: one runner per replica device, each with the core its --engine names.

The one place that turns `config.engine` and `config.model` into engine objects; the edge only calls
`build_engine`. Cores are built by the factory on their runner's thread, so the thread that owns a device also
loads the model onto it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asr_server.config import Config
from asr_server.engine.core import EngineCore
from asr_server.engine.replicas import ReplicatedRunner
from asr_server.engine.runner import BatchingPolicy, EngineRunner

logger = logging.getLogger(__name__)

# What the transcriber decodes through: one runner, or several behind the least-loaded balancer.
Engine = EngineRunner | ReplicatedRunner


def build_engine(config: Config, *, core_factory: Callable[[], EngineCore] | None = None) -> Engine:
    """One EngineRunner per device of `config.replica_devices` (a ReplicatedRunner over them when several).

    `core_factory` replaces the configured core (tests and tools pass their own); it gives one replica.
    """
    engine = config.engine
    policy = BatchingPolicy(engine.max_inference_batch_size, engine.max_batch_wait_ms, engine.max_queued_requests)
    if core_factory is not None:
        return EngineRunner(core_factory, policy, warmup=engine.warmup)
    devices = config.replica_devices
    if engine.kind == "fake" or len(devices) == 1:
        return EngineRunner(make_core_factory(config, devices[0]), policy, warmup=engine.warmup)
    return ReplicatedRunner(
        [
            EngineRunner(make_core_factory(config, device), policy, name=f"engine-{device}", warmup=engine.warmup)
            for device in devices
        ]
    )


def make_core_factory(config: Config, device: str) -> Callable[[], EngineCore]:
    """A factory (run on the engine thread) for the core of one replica on `device` ("auto" resolved there)."""
    engine = config.engine
    if engine.kind == "fake":
        from asr_server.engine.fake import FakeEngine

        return lambda: FakeEngine(
            max_batch_size=engine.max_inference_batch_size, batch_delay_ms=engine.fake_batch_delay_ms
        )

    def load() -> EngineCore:
        from asr_server.models.devices import resolve_device
        from asr_server.models.loading import load_asr_model

        model = config.model
        loaded = load_asr_model(
            model.model,
            dtype=model.dtype,
            device=resolve_device(device),
            device_map=model.device_map,
            attn_implementation=model.attn_implementation,
        )
        core: EngineCore
        if engine.kind == "continuous" and model.device_map is None:
            from asr_server.engine.continuous.core import ContinuousEngine

            core = ContinuousEngine(loaded, engine.continuous)
        else:
            from asr_server.engine.generate_core import GenerateEngine

            if engine.kind == "continuous":
                # A model split over devices by device_map: the paged decoder wants every layer on one device.
                logger.warning("--device-map given: using the generate engine (padded batches) for this model")
            core = GenerateEngine(loaded, max_batch_size=engine.max_inference_batch_size)
        if engine.bench_forced_tokens_per_audio_s > 0:
            from asr_server.engine.bench_mode import ForcedTokensCore

            logger.warning(
                "BENCHMARK MODE: every request generates %.1f tokens per audio second, ignoring EOS",
                engine.bench_forced_tokens_per_audio_s,
            )
            core = ForcedTokensCore(core, engine.bench_forced_tokens_per_audio_s)
        return core

    return load
