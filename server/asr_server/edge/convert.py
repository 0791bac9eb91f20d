"""The protobuf boundary: *_from_pb turns messages into domain values (validating them), *_to_pb the reverse.

Only this module and the servicer import the generated protobuf code.
"""

from __future__ import annotations

from collections.abc import Iterable

from asr_server import __version__
from asr_server.alignment import TextAlignment
from asr_server.audio.formats import AudioFormat, Encoding
from asr_server.config import Config
from asr_server.errors import InvalidInput
from asr_server.languages import (
    ALIGNER_LANGUAGES,
    ASR_LANGUAGES,
    language_codes,
    resolve_language,
    split_languages,
)
from asr_server.results import (
    ChannelMode,
    ChannelTranscript,
    Segment,
    TranscriptionResult,
    Word,
    WordTimestampsStatus,
)
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.session import SpeechEvent, SpeechEventKind, StreamEvent, StreamingOptions, StreamResult
from asr_server.transcription import TranscribeOptions
from qwenasr.v1 import asr_pb2 as pb

API_VERSION = "qwenasr.v1"

_ENCODINGS: dict[int, Encoding] = {
    pb.AUDIO_ENCODING_UNSPECIFIED: Encoding.FILE,
    pb.AUDIO_ENCODING_LINEAR16: Encoding.LINEAR16,
    pb.AUDIO_ENCODING_FLOAT32: Encoding.FLOAT32,
    pb.AUDIO_ENCODING_MULAW: Encoding.MULAW,
    pb.AUDIO_ENCODING_ALAW: Encoding.ALAW,
}

_CHANNEL_MODES: dict[int, ChannelMode] = {
    pb.CHANNEL_MODE_UNSPECIFIED: ChannelMode.DOWNMIX,
    pb.CHANNEL_MODE_DOWNMIX: ChannelMode.DOWNMIX,
    pb.CHANNEL_MODE_SEPARATE: ChannelMode.SEPARATE,
}

_STATUSES: dict[WordTimestampsStatus, pb.WordTimestampsStatus.ValueType] = {
    WordTimestampsStatus.NOT_REQUESTED: pb.WORD_TIMESTAMPS_STATUS_UNSPECIFIED,
    WordTimestampsStatus.OK: pb.WORD_TIMESTAMPS_STATUS_OK,
    WordTimestampsStatus.LANGUAGE_NOT_SUPPORTED: pb.WORD_TIMESTAMPS_STATUS_LANGUAGE_NOT_SUPPORTED,
    WordTimestampsStatus.NO_TEXT: pb.WORD_TIMESTAMPS_STATUS_NO_TEXT,
}


def _accepted(names: Iterable[str]) -> str:
    return ", ".join(names)


def audio_format_from_pb(msg: pb.AudioFormat) -> AudioFormat:
    encoding = _ENCODINGS.get(int(msg.encoding))
    if encoding is None:
        accepted = _accepted(pb.AudioEncoding.Name(v) for v in sorted(_ENCODINGS))  # type: ignore[arg-type]
        raise InvalidInput(f"unknown audio_format.encoding {int(msg.encoding)}; accepted: {accepted}")
    return AudioFormat(encoding=encoding, sample_rate_hz=int(msg.sample_rate_hz), channel_count=int(msg.channel_count))


def options_from_pb(msg: pb.RecognitionConfig, config: Config) -> TranscribeOptions:
    engine = config.engine
    max_new_tokens = int(msg.max_new_tokens)
    if max_new_tokens == 0:
        max_new_tokens = engine.default_max_new_tokens
    elif max_new_tokens > engine.max_new_tokens_limit:
        raise InvalidInput(
            f"max_new_tokens {msg.max_new_tokens} is out of range; accepted: 1 to {engine.max_new_tokens_limit}, "
            f"or 0 for the default ({engine.default_max_new_tokens})"
        )
    channel_mode = _CHANNEL_MODES.get(int(msg.channel_mode))
    if channel_mode is None:
        accepted = _accepted(pb.ChannelMode.Name(v) for v in sorted(_CHANNEL_MODES))  # type: ignore[arg-type]
        raise InvalidInput(f"unknown channel_mode {int(msg.channel_mode)}; accepted: {accepted}")
    return TranscribeOptions(
        language=resolve_language(msg.language),
        context=msg.context,
        max_new_tokens=max_new_tokens,
        return_word_timestamps=msg.return_word_timestamps,
        channel_mode=channel_mode,
    )


def _clamp_u32(value: float) -> int:
    return max(0, min(int(round(value)), 0xFFFFFFFF))


def word_to_pb(word: Word) -> pb.Word:
    return pb.Word(
        text=word.text, start_ms=_clamp_u32(word.start_ms), end_ms=_clamp_u32(word.end_ms), confidence=word.confidence
    )


def segment_to_pb(segment: Segment) -> pb.Segment:
    return pb.Segment(
        start_ms=_clamp_u32(segment.start_ms),
        end_ms=_clamp_u32(segment.end_ms),
        text=segment.text,
        language=segment.language,
        words=[word_to_pb(w) for w in segment.words],
        language_code=_joined_code(segment.language),
        confidence=segment.confidence,
    )


def transcript_to_pb(transcript: ChannelTranscript) -> pb.Transcript:
    return pb.Transcript(
        channel_index=transcript.channel_index,
        text=transcript.text,
        language=transcript.language,
        words=[word_to_pb(w) for w in transcript.words],
        segments=[segment_to_pb(s) for s in transcript.segments],
        word_timestamps_status=status_to_pb(transcript.word_timestamps_status),
        language_code=_joined_code(transcript.language),
        languages=split_languages(transcript.language),
        language_codes=language_codes(transcript.language),
        confidence=transcript.confidence,
    )


def _joined_code(language: str) -> str:
    """A result's language as codes, joined as its names are: "Chinese,English" -> "zh,en"."""
    return ",".join(language_codes(language))


def status_to_pb(status: WordTimestampsStatus) -> pb.WordTimestampsStatus.ValueType:
    return _STATUSES[status]


def result_to_pb(result: TranscriptionResult, *, total_ms: float, audio_decode_ms: float) -> pb.TranscribeResponse:
    timing = result.timing
    return pb.TranscribeResponse(
        transcripts=[transcript_to_pb(t) for t in result.transcripts],
        audio_duration_ms=_clamp_u32(result.audio_duration_ms),
        model_id=result.model_id,
        timing=pb.ServerTiming(
            total_ms=_clamp_u32(total_ms),
            audio_decode_ms=_clamp_u32(audio_decode_ms),
            queue_wait_ms=_clamp_u32(timing.queue_wait_ms),
            inference_ms=_clamp_u32(timing.inference_ms),
            alignment_ms=_clamp_u32(timing.alignment_ms),
            first_token_ms=0 if timing.first_token_ms is None else max(1, _clamp_u32(timing.first_token_ms)),
            alignment_work_ms=_clamp_u32(timing.alignment_work_ms),
            inference_wall_ms=_clamp_u32(timing.inference_wall_ms),
        ),
    )


def alignment_to_pb(
    result: TextAlignment, *, audio_decode_ms: float, aligner_model_id: str, request_id: str
) -> pb.AlignResponse:
    return pb.AlignResponse(
        words=[word_to_pb(w) for w in result.words],
        word_timestamps_status=status_to_pb(result.status),
        audio_duration_ms=_clamp_u32(result.audio_duration_ms),
        timing=pb.ServerTiming(
            total_ms=_clamp_u32(result.total_ms),
            audio_decode_ms=_clamp_u32(audio_decode_ms),
            alignment_ms=_clamp_u32(result.alignment_ms),
            alignment_work_ms=_clamp_u32(result.alignment_ms),  # one alignment: its work is its wall time
        ),
        aligner_model_id=aligner_model_id,
        request_id=request_id,
    )


def server_info_to_pb(
    config: Config,
    *,
    model_id: str,
    aligner_model_id: str,
    aligner_ready: bool,
    streaming_recognize: bool,
    endpointing: bool,
    container_formats: Iterable[str],
    min_sample_rate_hz: int,
    max_sample_rate_hz: int,
    max_channel_count: int,
) -> pb.GetServerInfoResponse:
    limits, engine = config.limits, config.engine
    return pb.GetServerInfoResponse(
        server_version=__version__,
        api_version=API_VERSION,
        model_id=model_id,
        aligner_model_id=aligner_model_id,
        languages=[pb.Language(name=lang.name, code=lang.code) for lang in ASR_LANGUAGES],
        aligner_languages=[pb.Language(name=lang.name, code=lang.code) for lang in ALIGNER_LANGUAGES],
        limits=pb.ServerLimits(
            max_audio_duration_s=limits.max_audio_duration_s,
            max_message_bytes=limits.max_message_bytes,
            max_stream_bytes=limits.max_stream_bytes,
            max_new_tokens=engine.max_new_tokens_limit,
            default_max_new_tokens=engine.default_max_new_tokens,
            max_chunk_duration_s=limits.max_chunk_s,
            max_chunk_duration_with_timestamps_s=limits.max_chunk_with_timestamps_s,
            min_sample_rate_hz=min_sample_rate_hz,
            max_sample_rate_hz=max_sample_rate_hz,
            max_channel_count=max_channel_count,
        ),
        features=pb.ServerFeatures(
            word_timestamps=bool(aligner_model_id),
            aligner_ready=aligner_ready,
            streaming_recognize=streaming_recognize,
            separate_channels=True,
            endpointing=endpointing,
        ),
        encodings=[
            pb.AUDIO_ENCODING_LINEAR16,
            pb.AUDIO_ENCODING_FLOAT32,
            pb.AUDIO_ENCODING_MULAW,
            pb.AUDIO_ENCODING_ALAW,
        ],
        container_formats=list(container_formats),
    )


# ---- live streams and endpointing ----

_SPEECH_EVENTS: dict[SpeechEventKind, pb.SpeechEventType.ValueType] = {
    SpeechEventKind.STARTED: pb.SPEECH_EVENT_TYPE_SPEECH_STARTED,
    SpeechEventKind.ENDED: pb.SPEECH_EVENT_TYPE_SPEECH_ENDED,
    SpeechEventKind.END_OF_SINGLE_UTTERANCE: pb.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE,
    SpeechEventKind.SPEECH_START_TIMEOUT: pb.SPEECH_EVENT_TYPE_SPEECH_START_TIMEOUT,
}


def endpoint_settings_from_pb(
    msg: pb.EndpointingConfig,
    limits_max_chunk_s: int,
    default_trailing_silence_ms: int,
    speculate_after_ms: int = 0,
) -> EndpointSettings:
    """0 means the default for every field (trailing silence: the server's --trailing-silence-ms); the contract
    publishes the accepted ranges. `speculate_after_ms`: live streams' --speculative-final-after-ms (server-side)."""
    defaults = EndpointSettings()
    trailing = int(msg.trailing_silence_ms) or default_trailing_silence_ms
    if not 100 <= trailing <= 10_000:
        raise InvalidInput(
            f"endpointing.trailing_silence_ms {msg.trailing_silence_ms} is out of range; accepted: 100 to 10000, "
            f"or 0 for the server's default ({default_trailing_silence_ms})"
        )
    max_utterance = int(msg.max_utterance_ms) or defaults.max_utterance_ms
    if not 1_000 <= max_utterance <= 60_000:
        raise InvalidInput(
            f"endpointing.max_utterance_ms {msg.max_utterance_ms} is out of range; accepted: 1000 to 60000, "
            f"or 0 for the default ({defaults.max_utterance_ms})"
        )
    threshold = float(msg.speech_threshold) or defaults.speech_threshold
    if not 0.0 < threshold < 1.0:
        raise InvalidInput(
            f"endpointing.speech_threshold {msg.speech_threshold} is out of range; accepted: above 0 and below "
            f"1, or 0 for the default ({defaults.speech_threshold})"
        )
    # An utterance is decoded in one piece, exactly as a unary call decodes audio up to max_chunk_s: keep
    # it within that, so a final always equals the unary result for its audio.
    max_utterance = min(max_utterance, limits_max_chunk_s * 1000)
    return EndpointSettings(
        trailing_silence_ms=trailing,
        max_utterance_ms=max_utterance,
        speech_threshold=threshold,
        speculate_after_ms=speculate_after_ms,
    )


def streaming_config_from_pb(
    msg: pb.StreamingRecognitionConfig, config: Config
) -> tuple[AudioFormat, StreamingOptions]:
    audio_format = audio_format_from_pb(msg.config.audio_format)
    options = options_from_pb(msg.config, config)
    interval = int(msg.interim_interval_ms) or 1000
    if not 200 <= interval <= 10_000:
        raise InvalidInput(
            f"interim_interval_ms {msg.interim_interval_ms} is out of range; accepted: 200 to 10000, or 0 for the "
            "default (1000)"
        )
    speech_start_timeout_ms = int(msg.speech_start_timeout_ms)
    if speech_start_timeout_ms and not 100 <= speech_start_timeout_ms <= 3_600_000:
        raise InvalidInput(
            f"speech_start_timeout_ms {msg.speech_start_timeout_ms} is out of range; accepted: 100 to 3600000, or 0 "
            "for none"
        )
    max_chunk_s = (
        config.limits.max_chunk_with_timestamps_s if options.return_word_timestamps else config.limits.max_chunk_s
    )
    return audio_format, StreamingOptions(
        transcribe=options,
        endpoint=endpoint_settings_from_pb(
            msg.config.endpointing,
            max_chunk_s,
            config.streaming.trailing_silence_ms,
            config.streaming.speculative_final_after_ms,
        ),
        interim_results=msg.interim_results,
        interim_interval_ms=interval,
        single_utterance=msg.single_utterance,
        speech_start_timeout_ms=speech_start_timeout_ms,
    )


def stream_event_to_pb(event: StreamEvent) -> pb.StreamingRecognizeResponse:
    if isinstance(event, SpeechEvent):
        return pb.StreamingRecognizeResponse(
            speech_event=pb.SpeechEvent(
                type=_SPEECH_EVENTS[event.kind],
                offset_ms=_clamp_u32(event.offset_ms),
                channel_index=event.channel_index,
            ),
            processed_audio_ms=_clamp_u32(event.processed_ms),
        )
    return pb.StreamingRecognizeResponse(
        result=stream_result_to_pb(event), processed_audio_ms=_clamp_u32(event.processed_ms)
    )


def stream_result_to_pb(result: StreamResult) -> pb.StreamingResult:
    return pb.StreamingResult(
        is_final=result.is_final,
        utterance_index=result.utterance_index,
        channel_index=result.channel_index,
        text=result.text,
        language=result.language,
        stability=result.stability,
        start_ms=_clamp_u32(result.start_ms),
        end_ms=_clamp_u32(result.end_ms),
        words=[word_to_pb(w) for w in result.words],
        word_timestamps_status=status_to_pb(result.word_timestamps_status),
        language_code=_joined_code(result.language),
        confidence=result.confidence,
    )
