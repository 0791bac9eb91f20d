import pytest

from asr_server.errors import InvalidInput
from asr_server.languages import ALIGNER_LANGUAGES, ASR_LANGUAGES, aligner_supports, resolve_language


@pytest.mark.parametrize(
    ("sent", "name"),
    [("English", "English"), ("english", "English"), ("EN", "English"), ("en-US", "English"), ("zh_CN", "Chinese"),
     ("yue", "Cantonese"), ("yue-Hant-HK", "Cantonese"), ("fil", "Filipino"), ("tl", "Filipino"), (" de ", "German")],
)
def test_names_codes_and_bcp47_tags_resolve_case_insensitively(sent: str, name: str) -> None:
    assert resolve_language(sent) == name


def test_empty_means_detect() -> None:
    assert resolve_language("") is None
    assert resolve_language("   ") is None


def test_unknown_language_lists_every_accepted_one() -> None:
    with pytest.raises(InvalidInput) as caught:
        resolve_language("Klingon")
    message = str(caught.value)
    assert "'Klingon'" in message
    for lang in ASR_LANGUAGES:
        assert f"{lang.name} ({lang.code})" in message


def test_thirty_languages_eleven_for_the_aligner() -> None:
    assert len(ASR_LANGUAGES) == 30 and len({lang.code for lang in ASR_LANGUAGES}) == 30
    assert len(ALIGNER_LANGUAGES) == 11
    assert aligner_supports("Japanese") and not aligner_supports("Arabic")
