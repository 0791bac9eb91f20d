"""The one path every AsrService call takes at the edge: its span, its request parsing, its errors as statuses.

`RpcInterceptor` wraps each AsrService method, so the servicer's methods only do their work and raise domain
errors (asr_server.errors):

- a request (or a streamed message) that is not a valid protobuf of its type, e.g. a string field holding invalid
  UTF-8, is answered INVALID_ARGUMENT; gRPC itself would answer UNKNOWN and log a traceback;
- every `AsrError` is answered with its code from `_CODES`, with `google.rpc.RetryInfo` in the status details when
  retrying can succeed (`AsrError.retry_after_s`), and is not logged: it is the caller's problem, not ours;
- anything else is a bug: INTERNAL, logged with its traceback.

`ObservingInterceptor`, the outermost interceptor, sees every AsrService call's final status (refusals by the auth
interceptor included) and hands one `RpcOutcome` per call to its observers: the Prometheus metrics and the access
log. Code below the edge adds to the call's record only through `note_audio_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.trace import Span, StatusCode

from asr_server.errors import AsrError, FailedPrecondition, InvalidInput, LimitExceeded, Unavailable, excerpt
from asr_server.metrics import RpcOutcome
from asr_server.streaming.session import IdleTimeout
from asr_server.tracing import rpc_span
from qwenasr.v1 import asr_pb2

logger = logging.getLogger(__name__)

SERVICE = asr_pb2.DESCRIPTOR.services_by_name["AsrService"]
# The status message travels in an HTTP/2 trailer (twice with details): keep it well inside clients' 8 KB cap
# whatever a raise site wrote.
_MAX_MESSAGE_CHARS = 2000

_CODES: tuple[tuple[type[AsrError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    # A live stream idle past --stream-idle-timeout-s: the contract's OUT_OF_RANGE (asr.proto), as Google's speech
    # APIs answer audio timeouts; DEADLINE_EXCEEDED is the caller's own deadline.
    (IdleTimeout, grpc.StatusCode.OUT_OF_RANGE),
)


def status_for(exc: AsrError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def grpc_status(code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None) -> grpc.Status:
    """The status to end a call with; with `retry_after_s`, a RetryInfo in its details says when to retry."""
    if len(message) > _MAX_MESSAGE_CHARS:
        message = f"{message[:_MAX_MESSAGE_CHARS]}... (cut at {_MAX_MESSAGE_CHARS} characters)"
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after_s is not None:
        delay = Duration()
        delay.FromNanoseconds(round(retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    result: grpc.Status = rpc_status.to_status(status)
    pushback = _retry_pushback_ms(code, retry_after_s)
    if pushback is None:
        return result
    return _Status(result.code, result.details, (*result.trailing_metadata, ("grpc-retry-pushback-ms", pushback)))


def _retry_pushback_ms(code: grpc.StatusCode, retry_after_s: float | None) -> str | None:
    """The same advice for gRPC's built-in retries (gRFC A6), which read the `grpc-retry-pushback-ms` trailer, not
    RetryInfo: the delay when retrying helps, -1 ("do not retry") for a RESOURCE_EXHAUSTED that retrying cannot cure
    (audio over a limit), so clients whose retry policy lists RESOURCE_EXHAUSTED for full queues stop at once."""
    if retry_after_s is not None:
        return str(max(0, round(retry_after_s * 1000)))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "-1"
    return None


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class RpcObserver(Protocol):
    """Told about every AsrService call: when it starts and, with its outcome, when it ends."""

    def rpc_started(self, service: str, method: str, rpc_type: str) -> None: ...

    def rpc_finished(self, outcome: RpcOutcome) -> None: ...


@dataclass
class _CallRecord:
    """What one call has done so far; mutable, filled while the call runs (not a domain value)."""

    method: str
    rpc_type: str
    peer: str
    request_id: str
    started_s: float = field(default_factory=time.perf_counter)
    request_bytes: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    audio_ms: float = 0.0
    code: grpc.StatusCode | None = None
    message: str = ""
    refused: str = ""


# The record of the call the current task serves (each gRPC call runs in its own task; tasks it starts inherit it).
_CURRENT_CALL: ContextVar[_CallRecord | None] = ContextVar("asr_current_call", default=None)
# A caller's own id for the call; else one is made up. One id per call, made once (`_request_id`, for the access
# log's record when observed), then echoed in the responses, the response header and the span.
REQUEST_ID_METADATA = "x-request-id"
REQUEST_ID_SPAN_ATTRIBUTE = "asr.request_id"
_MAX_REQUEST_ID_CHARS = 128
# The id of the call the current task serves ("" outside a call), set on the one path (`guarded`).
_REQUEST_ID: ContextVar[str] = ContextVar("asr_request_id", default="")


def note_audio_ms(audio_ms: float) -> None:
    """Adds audio processed by the current call (access log audio_ms, asr_audio_seconds_total)."""
    record = _CURRENT_CALL.get()
    if record is not None:
        record.audio_ms += audio_ms


def _rpc_type(handler: Any) -> str:
    kinds = {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }
    return kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]


def current_request_id() -> str:
    """The current call's id (for its responses); "" outside an AsrService call."""
    return _REQUEST_ID.get()


def _caller_request_id(metadata: Any) -> str | bytes | None:
    """What the caller sent as `x-request-id`, unchecked; None when nothing."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA:
            return value  # type: ignore[no-any-return]
    return None


def _valid_request_id(value: str | bytes | None) -> bool:
    return (
        isinstance(value, str) and 0 < len(value) <= _MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()
    )


def _request_id(metadata: Any) -> str:
    """The call's id: the caller's when valid, else a new one (an invalid one fails the call in `guarded`)."""
    given = _caller_request_id(metadata)
    if isinstance(given, str) and _valid_request_id(given):
        return given
    return uuid.uuid4().hex[:16]


async def _start_request_id(context: grpc.aio.ServicerContext[Any, Any], span: Span, *, send_header: bool) -> None:
    """Makes the call's id current, puts it on the span and (with `send_header`) in the response header, then
    refuses an invalid one the caller sent (after: the refusal's span and header carry the id the access log has).

    Unary-response calls send the header only with their response (`_send_request_id_header`), and a failure's
    trailers carry the id instead (`_abort`): a call that has received headers is committed, and gRPC's own retries
    (the clients' retryPolicy) could then never retry a full queue or an aligner restart."""
    metadata = context.invocation_metadata()
    record = _CURRENT_CALL.get()
    request_id = record.request_id if record is not None else _request_id(metadata)
    _REQUEST_ID.set(request_id)
    span.set_attribute(REQUEST_ID_SPAN_ATTRIBUTE, request_id)
    if send_header:
        await _send_request_id_header(context)
    given = _caller_request_id(metadata)
    if given is not None and not _valid_request_id(given):
        shown = excerpt(given.decode("utf-8", "replace") if isinstance(given, bytes) else given)
        raise InvalidInput(
            f"metadata {REQUEST_ID_METADATA} {shown} is not a valid request id; accepted: 1 to "
            f"{_MAX_REQUEST_ID_CHARS} printable ASCII characters, or no {REQUEST_ID_METADATA} for a generated one"
        )


async def _send_request_id_header(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.send_initial_metadata(((REQUEST_ID_METADATA, _REQUEST_ID.get()),))


def _refusal_reason(exc: AsrError) -> str:
    if isinstance(exc, LimitExceeded):
        return "capacity" if exc.retryable else "limit"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return ""


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Outermost: one `RpcOutcome` per AsrService call to each observer, whatever ended the call."""

    def __init__(self, observers: Sequence[RpcObserver]) -> None:
        self._prefix = f"/{SERVICE.full_name}/"
        self._observers = tuple(observers)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not self._observers or not method.startswith(self._prefix):
            return handler
        metadata = handler_call_details.invocation_metadata
        return _observed(handler, method[len(self._prefix) :], metadata, self._observers)


def _observed(handler: Any, method: str, metadata: Any, observers: tuple[RpcObserver, ...]) -> Any:
    record = _CallRecord(method=method, rpc_type=_rpc_type(handler), peer="", request_id=_request_id(metadata))

    def started(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        record.peer = context.peer()
        _CURRENT_CALL.set(record)
        for observer in observers:
            observer.rpc_started(SERVICE.full_name, method, record.rpc_type)

    def finished(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> None:
        code = record.code
        if code is None:
            if failure is None:
                code = grpc.StatusCode.OK
            elif isinstance(failure, grpc.aio.AbortError):
                code = context.code() or grpc.StatusCode.UNKNOWN  # aborted elsewhere (the auth interceptor)
                record.message = record.message or str(context.details() or "")
            elif isinstance(failure, (asyncio.CancelledError, GeneratorExit)):
                code = grpc.StatusCode.CANCELLED  # the client went away, or the grace ran out
            else:
                code = grpc.StatusCode.UNKNOWN
        outcome = RpcOutcome(
            service=SERVICE.full_name,
            method=method,
            rpc_type=record.rpc_type,
            code=code.name,
            duration_s=time.perf_counter() - record.started_s,
            audio_s=record.audio_ms / 1000,
            messages_received=record.messages_received,
            messages_sent=record.messages_sent,
            request_bytes=record.request_bytes,
            peer=record.peer,
            request_id=record.request_id,
            message=record.message,
            refused=record.refused,
        )
        for observer in observers:
            observer.rpc_finished(outcome)

    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def stream_behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started(context)
            failure: BaseException | None = None
            try:
                async with aclosing(inner_stream(request, context)) as responses:
                    async for response in responses:
                        record.messages_sent += 1
                        yield response
            except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
                failure = exc
                raise
            finally:
                finished(context, failure)

        behaviour: Any = stream_behaviour
    else:
        inner_unary = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started(context)
            failure: BaseException | None = None
            try:
                response = await inner_unary(request, context)
                record.messages_sent += 1
                return response
            except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
                failure = exc
                raise
            finally:
                finished(context, failure)

        behaviour = unary_behaviour
    deserialize = handler.request_deserializer

    def counting(data: bytes) -> Any:
        record.messages_received += 1
        record.request_bytes += len(data)
        return deserialize(data)

    return with_behaviour(handler, behaviour, request_deserializer=counting if deserialize is not None else None)


@dataclass(frozen=True)
class Unparsable:
    """What the request deserializer returns in place of a message it could not parse."""

    message_type: str
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(
            f"the request could not be parsed as {self.message_type} ({excerpt(self.reason)}); accepted: a "
            f"{self.message_type} in protobuf binary encoding, with valid UTF-8 in every string field"
        )


def tolerant(deserialize: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """`deserialize`, returning an `Unparsable` instead of raising for bytes that are no such message."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            # upb says "Error parsing message with type 'X': <what>"; the type is named by us already.
            return Unparsable(message_type, str(exc).rpartition(": ")[2] or type(exc).__name__)

    return parse


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Puts every AsrService method on the one path (see the module doc); other services pass untouched."""

    def __init__(self, *, refusal: Callable[[], AsrError | None] | None = None) -> None:
        self._prefix = f"/{SERVICE.full_name}/"
        # Asked before each call: an error to refuse it with (shutting down), or None to run it.
        self._refusal = refusal or _admit_all

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._prefix):
            return handler
        name = method[len(self._prefix) :]
        described = SERVICE.methods_by_name.get(name)
        if described is None:
            return handler
        return guarded(handler, name, described.input_type.full_name, refusal=self._refusal)


def _admit_all() -> AsrError | None:
    return None


def guarded(
    handler: Any, method: str, message_type: str, *, refusal: Callable[[], AsrError | None] = _admit_all
) -> Any:
    """`handler` with a tolerant request deserializer, inside the method's span and error path."""
    streaming_in: bool = handler.request_streaming
    if handler.response_streaming:
        inner_stream = handler.stream_stream if streaming_in else handler.unary_stream

        async def stream_behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with rpc_span(method, context.invocation_metadata()) as span:
                try:
                    await _start_request_id(context, span, send_header=True)
                    _admit(refusal)
                    async with aclosing(inner_stream(_parsed(request, streaming_in), context)) as responses:
                        async for response in responses:
                            yield response
                except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure ends the call with a status
                    await _fail(context, span, method, exc)

        behaviour: Any = stream_behaviour
    else:
        inner_unary = handler.stream_unary if streaming_in else handler.unary_unary

        async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with rpc_span(method, context.invocation_metadata()) as span:
                try:
                    await _start_request_id(context, span, send_header=False)
                    _admit(refusal)
                    response = await inner_unary(_parsed(request, streaming_in), context)
                    await _send_request_id_header(context)
                    return response
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure ends the call with a status
                    await _fail(context, span, method, exc)

        behaviour = unary_behaviour
    deserialize = handler.request_deserializer
    return with_behaviour(
        handler, behaviour, request_deserializer=None if deserialize is None else tolerant(deserialize, message_type)
    )


def _admit(refusal: Callable[[], AsrError | None]) -> None:
    refused = refusal()
    if refused is not None:
        raise refused


def with_behaviour(handler: Any, behaviour: Any, *, request_deserializer: Any = None) -> Any:
    """The same method handler (kind, serializers) running `behaviour` instead; optionally another deserializer."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _parsed(request: Any, streaming: bool) -> Any:
    if streaming:
        return _checked_messages(request)
    if isinstance(request, Unparsable):
        raise request.error()
    return request


async def _checked_messages(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    # A streamed message is parsed as it arrives: the ones before a bad one have been handled already.
    async for message in messages:
        if isinstance(message, Unparsable):
            raise message.error()
        yield message


async def _fail(context: grpc.aio.ServicerContext[Any, Any], span: Span, method: str, exc: Exception) -> NoReturn:
    cause = _innermost(exc)
    if isinstance(cause, AsrError):
        status = grpc_status(status_for(cause), str(cause), retry_after_s=cause.retry_after_s)
        await _abort(context, span, status, refused=_refusal_reason(cause))
    logger.error("%s failed", method, exc_info=exc)
    message = f"internal error: {type(cause).__name__}: {cause}"
    await _abort(context, span, grpc_status(grpc.StatusCode.INTERNAL, message))


def _innermost(exc: BaseException) -> BaseException:
    # A TaskGroup wraps the first failure of a request's chunks; report that one. TaskGroups nest (channels, then
    # chunks), so look through to the innermost failure.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], span: Span, status: grpc.Status, *, refused: str = ""
) -> NoReturn:
    record = _CURRENT_CALL.get()
    if record is not None:
        record.code, record.message, record.refused = status.code, status.details, refused
    span.set_attribute("rpc.grpc.status_code", status.code.value[0])
    span.set_status(StatusCode.ERROR, status.code.name)
    trailing = tuple(status.trailing_metadata)
    request_id = _REQUEST_ID.get()
    if request_id:  # a failed unary call sent no header: its id travels in the trailers (see _start_request_id)
        trailing += ((REQUEST_ID_METADATA, request_id),)
    # What context.abort_with_status does; grpc.aio's stubs lack it.
    await context.abort(status.code, status.details, trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
