"""Results carry BCP-47 codes beside the language names, one entry per language for merged transcripts."""

from __future__ import annotations

from asr_server.edge.convert import stream_result_to_pb, transcript_to_pb
from asr_server.languages import ASR_LANGUAGES, language_code, language_codes, split_languages
from asr_server.results import Segment
from asr_server.streaming.session import StreamResult
from asr_server.transcription import merge_segments


def test_every_language_has_its_iso_code_and_unknown_names_are_undetermined() -> None:
    assert [language_code(lang.name) for lang in ASR_LANGUAGES] == [lang.code for lang in ASR_LANGUAGES]
    assert language_code("Cantonese") == "yue"
    assert language_code("english") == "en"
    assert language_code("Shanghainese") == "und"
    assert language_code("") == ""


def test_merged_languages_split_entry_for_entry() -> None:
    assert split_languages("Chinese,English") == ("Chinese", "English")
    assert language_codes("Chinese,English") == ("zh", "en")
    assert split_languages("") == ()
    assert language_codes("") == ()


def test_a_transcript_of_chinese_then_english_segments_lists_both_with_codes() -> None:
    segments = [
        Segment(0, 1000, "你好", "Chinese"),
        Segment(1000, 2000, "hello", "English"),
        Segment(2000, 3000, "world", "English"),
        Segment(3000, 3500, "", ""),
    ]
    msg = transcript_to_pb(merge_segments(0, segments, timestamps_requested=False))
    assert msg.language == "Chinese,English"
    assert msg.language_code == "zh,en"
    assert list(msg.languages) == ["Chinese", "English"]
    assert list(msg.language_codes) == ["zh", "en"]
    assert [s.language_code for s in msg.segments] == ["zh", "en", "en", ""]


def test_a_transcript_without_speech_has_no_language_at_all() -> None:
    msg = transcript_to_pb(merge_segments(0, [Segment(0, 1000, "", "")], timestamps_requested=False))
    assert (msg.language, msg.language_code, list(msg.languages), list(msg.language_codes)) == ("", "", [], [])


def test_streaming_results_carry_the_code() -> None:
    result = StreamResult(True, 0, 0, "bonjour", "French", 1.0, 0, 900, 900)
    assert stream_result_to_pb(result).language_code == "fr"


def test_the_python_client_exposes_the_codes_and_confidence() -> None:
    from asr_client.results import streaming_result_from_pb, transcription_from_pb
    from qwenasr.v1 import asr_pb2 as pb

    response = pb.TranscribeResponse(
        transcripts=[
            pb.Transcript(
                text="你好 hello",
                language="Chinese,English",
                language_code="zh,en",
                confidence=0.75,
                segments=[pb.Segment(text="你好", language="Chinese", language_code="zh", confidence=0.5)],
            )
        ]
    )
    result = transcription_from_pb(response, time_stamps=False)
    assert (result.language_code, result.segments[0].language_code) == ("zh,en", "zh")
    assert (result.confidence, result.segments[0].confidence) == (0.75, 0.5)
    streamed = pb.StreamingRecognizeResponse(
        result=pb.StreamingResult(language="French", language_code="fr", confidence=0.25)
    )
    got = streaming_result_from_pb(streamed, time_stamps=False)
    assert (got.language_code, got.confidence) == ("fr", 0.25)
