"""SRT and WebVTT subtitles from a transcription.

Where the cues come from:

* with word timestamps (`return_time_stamps=True`, `asr-client --timestamps`): from the words. The forced aligner's
  words carry no punctuation, so each is mapped back onto the transcript text (its letters and digits in order)
  and a cue shows the transcript's own text from its first word to its last, punctuation and case included;
* without them: from the transcript's segments. `asr-client` asks the server for endpointing for subtitle formats,
  so a segment is one utterance between pauses; a segment over the limits below is split into cues at word
  boundaries, its time shared out in proportion to the characters;
* with neither: one cue over the whole audio, split the same way.

Cue rules (the common broadcast and streaming guidelines, e.g. the BBC's and Netflix's timed-text style guides):

* at most `MAX_CUE_S` (7 s) on screen; at least `MIN_CUE_S` (5/6 s, 20 frames at 24 fps) unless the next cue starts
  sooner; never zero-length, never overlapping the next cue;
* at most two lines of `MAX_LINE_CHARS` (42) characters, `MAX_CJK_LINE_CHARS` (16) for Chinese, Japanese and
  Korean text, a long cue broken into two lines at the space nearest its middle (CJK: at its middle);
* a new cue after a sentence end (. ! ? and their full-width forms) and at a pause over `MAX_GAP_S` (1 s).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from asr_client.results import ASRTranscription, ForcedAlignItem

MAX_LINE_CHARS = 42
MAX_CJK_LINE_CHARS = 16
MAX_LINES = 2
MAX_CUE_S = 7.0
MIN_CUE_S = 5 / 6
MAX_GAP_S = 1.0
_SENTENCE_END = tuple(".!?…。！？")


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


def _is_kept(char: str) -> bool:
    """What the forced aligner keeps of a word: letters, digits and the apostrophe."""
    return char == "'" or unicodedata.category(char)[0] in "LN"


def join_words(words: list[str]) -> str:
    """Words joined by spaces, except between two CJK characters (the aligner times those one by one)."""
    text = ""
    for word in words:
        if text and word and not (_is_cjk(text[-1]) and _is_cjk(word[0])):
            text += " "
        text += word
    return text


def _is_wide(char: str) -> bool:
    """Characters that subtitle guidelines count double-width: CJK and Hangul."""
    return _is_cjk(char) or 0xAC00 <= ord(char) <= 0xD7AF


def line_limit(text: str) -> int:
    letters = [c for c in text if not c.isspace()]
    cjk = sum(1 for c in letters if _is_wide(c))
    return MAX_CJK_LINE_CHARS if letters and cjk * 2 > len(letters) else MAX_LINE_CHARS


def wrap(text: str) -> str:
    """At most two lines: a cue longer than one line is broken at the space nearest its middle (CJK text without
    spaces: at its middle)."""
    if len(text) <= line_limit(text):
        return text
    middle = len(text) // 2
    spaces = [i for i, c in enumerate(text) if c == " "]
    if not spaces:
        return text[:middle] + "\n" + text[middle:]
    split = min(spaces, key=lambda i: abs(i - middle))
    return text[:split] + "\n" + text[split + 1 :]


@dataclass(frozen=True)
class _Span:
    """Where a timed word is shown from in the transcript text: [start, end) with its punctuation."""

    start: int
    end: int


def word_spans(text: str, words: list[str]) -> list[_Span] | None:
    """Each aligner word's place in `text`, punctuation attached (trailing to the word before a space, leading
    such as an opening quote to the word after it); None when the words do not follow the text's letters."""
    positions = [i for i, c in enumerate(text) if _is_kept(c)]
    kept = "".join(text[i] for i in positions).casefold()
    cursor = 0
    bare: list[tuple[int, int]] = []
    for word in words:
        cleaned = "".join(c for c in word if _is_kept(c)).casefold()
        if not cleaned:
            return None
        found = kept.find(cleaned, cursor)
        if found < 0:
            return None
        cursor = found + len(cleaned)
        bare.append((positions[found], positions[cursor - 1] + 1))
    if not bare:
        return []
    starts = [start for start, _ in bare]
    ends = [end for _, end in bare]
    # Punctuation right before the first word (an opening quote) and right after the last belong to them.
    lead_spaces = [j for j, c in enumerate(text[: starts[0]]) if c.isspace()]
    starts[0] = lead_spaces[-1] + 1 if lead_spaces else 0
    for i in range(len(bare) - 1):
        gap = text[ends[i] : starts[i + 1]]
        spaces = [j for j, c in enumerate(gap) if c.isspace()]
        if spaces:
            starts[i + 1] = ends[i] + spaces[-1] + 1
            ends[i] = ends[i] + spaces[0]
        else:
            ends[i] = starts[i + 1]
    tail = text[ends[-1] :]
    ends[-1] += next((j for j, c in enumerate(tail) if c.isspace()), len(tail))
    return [_Span(s, e) for s, e in zip(starts, ends, strict=True)]


def _word_cues(transcript: str, items: list[ForcedAlignItem]) -> list[Cue]:
    spans = word_spans(transcript, [w.text for w in items])
    shown = [" ".join(transcript[s.start : s.end].split()) for s in spans] if spans else [w.text for w in items]
    cues: list[Cue] = []
    current: list[int] = []

    def cue_text(indices: list[int]) -> str:
        if spans:
            return " ".join(transcript[spans[indices[0]].start : spans[indices[-1]].end].split())
        return join_words([shown[i] for i in indices])

    for index, word in enumerate(items):
        if current:
            first, last = items[current[0]], items[current[-1]]
            widened = cue_text([*current, index])
            if (
                word.end_time - first.start_time > MAX_CUE_S
                or len(widened) > MAX_LINES * line_limit(widened)
                or word.start_time - last.end_time > MAX_GAP_S
                or shown[current[-1]].endswith(_SENTENCE_END)
            ):
                cues.append(Cue(first.start_time, last.end_time, cue_text(current)))
                current = []
        current.append(index)
    if current:
        cues.append(Cue(items[current[0]].start_time, items[current[-1]].end_time, cue_text(current)))
    return cues


def _split_text(text: str, parts: int) -> list[str]:
    """`text` in at most `parts` pieces of about equal length, cut at spaces (CJK text without spaces: between any
    two characters)."""
    if parts <= 1:
        return [text]
    by_character = " " not in text and line_limit(text) == MAX_CJK_LINE_CHARS
    tokens = list(text) if by_character else text.split(" ")
    glue = "" if by_character else " "
    target = len(text) / parts
    pieces: list[str] = []
    current: list[str] = []
    for token in tokens:
        candidate = glue.join([*current, token])
        if current and len(candidate) > target and len(pieces) < parts - 1:
            pieces.append(glue.join(current))
            current = [token]
        else:
            current.append(token)
    pieces.append(glue.join(current))
    return [p for p in pieces if p]


def _timed_text_cues(start_s: float, end_s: float, text: str) -> list[Cue]:
    """One span of audio with its text as cues within the limits, time shared in proportion to characters."""
    text = " ".join(text.split())
    if not text:
        return []
    limit = MAX_LINES * line_limit(text)
    parts = max(math.ceil(len(text) / limit), math.ceil(max(end_s - start_s, 0.0) / MAX_CUE_S), 1)
    pieces = _split_text(text, parts)
    while any(len(p) > limit for p in pieces) and parts < len(text):
        parts += 1
        pieces = _split_text(text, parts)
    total = sum(len(p) for p in pieces)
    cues = []
    position = start_s
    for piece in pieces:
        length_s = (end_s - start_s) * len(piece) / total
        cues.append(Cue(position, position + length_s, piece))
        position += length_s
    return cues


def _fix_times(cues: list[Cue]) -> list[Cue]:
    """In whole milliseconds: no overlap, at least MIN_CUE_S unless the next cue starts sooner, at most MAX_CUE_S,
    never zero-length."""
    ordered = sorted(cues, key=lambda c: c.start_time)
    min_ms, max_ms = round(MIN_CUE_S * 1000), round(MAX_CUE_S * 1000)
    fixed: list[tuple[int, int, str]] = []
    for index, cue in enumerate(ordered):
        start = round(cue.start_time * 1000)
        if fixed:
            start = max(start, fixed[-1][1])
        end = min(max(round(cue.end_time * 1000), start + min_ms), start + max_ms)
        if index + 1 < len(ordered):
            next_start = round(ordered[index + 1].start_time * 1000)
            if end > next_start:
                end = max(next_start, start + 1)
        fixed.append((start, end, cue.text))
    return [Cue(start / 1000, end / 1000, text) for start, end, text in fixed]


def cues(transcription: ASRTranscription) -> list[Cue]:
    """The subtitle cues of one transcription, in time order (see the module doc for the rules)."""
    if transcription.time_stamps:
        found = _word_cues(transcription.text, list(transcription.time_stamps))
    elif transcription.segments:
        found = [c for s in transcription.segments for c in _timed_text_cues(s.start_time, s.end_time, s.text)]
    else:
        found = _timed_text_cues(0.0, transcription.duration, transcription.text)
    return [Cue(c.start_time, c.end_time, wrap(c.text)) for c in _fix_times([c for c in found if c.text.strip()])]


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
