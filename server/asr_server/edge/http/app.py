"""The Starlette app of the HTTP front: routes, the multipart form, auth, and the one request path.

Every route runs inside `_Observed`: its span, its request id, its refusal while starting or draining, its errors
as OpenAI error bodies (errors.py), and one `HttpOutcome` to the metrics and the access log. The transcription
route reads the form (bounded), decodes the file and runs the same Transcriber as the gRPC Transcribe.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from asr_server.audio.budget import DecodedAudioBudget, held_for_call
from asr_server.audio.decode import decode_audio
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.config import Config
from asr_server.edge.http import responses
from asr_server.edge.http.errors import HttpError, NotFound, Unauthenticated, http_error, internal_error
from asr_server.edge.http.responses import RESPONSE_FORMATS, ResponseFormat
from asr_server.errors import AsrError, InvalidInput, LimitExceeded, Unavailable, excerpt
from asr_server.languages import resolve_language
from asr_server.metrics import HttpOutcome
from asr_server.results import ChannelMode, TranscriptionResult
from asr_server.tracing import http_span
from asr_server.transcription import TranscribeOptions, Transcriber

logger = logging.getLogger(__name__)

TRANSCRIPTIONS_ROUTE = "/v1/audio/transcriptions"
MODELS_ROUTE = "/v1/models"
HEALTH_ROUTE = "/health"
REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID_CHARS = 128
# Room for the form's other fields and the multipart boundaries beside max_message_bytes of audio.
_FORM_OVERHEAD_BYTES = 64 * 1024
_MAX_FIELD_BYTES = 32 * 1024  # one non-file field (a prompt is the longest)
_MAX_FIELDS = 32
# A body over the limit is still read (and dropped) up to this much, so the client, still sending, gets the 413
# instead of a reset connection; past it the connection is closed.
_DRAIN_BYTES = 64 * 1024 * 1024
_GRANULARITIES = ("word", "segment")

T = TypeVar("T")

ServingState = Literal["starting", "serving", "draining", "unavailable"]

_REFUSALS: dict[ServingState, str] = {
    "starting": "the server is starting (loading the model); retry shortly",
    "draining": "the server is shutting down; retry, on another replica",
    "unavailable": "the engine is restarting; retry shortly",
}


class HttpObserver(Protocol):
    def http_finished(self, outcome: HttpOutcome) -> None: ...


class InFlight(Protocol):
    """The server's count of calls in progress, which shutdown waits for (shared with the gRPC calls)."""

    def enter(self) -> None: ...

    def leave(self) -> None: ...


@dataclass(frozen=True)
class HttpContext:
    """What the HTTP front serves with: the server's config, pipeline, state and observers."""

    config: Config
    transcriber: Transcriber
    model_id: Callable[[], str]
    state: Callable[[], ServingState]
    in_flight: InFlight
    decoded_budget: DecodedAudioBudget | None
    observers: Sequence[HttpObserver]
    created_s: int  # the model's "created" in /v1/models: when the server started (Unix seconds)


class InvalidField(InvalidInput):
    """A form field is missing or wrong; `param` names it in OpenAI's error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TranscriptionForm:
    """A parsed POST /v1/audio/transcriptions (its file still to be decoded)."""

    audio: bytes
    options: TranscribeOptions
    response_format: ResponseFormat
    segments: bool
    words: bool
    stream: bool


# ---- the form ----


class _BodyTooLarge(LimitExceeded):
    pass


class _CountedBody:
    """The request body as the multipart parser reads it, refused once past `max_bytes`."""

    def __init__(self, receive: Receive, max_bytes: int) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self.received_bytes = 0
        self.finished = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while not self.finished:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body: bytes = message.get("body", b"")
            self.received_bytes += len(body)
            self.finished = not message.get("more_body", False)
            if self.received_bytes > self._max_bytes:
                raise _BodyTooLarge(
                    f"the request body is larger than this server takes ({self._max_bytes} bytes: --max-message-bytes "
                    f"of audio plus {_FORM_OVERHEAD_BYTES} bytes for the other fields); send a smaller or compressed "
                    "file (FLAC, Opus, MP3)"
                )
            if body:
                yield body

    async def drain(self) -> None:
        """Reads and drops the rest of the body (bounded), so that the client reads our answer."""
        while not self.finished and self.received_bytes <= self._max_bytes + _DRAIN_BYTES:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            self.received_bytes += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)


async def read_form(request: Request, max_bytes: int) -> tuple[FormData, int]:
    """The multipart form of `request` (at most one file, bounded fields), and the body's size in bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidInput(
            f"the request body must be multipart/form-data with a 'file' field, not {excerpt(content_type or 'none')}"
        )
    body = _CountedBody(request.receive, max_bytes)
    parser = MultiPartParser(
        request.headers, body.chunks(), max_files=1, max_fields=_MAX_FIELDS, max_part_size=_MAX_FIELD_BYTES
    )
    try:
        form = await parser.parse()
    except _BodyTooLarge:
        await body.drain()
        raise
    except MultiPartException as exc:
        await body.drain()
        raise InvalidInput(f"the multipart form could not be read: {exc.message}") from exc
    return form, body.received_bytes


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(name, f"'{name}' must be a plain form field, not a file")
    return value


def _granularities(form: FormData) -> tuple[str, ...]:
    # OpenAI's SDKs send the list as repeated "timestamp_granularities[]" fields; some clients drop the brackets.
    given = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
    for value in given:
        if not isinstance(value, str) or value not in _GRANULARITIES:
            shown = excerpt(value) if isinstance(value, str) else "a file"
            raise InvalidField(
                "timestamp_granularities", f"unknown timestamp granularity {shown}; accepted: word, segment"
            )
    return tuple(str(v) for v in given)


def _boolean(form: FormData, name: str) -> bool:
    value = (_field(form, name) or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidField(name, f"'{name}' must be true or false, not {excerpt(value)}")
    return value in ("true", "1")


def parse_transcription_form(form: FormData, audio: bytes | None, config: Config) -> TranscriptionForm:
    """Checks every field (the file read already: `audio`, None when there is no file field)."""
    if audio is None:
        raise InvalidField("file", "the multipart field 'file' is missing: send the audio file as 'file'")
    response_format = (_field(form, "response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise InvalidField(
            "response_format",
            f"unknown response_format {excerpt(response_format)}; accepted: {', '.join(RESPONSE_FORMATS)}",
        )
    granularities = _granularities(form)
    if granularities and response_format != "verbose_json":
        raise InvalidField(
            "timestamp_granularities", "timestamp_granularities need response_format=verbose_json, as in OpenAI's API"
        )
    temperature_text = (_field(form, "temperature") or "0").strip()
    try:
        temperature = float(temperature_text)
    except ValueError:
        temperature = -1.0
    if not 0.0 <= temperature <= 1.0:
        raise InvalidField("temperature", f"temperature must be a number from 0 to 1, not {excerpt(temperature_text)}")
    stream = _boolean(form, "stream")
    if stream and response_format not in ("json", "text"):
        raise InvalidField(
            "stream", "stream=true sends transcript.text events: use it with response_format json or text"
        )
    include = [v for v in form.getlist("include[]") if v]
    if include:
        raise InvalidField("include", "include[] (logprobs) is not supported by this server")
    try:
        language = resolve_language(_field(form, "language") or "")
    except InvalidInput as exc:
        raise InvalidField("language", str(exc)) from exc
    words = "word" in granularities
    return TranscriptionForm(
        audio=audio,
        options=TranscribeOptions(
            language=language,
            context=_field(form, "prompt") or "",
            max_new_tokens=config.engine.default_max_new_tokens,
            return_word_timestamps=words,
            channel_mode=ChannelMode.DOWNMIX,
        ),
        response_format=response_format,
        segments=response_format == "verbose_json" and ("segment" in granularities or not words),
        words=words,
        stream=stream,
    )


# ---- the routes ----


def _request_id(headers: Headers) -> str:
    given = headers.get(REQUEST_ID_HEADER, "")
    if 0 < len(given) <= _MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex[:16]


@dataclass
class _Call:
    """One request's record while it runs (mutable; not a domain value)."""

    request_id: str
    request_bytes: int = 0
    audio_s: float = 0.0


class _Observed:
    """The one path of every route (see the module doc)."""

    def __init__(self, ctx: HttpContext) -> None:
        self._ctx = ctx

    def route(
        self, method: str, path: str, handler: Callable[[Request, _Call], Awaitable[Response]], *, open_: bool = False
    ) -> Route:
        """`open_`: served without auth and while starting or draining (health)."""

        async def endpoint(request: Request) -> Response:
            return await self._run(request, method, path, handler, open_)

        return Route(path, endpoint, methods=[method])

    async def _run(
        self,
        request: Request,
        method: str,
        path: str,
        handler: Callable[[Request, _Call], Awaitable[Response]],
        open_: bool,
    ) -> Response:
        started = time.perf_counter()
        call = _Call(_request_id(request.headers))
        error: HttpError | None = None
        with http_span(method, path, request.headers) as span:
            span.set_attribute("asr.request_id", call.request_id)
            try:
                if open_:
                    response = await handler(request, call)
                else:
                    self._check_token(request.headers)
                    state = self._ctx.state()
                    if state != "serving":
                        raise Unavailable(_REFUSALS[state])
                    # Checked and counted with no await in between: a request admitted before the drain began is
                    # one the drain waits for.
                    self._ctx.in_flight.enter()
                    try:
                        response = await handler(request, call)
                    finally:
                        self._ctx.in_flight.leave()
            except ClientDisconnect:
                error = HttpError(499, "invalid_request_error", "client_closed", "the client went away")
                response = Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every failure is answered with an error body
                error = _as_http_error(exc, method, path)
                response = error_response(error)
            response.headers[REQUEST_ID_HEADER] = call.request_id
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(StatusCode.ERROR, str(response.status_code))
            self._finish(request, method, path, call, response.status_code, started, error)
        return response

    def _check_token(self, headers: Headers) -> None:
        token = self._ctx.config.server.auth_token
        if not token:
            return
        sent = headers.getlist("authorization")
        if len(sent) > 1:
            raise Unauthenticated(f"{len(sent)} Authorization headers: send exactly one")
        # Constant-time: a plain == leaks through its timing how much of a guess was right.
        if not sent or not hmac.compare_digest(sent[0].encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("missing or wrong bearer token: send the header 'Authorization: Bearer <token>'")

    def _finish(
        self,
        request: Request,
        method: str,
        path: str,
        call: _Call,
        status_code: int,
        started: float,
        error: HttpError | None,
    ) -> None:
        client = request.client
        outcome = HttpOutcome(
            method=method,
            route=path,
            status_code=status_code,
            duration_s=time.perf_counter() - started,
            audio_s=call.audio_s,
            request_bytes=call.request_bytes,
            peer=f"{client.host}:{client.port}" if client is not None else "",
            request_id=call.request_id,
            message=error.message if error is not None else "",
            refused=error.refused if error is not None else "",
        )
        for observer in self._ctx.observers:
            observer.http_finished(outcome)


def _as_http_error(exc: Exception, method: str, path: str) -> HttpError:
    cause = _innermost(exc)
    if isinstance(cause, AsrError):
        return http_error(cause, param=getattr(cause, "param", None))
    logger.error("%s %s failed", method, path, exc_info=exc)
    return internal_error(cause)


def _innermost(exc: BaseException) -> BaseException:
    # The pipeline's TaskGroups wrap the first failure of a request's pieces (nested: channels, then chunks).
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


class _Handlers:
    def __init__(self, ctx: HttpContext) -> None:
        self._ctx = ctx
        limits = ctx.config.limits
        self._audio_limits = AudioLimits(
            max_audio_duration_s=limits.max_audio_duration_s,
            max_message_bytes=limits.max_message_bytes,
            max_stream_bytes=limits.max_stream_bytes,
        )

    async def transcriptions(self, request: Request, call: _Call) -> Response:
        max_bytes = self._ctx.config.limits.max_message_bytes + _FORM_OVERHEAD_BYTES
        form, call.request_bytes = await read_form(request, max_bytes)
        try:
            upload = form.get("file")
            audio = await upload.read() if isinstance(upload, UploadFile) else None
            if upload is not None and audio is None:
                raise InvalidField("file", "'file' must be a file upload (multipart part with a filename)")
            parsed = parse_transcription_form(form, audio, self._ctx.config)
        finally:
            await form.close()
        # A client that goes away frees its queued work at once, as a cancelled gRPC call does (uvicorn itself
        # lets the handler run on).
        result = await _unless_disconnected(request.receive, self._transcribe(parsed, call))
        if parsed.stream:
            # The whole transcript is ready before the first event: one delta per decoded piece, then done.
            events = list(responses.sse_events(result))
            return StreamingResponse(_iterate(events), media_type="text/event-stream")
        if parsed.response_format == "text":
            return PlainTextResponse(responses.transcript_of(result).text)
        if parsed.response_format == "srt":
            return PlainTextResponse(responses.srt_text(result))
        if parsed.response_format == "vtt":
            return PlainTextResponse(responses.vtt_text(result), media_type="text/vtt")
        if parsed.response_format == "verbose_json":
            body = responses.verbose_json_body(
                result, requested_language=parsed.options.language, segments=parsed.segments, words=parsed.words
            )
            return _json(body)
        return _json(responses.json_body(result))

    async def _transcribe(self, parsed: TranscriptionForm, call: _Call) -> TranscriptionResult:
        with held_for_call(self._ctx.decoded_budget) as reserve:
            try:
                decoded = await asyncio.to_thread(
                    decode_audio,
                    parsed.audio,
                    AudioFormat(Encoding.FILE, 0, 0),
                    limits=self._audio_limits,
                    downmix=True,
                    reserve=reserve,
                )
            except InvalidInput as exc:
                raise InvalidField("file", str(exc)) from exc
            call.audio_s = decoded.duration_ms / 1000
            return await self._ctx.transcriber.transcribe(decoded, parsed.options)

    async def models(self, request: Request, call: _Call) -> Response:
        return _json({"object": "list", "data": [self._model()]})

    async def model(self, request: Request, call: _Call) -> Response:
        asked = str(request.path_params["model_id"])
        model = self._model()
        if asked != model["id"]:
            raise NotFound(f"no model {excerpt(asked)}: this server serves {excerpt(str(model['id']))}")
        return _json(model)

    def _model(self) -> dict[str, Any]:
        return {
            "id": self._ctx.model_id(),
            "object": "model",
            "created": self._ctx.created_s,
            "owned_by": "qwen-asr-server",
        }

    async def health(self, request: Request, call: _Call) -> Response:
        state = self._ctx.state()
        return _json({"status": state}, status_code=200 if state == "serving" else 503)


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result; cancelled, and ClientDisconnect raised, when the client disconnects first (the body has
    been read: the next ASGI message is the disconnect)."""
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnect()
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _iterate(events: list[str]) -> AsyncIterator[str]:
    for event in events:
        yield event


def _json(body: dict[str, Any], status_code: int = 200) -> Response:
    # ensure_ascii=False: transcripts are mostly not ASCII; Starlette's JSONResponse writes them as they are too.
    return Response(json.dumps(body, ensure_ascii=False), status_code=status_code, media_type="application/json")


def build_app(ctx: HttpContext) -> Starlette:
    observed = _Observed(ctx)
    handlers = _Handlers(ctx)
    routes = [
        observed.route("POST", TRANSCRIPTIONS_ROUTE, handlers.transcriptions),
        observed.route("GET", MODELS_ROUTE, handlers.models),
        observed.route("GET", MODELS_ROUTE + "/{model_id:path}", handlers.model),
        observed.route("GET", HEALTH_ROUTE, handlers.health, open_=True),
    ]

    async def not_routed(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            error = HttpError(
                405,
                "invalid_request_error",
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}",
            )
        else:
            error = http_error(
                NotFound(
                    f"no route {request.method} {request.url.path}; served: POST {TRANSCRIPTIONS_ROUTE}, "
                    f"GET {MODELS_ROUTE}, GET {HEALTH_ROUTE}"
                )
            )
        return error_response(error)

    return Starlette(routes=routes, exception_handlers={404: not_routed, 405: not_routed})
