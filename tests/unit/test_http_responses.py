"""The HTTP front's pure parts: OpenAI's response formats from a result, the form's checks, the error map."""

from __future__ import annotations

import socket

import pytest
from starlette.datastructures import FormData

from asr_server.config import Config
from asr_server.edge.http.app import InvalidField, parse_transcription_form
from asr_server.edge.http.errors import Unauthenticated, http_error
from asr_server.edge.http.responses import srt_text, sse_events, text_deltas, verbose_json_body, vtt_text
from asr_server.edge.http.server import listening_socket
from asr_server.errors import FailedPrecondition, InvalidInput, LimitExceeded, Unavailable
from asr_server.results import ChannelTranscript, Segment, TranscriptionResult, Word, WordTimestampsStatus
from asr_server.transcription import merge_segments


def result_of(segments: list[Segment], duration_ms: int = 75_000) -> TranscriptionResult:
    transcript = merge_segments(0, segments, timestamps_requested=any(s.words for s in segments))
    return TranscriptionResult((transcript,), duration_ms, "m")


SEGMENTS = [
    Segment(0, 2_500, "你好。", "Chinese", (Word("你好", 0, 900),), WordTimestampsStatus.OK),
    Segment(3_000, 61_250, "Hello there.", "English", (Word("Hello", 3_000, 3_400),), WordTimestampsStatus.OK),
    Segment(61_250, 62_000, "", "", (), WordTimestampsStatus.NO_TEXT),
    Segment(62_000, 3_723_004, "Bye", "English", (), WordTimestampsStatus.NO_TEXT),
]


def test_deltas_add_up_to_the_joined_text() -> None:
    transcript: ChannelTranscript = result_of(SEGMENTS).transcripts[0]
    deltas = text_deltas(transcript)
    assert "".join(deltas) == transcript.text and len(deltas) == 3
    assert deltas[0] == "你好。"  # no space after CJK; one before the next English piece or not: as join_texts says
    events = list(sse_events(result_of(SEGMENTS)))
    assert events[-1].startswith('data: {"type": "transcript.text.done", "text": "你好。')
    assert all(e.endswith("\n\n") for e in events) and len(events) == 4


def test_subtitles_skip_silent_pieces_and_write_hours() -> None:
    result = result_of(SEGMENTS)
    srt = srt_text(result)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,500\n你好。\n\n2\n00:00:03,000 --> 00:01:01,250\nHello there.")
    assert srt.endswith("3\n00:01:02,000 --> 01:02:03,004\nBye\n\n")
    vtt = vtt_text(result)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n你好。\n\n") and "01:02:03.004\nBye" in vtt


def test_verbose_json_segments_and_words() -> None:
    body = verbose_json_body(result_of(SEGMENTS), requested_language=None, segments=True, words=True)
    assert body["language"] == "chinese,english" and body["duration"] == 75.0
    assert [s["id"] for s in body["segments"]] == [0, 1, 2]
    assert body["segments"][1]["start"] == 3.0 and body["segments"][1]["seek"] == 300
    assert body["words"] == [{"word": "你好", "start": 0.0, "end": 0.9}, {"word": "Hello", "start": 3.0, "end": 3.4}]
    silent = verbose_json_body(result_of([]), requested_language="German", segments=False, words=False)
    assert silent["language"] == "german" and "segments" not in silent and "words" not in silent


def form(**fields: str | list[str]) -> FormData:
    items: list[tuple[str, str]] = []
    for key, value in fields.items():
        name = key.replace("__", "[]")
        items.extend((name, v) for v in (value if isinstance(value, list) else [value]))
    return FormData(items)


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"response_format": "xml"}, "response_format", "accepted: json, text, srt, vtt, verbose_json"),
        ({"timestamp_granularities__": "word"}, "timestamp_granularities", "verbose_json"),
        ({"response_format": "verbose_json", "timestamp_granularities__": "char"}, "timestamp_granularities", "char"),
        ({"temperature": "1.5"}, "temperature", "0 to 1"),
        ({"temperature": "warm"}, "temperature", "'warm'"),
        ({"stream": "true", "response_format": "srt"}, "stream", "json or text"),
        ({"stream": "maybe"}, "stream", "true or false"),
        ({"language": "klingon"}, "language", "'klingon'"),
        ({"include__": "logprobs"}, "include", "not supported"),
    ],
)
def test_bad_fields_name_their_param(fields: dict[str, str], param: str, fragment: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_transcription_form(form(**fields), b"audio", Config())
    assert caught.value.param == param and fragment in str(caught.value)
    assert http_error(caught.value, param=param).body()["error"]["param"] == param


def test_good_fields_become_options() -> None:
    parsed = parse_transcription_form(
        form(
            language="en-US",
            prompt="Qwen",
            response_format="verbose_json",
            timestamp_granularities__=["word"],
            temperature="0.4",
            stream="false",
            model="whisper-1",
        ),
        b"audio",
        Config(),
    )
    assert parsed.options.language == "English" and parsed.options.context == "Qwen"
    assert parsed.options.return_word_timestamps and parsed.words and not parsed.segments
    with pytest.raises(InvalidField) as missing:
        parse_transcription_form(form(), None, Config())
    assert missing.value.param == "file"


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (InvalidInput("bad"), 400, "invalid_value", None),
        (FailedPrecondition("no aligner"), 400, "unsupported_value", None),
        (LimitExceeded("too long"), 413, "limit_exceeded", None),
        (LimitExceeded("queue full", retryable=True, retry_after_s=0.2), 429, "queue_full", "1"),
        (Unavailable("draining", retry_after_s=2.5), 503, "unavailable", "3"),
        (Unauthenticated("who"), 401, "invalid_api_key", None),
    ],
)
def test_the_error_map(error: Exception, status: int, code: str, retry_after: str | None) -> None:
    mapped = http_error(error)  # type: ignore[arg-type]
    assert (mapped.status_code, mapped.body()["error"]["code"]) == (status, code)
    assert mapped.headers().get("Retry-After") == retry_after


def test_the_http_socket_says_tcp_so_asyncio_turns_nagle_off() -> None:
    # asyncio sets TCP_NODELAY only where sock.proto is IPPROTO_TCP (accepted sockets inherit it); with proto 0 each
    # keep-alive response waited ~40 ms for the client's delayed ACK.
    sock = listening_socket("127.0.0.1", 0)
    with sock:
        assert sock.proto == socket.IPPROTO_TCP
