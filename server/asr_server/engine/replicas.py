"""Several engine replicas (one per device) behind the one-runner interface the transcriber uses.

Each replica is a full EngineRunner with its own thread, model copy and KV cache. A request goes to the replica
with the least audio in flight (seconds, not requests: one 120 s request weighs as much as 24 short ones), ties to
the lower index. A replica that is not ready is skipped; the call fails only when none is.
"""

from __future__ import annotations

import asyncio

from asr_server.engine.runner import EngineRunner
from asr_server.engine.types import DecodeRequest, DecodeResult
from asr_server.errors import Unavailable
from asr_server.worker import State


class ReplicatedRunner:
    def __init__(self, runners: list[EngineRunner]) -> None:
        if not runners:
            raise ValueError("ReplicatedRunner needs at least one runner")
        self._runners = runners
        self._load_s = [0.0] * len(runners)

    @property
    def runners(self) -> list[EngineRunner]:
        return list(self._runners)

    @property
    def state(self) -> State:
        states = [r.state for r in self._runners]
        if "ready" in states:
            return "ready"
        return states[0]

    @property
    def model_id(self) -> str:
        return next((r.model_id for r in self._runners if r.model_id), "")

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._runners)

    async def start(self) -> None:
        # Loaded one after another: loading is host-memory and disk bound, so in parallel it is no faster.
        for runner in self._runners:
            await runner.start()

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self._runners))

    def pick(self) -> int:
        ready = [i for i, r in enumerate(self._runners) if r.state == "ready"]
        if not ready:
            raise Unavailable("no engine replica is ready; retry later")
        return min(ready, key=lambda i: (self._load_s[i], i))

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        index = self.pick()
        weight = max(request.audio_s, 0.1)
        self._load_s[index] += weight
        try:
            return await self._runners[index].decode(request)
        finally:
            self._load_s[index] -= weight
