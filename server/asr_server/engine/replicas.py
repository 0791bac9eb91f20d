"""Several engine replicas (one per device) behind the one-runner interface the transcriber uses.

Each replica is a full EngineRunner with its own thread, model copy and KV cache (or an EngineProcess: the same in
a process of its own). A request goes to the replica
with the least audio in flight (seconds, not requests: one 120 s request weighs as much as 24 short ones), ties to
the lower index. A replica that is not ready is skipped; the call fails only when none is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from asr_server.engine.types import DecodeRequest, DecodeResult
from asr_server.errors import Unavailable
from asr_server.worker import State


class Replica(Protocol):
    """What the balancer needs of one replica: EngineRunner (in-process) and EngineProcess both are one."""

    @property
    def state(self) -> State: ...

    @property
    def model_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    def add_listener(self, listener: Callable[[bool], None]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def decode(self, request: DecodeRequest) -> DecodeResult: ...


class ReplicatedRunner:
    def __init__(self, runners: Sequence[Replica]) -> None:
        if not runners:
            raise ValueError("ReplicatedRunner needs at least one runner")
        self._runners = list(runners)
        self._load_s = [0.0] * len(runners)

    @property
    def runners(self) -> list[Replica]:
        return list(self._runners)

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` runs when the set of replicas turns from serving (any ready) to not serving or back."""
        serving = [self.state == "ready"]

        def changed(_ready: bool) -> None:
            now = self.state == "ready"
            if now != serving[0]:
                serving[0] = now
                listener(now)

        for runner in self._runners:
            runner.add_listener(changed)

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
