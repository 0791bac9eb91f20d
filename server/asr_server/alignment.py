"""The Align RPC's use case: a known transcript timed in audio by the forced aligner.

The same aligner path as word timestamps (`Transcriber.align_piece`: the sidecar's queue and batcher), with the
checks a caller-supplied text needs before any work starts. Every refusal names what is accepted:
- no aligner configured: FailedPrecondition, as word timestamps;
- an empty, unknown or uncovered language, an empty text, a text over its limits: InvalidInput;
- audio longer than the aligner's per-request length (`--max-chunk-with-timestamps-s`, the limit word timestamps
  chunk at): LimitExceeded. It is refused, not split: the words of a known text cannot be assigned to chunks
  without aligning them first, and a wrong cut would misplace every word after it.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

from asr_server.audio.decode import DecodedAudio
from asr_server.errors import FailedPrecondition, InvalidInput, LimitExceeded, excerpt
from asr_server.languages import ALIGNER_LANGUAGES, aligner_supports, resolve_language
from asr_server.results import Word, WordTimestampsStatus
from asr_server.transcription import Transcriber

# The aligner's time resolution: one class per 80 ms (5000 classes span 400 s). More words than 80 ms steps
# cannot get distinct times.
ALIGNER_STEP_MS = 80
MAX_TEXT_BYTES = 65536
# Splitters that cut text without spaces into words (nagisa, soynlp): each character may become a word.
_PER_CHARACTER_LANGUAGES = frozenset({"Japanese", "Korean"})


@dataclass(frozen=True)
class AlignText:
    """A checked Align request's text: the transcript and its canonical aligner language."""

    text: str
    language: str


@dataclass(frozen=True)
class TextAlignment:
    words: tuple[Word, ...]
    status: WordTimestampsStatus
    audio_duration_ms: int
    alignment_ms: float
    total_ms: float


def accepted_aligner_languages() -> str:
    return ", ".join(f"{lang.name} ({lang.code})" for lang in ALIGNER_LANGUAGES)


def check_align_text(text: str, language: str, *, has_aligner: bool) -> AlignText:
    """The checks that need no audio, in the order a caller fixes them (an aligner first, then the request)."""
    if not has_aligner:
        raise FailedPrecondition(
            "Align needs the forced aligner, and this server runs without one; "
            "start it with --aligner-model (e.g. Qwen/Qwen3-ForcedAligner-0.6B-hf)"
        )
    accepted = f"accepted (name or ISO 639 code, case-insensitive): {accepted_aligner_languages()}"
    if not language.strip():
        raise InvalidInput(f"Align needs the transcript's language; {accepted}")
    try:
        name = resolve_language(language)
    except InvalidInput as exc:
        raise InvalidInput(f"unknown language {excerpt(language)}; {accepted}") from exc
    if name is None or not aligner_supports(name):
        raise InvalidInput(f"the forced aligner does not cover {name or excerpt(language)}; {accepted}")
    if not text.strip():
        raise InvalidInput("Align needs the transcript to time: text is empty")
    text_bytes = len(text.encode("utf-8"))
    if text_bytes > MAX_TEXT_BYTES:
        raise InvalidInput(f"text of {text_bytes} bytes is longer than Align's limit of {MAX_TEXT_BYTES} UTF-8 bytes")
    return AlignText(text, name)


def max_words(text: str, language: str) -> int:
    """How many words the aligner's splitter (transformers' `split_words_for_alignment`) makes of `text`: exactly,
    for the default splitter (each CJK ideograph alone, the letters and digits between spaces and ideographs as one
    word); for Japanese and Korean, whose splitters cut unspaced text, an upper bound (every kept character)."""
    if language in _PER_CHARACTER_LANGUAGES:
        return sum(1 for ch in text if _is_kept(ch))
    count = 0
    in_word = False
    for ch in text:
        if _is_cjk(ch):
            count += 1
            in_word = False
        elif ch.isspace():
            in_word = False
        elif _is_kept(ch) and not in_word:
            count += 1
            in_word = True
    return count


# The CJK ideograph blocks the reference splitter emits one character at a time (transformers' `_is_cjk_char`).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    codepoint = ord(ch)
    return any(low <= codepoint <= high for low, high in _CJK_RANGES)


def _is_kept(ch: str) -> bool:
    # What the reference keeps of a word: letters, digits, apostrophes (punctuation is dropped).
    category = unicodedata.category(ch)
    return ch == "'" or category[0] in "LN" or _is_cjk(ch)


def check_align_audio(checked: AlignText, duration_ms: int, *, max_audio_s: float) -> None:
    """The checks against the decoded audio's length."""
    if duration_ms > max_audio_s * 1000:
        raise LimitExceeded(
            f"audio of {duration_ms / 1000:.1f} s is longer than Align's limit of {max_audio_s:g} s "
            "(ServerLimits.max_chunk_duration_with_timestamps_s, --max-chunk-with-timestamps-s); Align does not "
            "split a known text: cut the audio and its text at pauses and align each piece"
        )
    words = max_words(checked.text, checked.language)
    limit = max(1, duration_ms // ALIGNER_STEP_MS)
    if words > limit:
        raise InvalidInput(
            f"text of up to {words} words is too long for {duration_ms} ms of audio: the aligner times at most one "
            f"word per {ALIGNER_STEP_MS} ms ({limit} words here)"
        )


async def align_text(
    transcriber: Transcriber, audio: DecodedAudio, checked: AlignText, *, max_audio_s: float, started_s: float
) -> TextAlignment:
    """Times `checked.text` in `audio` (downmixed). `started_s`: the call's start (time.perf_counter)."""
    duration_ms = audio.duration_ms
    check_align_audio(checked, duration_ms, max_audio_s=max_audio_s)
    piece = await transcriber.align_piece(audio.downmix(), checked.text, checked.language, 0)
    status = piece.status if piece.words else WordTimestampsStatus.NO_TEXT
    return TextAlignment(
        words=piece.words,
        status=status,
        audio_duration_ms=duration_ms,
        alignment_ms=piece.alignment_ms,
        total_ms=(time.perf_counter() - started_s) * 1000,
    )
