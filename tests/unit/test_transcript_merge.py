import pytest

from asr_server.transcript_merge import join_texts, merge_languages


@pytest.mark.parametrize(
    ("langs", "merged"),
    [
        (["Chinese", "English", "English"], "Chinese,English"),
        (["English", "", "English"], "English"),
        (["Chinese", "English", "Chinese"], "Chinese,English,Chinese"),
        (["Chinese,English", "English", "French"], "Chinese,English,French"),
        (["", ""], ""),
        ([], ""),
        ([" English ", "English"], "English"),
    ],
)
def test_merge_languages(langs: list[str], merged: str) -> None:
    assert merge_languages(langs) == merged


@pytest.mark.parametrize(
    ("texts", "languages", "joined"),
    [
        (["hello", "world"], ["English", "English"], "hello world"),
        (["hello ", "world"], ["English", "English"], "hello world"),
        (["hello", " world"], ["English", "English"], "hello world"),
        (["你好", "世界"], ["Chinese", "Chinese"], "你好世界"),
        (["今天天气很好。", "我们出去吧"], ["Chinese", "Chinese"], "今天天气很好。我们出去吧"),
        (["I bought an", "iPhone"], ["English", "English"], "I bought an iPhone"),
        (["我买了", "iPhone"], ["Chinese", "English"], "我买了iPhone"),
        (["iPhone", "很好用"], ["English", "Chinese"], "iPhone很好用"),
        (["Hello.", "你好"], ["English", "Chinese"], "Hello.你好"),
        (["こんにちは", "世界"], ["Japanese", "Japanese"], "こんにちは世界"),
        (["สวัสดี", "ครับ"], ["Thai", "Thai"], "สวัสดีครับ"),
        (["안녕하세요", "반갑습니다"], ["Korean", "Korean"], "안녕하세요 반갑습니다"),
        (["Привет", "мир"], ["Russian", "Russian"], "Привет мир"),
        (["and so", ", we left"], ["English", "English"], "and so, we left"),
        (["the end", "."], ["English", "English"], "the end."),
        (["he said (", "quietly)"], ["English", "English"], "he said (quietly)"),
        (["it is 100", "200 km"], ["English", "English"], "it is 100 200 km"),
        (["价格是100", "200元"], ["Chinese", "Chinese"], "价格是100200元"),
        (["one", "", "two"], ["English", "", "English"], "one two"),
        (["", "only"], ["", "English"], "only"),
        (["a", "b", "c"], ["French", "French", "French"], "a b c"),
        ([], [], ""),
    ],
)
def test_join_texts(texts: list[str], languages: list[str], joined: str) -> None:
    assert join_texts(texts, languages) == joined


def test_join_texts_needs_one_language_per_text() -> None:
    with pytest.raises(ValueError, match="one language per text"):
        join_texts(["a", "b"], ["English"])
