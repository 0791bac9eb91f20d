"""A TranscriptionResult in OpenAI's response formats: json, text, srt, vtt, verbose_json, and the SSE events of
`stream=true`. Pure functions of domain values; the route (app.py) picks one.

The HTTP front always downmixes (OpenAI has no channels), so a result has one transcript; its segments are the
pieces the pipeline decoded (chunks cut at silences), which are also the subtitle cues.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

from asr_server.languages import ASR_LANGUAGES
from asr_server.results import ChannelTranscript, Segment, TranscriptionResult
from asr_server.transcript_merge import join_texts

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = ("json", "text", "srt", "vtt", "verbose_json")
_CODES = {language.name: language.code for language in ASR_LANGUAGES}


def transcript_of(result: TranscriptionResult) -> ChannelTranscript:
    return result.transcripts[0]


def _seconds(ms: float) -> float:
    return round(ms / 1000, 3)


def _language_codes(language: str) -> list[dict[str, str]]:
    """The new SDKs' `languages` ([{"code": "en"}]): the detected languages as ISO 639 codes, in order."""
    return [{"code": _CODES[name]} for name in language.split(",") if name in _CODES]


def _usage(result: TranscriptionResult) -> dict[str, Any]:
    return {"type": "duration", "seconds": _seconds(result.audio_duration_ms)}


def json_body(result: TranscriptionResult) -> dict[str, Any]:
    transcript = transcript_of(result)
    return {"text": transcript.text, "languages": _language_codes(transcript.language), "usage": _usage(result)}


def _spoken(segments: tuple[Segment, ...]) -> list[Segment]:
    return [s for s in segments if s.text.strip()]


def verbose_json_body(
    result: TranscriptionResult, *, requested_language: str | None, segments: bool, words: bool
) -> dict[str, Any]:
    """OpenAI's verbose_json. `language` is the detected one (the requested one for silence), lower-case as OpenAI
    writes it ("english"; "chinese,english" for a mix). Whisper's per-segment statistics do not exist for this
    model: `tokens` is empty and `temperature`, `avg_logprob`, `compression_ratio`, `no_speech_prob` are 0."""
    transcript = transcript_of(result)
    language = transcript.language or requested_language or ""
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": language.lower(),
        "duration": _seconds(result.audio_duration_ms),
        "text": transcript.text,
    }
    if segments:
        body["segments"] = [
            {
                "id": index,
                "seek": segment.start_ms // 10,  # Whisper's seek counts 10 ms frames
                "start": _seconds(segment.start_ms),
                "end": _seconds(segment.end_ms),
                "text": segment.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for index, segment in enumerate(_spoken(transcript.segments))
        ]
    if words:
        body["words"] = [
            {"word": w.text, "start": _seconds(w.start_ms), "end": _seconds(w.end_ms)} for w in transcript.words
        ]
    body["usage"] = _usage(result)
    return body


def _clock(ms: int, separator: str) -> str:
    hours, rest = divmod(max(0, ms), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{millis:03d}"


def srt_text(result: TranscriptionResult) -> str:
    cues = _spoken(transcript_of(result).segments)
    return "".join(
        f"{i}\n{_clock(s.start_ms, ',')} --> {_clock(s.end_ms, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(cues, start=1)
    )


def vtt_text(result: TranscriptionResult) -> str:
    cues = _spoken(transcript_of(result).segments)
    return "WEBVTT\n\n" + "".join(
        f"{_clock(s.start_ms, '.')} --> {_clock(s.end_ms, '.')}\n{s.text.strip()}\n\n" for s in cues
    )


def text_deltas(transcript: ChannelTranscript) -> list[str]:
    """The transcript's text in one delta per segment, with the joining spaces, so that the deltas add up to
    exactly `transcript.text` (join_texts only ever appends)."""
    texts = [s.text for s in transcript.segments]
    languages = [s.language for s in transcript.segments]
    deltas: list[str] = []
    sent = ""
    for end in range(1, len(texts) + 1):
        joined = join_texts(texts[:end], languages[:end])
        if not joined.startswith(sent):
            break  # not expected; the rest then goes in one delta below
        if len(joined) > len(sent):
            deltas.append(joined[len(sent) :])
            sent = joined
    if sent != transcript.text:
        deltas = [transcript.text] if transcript.text else []
    return deltas


def sse_events(result: TranscriptionResult) -> Iterator[str]:
    """`transcript.text.delta` events, then one `transcript.text.done`, as server-sent events (OpenAI's stream)."""
    transcript = transcript_of(result)
    for delta in text_deltas(transcript):
        yield _sse({"type": "transcript.text.delta", "delta": delta})
    yield _sse(
        {"type": "transcript.text.done", "text": transcript.text, "languages": _language_codes(transcript.language)}
    )


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
