"""The engine's inner interface: a synchronous core that only the engine thread ever calls.

Like vLLM's EngineCore, a core is driven by `step()`. A step of the batching `generate` core decodes one
whole batch; a continuous-batching core would advance every running request by one token. The runner
(runner.py) owns the thread, the inbox and the output fan-out, so every core gets dynamic batching,
cancellation and back-pressure the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from asr_server.engine.types import DecodeResult, WorkItem


@dataclass(frozen=True)
class EngineOutput:
    request_id: str
    result: DecodeResult | None = None
    error: Exception | None = None


class EngineCore(Protocol):
    # Shown in server info and trace attributes.
    model_id: str

    def warmup(self) -> None:
        """Runs a representative batch so the first caller does not pay for lazy initialisation."""

    def add(self, item: WorkItem) -> None: ...

    def abort(self, request_id: str) -> None:
        """Drops a request; a request in a batch that is already running is discarded when it ends."""

    def num_waiting(self) -> int: ...

    def num_running(self) -> int: ...

    def oldest_waiting_monotonic_s(self) -> float | None: ...

    def step(self) -> list[EngineOutput]:
        """Does one unit of work; returns the requests it finished (or failed). Never raises for one
        request's fault: that request gets an error output and the others go on."""
        ...

    def close(self) -> None: ...
