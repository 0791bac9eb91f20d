"""The continuous engine's per-stream encoder cache (engine/continuous/stream_cache.py), tiny checkpoint, fp32,
CPU, torch features: growing prefixes of one utterance decoded with a stream key give token for token what each
prefix gives decoded alone; a louder sound arriving late (the clamp floor rises) invalidates what it must; the
audio encoded per interim stays bounded (this fails with the cache off); entries are freed and bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.continuous.features import TorchFeatureExtractor
from asr_server.engine.continuous.stream_cache import CachedPrefix, CachedWindow, StreamEncoderCache
from asr_server.engine.core import EngineOutput
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, DecodeResult, WorkItem
from asr_server.models.loading import LoadedAsrModel, load_asr_model

_RATE = 16000
_OPTIONS = DecodeOptions(language=None, context="", max_new_tokens=6)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _engine(loaded: LoadedAsrModel, **cache: Any) -> ContinuousEngine:
    config = ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=8192, features="torch", **cache)
    return ContinuousEngine(loaded, config)


def _utterance(seconds: float, seed: int, *, loud_at_s: float | None = None) -> np.ndarray[Any, Any]:
    """Noise with a tone in its first 0.25 s (the clip's maximum is there, so the floor stays put) and a
    near-silent stretch in every 8 s window (frames far below any floor, so a floor change matters there);
    with `loud_at_s`, the same tone 5x louder there (the floor rises)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * _RATE)
    audio = 0.05 * rng.standard_normal(n)
    t = np.arange(n) / _RATE
    audio[: _RATE // 4] += 0.2 * np.sin(2 * np.pi * 1000 * t[: _RATE // 4])
    for start_s in range(2, int(seconds), 8):
        audio[start_s * _RATE : start_s * _RATE + _RATE // 2] *= 1e-4
    if loud_at_s is not None:
        begin = int(loud_at_s * _RATE)
        audio[begin : begin + _RATE // 2] = 0.99 * np.sin(2 * np.pi * 1000 * t[begin : begin + _RATE // 2])
    return audio.astype(np.float32)


def _drain(engine: ContinuousEngine) -> Iterator[EngineOutput]:
    while engine.num_waiting() or engine.num_running():
        yield from engine.step()


def _decode_result(engine: ContinuousEngine, request: DecodeRequest) -> DecodeResult:
    engine.add(WorkItem(request, time.time_ns(), time.monotonic()))
    outputs = list(_drain(engine))
    assert len(outputs) == 1 and outputs[0].error is None, outputs
    assert outputs[0].result is not None
    return outputs[0].result


def _decode(engine: ContinuousEngine, request: DecodeRequest) -> tuple[int, ...]:
    return _decode_result(engine, request).token_ids


def _pieces(
    engine: ContinuousEngine,
    audio: np.ndarray[Any, Any],
    cut_s: list[float],
    key: str | None,
    prefix_text: str = "",
) -> list[tuple[DecodeResult, float, int]]:
    """Interims of the growing prefixes (from the third on continuing `prefix_text`, as the session's interims
    continue the previous one's text), then the final of the whole audio; (result, audio s encoded, prompt tokens
    prefilled) each."""
    out = []
    pieces = [(audio[: int(s * _RATE)], DecodePriority.INTERIM) for s in cut_s] + [(audio, DecodePriority.FINAL)]
    for i, (piece, priority) in enumerate(pieces):
        rid = f"{key or 'alone'}-{i}"
        prefix = prefix_text if priority is DecodePriority.INTERIM and i >= 2 else ""
        request = DecodeRequest(rid, piece, _OPTIONS, priority=priority, stream_key=key, prefix_text=prefix)
        result = _decode_result(engine, request)
        out.append((result, engine.encoded_audio_s[rid], engine.prefilled_tokens[rid]))
    return out


def _prefixes(
    engine: ContinuousEngine, audio: np.ndarray[Any, Any], cut_s: list[float], key: str | None
) -> list[tuple[tuple[int, ...], float]]:
    return [(result.token_ids, encoded) for result, encoded, _ in _pieces(engine, audio, cut_s, key)]


@pytest.mark.parametrize("max_step_tokens", [0, 96], ids=["whole-prefill", "chunked-prefill"])
def test_growing_prefixes_with_the_cache_equal_each_prefix_alone(loaded: LoadedAsrModel, max_step_tokens: int) -> None:
    """With chunked prefill a prompt's windows are encoded over several steps, cached ones skipped."""
    audio = _utterance(26.0, seed=1)
    cuts = [3.0, 9.0, 17.0, 25.0]
    alone = _prefixes(_engine(loaded), audio, cuts, None)
    engine = _engine(loaded, max_step_tokens=max_step_tokens)
    keyed = _prefixes(engine, audio, cuts, "s1/0/0")
    assert [t for t, _ in keyed] == [t for t, _ in alone]
    # Alone, every piece encodes all its audio; keyed, the windows completed (with the STFT's reach) in the
    # previous piece are reused: 17 s reuses window 0 (stable at 9 s), 25 s windows 0-1, the final 0-2.
    assert [round(s, 2) for _, s in alone] == [3.0, 9.0, 17.0, 25.0, 26.0]
    assert [round(s, 2) for _, s in keyed] == [3.0, 9.0, 9.0, 9.0, 2.0]
    assert engine.stream_cache.hits == 1 + 2 + 3
    if max_step_tokens:
        assert engine.prefill_chunks > len(keyed)  # the long prompts did span steps
    assert "s1/0/0" not in engine.stream_cache  # freed with the final


def test_a_louder_sound_arriving_late_invalidates_the_windows_under_the_new_floor(loaded: LoadedAsrModel) -> None:
    audio = _utterance(26.0, seed=2, loud_at_s=20.0)
    cuts = [9.0, 17.0, 25.0]
    # The burst really changes window 0's features (its near-silent frames sit under the new floor): reusing its
    # encoder output would be wrong.
    extractor = TorchFeatureExtractor(loaded.processor, n_window=50)
    before = extractor([audio[: 17 * _RATE]]).input_features[0, :, :800]
    after = extractor([audio[: 25 * _RATE]]).input_features[0, :, :800]
    assert not torch.equal(before, after)
    alone = _prefixes(_engine(loaded), audio, cuts, None)
    engine = _engine(loaded)
    keyed = _prefixes(engine, audio, cuts, "s2/0/0")
    assert [t for t, _ in keyed] == [t for t, _ in alone]
    # 17 s reuses window 0; 25 s (after the burst, new floor) recomputes windows 0 and 1; the final (same floor
    # as 25 s) reuses windows 0-2.
    assert [round(s, 2) for _, s in keyed] == [9.0, 9.0, 25.0, 2.0]
    assert engine.stream_cache.misses >= 2


def _interims(loaded: LoadedAsrModel, **cache: Any) -> list[tuple[float, int]]:
    """Interims every 2 s of a 40 s utterance: (audio s encoded, prompt tokens prefilled) each."""
    engine = _engine(loaded, **cache)
    audio = _utterance(40.0, seed=3)
    work = []
    for i, end_s in enumerate(range(2, 41, 2)):
        rid = f"i{i}"
        request = DecodeRequest(
            rid, audio[: end_s * _RATE], _OPTIONS, priority=DecodePriority.INTERIM, stream_key="s3/0/0"
        )
        _decode(engine, request)
        work.append((engine.encoded_audio_s[rid], engine.prefilled_tokens[rid]))
    return work


def _interims_encoded_s(loaded: LoadedAsrModel, enabled: bool) -> list[float]:
    return [s for s, _ in _interims(loaded, stream_cache_max_streams=1024 if enabled else 0)]


def test_audio_encoded_per_interim_stays_bounded(loaded: LoadedAsrModel) -> None:
    """Interims every 2 s of a 40 s utterance: each encodes at most one window, the interval and the open
    remainder (<= 8 + 2 + 8 s), however long the utterance grew."""
    bound_s = 8.0 + 2.0 + 8.0
    encoded = _interims_encoded_s(loaded, enabled=True)
    assert max(encoded) <= bound_s, encoded
    assert max(encoded[-4:]) <= bound_s
    # The same test with the cache off fails: per-interim work grows with the utterance.
    off = _interims_encoded_s(loaded, enabled=False)
    assert max(off) == pytest.approx(40.0)
    assert max(off) > bound_s


def test_entries_are_freed_by_the_final_an_aborted_final_and_idleness(loaded: LoadedAsrModel) -> None:
    engine = _engine(loaded, stream_cache_idle_s=30.0)
    audio = _utterance(10.0, seed=4)
    cache = engine.stream_cache
    _decode(engine, DecodeRequest("a", audio, _OPTIONS, priority=DecodePriority.INTERIM, stream_key="k1"))
    assert "k1" in cache and cache.nbytes > 0
    # An aborted interim frees nothing (the session cancels it as the utterance closes; the final reuses it).
    engine.add(WorkItem(DecodeRequest("b", audio, _OPTIONS, priority=DecodePriority.INTERIM, stream_key="k1"), 0, 0))
    engine.abort("b")
    assert "k1" in cache
    # An aborted final (the stream was cancelled) frees the entry, and a late interim cannot store it again.
    engine.add(WorkItem(DecodeRequest("c", audio, _OPTIONS, priority=DecodePriority.FINAL, stream_key="k1"), 0, 0))
    engine.abort("c")
    assert "k1" not in cache and cache.nbytes == 0
    _decode(engine, DecodeRequest("d", audio, _OPTIONS, priority=DecodePriority.INTERIM, stream_key="k1"))
    assert "k1" not in cache
    # A stream that ended with no final: freed once idle.
    _decode(engine, DecodeRequest("e", audio, _OPTIONS, priority=DecodePriority.INTERIM, stream_key="k2"))
    assert "k2" in cache
    cache.expire(time.monotonic() + 31.0)
    assert "k2" not in cache and len(cache) == 0 and cache.nbytes == 0
    # Unkeyed requests never store anything.
    _decode(engine, DecodeRequest("f", audio, _OPTIONS))
    assert len(cache) == 0


def _window(nbytes: int) -> CachedWindow:
    return CachedWindow(b"d", 0.0, -1.0, torch.zeros(nbytes // 4, dtype=torch.float32))


def test_the_cache_keeps_to_its_bounds() -> None:
    cache = StreamEncoderCache(max_streams=2, max_windows=2, max_bytes=10_000, idle_s=60.0)
    cache.store("a", {0: _window(1000), 1: _window(1000), 2: _window(1000)}, 0.0)
    assert cache.nbytes == 2000  # two windows per utterance at most
    cache.store("b", {0: _window(1000)}, 1.0)
    cache.store("c", {0: _window(1000)}, 2.0)  # three utterances: the least recently used goes
    assert "a" not in cache and len(cache) == 2 and cache.nbytes == 2000
    cache.get("b", 0, 3.0)  # b used: c is now the oldest
    cache.store("d", {0: _window(4000), 1: _window(4000)}, 4.0)
    assert "c" not in cache and "b" in cache and "d" in cache and cache.nbytes == 9000
    cache.store("f", {0: _window(4000), 1: _window(4000)}, 5.0)  # 17,000 bytes: evicted until it fits
    assert "b" not in cache and "d" not in cache and "f" in cache and cache.nbytes == 8000
    cache.store("e", {0: _window(12_000)}, 6.0)  # alone over the byte bound: not kept
    assert "e" not in cache and cache.nbytes == 8000
    # Storing replaces the utterance's entry (bytes counted once).
    cache.store("f", {0: _window(1000)}, 7.0)
    assert cache.nbytes == 1000 and len(cache) == 1


@pytest.mark.parametrize("max_step_tokens", [0, 96], ids=["whole-prefill", "chunked-prefill"])
def test_the_kv_prefix_of_reused_windows_is_copied_and_not_prefilled_again(
    loaded: LoadedAsrModel, max_step_tokens: int
) -> None:
    """Growing prefixes of one utterance: each keyed piece prefills only the tokens after the head and the audio
    tokens of the windows it reused (their K/V copied from the previous piece), token for token what the piece
    gives decoded alone; with chunked prefill (a chunk never starts inside a reused run) every token is
    prefilled, with the same result. The tiny model's greedy tokens barely depend on the audio, so the
    log-probabilities are compared too: a wrong K/V anywhere in the prompt moves them far past fp32 rounding."""
    audio = _utterance(26.0, seed=1)
    cuts = [3.0, 9.0, 17.0, 25.0]
    alone = _pieces(_engine(loaded), audio, cuts, None, prefix_text="hello there")
    engine = _engine(loaded, max_step_tokens=max_step_tokens)
    keyed = _pieces(engine, audio, cuts, "s5/0/0", prefix_text="hello there")
    assert [r.token_ids for r, _, _ in keyed] == [r.token_ids for r, _, _ in alone]
    for (mine, _, _), (reference, _, _) in zip(keyed, alone, strict=True):
        assert mine.token_logprobs == pytest.approx(reference.token_logprobs, abs=1e-5)
    # Alone (and chunked), every piece prefills its whole prompt: the template, its audio tokens, the tail.
    prompts = [p for _, _, p in alone]
    assert prompts[:4] == sorted(prompts[:4]) and prompts[-1] > 26 * 12
    window_tokens = 104
    if max_step_tokens:
        assert [p for _, _, p in keyed] == prompts
        assert engine.stream_cache.prefix_hits == 0
        return
    # Keyed: 17 s reuses window 0 (104 audio tokens and the head), 25 s windows 0-1, the final 0-2.
    reused = [a - k for (_, _, a), (_, _, k) in zip(alone, keyed, strict=True)]
    head = reused[2] - window_tokens
    assert 0 < head < 32
    assert reused == [0, 0, head + window_tokens, head + 2 * window_tokens, head + 3 * window_tokens]
    assert engine.stream_cache.prefix_hits == 3
    assert engine.stream_cache.prefix_nbytes == 0  # freed with the final


def test_two_streams_reusing_their_kv_prefixes_in_one_prefill_each_get_their_own(loaded: LoadedAsrModel) -> None:
    """Two keyed streams' pieces arrive together and are prepared before the engine steps, so each prefill copies
    both prefixes (one batch of copies, page ids side by side): each piece equals that piece decoded alone,
    log-probabilities included."""
    audios = {"a/0/0": _utterance(26.0, seed=1), "b/0/0": _utterance(26.0, seed=2)}
    cuts = [3.0, 9.0, 17.0, 25.0]
    alone = {key: _pieces(_engine(loaded), audio, cuts, None) for key, audio in audios.items()}
    engine = _engine(loaded)
    batches: list[int] = []
    copy = engine._runner._copy_kv_prefixes

    def counted(copies: Any) -> None:
        batches.append(len(copies))
        copy(copies)

    engine._runner._copy_kv_prefixes = counted  # type: ignore[method-assign]
    pieces = [(cut, DecodePriority.INTERIM) for cut in cuts] + [(26.0, DecodePriority.FINAL)]
    for i, (cut, priority) in enumerate(pieces):
        for key, audio in audios.items():
            request = DecodeRequest(
                f"{key}-{i}", audio[: int(cut * _RATE)], _OPTIONS, priority=priority, stream_key=key
            )
            engine.add(WorkItem(request, time.time_ns(), time.monotonic()))
        # Both prepared (preprocess threads) before the first step, so one prefill takes both.
        for key in audios:
            waiting = engine._requests[f"{key}-{i}"]
            waiting.prepared.future.result(timeout=60)
            if waiting.digests is not None:
                waiting.digests.result(timeout=60)
        results = {o.request_id: o.result for o in _drain(engine)}
        for key in audios:
            mine, reference = results[f"{key}-{i}"], alone[key][i][0]
            assert mine is not None and mine.token_ids == reference.token_ids, (key, i)
            assert mine.token_logprobs == pytest.approx(reference.token_logprobs, abs=1e-5), (key, i)
    assert engine.stream_cache.prefix_hits == 6
    assert max(batches) == 2


def _interims_prefilled(loaded: LoadedAsrModel, **cache: Any) -> list[int]:
    return [tokens for _, tokens in _interims(loaded, **cache)]


def test_prompt_tokens_prefilled_per_interim_stay_bounded(loaded: LoadedAsrModel) -> None:
    """Interims every 2 s of a 40 s utterance: each prefills at most the audio tokens of one window, the interval
    and the open remainder (<= 8 + 2 + 8 s at 13 tokens a second) and the tail, however long the utterance grew;
    with the KV prefixes off (windows still reused) or the cache off, the whole prompt every time."""
    bound = 18 * 13 + 32
    prefilled = _interims_prefilled(loaded)
    assert max(prefilled) <= bound, prefilled
    for cache in ({"stream_cache_max_kv_mib": 0}, {"stream_cache_max_streams": 0}):
        off = _interims_prefilled(loaded, **cache)
        assert off[-1] > 40 * 12 and off == sorted(off), off
        assert max(off) > bound


def _prefix(pages: int, windows: int = 1, head: tuple[int, ...] = (1, 2)) -> CachedPrefix:
    # 2 layers, `pages` pages of 1 KV head x 8 slots x 4 dims, fp32: 256 bytes a page for K and V together.
    return CachedPrefix(head, windows, 8 * pages, torch.zeros(2, pages, 1, 8, 4), torch.zeros(2, pages, 1, 8, 4))


def test_the_kv_prefixes_keep_to_their_own_bound() -> None:
    cache = StreamEncoderCache(max_streams=8, max_windows=2, max_bytes=10_000, idle_s=60.0, max_prefix_bytes=3000)
    assert _prefix(1).nbytes == 512
    cache.store("a", {0: _window(100)}, 0.0, _prefix(2))
    assert cache.prefix("a") is not None and cache.prefix_nbytes == 1024
    cache.store("b", {0: _window(100)}, 1.0, _prefix(6))  # 3,072 bytes alone: over the bound, not kept
    assert cache.prefix("b") is None and "b" in cache and cache.prefix_nbytes == 1024
    cache.store("c", {0: _window(100), 1: _window(100)}, 2.0, _prefix(3, windows=3))  # window 2 is not kept
    assert cache.prefix("c") is None
    cache.store("c", {0: _window(100), 1: _window(100)}, 3.0, _prefix(3, windows=2))
    assert cache.prefix_nbytes == 1024 + 1536
    # Over the bound: the least recently used loses its prefix first, its windows stay.
    cache.store("d", {0: _window(100)}, 4.0, _prefix(2))
    assert cache.prefix("a") is None and "a" in cache and cache.prefix("d") is not None
    assert cache.prefix_nbytes == 1536 + 1024
    # Released with the entry (the final), replaced with it (the next request).
    cache.close("c")
    assert cache.prefix_nbytes == 1024
    cache.store("d", {0: _window(100)}, 5.0)
    assert cache.prefix("d") is None and cache.prefix_nbytes == 0
