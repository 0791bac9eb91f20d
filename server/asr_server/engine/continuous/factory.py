"""Building engine cores and runners from the config: one continuous core per device, or the generate core."""

from __future__ import annotations

import logging
from collections.abc import Callable

from asr_server.config import Config
from asr_server.engine.core import EngineCore

logger = logging.getLogger(__name__)


def replica_devices(config: Config) -> list[str]:
    """The devices to run one replica on: --devices when given, else the single --device."""
    devices = [d.strip() for d in config.engine.devices.split(",") if d.strip()]
    return devices or [config.model.device]


def make_core_factory(config: Config, device: str) -> Callable[[], EngineCore]:
    """A factory (run on the engine thread) for the core of one replica on `device` ("auto" resolved here)."""

    def load() -> EngineCore:
        from asr_server.edge.server import resolve_device
        from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
        from asr_server.engine.generate_core import GenerateEngine
        from asr_server.models.loading import load_asr_model

        engine = config.engine
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
            core = ContinuousEngine(
                loaded,
                ContinuousConfig(
                    max_running=engine.max_running_requests,
                    kv_cache_tokens=engine.kv_cache_tokens or None,
                    kv_cache_memory_fraction=engine.kv_cache_memory_fraction,
                    max_context_tokens=engine.max_context_tokens,
                    max_prefill_tokens=engine.max_prefill_tokens,
                    encoder_batch_audio_s=engine.encoder_batch_audio_s,
                    cuda_graphs=engine.cuda_graphs,
                    kv_cache_dtype=engine.kv_cache_dtype,
                ),
            )
        else:
            if engine.kind == "continuous":
                # A model split over devices by device_map: the paged decoder wants every layer on one device.
                logger.warning("--device-map given: using the generate engine (padded batches) for this model")
            core = GenerateEngine(loaded, max_batch_size=engine.max_inference_batch_size)
        if engine.bench_forced_tokens_per_audio_s > 0:
            from asr_server.engine.continuous.bench_mode import ForcedTokensCore

            logger.warning(
                "BENCHMARK MODE: every request generates %.1f tokens per audio second, ignoring EOS",
                engine.bench_forced_tokens_per_audio_s,
            )
            core = ForcedTokensCore(core, engine.bench_forced_tokens_per_audio_s)
        return core

    return load
