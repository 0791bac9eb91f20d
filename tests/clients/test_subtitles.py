"""`asr-client transcribe --format srt|vtt` as subtitles: cues from the server's endpointed segments for a
10-minute recording, punctuation kept with --timestamps, and the documented cue rules (asr_client.subtitles); every
file goes through strict SRT (`srt`) and WebVTT (`webvtt-py`) parsers."""

from __future__ import annotations

import datetime
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import srt
import webvtt

from asr_client.cli import main as cli_main
from asr_client.results import ASRTranscription, ForcedAlignItem, ForcedAlignResult, Segment
from asr_client.subtitles import MAX_CUE_S, MAX_LINE_CHARS, MIN_CUE_S, cues, to_srt, to_vtt
from asr_server.engine import fake
from asr_server.engine.types import DecodeRequest
from asr_server.results import Word
from asr_server.transcription import AlignmentResult
from tests.clients.servers import threaded_server
from tests.helpers import fake_config, tone, wav_bytes
from tests.speech import espeak_available, synthesize_sentences

SENTENCES = [
    "The weather is nice today.", "Please call me back tomorrow morning.", "I would like to order a large pizza.",
    "Our meeting starts at nine o'clock.", "Thank you for calling customer service.", "Can you hear me now?",
]


def parse_srt(text: str) -> list[srt.Subtitle]:
    """Strictly: `srt.parse` refuses anything between blocks that is not a block; numbering must run 1, 2, ..."""
    subtitles = list(srt.parse(text, ignore_errors=False))
    assert [s.index for s in subtitles] == list(range(1, len(subtitles) + 1))
    return subtitles


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """webvtt-py refuses a file without the WEBVTT header or with malformed cue timings."""
    captions = webvtt.from_buffer(io.StringIO(text))
    return [(_vtt_s(c.start), _vtt_s(c.end), c.text) for c in captions]


def _vtt_s(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def check_rules(timed: list[tuple[float, float, str]]) -> None:
    """The documented rules: 0 < duration <= 7 s, in order without overlap, at most 2 lines of 42 characters."""
    previous_end = 0.0
    for start, end, text in timed:
        assert 0 < end - start <= MAX_CUE_S + 1e-9, (start, end, text)
        assert start >= previous_end - 1e-9, (start, previous_end, text)
        lines = text.split("\n")
        assert 1 <= len(lines) <= 2 and all(0 < len(line) <= MAX_LINE_CHARS for line in lines), text
        previous_end = end


def srt_timed(subtitles: list[srt.Subtitle]) -> list[tuple[float, float, str]]:
    return [(s.start / datetime.timedelta(seconds=1), s.end / datetime.timedelta(seconds=1), s.content)
            for s in subtitles]


@pytest.mark.slow  # about 10 s: 10 minutes of speech endpointed twice
@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_a_ten_minute_recording_gives_a_cue_per_utterance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --timestamps the CLI asks for endpointing: one segment per utterance between pauses, so a 10-minute
    recording of 198 sentences gives about as many cues (not one 10-minute cue), each within the rules."""
    audio, spans = synthesize_sentences(SENTENCES * 33, silence_s=1.5)
    assert len(audio) / 16_000 > 600
    path = tmp_path / "long.wav"
    path.write_bytes(wav_bytes(audio))
    with threaded_server(fake_config()) as (_, target):
        assert cli_main(["--target", target, "--timeout-s", "300", "transcribe", str(path), "--format", "srt"]) == 0
        subtitles = parse_srt(capsys.readouterr().out)
        assert cli_main(["--target", target, "--timeout-s", "300", "transcribe", str(path), "--format", "vtt"]) == 0
        captions = parse_vtt(capsys.readouterr().out)
    assert len(subtitles) >= 0.9 * len(spans)
    timed = srt_timed(subtitles)
    check_rules(timed)
    check_rules(captions)
    assert [(round(s, 3), round(e, 3), t) for s, e, t in timed] == [(round(s, 3), round(e, 3), t)
                                                                    for s, e, t in captions]
    # Each cue lies on one sentence's speech (endpointing found the utterances).
    starts = np.array([span[0] for span in spans])
    for start, end, _ in timed[:20]:
        nearest = int(np.argmin(np.abs(starts - start)))
        assert abs(spans[nearest][0] - start) < 0.5 and end <= spans[nearest][1] + 1.0


def _punctuated(request: DecodeRequest) -> tuple[str, tuple[int, ...]]:
    """The fake engine's words as sentences of four, capitalised, with a comma after the second word."""
    text, ids = ORIGINAL_TRANSCRIPT(request)
    words = text.split()
    out = []
    for i, word in enumerate(words):
        if i % 4 == 0:
            word = word.capitalize()
        if i % 4 == 1:
            word += ","
        if i % 4 == 3 or i == len(words) - 1:
            word += "."
        out.append(word)
    return " ".join(out), ids


ORIGINAL_TRANSCRIPT = fake.fake_transcript


class PunctuationDroppingAligner:
    """Like the real forced aligner: words are the transcript's tokens with only letters, digits and ' kept;
    word i of n gets the i-th n-th of the audio."""

    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult:
        tokens = ["".join(c for c in t if c == "'" or unicodedata.category(c)[0] in "LN") for t in text.split()]
        words = [t for t in tokens if t]
        duration_ms = audio_16k.shape[0] * 1000 // 16_000
        step = duration_ms // max(len(words), 1)
        return AlignmentResult(tuple(Word(w, i * step, (i + 1) * step - 10) for i, w in enumerate(words)), 1.0)


@pytest.fixture()
def punctuating_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(fake, "fake_transcript", _punctuated)
    with threaded_server(fake_config(), aligner=PunctuationDroppingAligner()) as (_, target):  # type: ignore[arg-type]
        yield target


def test_with_timestamps_cues_keep_the_transcripts_punctuation(
    punctuating_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The aligner's words carry no punctuation; mapped back onto the transcript, the cues show its text exactly
    (commas, full stops, capitals), and a cue ends at a sentence end."""
    path = tmp_path / "speech.wav"
    path.write_bytes(wav_bytes(tone(20.0, seed=9)))
    assert cli_main(["--target", punctuating_server, "transcribe", str(path), "--timestamps", "--format", "json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert "," in result["text"] and "." in result["text"]
    assert not any("," in w["text"] or "." in w["text"] for w in result["time_stamps"])
    assert cli_main(["--target", punctuating_server, "transcribe", str(path), "--timestamps", "--format", "srt"]) == 0
    subtitles = parse_srt(capsys.readouterr().out)
    check_rules(srt_timed(subtitles))
    assert " ".join(s.content.replace("\n", " ") for s in subtitles) == result["text"]
    assert all(s.content.endswith(".") for s in subtitles)
    assert all(re.fullmatch(r"W\d+ w\d+, w\d+ w\d+\.|W\d+( w\d+,?)*\.", s.content.replace("\n", " "))
               for s in subtitles)
    assert cli_main(["--target", punctuating_server, "transcribe", str(path), "--timestamps", "--format", "vtt"]) == 0
    check_rules(parse_vtt(capsys.readouterr().out))


def test_zero_length_and_overlapping_words_give_valid_cues() -> None:
    """Words with no duration, or sharing a start, still give cues that last (at least 1 ms, up to the minimum
    5/6 s when the next cue allows) and never overlap."""
    items = [ForcedAlignItem("a.", 1.0, 1.0), ForcedAlignItem("b.", 1.0, 1.0), ForcedAlignItem("c.", 3.0, 3.0)]
    result = ASRTranscription("English", "a. b. c.", ForcedAlignResult(items), [], 4.0)
    found = cues(result)
    assert [c.text for c in found] == ["a.", "b.", "c."]
    check_rules([(c.start_time, c.end_time, c.text) for c in found])
    assert found[2].end_time == pytest.approx(3.0 + MIN_CUE_S, abs=1e-3)
    check_rules(srt_timed(parse_srt(to_srt(result))))
    check_rules(parse_vtt(to_vtt(result)))


def test_a_long_segment_is_split_into_cues_within_the_limits() -> None:
    """One 25 s utterance with 300 characters: cues of at most 7 s and 2 x 42 characters, in order, time shared in
    proportion to the text."""
    text = " ".join(f"word{i}" for i in range(50))
    result = ASRTranscription("English", text, None, [Segment(2.0, 27.0, text, "English")], 30.0)
    found = cues(result)
    assert len(found) >= 4
    check_rules([(c.start_time, c.end_time, c.text) for c in found])
    assert " ".join(c.text.replace("\n", " ") for c in found) == text
    assert found[0].start_time == 2.0 and found[-1].end_time == pytest.approx(27.0, abs=1e-3)
    check_rules(srt_timed(parse_srt(to_srt(result))))


def test_cjk_text_keeps_its_punctuation_and_16_character_lines() -> None:
    """Chinese: the aligner times each character; cues keep the full-width punctuation and wrap at 16 a line."""
    text = "今天天气很好，我们去公园散步吧。明天见！"
    chars = [c for c in text if unicodedata.category(c)[0] == "L"]
    items = [ForcedAlignItem(c, 0.3 * i, 0.3 * i + 0.25) for i, c in enumerate(chars)]
    found = cues(ASRTranscription("Chinese", text, ForcedAlignResult(items), [], 6.0))
    assert [c.text.replace("\n", "") for c in found] == ["今天天气很好，我们去公园散步吧。", "明天见！"]
    assert all(len(line) <= 16 for c in found for line in c.text.split("\n"))
