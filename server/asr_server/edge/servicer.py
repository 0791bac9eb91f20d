"""The AsrService servicer: protobuf in, domain calls, protobuf out.

Its methods raise domain errors; edge.rpc answers them as precise gRPC statuses and opens each call's span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

import grpc
from opentelemetry import trace

from asr_server.alignment import align_text, check_align_text
from asr_server.audio.assembler import StreamAssembler
from asr_server.audio.budget import BYTES_PER_MIB, DecodedAudioBudget, held_for_call
from asr_server.audio.decode import DecodedAudio, container_formats, decode_audio
from asr_server.audio.formats import MAX_CHANNEL_COUNT, MAX_RAW_SAMPLE_RATE_HZ, MIN_RAW_SAMPLE_RATE_HZ, AudioLimits
from asr_server.config import Config
from asr_server.edge import convert
from asr_server.edge.rpc import current_request_id, note_audio_ms
from asr_server.errors import AsrError, InvalidInput, LimitExceeded, Unavailable
from asr_server.results import ChannelMode
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.prefix import FakeTokenDecoder, TokenDecoder, load_hf_token_decoder
from asr_server.streaming.segmenter import UtterancePlanner
from asr_server.streaming.session import IdleTimeout, StreamingSession, UtteranceWork
from asr_server.streaming.vad import VadBatcher
from asr_server.transcription import TranscribeOptions, Transcriber
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class StreamObserver(Protocol):
    """Told how live streams fare (the metrics)."""

    def stream_ended(self, max_final_delay_s: float) -> None: ...

    def final_lagged(self) -> None: ...

    def utterance_closed(self, speculations_kept: int, speculations_discarded: int) -> None: ...


class AsrServicer(pb_grpc.AsrServiceServicer):
    def __init__(
        self,
        config: Config,
        transcriber: Transcriber,
        *,
        model_id: Callable[[], str],
        aligner_ready: Callable[[], bool],
        stream_observer: StreamObserver | None = None,
    ) -> None:
        self._config = config
        self._stream_observer = stream_observer
        self._transcriber = transcriber
        self._model_id = model_id
        self._aligner_ready = aligner_ready
        limits = config.limits
        self._audio_limits = AudioLimits(
            max_audio_duration_s=limits.max_audio_duration_s,
            max_message_bytes=limits.max_message_bytes,
            max_stream_bytes=limits.max_stream_bytes,
        )
        # Decoded audio held by the Transcribe and TranscribeStream calls in flight, bounded (audio/budget.py).
        budget_mib = limits.max_decoded_audio_mb
        self._decoded_budget = DecodedAudioBudget(budget_mib * BYTES_PER_MIB) if budget_mib else None
        # Shared by every stream (and by endpointed unary calls), so VAD batches across them.
        self._vad = VadBatcher()
        self._token_decoder: asyncio.Task[TokenDecoder | None] | None = None
        self._sessions: set[StreamingSession] = set()
        self._draining = False  # shutdown began: live streams are being flushed, no new one opens
        self._max_live_streams = config.live_streams_per_front

    async def warm_up(self) -> None:
        """Before the server reports SERVING: the VAD loaded and past torch's slow first passes, and the
        interim-prefix tokenizer loaded. Loaded on first use instead, every front's first live streams waited for
        it (importing transformers and reading the tokenizer: 6-8 s on the H200 machine, their finals that late)."""
        await asyncio.gather(self._vad.ready(), self._get_token_decoder())

    # ---- RPCs (edge.rpc gives each its span and answers its errors) ----

    async def Transcribe(  # noqa: N802 - gRPC method name
        self,
        request: pb.TranscribeRequest,
        context: grpc.aio.ServicerContext[pb.TranscribeRequest, pb.TranscribeResponse],
    ) -> pb.TranscribeResponse:
        started = time.perf_counter()
        audio_format = convert.audio_format_from_pb(request.config.audio_format)
        options = convert.options_from_pb(request.config, self._config)
        endpointing = self._endpointing(request.config, options)
        decode_started = time.perf_counter()
        with self._budget_hold() as hold:
            # Mixing before resampling costs a fraction of resampling every channel.
            audio = await asyncio.to_thread(
                decode_audio,
                request.audio,
                audio_format,
                limits=self._audio_limits,
                downmix=options.channel_mode is ChannelMode.DOWNMIX,
                reserve=hold,
            )
            decode_s = time.perf_counter() - decode_started
            return await self._finish(audio, options, started, decode_s, endpointing=endpointing)

    async def TranscribeStream(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.TranscribeStreamRequest],
        context: grpc.aio.ServicerContext[pb.TranscribeStreamRequest, pb.TranscribeResponse],
    ) -> pb.TranscribeResponse:
        started = time.perf_counter()
        assembler: StreamAssembler | None = None
        options: TranscribeOptions | None = None
        endpointing: EndpointSettings | None = None
        received_bytes = 0
        async for message in request_iterator:
            payload = message.WhichOneof("payload")
            if assembler is None:
                if payload != "config":
                    raise InvalidInput(
                        "the first TranscribeStreamRequest must carry config (audio_format, language, ...); "
                        f"got {payload or 'an empty message'}"
                    )
                audio_format = convert.audio_format_from_pb(message.config.audio_format)
                options = convert.options_from_pb(message.config, self._config)
                endpointing = self._endpointing(message.config, options)
                assembler = StreamAssembler(audio_format, limits=self._audio_limits)
            elif payload == "config":
                raise InvalidInput(
                    f"config may be sent only once, in the first message; got a second one after "
                    f"{received_bytes} audio bytes"
                )
            elif payload == "audio":
                received_bytes += len(message.audio)
                assembler.append(message.audio)
        if assembler is None or options is None:
            raise InvalidInput("the stream was empty: send a config message, then the audio")
        trace.get_current_span().set_attribute("asr.stream.bytes", received_bytes)
        decode_started = time.perf_counter()
        with self._budget_hold() as hold:
            audio = await asyncio.to_thread(
                assembler.finish, downmix=options.channel_mode is ChannelMode.DOWNMIX, reserve=hold
            )
            decode_s = time.perf_counter() - decode_started
            return await self._finish(audio, options, started, decode_s, endpointing=endpointing)

    async def StreamingRecognize(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext[pb.StreamingRecognizeRequest, pb.StreamingRecognizeResponse],
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        span = trace.get_current_span()
        session: StreamingSession | None = None
        reader: asyncio.Task[None] | None = None
        try:
            session = await self._open_stream(request_iterator)
            span.set_attribute("asr.stream.channels", session.format.channel_count)
            reader = asyncio.create_task(self._read_stream(request_iterator, session))
            finals = 0
            request_id = current_request_id()
            async for event in session.events():
                finals += int(getattr(event, "is_final", False))
                message = convert.stream_event_to_pb(event)
                message.request_id = request_id
                yield message
            span.set_attribute("asr.stream.finals", finals)
            span.set_attribute("asr.stream.processed_s", session.processed_ms / 1000)
            if reader.done():
                reader.result()  # an idle timeout ends the call with its status after the flushed finals
        finally:
            # Client cancellation, an error or single_utterance's end: free everything at once.
            if reader is not None and not reader.done():
                reader.cancel()
            if session is not None:
                session.cancel()
                self._sessions.discard(session)
                note_audio_ms(session.processed_ms)
                if self._stream_observer is not None:
                    self._stream_observer.stream_ended(session.max_final_delay_ms / 1000)

    async def Align(  # noqa: N802 - gRPC method name
        self,
        request: pb.AlignRequest,
        context: grpc.aio.ServicerContext[pb.AlignRequest, pb.AlignResponse],
    ) -> pb.AlignResponse:
        started = time.perf_counter()
        checked = check_align_text(request.text, request.language, has_aligner=self._transcriber.has_aligner)
        audio_format = convert.audio_format_from_pb(request.audio_format)
        decode_started = time.perf_counter()
        with self._budget_hold() as hold:
            audio = await asyncio.to_thread(
                decode_audio, request.audio, audio_format, limits=self._audio_limits, downmix=True, reserve=hold
            )
            decode_s = time.perf_counter() - decode_started
            trace.get_current_span().set_attribute("asr.audio_s", audio.duration_ms / 1000)
            note_audio_ms(audio.duration_ms)
            result = await align_text(
                self._transcriber,
                audio,
                checked,
                max_audio_s=self._config.limits.max_chunk_with_timestamps_s,
                started_s=started,
            )
        return convert.alignment_to_pb(
            result,
            audio_decode_ms=decode_s * 1000,
            aligner_model_id=self._config.aligner.model or "",
            request_id=current_request_id(),
        )

    async def drain_streams(self) -> int:
        """Shutdown: every live stream flushes its open utterances as finals, then ends UNAVAILABLE (retry on
        another replica). Returns how many open utterances were flushed."""
        # Set before the snapshot, with no await in between: a stream whose config arrives from now on is refused in
        # _open_stream instead of opening after the snapshot and running on, unflushed, until the grace is over.
        self._draining = True
        sessions = list(self._sessions)
        flushed = await asyncio.gather(
            *(
                s.drain("the server is shutting down; open utterances were flushed as finals; reconnect to continue")
                for s in sessions
            )
        )
        logger.info("shutdown: %d open utterances of %d live streams flushed", sum(flushed), len(sessions))
        return sum(flushed)

    @property
    def decoded_budget(self) -> DecodedAudioBudget | None:
        """The bound on decoded audio in flight (--max-decoded-audio-mb), shared with the HTTP front."""
        return self._decoded_budget

    @property
    def live_streams(self) -> int:
        """StreamingRecognize calls open now."""
        return len(self._sessions)

    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self,
        request: pb.GetServerInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetServerInfoRequest, pb.GetServerInfoResponse],
    ) -> pb.GetServerInfoResponse:
        info = convert.server_info_to_pb(
            self._config,
            model_id=self._model_id() or self._config.model.model,
            aligner_model_id=self._config.aligner.model,
            aligner_ready=self._aligner_ready(),
            streaming_recognize=True,
            endpointing=True,
            container_formats=container_formats(),
            min_sample_rate_hz=MIN_RAW_SAMPLE_RATE_HZ,
            max_sample_rate_hz=MAX_RAW_SAMPLE_RATE_HZ,
            max_channel_count=MAX_CHANNEL_COUNT,
        )
        info.limits.stream_idle_timeout_ms = round(self._config.streaming.idle_timeout_s * 1000)
        info.limits.max_stream_duration_ms = round(self._config.streaming.max_duration_s * 1000)
        if self._decoded_budget is not None:
            info.limits.max_decoded_audio_bytes = self._decoded_budget.max_bytes
        return info

    # ---- live streams ----

    async def _next_request(
        self, request_iterator: AsyncIterator[pb.StreamingRecognizeRequest]
    ) -> pb.StreamingRecognizeRequest | None:
        idle_s = self._config.streaming.idle_timeout_s
        try:
            async with asyncio.timeout(idle_s):
                return await anext(request_iterator, None)
        except TimeoutError:
            raise _idle_timeout(idle_s, before_config=True) from None

    async def _open_stream(self, request_iterator: AsyncIterator[pb.StreamingRecognizeRequest]) -> StreamingSession:
        first = await self._next_request(request_iterator)
        if first is None:
            raise InvalidInput("the stream was empty: send a config message first, then the audio")
        payload = first.WhichOneof("payload")
        if payload != "config":
            raise InvalidInput(
                "the first StreamingRecognizeRequest must carry config (StreamingRecognitionConfig with "
                f"audio_format, language, ...); got {payload or 'an empty message'}"
            )
        audio_format, options = convert.streaming_config_from_pb(first.config, self._config)
        token_decoder = await self._get_token_decoder()
        # Checked and counted with no await in between, so concurrent opens cannot overshoot the capacity (nor open
        # after drain_streams took its snapshot).
        if self._draining:
            raise Unavailable("the server is shutting down; open the stream on another replica")
        if self._max_live_streams and len(self._sessions) >= self._max_live_streams:
            raise LimitExceeded(
                f"this server holds its capacity of {self._max_live_streams} live streams "
                f"(--max-live-streams-per-replica x replicas, shared over the front processes); retry with "
                "backoff or on another replica",
                retryable=True,
            )
        max_lag_ms = self._config.streaming.max_stream_lag_ms
        session = StreamingSession(
            options,
            audio_format,
            transcriber=self._transcriber,
            vad=self._vad,
            limits=self._audio_limits,
            token_decoder=token_decoder,
            max_lag_ms=max_lag_ms,
            on_lag=self._on_lag,
            max_duration_s=self._config.streaming.max_duration_s,
            on_utterance_work=self._on_utterance_work,
        )
        self._sessions.add(session)
        return session

    def _on_utterance_work(self, work: UtteranceWork) -> None:
        if self._stream_observer is not None:
            self._stream_observer.utterance_closed(work.speculations_kept, work.speculations_discarded)

    def _on_lag(self, delay_ms: float) -> None:
        logger.warning(
            "a live stream fell behind real time: a final came %.0f ms after its utterance ended "
            "(--max-stream-lag-ms %.0f); %d live streams",
            delay_ms,
            self._config.streaming.max_stream_lag_ms,
            len(self._sessions),
        )
        if self._stream_observer is not None:
            self._stream_observer.final_lagged()

    async def _read_stream(
        self, request_iterator: AsyncIterator[pb.StreamingRecognizeRequest], session: StreamingSession
    ) -> None:
        """Feeds the session until the client half-closes. Bad input fails the session (the response loop
        reports it); an idle timeout flushes first and is raised here for the response loop to report."""
        received = 0
        watchdog = _IdleWatchdog(self._config.streaming.idle_timeout_s)
        try:
            while True:
                message = await watchdog.read(request_iterator)
                if message is None:
                    await session.finish()
                    return
                payload = message.WhichOneof("payload")
                if payload == "config":
                    raise InvalidInput(_second_config_message(message.config, session, received))
                if payload == "audio" and session.accepting_audio:
                    received += len(message.audio)
                    await session.feed(message.audio)
        except IdleTimeout:
            await session.finish()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the call; the response loop reports it
            if not isinstance(exc, AsrError):
                logger.exception("StreamingRecognize: reading the stream failed")
            session.fail(exc)
        finally:
            watchdog.stop()

    async def _get_token_decoder(self) -> TokenDecoder | None:
        """The tokenizer that turns an interim's token ids back into a prefix (loaded once: by warm_up, else on first
        use).

        One shared task: streams that open while it loads wait for it instead of going without a prefix.
        """
        if self._token_decoder is None:
            self._token_decoder = asyncio.create_task(self._load_token_decoder())
        return await asyncio.shield(self._token_decoder)

    async def _load_token_decoder(self) -> TokenDecoder | None:
        if self._config.engine.kind == "fake":
            return FakeTokenDecoder()
        try:
            return await asyncio.to_thread(load_hf_token_decoder, self._config.model.model)
        except Exception:  # noqa: BLE001 - interims then go without a prefix; nothing else changes
            logger.warning("no tokenizer for interim prefixes; interims decode without one", exc_info=True)
            return None

    def _endpointing(self, msg: pb.RecognitionConfig, options: TranscribeOptions) -> EndpointSettings | None:
        if not msg.HasField("endpointing"):
            return None
        limits = self._config.limits
        max_chunk_s = limits.max_chunk_with_timestamps_s if options.return_word_timestamps else limits.max_chunk_s
        default_trailing_ms = self._config.streaming.trailing_silence_ms
        return convert.endpoint_settings_from_pb(msg.endpointing, max_chunk_s, default_trailing_ms)

    # ---- shared ----

    @contextlib.contextmanager
    def _budget_hold(self) -> Iterator[Callable[[int], None] | None]:
        """The reserve callback for one call's decoding; what it reserved is released when the call is done with
        its audio (the transcript sent, or the call failed or was cancelled)."""
        with held_for_call(self._decoded_budget) as reserve:
            yield reserve

    async def _finish(
        self,
        audio: DecodedAudio,
        options: TranscribeOptions,
        started: float,
        decode_s: float,
        *,
        endpointing: EndpointSettings | None = None,
    ) -> pb.TranscribeResponse:
        span = trace.get_current_span()
        span.set_attribute("asr.audio_s", audio.duration_ms / 1000)
        note_audio_ms(audio.duration_ms)
        span.set_attribute("asr.channels", len(audio.channels))
        planner = UtterancePlanner(self._vad, endpointing) if endpointing is not None else None
        result = await self._transcriber.transcribe(audio, options, planner)
        response = convert.result_to_pb(
            result, total_ms=(time.perf_counter() - started) * 1000, audio_decode_ms=decode_s * 1000
        )
        response.request_id = current_request_id()
        return response


class _IdleWatchdog:
    """Raises IdleTimeout from `read` when no message came for idle_s.

    One timer per stream, re-armed lazily, instead of a timeout context per message: at 50 messages a second
    per stream, per-message timers cost more than the rest of the message's handling.
    """

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._waiting: asyncio.Task[object] | None = None
        self._fired = False
        self._handle = self._loop.call_later(idle_s, self._check)

    def _check(self) -> None:
        remaining = self._last + self._idle_s - self._loop.time()
        if remaining > 0 or self._waiting is None:
            # Busy feeding (not idle), or a message just came: look again later.
            self._handle = self._loop.call_later(max(remaining, 0.05), self._check)
            return
        self._fired = True
        self._waiting.cancel()

    async def read(
        self, request_iterator: AsyncIterator[pb.StreamingRecognizeRequest]
    ) -> pb.StreamingRecognizeRequest | None:
        self._waiting = asyncio.current_task()
        self._last = self._loop.time()  # idle is time spent waiting for the client, not feeding its audio
        try:
            message = await anext(request_iterator, None)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._fired or task is None:
                raise
            task.uncancel()
            raise _idle_timeout(self._idle_s) from None
        finally:
            self._waiting = None
        return message

    def stop(self) -> None:
        self._handle.cancel()


def _idle_timeout(idle_s: float, *, before_config: bool = False) -> IdleTimeout:
    # The edge answers OUT_OF_RANGE (the contract keeps DEADLINE_EXCEEDED for the caller's own deadline).
    flushed = "" if before_config else "; the open utterance was flushed as a final"
    return IdleTimeout(
        f"no audio for {idle_s:g} s: no message for the server's --stream-idle-timeout-s={idle_s:g}{flushed}; "
        "send audio continuously (silence included) or half-close the stream when done"
    )


def _second_config_message(msg: pb.StreamingRecognitionConfig, session: StreamingSession, received: int) -> str:
    fmt = msg.config.audio_format
    current = session.format
    new = convert.audio_format_from_pb(fmt) if fmt.ByteSize() else None
    if new is not None and new != current:
        return (
            f"the audio format cannot change mid-stream: the stream is {current.encoding.name} "
            f"{current.sample_rate_hz} Hz x{current.channel_count}, a later config asks for {new.encoding.name} "
            f"{new.sample_rate_hz} Hz x{new.channel_count}; start a new stream for the new format"
        )
    return f"config may be sent only once, in the first message; got a second one after {received} audio bytes"
