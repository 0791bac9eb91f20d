"""The core of one replica, built from the config: what an engine thread (in this process or in an engine
process) loads onto its device.

Apart from factory.py so that the engine process (engine/process/child.py) can build its core without importing
the front's side of the factory, which imports the engine-process client: no import circle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asr_server.config import Config, EngineConfig
from asr_server.engine.core import EngineCore
from asr_server.engine.runner import BatchingPolicy

logger = logging.getLogger(__name__)


def batching_policy(engine: EngineConfig) -> BatchingPolicy:
    return BatchingPolicy(engine.max_inference_batch_size, engine.max_batch_wait_ms, engine.max_queued_requests)


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
            tokenizer = loaded.processor.tokenizer
            core = ForcedTokensCore(
                core,
                engine.bench_forced_tokens_per_audio_s,
                # As the prompt is built (continuous/prepare.py).
                lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            )
        return core

    return load
