"""SRT and WebVTT rendering of the Python client: timing format, cue splitting, word joining."""

from __future__ import annotations

import re

from asr_client.results import ASRTranscription, ForcedAlignItem, ForcedAlignResult, Segment
from asr_client.subtitles import cues, join_words, timestamp, to_srt, to_vtt

SRT_TIME = re.compile(r"^\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}$")
VTT_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}$")


def words(*items: tuple[str, float, float]) -> ForcedAlignResult:
    return ForcedAlignResult([ForcedAlignItem(*item) for item in items])


def test_timestamps_are_zero_padded_with_the_format_separator() -> None:
    assert timestamp(0, decimal=",") == "00:00:00,000"
    assert timestamp(3723.4567, decimal=",") == "01:02:03,457"
    assert timestamp(59.9996, decimal=".") == "00:01:00.000"
    assert timestamp(-1, decimal=".") == "00:00:00.000"


def test_srt_numbers_cues_and_vtt_has_its_header() -> None:
    result = ASRTranscription(
        "English", "Hello there. How are you?",
        words(("Hello", 0.1, 0.4), ("there.", 0.5, 0.9), ("How", 1.2, 1.4), ("are", 1.45, 1.6), ("you?", 1.6, 2.05)),
    )
    # The first cue lasts 0.8 s, under the minimum of 5/6 s: it is held until 0.933 s (the next starts at 1.2 s).
    assert to_srt(result) == (
        "1\n00:00:00,100 --> 00:00:00,933\nHello there.\n\n"
        "2\n00:00:01,200 --> 00:00:02,050\nHow are you?\n"
    )
    assert to_vtt(result) == (
        "WEBVTT\n\n"
        "00:00:00.100 --> 00:00:00.933\nHello there.\n\n"
        "00:00:01.200 --> 00:00:02.050\nHow are you?\n"
    )


def test_cues_break_at_pauses_and_stay_short() -> None:
    many = [(f"word{i}", i * 0.3, i * 0.3 + 0.25) for i in range(60)]
    paused = [("a", 0.0, 0.2), ("b", 0.3, 0.5), ("c", 2.0, 2.2)]
    assert [c.text for c in cues(ASRTranscription("English", "", words(*paused)))] == ["a b", "c"]
    long_cues = cues(ASRTranscription("English", "", words(*many)))
    assert len(long_cues) > 3
    for cue in long_cues:
        assert cue.end_time - cue.start_time <= 7.0
        assert all(len(line) <= 50 for line in cue.text.split("\n"))
        assert cue.text.count("\n") <= 1


def test_without_words_segments_become_cues() -> None:
    result = ASRTranscription(
        "English", "one two", None,
        [Segment(0.0, 30.0, "one", "English"), Segment(30.0, 42.5, "two", "English"), Segment(42.5, 43, "", "")],
        43.0,
    )
    srt = to_srt(result).splitlines()
    # A cue is on screen for at most 7 s, however long its segment.
    assert [line for line in srt if SRT_TIME.match(line)] == [
        "00:00:00,000 --> 00:00:07,000",
        "00:00:30,000 --> 00:00:37,000",
    ]
    vtt = to_vtt(ASRTranscription("English", "only text", None, [], 2.0)).splitlines()
    assert vtt[0] == "WEBVTT" and VTT_TIME.match(vtt[2]) and vtt[3] == "only text"


def test_cjk_characters_join_without_spaces_and_latin_words_with() -> None:
    assert join_words(["你", "好", "world", "再", "见"]) == "你好 world 再见"
    assert join_words(["こん", "にちは"]) == "こんにちは"
    assert join_words(["안녕", "하세요"]) == "안녕 하세요"
