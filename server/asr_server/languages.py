"""The languages Qwen3-ASR accepts, and how callers may name them."""

from __future__ import annotations

from dataclasses import dataclass

from asr_server.errors import InvalidInput, excerpt


@dataclass(frozen=True)
class Language:
    name: str  # canonical, as the model writes it after "language "
    code: str  # ISO 639


# The order is the model card's; the names are what the model was trained to see in "language {name}".
ASR_LANGUAGES: tuple[Language, ...] = (
    Language("Chinese", "zh"),
    Language("English", "en"),
    Language("Cantonese", "yue"),
    Language("Arabic", "ar"),
    Language("German", "de"),
    Language("French", "fr"),
    Language("Spanish", "es"),
    Language("Portuguese", "pt"),
    Language("Indonesian", "id"),
    Language("Italian", "it"),
    Language("Korean", "ko"),
    Language("Russian", "ru"),
    Language("Thai", "th"),
    Language("Vietnamese", "vi"),
    Language("Japanese", "ja"),
    Language("Turkish", "tr"),
    Language("Hindi", "hi"),
    Language("Malay", "ms"),
    Language("Dutch", "nl"),
    Language("Swedish", "sv"),
    Language("Danish", "da"),
    Language("Finnish", "fi"),
    Language("Polish", "pl"),
    Language("Czech", "cs"),
    Language("Filipino", "fil"),
    Language("Persian", "fa"),
    Language("Greek", "el"),
    Language("Romanian", "ro"),
    Language("Hungarian", "hu"),
    Language("Macedonian", "mk"),
)

ALIGNER_LANGUAGE_NAMES: frozenset[str] = frozenset(
    {
        "Chinese",
        "English",
        "Cantonese",
        "French",
        "German",
        "Italian",
        "Japanese",
        "Korean",
        "Portuguese",
        "Russian",
        "Spanish",
    }
)

ALIGNER_LANGUAGES: tuple[Language, ...] = tuple(lang for lang in ASR_LANGUAGES if lang.name in ALIGNER_LANGUAGE_NAMES)

# Other spellings callers send: ISO 639-2/3 codes, and "tl" (Tagalog) which most systems use for Filipino.
_ALIASES: dict[str, str] = {
    "zho": "Chinese",
    "chi": "Chinese",
    "cmn": "Chinese",
    "eng": "English",
    "deu": "German",
    "ger": "German",
    "fra": "French",
    "fre": "French",
    "spa": "Spanish",
    "por": "Portuguese",
    "jpn": "Japanese",
    "kor": "Korean",
    "rus": "Russian",
    "ara": "Arabic",
    "tl": "Filipino",
    "tgl": "Filipino",
    "mandarin": "Chinese",
}

_BY_KEY: dict[str, str] = {
    **{lang.name.lower(): lang.name for lang in ASR_LANGUAGES},
    **{lang.code: lang.name for lang in ASR_LANGUAGES},
    **_ALIASES,
}


def accepted_languages_text() -> str:
    return ", ".join(f"{lang.name} ({lang.code})" for lang in ASR_LANGUAGES)


def resolve_language(value: str) -> str | None:
    """Canonical name for what a caller sent; None for empty (auto-detect).

    Case-insensitive names and codes; a BCP-47 tag ("en-US", "zh_CN", "yue-Hant-HK") is read by its primary
    subtag, since the model knows languages, not regions.
    """
    key = value.strip().lower()
    if not key:
        return None
    name = _BY_KEY.get(key)
    if name is None:
        primary = key.replace("_", "-").split("-", 1)[0]
        name = _BY_KEY.get(primary)
    if name is None:
        raise InvalidInput(
            f"unknown language {excerpt(value)}; accepted (case-insensitive, name or ISO 639 code, empty to detect): "
            f"{accepted_languages_text()}"
        )
    return name


def aligner_supports(language_name: str) -> bool:
    return language_name in ALIGNER_LANGUAGE_NAMES


# BCP-47 for "undetermined": a name the model wrote that is not one of the 30 (results pass names through as the
# model writes them).
UNDETERMINED_CODE = "und"
_CODE_BY_NAME: dict[str, str] = {lang.name: lang.code for lang in ASR_LANGUAGES}


def split_languages(merged: str) -> tuple[str, ...]:
    """The names of a result's language, in order: "Chinese,English" -> ("Chinese", "English"); "" -> ()."""
    return tuple(name for name in (part.strip() for part in merged.split(",")) if name)


def language_code(name: str) -> str:
    """The BCP-47 code of one canonical name ("English" -> "en"); "und" for an unknown name, "" for none. The ISO
    639 codes of the 30 languages are valid BCP-47 primary subtags; results name no region, as the model knows
    none."""
    if not name.strip():
        return ""
    canonical = _BY_KEY.get(name.strip().lower())
    return _CODE_BY_NAME[canonical] if canonical is not None else UNDETERMINED_CODE


def language_codes(merged: str) -> tuple[str, ...]:
    """The codes of a result's language, entry for entry with `split_languages(merged)`."""
    return tuple(language_code(name) for name in split_languages(merged))
