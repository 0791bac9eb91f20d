"""SRT and WebVTT subtitles from a transcription: cues from word timestamps when present, else from segments."""

from __future__ import annotations

from dataclasses import dataclass

from asr_client.results import ASRTranscription, ForcedAlignItem

MAX_LINE_CHARS = 42  # two lines of this per cue, the usual subtitle limit
MAX_CUE_S = 7.0
MAX_GAP_S = 1.0
_SENTENCE_END = tuple(".!?。！？")


@dataclass(frozen=True)
class Cue:
    start_time: float
    end_time: float
    text: str


def timestamp(seconds: float, *, decimal: str) -> str:
    """HH:MM:SS,mmm (SRT, decimal=",") or HH:MM:SS.mmm (WebVTT, decimal=".")."""
    total_ms = max(0, int(round(seconds * 1000)))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x3000 <= code <= 0x30FF  # CJK punctuation, hiragana, katakana
        or 0x3400 <= code <= 0x4DBF
        or 0x4E00 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
        or 0x20000 <= code <= 0x2FFFF
    )


def join_words(words: list[str]) -> str:
    """Words joined by spaces, except between two CJK characters (the aligner times those one by one)."""
    text = ""
    for word in words:
        if text and word and not (_is_cjk(text[-1]) and _is_cjk(word[0])):
            text += " "
        text += word
    return text


def _wrap(text: str) -> str:
    """At most two lines: split a long cue at the space nearest its middle."""
    if len(text) <= MAX_LINE_CHARS or " " not in text:
        return text
    middle = len(text) // 2
    spaces = [i for i, c in enumerate(text) if c == " "]
    split = min(spaces, key=lambda i: abs(i - middle))
    return text[:split] + "\n" + text[split + 1 :]


def _word_cues(items: list[ForcedAlignItem]) -> list[Cue]:
    cues: list[Cue] = []
    current: list[ForcedAlignItem] = []

    def flush() -> None:
        if current:
            cues.append(Cue(current[0].start_time, current[-1].end_time, join_words([w.text for w in current])))
            current.clear()

    for word in items:
        if current:
            last = current[-1]
            too_long = word.end_time - current[0].start_time > MAX_CUE_S
            too_wide = len(join_words([w.text for w in current] + [word.text])) > 2 * MAX_LINE_CHARS
            if too_long or too_wide or word.start_time - last.end_time > MAX_GAP_S or last.text.endswith(_SENTENCE_END):
                flush()
        current.append(word)
    flush()
    return cues


def cues(transcription: ASRTranscription) -> list[Cue]:
    """The subtitle cues of one transcription, in time order."""
    if transcription.time_stamps:
        found = _word_cues(list(transcription.time_stamps))
    elif transcription.segments:
        found = [Cue(s.start_time, s.end_time, s.text.strip()) for s in transcription.segments]
    else:
        found = [Cue(0.0, transcription.duration, transcription.text.strip())]
    return [Cue(c.start_time, max(c.end_time, c.start_time), _wrap(c.text)) for c in found if c.text]


def to_srt(transcription: ASRTranscription) -> str:
    blocks = [
        f"{i}\n{timestamp(c.start_time, decimal=',')} --> {timestamp(c.end_time, decimal=',')}\n{c.text}\n"
        for i, c in enumerate(cues(transcription), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcription: ASRTranscription) -> str:
    blocks = [
        f"{timestamp(c.start_time, decimal='.')} --> {timestamp(c.end_time, decimal='.')}\n{c.text}\n"
        for c in cues(transcription)
    ]
    return "\n".join(["WEBVTT\n", *blocks])
