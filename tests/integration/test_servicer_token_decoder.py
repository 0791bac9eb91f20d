"""Streams opened while the interim-prefix tokenizer loads wait for it (they used to get none)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from asr_server.config import Config, EngineConfig
from asr_server.edge import servicer as servicer_module
from asr_server.edge.servicer import AsrServicer


async def test_streams_opened_during_the_tokenizer_load_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    decoder = object()
    gate = threading.Event()

    def slow_load(model: str) -> Any:
        loads.append(model)
        gate.wait(10)
        return decoder

    monkeypatch.setattr(servicer_module, "load_hf_token_decoder", slow_load)
    config = Config(engine=EngineConfig(kind="transformers"))
    servicer = AsrServicer(config, transcriber=None, model_id=lambda: "m", aligner_ready=lambda: False)  # type: ignore[arg-type]
    first = asyncio.create_task(servicer._get_token_decoder())
    await asyncio.sleep(0.05)
    second = asyncio.create_task(servicer._get_token_decoder())
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for the load instead of answering "no tokenizer"
    # A stream cancelled while it waits does not cancel the shared load.
    first.cancel()
    gate.set()
    started = time.monotonic()
    assert await asyncio.wait_for(second, 10) is decoder
    assert time.monotonic() - started < 5
    assert await servicer._get_token_decoder() is decoder
    assert loads == [config.model.model]


async def test_warm_up_loads_the_tokenizer_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loaded on a fresh server's first stream instead, that stream (and every one opened meanwhile) waited seconds
    # for it with its audio piling up: the finals of a fresh front's first streams came 6-8 s late.
    loads: list[str] = []
    decoder = object()

    def load(model: str) -> Any:
        loads.append(model)
        return decoder

    monkeypatch.setattr(servicer_module, "load_hf_token_decoder", load)
    config = Config(engine=EngineConfig(kind="transformers"))
    servicer = AsrServicer(config, transcriber=None, model_id=lambda: "m", aligner_ready=lambda: False)  # type: ignore[arg-type]
    servicer._vad.ready = _no_wait  # type: ignore[method-assign]
    await servicer.warm_up()
    assert loads == [config.model.model]
    assert servicer._token_decoder is not None and servicer._token_decoder.done()
    assert await servicer._get_token_decoder() is decoder
    assert loads == [config.model.model]


async def _no_wait() -> None:
    return None
