"""The front's bookkeeping of what it asked an engine process, shared by EngineProcess (client.py, the supervisor's
own channel) and EngineLink (link.py, a front on a shared engine): the futures of requests and stats queries in
flight, resolved by the engine's answers, or failed together when the engine is lost or stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable

from asr_server.engine.process import messages as m
from asr_server.engine.types import DecodeRequest, DecodeResult
from asr_server.errors import Unavailable

Frames = list[bytes | memoryview]


class Replies:
    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[DecodeResult]] = {}
        self._stats_waiters: dict[int, asyncio.Future[m.Stats]] = {}
        self._query_ids = itertools.count(1)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def decode(
        self, request: DecodeRequest, send_frames: Callable[[Frames], None], abort: Callable[[str], None]
    ) -> DecodeResult:
        """Sends `request` and awaits its answer; a cancelled caller's request is aborted (`abort(request_id)`,
        unless the engine already answered or was lost)."""
        request_id = request.request_id
        future: asyncio.Future[DecodeResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._in_flight += 1
        enqueued_ns = time.time_ns()
        try:
            send_frames(m.submit_frames(request))
            result = await future
        except asyncio.CancelledError:
            if self._pending.get(request_id) is future:
                abort(request_id)
            raise
        finally:
            self._in_flight -= 1
            if self._pending.get(request_id) is future:
                del self._pending[request_id]
        # The queue wait a caller's span shows includes the hop to the engine process.
        return dataclasses.replace(result, enqueued_ns=min(enqueued_ns, result.enqueued_ns))

    async def stats(self, send: Callable[[m.ToEngine], None], timeout_s: float) -> m.Stats:
        query_id = next(self._query_ids)
        future: asyncio.Future[m.Stats] = asyncio.get_running_loop().create_future()
        self._stats_waiters[query_id] = future
        try:
            send(m.StatsQuery(query_id))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._stats_waiters.pop(query_id, None)

    def resolve(self, message: m.FromEngine) -> bool:
        """Settles what `message` answers (a Result, Failure or Stats); False for any other message."""
        if isinstance(message, m.Result | m.Failure):
            result_future = self._pending.pop(message.request_id, None)
            if result_future is not None and not result_future.done():
                if isinstance(message, m.Result):
                    result_future.set_result(m.result_from_message(message))
                else:
                    result_future.set_exception(m.error_from_failure(message))
            return True
        if isinstance(message, m.Stats):
            stats_future = self._stats_waiters.pop(message.query_id, None)
            if stats_future is not None and not stats_future.done():
                stats_future.set_result(message)
            return True
        return False

    def fail_all(self, error: Unavailable, stats_error: Unavailable) -> None:
        """Fails every request with `error` and every stats query with `stats_error`."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        waiters, self._stats_waiters = self._stats_waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(stats_error)
