"""Silero VAD as the server runs it: offline load, same output as the packaged model, batching is invisible."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import torch

from asr_server.streaming.vad import FRAME_SAMPLES, SileroVad, VadBatcher, VadState, silero_model_path
from tests.speech import espeak_available, synthesize_sentences

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

SENTENCES = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def model() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    return synthesize_sentences(SENTENCES, silence_s=0.7)[0]


def test_the_model_loads_offline_from_the_package_without_touching_torch_threads() -> None:
    # A fresh interpreter with the network unusable for the hub: the model file ships inside the package.
    code = (
        "import torch; before = torch.get_num_threads(); "
        "from asr_server.streaming.vad import SileroVad; SileroVad(); "
        "assert torch.get_num_threads() == before, (before, torch.get_num_threads())"
    )
    env = {"HF_HUB_OFFLINE": "1", "TORCH_HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert silero_model_path().is_file()


@needs_espeak
def test_probabilities_equal_the_packaged_model_run_frame_by_frame(model: SileroVad, speech: np.ndarray) -> None:
    scripted = torch.jit.load(str(silero_model_path()), map_location="cpu")  # type: ignore[no-untyped-call]
    n = speech.shape[0] // FRAME_SAMPLES
    with torch.inference_mode():
        reference = np.array(
            [float(scripted(torch.from_numpy(speech[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]), 16000)) for i in range(n)]
        )
    state = VadState()
    ours = model.run([(state, state.windows(speech))])[0]
    assert ours.shape == (n,)
    assert np.max(np.abs(ours - reference)) < 1e-3
    assert (ours > 0.5).sum() > n // 3  # it is speech, mostly


@needs_espeak
def test_pieces_and_batching_do_not_change_the_probabilities(model: SileroVad, speech: np.ndarray) -> None:
    whole_state = VadState()
    whole = model.run([(whole_state, whole_state.windows(speech))])[0]

    async def streamed() -> list[np.ndarray]:
        batcher = VadBatcher(model)
        rng = np.random.default_rng(0)
        states = [VadState() for _ in range(5)]

        async def one(state: VadState, seed: int) -> np.ndarray:
            out: list[np.ndarray] = []
            pos = 0
            local = np.random.default_rng(seed)
            while pos < speech.shape[0]:
                size = int(local.integers(1, 3000))
                out.append((await batcher.frames(state, speech[pos : pos + size]))[0])
                pos += size
            return np.concatenate(out)

        results = await asyncio.gather(*(one(s, int(rng.integers(1000))) for s in states))
        assert batcher.passes < sum(s.frames_done for s in states)  # streams shared passes
        return results

    for result in asyncio.run(streamed()):
        np.testing.assert_allclose(result, whole, atol=1e-5)
