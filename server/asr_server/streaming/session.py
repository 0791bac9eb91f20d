"""One live recognition stream: audio pieces in, speech events and interim/final results out.

Pure asyncio over the Transcriber and the VAD batcher; the gRPC servicer only converts messages.

Per channel (one for a downmix, one per channel with ChannelMode.SEPARATE):
  raw bytes -> whole frames -> (downmix) -> incremental 16 kHz resampling -> VAD (32 ms frames) -> endpointer
  -> utterances. The channel keeps only the audio of its open utterance (plus a few frames before it), so
  memory is bounded by max_utterance_ms however long the stream runs.
- Interim decodes of the open utterance, every `interim_interval_ms` of new audio, with the previous interim's
  output minus its last tokens as prefix (prefix.py). At most one is in flight per channel: when one is still
  queued in the engine as new audio arrives, nothing more is queued, and the next one starts from the newest
  audio when it returns. A closing utterance cancels its interim (the engine drops it if still queued).
- When an utterance closes, its final decode is exactly the unary path for its 16 kHz samples
  (Transcriber.decode_piece, no prefix), then the aligner when word timestamps are asked for. Finals are
  decoded concurrently but emitted in utterance order.
- Speculative finals (EndpointSettings.speculate_after_ms, 0: off): once the open utterance's silence has lasted
  that long, the endpointer tells the span the utterance will get if the silence lasts to the endpoint
  (Endpointer.pending_end), and that span's final decode starts at once: the very call the final makes. If the
  endpoint then fires with that span, the final takes that decode's result (it is the same decode of the same
  samples, so the same result); if speech resumes first, or the utterance is cut at max_utterance_ms, it is
  cancelled (the engine drops it). No interims are decoded while a speculation is held: its final supersedes them.
Cost per utterance is bounded: at most (length / interval) interims of at most max_utterance_ms audio each,
plus one final of its own audio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from asr_server.audio.assembler import StreamAssembler, StreamResampler
from asr_server.audio.formats import AudioFormat, AudioLimits, ms_to_samples, samples_to_ms
from asr_server.engine.types import DecodePriority, DecodeResult
from asr_server.errors import DEFAULT_RETRY_AFTER_S, AsrError, InvalidInput, Unavailable
from asr_server.results import ChannelMode, Word, WordTimestampsStatus, mean_probability
from asr_server.streaming.endpoint import Endpointer, EndpointEvent, EndpointSettings, SpeechStarted, UtteranceEnded
from asr_server.streaming.prefix import TokenDecoder, rollback
from asr_server.streaming.vad import FRAME_SAMPLES, VadBatcher, VadState
from asr_server.transcription import TranscribeOptions, Transcriber, require_aligner

logger = logging.getLogger(__name__)

# The smallest open utterance worth an interim decode (the model pads anything shorter to 0.5 s anyway).
_MIN_INTERIM_SAMPLES = 8_000
# Interim stability is the agreement with the previous interim, scaled below this (1.0 is for finals).
_MAX_INTERIM_STABILITY = 0.9


class IdleTimeout(AsrError):
    """No message arrived for the configured idle time (the edge answers OUT_OF_RANGE: DEADLINE_EXCEEDED is the
    caller's own deadline)."""


class SpeechEventKind(enum.Enum):
    STARTED = "started"
    ENDED = "ended"
    END_OF_SINGLE_UTTERANCE = "end_of_single_utterance"
    SPEECH_START_TIMEOUT = "speech_start_timeout"


@dataclass(frozen=True)
class SpeechEvent:
    kind: SpeechEventKind
    offset_ms: int
    channel_index: int
    processed_ms: int


@dataclass(frozen=True)
class StreamResult:
    is_final: bool
    utterance_index: int
    channel_index: int
    text: str
    language: str
    stability: float
    start_ms: int
    end_ms: int
    processed_ms: int
    words: tuple[Word, ...] = ()
    word_timestamps_status: WordTimestampsStatus = WordTimestampsStatus.NOT_REQUESTED
    confidence: float = 0.0  # mean probability of the tokens decoded for it (results.mean_probability)


StreamEvent = SpeechEvent | StreamResult


@dataclass(frozen=True)
class StreamingOptions:
    transcribe: TranscribeOptions
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    interim_results: bool = False
    interim_interval_ms: int = 1000
    single_utterance: bool = False
    # No speech started in this much stream audio: a SPEECH_START_TIMEOUT event, then the stream ends. 0: never.
    speech_start_timeout_ms: int = 0
    # The reference's rollback: drop this many tokens of the previous interim, and use no prefix for the
    # first `unprefixed_interims` interims of an utterance (too little audio for a reliable prefix).
    rollback_tokens: int = 5
    unprefixed_interims: int = 2


@dataclass(frozen=True)
class UtteranceWork:
    """What one utterance cost the engine (for tests and benchmarks)."""

    channel_index: int
    utterance_index: int
    audio_samples: int
    interim_decodes: int
    interim_samples: int
    skipped_interims: int
    # Speculative finals of this utterance: started, the one its final used (0 or 1), and those cancelled because
    # speech resumed (or the utterance was cut at max_utterance_ms).
    speculations: int = 0
    speculations_kept: int = 0
    speculations_discarded: int = 0


class _AudioBuffer:
    """16 kHz samples [base, end) of one channel; the front is dropped as utterances close."""

    def __init__(self) -> None:
        self.base = 0
        self._chunks: list[npt.NDArray[np.float32]] = []
        self._length = 0

    @property
    def end(self) -> int:
        return self.base + self._length

    @property
    def held(self) -> int:
        return self._length

    def append(self, samples: npt.NDArray[np.float32]) -> None:
        if samples.shape[0]:
            self._chunks.append(samples)
            self._length += samples.shape[0]

    def _joined(self) -> npt.NDArray[np.float32]:
        if len(self._chunks) != 1:
            joined = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
            self._chunks = [joined] if joined.shape[0] else []
        return self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)

    def slice(self, start: int, end: int) -> npt.NDArray[np.float32]:
        if start < self.base or end > self.end or start > end:
            raise RuntimeError(f"samples [{start}, {end}) are not held (held: [{self.base}, {self.end}))")
        return self._joined()[start - self.base : end - self.base].copy()

    def drop_before(self, sample: int) -> None:
        cut = min(max(sample, self.base), self.end) - self.base
        if cut <= 0:
            return
        joined = self._joined()
        rest = joined[cut:].copy()
        self._chunks = [rest] if rest.shape[0] else []
        self._length = rest.shape[0]
        self.base += cut


@dataclass(eq=False)
class _Channel:
    index: int
    endpointer: Endpointer
    vad: VadState = field(default_factory=VadState)
    buffer: _AudioBuffer = field(default_factory=_AudioBuffer)
    utterance_index: int = 0
    # Finals in utterance order, each with when its utterance closed (loop time), for the lag check.
    finals: asyncio.Queue[tuple[asyncio.Task[StreamResult], float] | None] = field(default_factory=asyncio.Queue)
    finals_decoding: int = 0  # finals of this channel still in the engine
    emitter: asyncio.Task[None] | None = None
    # The open utterance's interim state.
    interim_task: asyncio.Task[None] | None = None
    interim_from: int = 0  # audio end of the last interim (or the utterance start)
    interim_ids: tuple[int, ...] = ()
    interim_text: str = ""
    interim_count: int = 0
    interim_samples: int = 0
    interims_skipped: int = 0
    # single_utterance: this channel has had its utterance (or had none open when another channel's ended).
    done: bool = False
    # The open utterance's speculative final, its counts, and how many were discarded (each one renames the
    # utterance's stream key: see _discard_speculation).
    speculation: _Speculation | None = None
    speculations: int = 0
    speculations_kept: int = 0
    speculations_discarded: int = 0
    key_generation: int = 0


@dataclass(frozen=True)
class _Speculation:
    """A final decode started ahead of the endpoint for the open utterance's samples [start, end)."""

    start: int
    end: int
    decode: asyncio.Task[DecodeResult]


class StreamingSession:
    """Feed audio with `feed`, end with `finish` (half-close) or `cancel`; read `events()` concurrently.

    `feed` returns once the piece went through VAD and endpointing (its decodes run on in the background), so
    a caller that awaits it gets natural back-pressure. Errors of the stream (a final's decode failing) end
    `events()` with the exception.
    """

    def __init__(
        self,
        options: StreamingOptions,
        audio_format: AudioFormat,
        *,
        transcriber: Transcriber,
        vad: VadBatcher,
        limits: AudioLimits,
        token_decoder: TokenDecoder | None = None,
        on_utterance_work: Callable[[UtteranceWork], None] | None = None,
        max_lag_ms: float = 0.0,
        on_lag: Callable[[float], None] | None = None,
        max_duration_s: float = 0.0,
    ) -> None:
        if not audio_format.encoding.is_raw:
            raise InvalidInput(
                "StreamingRecognize needs a raw encoding (LINEAR16, FLOAT32, MULAW or ALAW) with sample_rate_hz "
                "and channel_count; encoded files can only be decoded whole: send them with TranscribeStream"
            )
        require_aligner(options.transcribe, transcriber.has_aligner)
        self.options = options
        self.format = audio_format
        self._transcriber = transcriber
        self._vad = vad
        self._decoder = token_decoder
        self._on_work = on_utterance_work
        # A final later than this after its utterance closed means the stream is behind real time: reported to
        # on_lag (the servicer logs it), never silently. 0: not checked.
        self._max_lag_s = max_lag_ms / 1000
        self._on_lag = on_lag
        self.max_final_delay_ms = 0.0
        self._assembler = StreamAssembler(audio_format, limits=limits, keep_for_finish=False)
        separate = options.transcribe.channel_mode is ChannelMode.SEPARATE and audio_format.channel_count > 1
        self._downmix = not separate and audio_format.channel_count > 1
        count = audio_format.channel_count if separate else 1
        self._resampler = StreamResampler(audio_format.sample_rate_hz, count)
        self._channels = [_Channel(i, Endpointer(options.endpoint)) for i in range(count)]
        self._out: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._stopped = False  # no more audio is processed (single utterance done, finished or cancelled)
        self._flushing = False  # finish() is pushing the last samples through
        self._finished = False
        self._finishing: asyncio.Task[None] | None = None
        self._interval_samples = ms_to_samples(options.interim_interval_ms)
        self._speech_started = False  # on any channel, ever (the speech-start timeout's test)
        # The live-stream duration cap (--max-stream-duration-s), wall clock from the open: a stream pins its
        # replica for as long as it runs, so balancers can only move load when streams end. 0: no cap.
        self._max_duration_s = max_duration_s
        self._duration_cap: asyncio.TimerHandle | None = None
        self._capping: asyncio.Task[int] | None = None
        if max_duration_s > 0:
            self._duration_cap = asyncio.get_running_loop().call_later(max_duration_s, self._duration_reached)
        # Names this stream's utterances to the engine (DecodeRequest.stream_key), which keeps an open
        # utterance's encoder state between its interims and its final.
        self._stream_id = uuid.uuid4().hex

    # ---- input ----

    @property
    def accepting_audio(self) -> bool:
        return not self._stopped

    @property
    def processed_ms(self) -> int:
        return samples_to_ms(self._processed_samples())

    def _processed_samples(self) -> int:
        """16 kHz samples every live channel has pushed through VAD and endpointing (channels done with their
        single utterance no longer advance, so they do not hold the others back)."""
        live = [c for c in self._channels if not c.done] or self._channels
        return min(c.endpointer.frames_seen for c in live) * FRAME_SAMPLES

    @property
    def held_samples(self) -> int:
        """16 kHz samples the session holds right now, all channels (bounded by max_utterance_ms)."""
        return sum(c.buffer.held for c in self._channels)

    async def feed(self, piece: bytes) -> None:
        """Adds one audio piece of any size. Raises InvalidInput or LimitExceeded for bad or too much audio."""
        if self._stopped:
            return
        self._assembler.append(piece)
        frames = self._assembler.take_frames()
        if frames is None:
            return
        if self._downmix:
            frames = frames.mean(axis=0, dtype=np.float32, keepdims=True)
        await self._process(self._resampler.process(frames))

    async def finish(self) -> None:
        """The client half-closed: flush the open utterances as finals; `events()` ends after the last one."""
        if self._finished:
            return
        self._finished = True
        if self._duration_cap is not None:
            self._duration_cap.cancel()
            self._duration_cap = None
        if not self._stopped:
            self._stopped = True
            self._flushing = True
            await self._process(self._resampler.flush(), flushing=True)
            self._flushing = False
            for channel in self._channels:
                ended = channel.endpointer.flush(channel.buffer.end)
                if ended is not None:
                    self._close_utterance(channel, ended)
        for channel in self._channels:
            self._discard_speculation(channel)  # none is left unless a channel ended without its final
        await self._drain_finals()
        self._out.put_nowait(None)

    async def drain(self, reason: str, *, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> int:
        """The server is shutting down: every open utterance is flushed as a final (as on half-close), then
        `events()` ends with Unavailable(reason) so the caller knows to reconnect. Returns how many open
        utterances were flushed."""
        if self._finished:
            return 0  # half-closed, cancelled or failed already: it ends on its own, as it would have
        flushed = sum(1 for c in self._channels if not c.done and c.endpointer.open_start is not None)
        self._error = Unavailable(reason, retry_after_s=retry_after_s)
        await self.finish()
        return flushed

    def _duration_reached(self) -> None:
        """At the cap, the stream ends as on a server drain: open utterances flushed as finals, then UNAVAILABLE
        with a resume hint (retry at once: any replica, this one included, takes the continuation)."""
        self._duration_cap = None
        if self._finished:
            return
        processed_ms = self.processed_ms
        reason = (
            f"the stream reached the server's --max-stream-duration-s={self._max_duration_s:g} s (a cap so load "
            f"balancers can move long streams); open utterances were flushed as finals; resume on a new stream "
            f"with the audio after processed_audio_ms={processed_ms}"
        )
        # Kept: the loop holds tasks only weakly.
        self._capping = asyncio.get_running_loop().create_task(self.drain(reason, retry_after_s=0.0))

    def cancel(self) -> None:
        """The client went away: drop every decode at once (queued ones leave the engine queue)."""
        self._stopped = True
        self._finished = True
        if self._duration_cap is not None:
            self._duration_cap.cancel()
            self._duration_cap = None
        for channel in self._channels:
            if channel.interim_task is not None:
                channel.interim_task.cancel()
                channel.interim_task = None
            self._discard_speculation(channel)
            if channel.emitter is not None:
                channel.emitter.cancel()
            while not channel.finals.empty():
                queued = channel.finals.get_nowait()
                if queued is not None:
                    queued[0].cancel()
        self._out.put_nowait(None)

    async def events(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self._out.get()
            if event is None:
                if self._error is not None:
                    raise self._error
                return
            yield event

    # ---- processing ----

    async def _process(self, samples_16k: npt.NDArray[np.float32], *, flushing: bool = False) -> None:
        if samples_16k.shape[1] == 0:
            return
        if len(self._channels) == 1:
            await self._process_channel(self._channels[0], samples_16k[0])
        else:
            await asyncio.gather(*(self._process_channel(c, samples_16k[c.index]) for c in self._channels))
        if not flushing:
            self._check_speech_start_timeout()
            for channel in self._channels:
                self._maybe_interim(channel)

    async def _process_channel(self, channel: _Channel, samples: npt.NDArray[np.float32]) -> None:
        if channel.done:
            return
        channel.buffer.append(np.ascontiguousarray(samples, dtype=np.float32))
        probs, energies = await self._vad.frames(channel.vad, samples)
        if self._stopped and not self._flushing:
            return
        if probs.shape[0]:
            for event in channel.endpointer.push(probs, energies):
                self._on_endpoint(channel, event)
                if self._stopped and not self._flushing:
                    return  # single utterance: nothing after the first final
            self._maybe_speculate(channel)
        # Keep the open utterance, or what a future one could be back-dated into.
        channel.buffer.drop_before(channel.endpointer.keep_from)

    def _on_endpoint(self, channel: _Channel, event: EndpointEvent) -> None:
        if isinstance(event, SpeechStarted):
            if not self._speech_started and self._speech_start_timed_out(samples_to_ms(event.sample)):
                return
            self._speech_started = True
            self._reset_interim(channel, event.sample)
            self._emit(SpeechEvent(SpeechEventKind.STARTED, samples_to_ms(event.sample), channel.index, 0))
        elif isinstance(event, UtteranceEnded):
            self._close_utterance(channel, event)

    def _close_utterance(self, channel: _Channel, ended: UtteranceEnded) -> None:
        speculated, stream_key = self._take_speculation(channel, ended)
        audio = channel.buffer.slice(ended.start_sample, ended.end_sample)
        index = channel.utterance_index
        channel.utterance_index += 1
        if self._on_work is not None:
            self._on_work(
                UtteranceWork(
                    channel.index,
                    index,
                    audio.shape[0],
                    channel.interim_count,
                    channel.interim_samples,
                    channel.interims_skipped,
                    channel.speculations,
                    channel.speculations_kept,
                    channel.speculations_discarded,
                )
            )
        channel.speculations = channel.speculations_kept = channel.speculations_discarded = 0
        channel.key_generation = 0
        draft = channel.interim_ids
        self._reset_interim(channel, ended.end_sample)
        self._emit(SpeechEvent(SpeechEventKind.ENDED, samples_to_ms(ended.end_sample), channel.index, 0))
        task = asyncio.get_running_loop().create_task(
            self._final(
                channel.index, index, ended.start_sample, ended.end_sample, audio, stream_key, speculated, draft
            )
        )
        if channel.emitter is None:
            channel.emitter = asyncio.get_running_loop().create_task(self._emit_finals(channel))
        if speculated is not None:
            # A final cancelled before its first step never awaits the speculation: it must not run on alone.
            task.add_done_callback(lambda _: speculated.cancel())
        channel.finals_decoding += 1
        task.add_done_callback(lambda _: _final_done(channel))
        channel.finals.put_nowait((task, asyncio.get_running_loop().time()))
        if self.options.single_utterance and not self._stopped:
            self._end_single_utterance(channel, ended.end_sample)

    def _check_speech_start_timeout(self) -> None:
        if not self._speech_started:
            self._speech_start_timed_out(self.processed_ms)

    def _speech_start_timed_out(self, at_ms: int) -> bool:
        """Ends the stream (an event, then as on half-close: nothing is open) when `at_ms` of audio without speech
        reach the speech-start timeout; a speech start judged here is at its onset (the endpointer back-dates it),
        not where a batch of frames happened to end."""
        timeout_ms = self.options.speech_start_timeout_ms
        if not timeout_ms or self._stopped or at_ms < timeout_ms:
            return False
        self._stopped = True
        self._emit(SpeechEvent(SpeechEventKind.SPEECH_START_TIMEOUT, timeout_ms, 0, 0))
        # Kept: the loop holds tasks only weakly.
        self._finishing = asyncio.get_running_loop().create_task(self.finish())
        return True

    def _end_single_utterance(self, channel: _Channel, end_sample: int) -> None:
        """One utterance per channel: a channel that spoke is done once its utterance closed; one that had no open
        utterance when the first one closed is done at once. The call ends when every channel is done, so a
        second speaker mid-sentence on another channel still gets its whole utterance and its final."""
        channel.done = True
        self._reset_interim(channel, channel.buffer.end)
        for other in self._channels:
            if other.endpointer.open_start is None and not other.done:
                other.done = True
                self._reset_interim(other, other.buffer.end)
        if not all(c.done for c in self._channels):
            return
        self._stopped = True
        self._emit(SpeechEvent(SpeechEventKind.END_OF_SINGLE_UTTERANCE, samples_to_ms(end_sample), channel.index, 0))
        # Kept: the loop holds tasks only weakly.
        self._finishing = asyncio.get_running_loop().create_task(self.finish())

    def _stream_key(self, channel_index: int, utterance_index: int) -> str:
        key = f"{self._stream_id}/{channel_index}/{utterance_index}"
        channel = self._channels[channel_index]
        if channel.utterance_index == utterance_index and channel.key_generation:
            key += f"/{channel.key_generation}"  # after a discarded speculation (_discard_speculation)
        return key

    async def _decode_final(
        self, audio: npt.NDArray[np.float32], stream_key: str, draft: tuple[int, ...]
    ) -> DecodeResult:
        """A final's decode, and a speculative final's: the unary path for the utterance's samples. `draft`, the
        utterance's last interim's tokens: the engine verifies them in one pass and decodes on from the longest
        prefix greedy decoding agrees with, so the result is the unary one."""
        # Ahead of every interim and of recorded audio in the engine's queue: its caller waits since speech ended.
        return await self._transcriber.decode_piece(
            audio,
            self.options.transcribe,
            priority=DecodePriority.FINAL,
            stream_key=stream_key,
            draft_token_ids=draft,
        )

    async def _final(
        self,
        channel_index: int,
        utterance_index: int,
        start: int,
        end: int,
        audio: npt.NDArray[np.float32],
        stream_key: str,
        speculated: asyncio.Task[DecodeResult] | None = None,
        draft: tuple[int, ...] = (),
    ) -> StreamResult:
        options = self.options.transcribe
        if speculated is not None:
            result = await speculated  # the same _decode_final of the same samples, started before the endpoint
        else:
            result = await self._decode_final(audio, stream_key, draft)
        words: tuple[Word, ...] = ()
        status = WordTimestampsStatus.NOT_REQUESTED
        if options.return_word_timestamps:
            aligned = await self._transcriber.align_piece(
                audio, result.text, result.language, samples_to_ms(start), decoded=result
            )
            words, status = aligned.words, aligned.status
        return StreamResult(
            is_final=True,
            utterance_index=utterance_index,
            channel_index=channel_index,
            text=result.text,
            language=result.language,
            stability=1.0,
            start_ms=samples_to_ms(start),
            end_ms=samples_to_ms(end),
            processed_ms=0,
            words=words,
            word_timestamps_status=status,
            confidence=mean_probability(result.text_token_probs),
        )

    async def _emit_finals(self, channel: _Channel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            queued = await channel.finals.get()
            if queued is None:
                return
            task, closed_at = queued
            try:
                result = await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the stream ends with the first failed final
                self.fail(exc)
                return
            self._emit(result)
            self._check_lag(loop.time() - closed_at)

    async def _drain_finals(self) -> None:
        for channel in self._channels:
            if channel.emitter is not None:
                channel.finals.put_nowait(None)
        emitters = [c.emitter for c in self._channels if c.emitter is not None]
        if emitters:
            await asyncio.gather(*emitters, return_exceptions=True)

    def fail(self, exc: Exception) -> None:
        """Ends the stream with `exc` at once: `events()` raises it; every decode is dropped."""
        if self._error is None:
            self._error = exc
            self.cancel()

    def _check_lag(self, delay_s: float) -> None:
        self.max_final_delay_ms = max(self.max_final_delay_ms, delay_s * 1000)
        if self._max_lag_s and delay_s > self._max_lag_s and self._on_lag is not None:
            self._on_lag(delay_s * 1000)

    def _emit(self, event: StreamEvent) -> None:
        self._out.put_nowait(dataclasses.replace(event, processed_ms=self.processed_ms))

    # ---- speculative finals ----

    def _maybe_speculate(self, channel: _Channel) -> None:
        """After a piece went through endpointing: a speculative final for the span the open utterance will get if
        its silence lasts to the endpoint, started once that span is known; dropped as soon as it no longer is."""
        pending = channel.endpointer.pending_end
        current = channel.speculation
        if current is not None and (current.start, current.end) == pending:
            return
        self._discard_speculation(channel)  # speech resumed (pending is None), or the span moved on
        if pending is None or self._stopped or channel.done:
            return
        start, end = pending
        if end > channel.buffer.end:
            return  # an end pad longer than the silence so far: the audio is not all here yet (next piece)
        audio = channel.buffer.slice(start, end)
        decode = asyncio.get_running_loop().create_task(
            self._decode_final(audio, self._stream_key(channel.index, channel.utterance_index), channel.interim_ids)
        )
        channel.speculation = _Speculation(start, end, decode)
        channel.speculations += 1

    def _take_speculation(
        self, channel: _Channel, ended: UtteranceEnded
    ) -> tuple[asyncio.Task[DecodeResult] | None, str]:
        """The closing utterance's speculative decode if it decoded exactly its span (then its final uses it), and
        the stream key its final decodes under otherwise."""
        current = channel.speculation
        span = (ended.start_sample, ended.end_sample)
        if current is not None and not ended.forced and (current.start, current.end) == span:
            channel.speculation = None
            channel.speculations_kept += 1
            return current.decode, self._stream_key(channel.index, channel.utterance_index)
        self._discard_speculation(channel)
        return None, self._stream_key(channel.index, channel.utterance_index)

    def _discard_speculation(self, channel: _Channel) -> None:
        current = channel.speculation
        if current is None:
            return
        channel.speculation = None
        channel.speculations_discarded += 1
        if current.decode.done():
            if not current.decode.cancelled() and current.decode.exception() is not None:
                logger.warning(
                    "a speculative final failed (%s); it was discarded unused (the final decodes on its own)",
                    current.decode.exception(),
                )
        else:
            current.decode.cancel()  # the engine drops it (aborted), queued or running
        # The engine closes an utterance's cached encoder windows when a FINAL-priority decode under its key is
        # done or aborted, and keeps no more under that key: the utterance's later interims and its final use a
        # new one, so they can cache and reuse windows again.
        channel.key_generation += 1

    # ---- interims ----

    def _reset_interim(self, channel: _Channel, start: int) -> None:
        if channel.interim_task is not None:
            channel.interim_task.cancel()
            channel.interim_task = None
        channel.interim_from = start
        channel.interim_ids = ()
        channel.interim_text = ""
        channel.interim_count = 0
        channel.interim_samples = 0
        channel.interims_skipped = 0

    def _maybe_interim(self, channel: _Channel) -> None:
        start = channel.endpointer.open_start
        if not self.options.interim_results or self._stopped or channel.done or start is None:
            return
        # Only audio the endpointer has seen: the interim's end_ms never runs ahead of processed_audio_ms.
        end = min(channel.buffer.end, self._processed_samples())
        if end - channel.interim_from < self._interval_samples or end - start < _MIN_INTERIM_SAMPLES:
            return
        if channel.speculation is not None:
            return  # its final is being decoded already, for the same audio: it supersedes an interim
        if channel.interim_task is not None or channel.finals_decoding:
            # Still queued or running (or this channel's last final is): do not pile up work, and never make a
            # final wait behind this stream's own interims; the next interim takes the newest audio.
            channel.interims_skipped += 1
            return
        prefix_ids: tuple[int, ...] = ()
        prefix_text = ""
        if self._decoder is not None and channel.interim_count >= self.options.unprefixed_interims:
            prefix_ids, prefix_text = rollback(channel.interim_ids, self.options.rollback_tokens, self._decoder)
        audio = channel.buffer.slice(start, end)
        channel.interim_from = end
        channel.interim_count += 1
        channel.interim_samples += audio.shape[0]
        channel.interim_task = asyncio.get_running_loop().create_task(
            self._interim(channel, channel.utterance_index, start, end, audio, prefix_ids, prefix_text)
        )

    async def _interim(
        self,
        channel: _Channel,
        utterance_index: int,
        start: int,
        end: int,
        audio: npt.NDArray[np.float32],
        prefix_ids: tuple[int, ...],
        prefix_text: str,
    ) -> None:
        try:
            result = await self._transcriber.decode_piece(
                audio,
                self.options.transcribe,
                prefix_text=prefix_text,
                priority=DecodePriority.INTERIM,
                stream_key=self._stream_key(channel.index, utterance_index),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - interims are best effort; the final is what counts
            logger.warning("interim decode failed (%s); waiting for the next one", exc)
            if channel.interim_task is asyncio.current_task():
                channel.interim_task = None
            return
        if channel.interim_task is not asyncio.current_task() or channel.utterance_index != utterance_index:
            return  # the utterance closed meanwhile: its final supersedes this
        channel.interim_task = None
        channel.interim_ids = prefix_ids + tuple(result.token_ids)
        stability = _agreement(channel.interim_text, result.text) * _MAX_INTERIM_STABILITY
        channel.interim_text = result.text
        self._emit(
            StreamResult(
                is_final=False,
                utterance_index=utterance_index,
                channel_index=channel.index,
                text=result.text,
                language=result.language,
                stability=round(stability, 3),
                start_ms=samples_to_ms(start),
                end_ms=samples_to_ms(end),
                processed_ms=0,
                confidence=mean_probability(result.text_token_probs),
            )
        )
        self._maybe_interim(channel)


def _final_done(channel: _Channel) -> None:
    channel.finals_decoding -= 1


def _agreement(previous: str, current: str) -> float:
    """The share of `current` that the previous interim already had (common prefix, in characters)."""
    if not current:
        return 0.0
    same = 0
    for a, b in zip(previous, current, strict=False):
        if a != b:
            break
        same += 1
    return same / len(current)
