"""What interim results cost the engine, counted (not timed): StreamingSession over an engine that answers at once.

Every interim decodes its open utterance from the utterance's start to the newest audio, so its work grows with
the utterance, and only with it: the endpointer cuts an utterance at max_utterance_ms, and everything before a
closed utterance is dropped. These tests count decodes and the samples they cover; each piece's decodes are
answered before the next piece arrives (tests/streaming_helpers.py `CountingEngine.settle`), so the counts depend
on the audio alone. The two-hour soak of the same session is tests/integration/test_streaming_session.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt

from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.engine.types import DecodePriority
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.session import StreamingOptions, StreamingSession, StreamResult, UtteranceWork
from asr_server.streaming.vad import CONTEXT_SAMPLES, FRAME_SAMPLES, EnergyVad, VadState
from asr_server.transcription import TranscribeOptions, Transcriber, TranscriberLimits
from tests.streaming_helpers import CountingEngine, pcm16

RATE_HZ = 16_000
LINEAR16 = AudioFormat(Encoding.LINEAR16, RATE_HZ, 1)
LIMITS = AudioLimits(max_audio_duration_s=4 * 3600, max_message_bytes=64 << 20, max_stream_bytes=1 << 31)
PIECE_SAMPLES = RATE_HZ // 4  # 250 ms pieces
INTERVAL_MS = 1000
MIN_FINAL_SAMPLES = RATE_HZ // 2  # the Transcriber pads every piece to the model's 0.5 s minimum


def noise(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    """Stand-in speech: -26 dBFS noise, far above the energy VAD's -45 dBFS threshold."""
    return (0.05 * np.random.default_rng(seed).standard_normal(round(seconds * RATE_HZ))).astype(np.float32)


def silence(seconds: float) -> npt.NDArray[np.float32]:
    return np.zeros(round(seconds * RATE_HZ), dtype=np.float32)


class InlineEnergyVad:
    """VadBatcher's `frames` over the energy VAD, computed in the event loop.

    The session asks its VAD only for `frames`. The real batcher runs each pass on its own thread, whose start
    imports torch (seconds); the energy VAD needs neither.
    """

    def __init__(self) -> None:
        self._vad = EnergyVad()

    async def frames(
        self, state: VadState, samples: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        windows = state.windows(samples)
        frames = windows[:, CONTEXT_SAMPLES:]
        energies = np.einsum("ij,ij->i", frames, frames) / np.float32(FRAME_SAMPLES)
        return self._vad.run([(state, windows)])[0], energies


class Run:
    """One session over a CountingEngine, fed piece by piece with every decode answered before the next piece."""

    def __init__(self, endpoint: EndpointSettings) -> None:
        self.engine = CountingEngine()
        self.work: list[UtteranceWork] = []
        self.finals: list[StreamResult] = []
        self.session = StreamingSession(
            StreamingOptions(
                transcribe=TranscribeOptions(language=None, context="", max_new_tokens=4096),
                endpoint=endpoint,
                interim_results=True,
                interim_interval_ms=INTERVAL_MS,
            ),
            LINEAR16,
            transcriber=Transcriber(self.engine, None, TranscriberLimits(1200, 180)),
            vad=InlineEnergyVad(),  # type: ignore[arg-type]
            limits=LIMITS,
            on_utterance_work=self.work.append,
        )

    async def _collect(self, events: AsyncIterator[object]) -> None:
        async for event in events:
            if isinstance(event, StreamResult) and event.is_final:
                self.finals.append(event)

    async def feed_all(self, audio: npt.NDArray[np.float32]) -> None:
        consumer = asyncio.get_running_loop().create_task(self._collect(self.session.events()))
        data = pcm16(audio)
        step = PIECE_SAMPLES * 2
        for offset in range(0, len(data), step):
            await self.session.feed(data[offset : offset + step])
            await self.engine.settle()
        await self.session.finish()
        await consumer

    def check_one_decode_per_interim(self) -> None:
        """Each interim is one decode of its utterance's audio, each final one more, and nothing else is decoded."""
        assert self.engine.decodes == len(self.finals) + sum(w.interim_decodes for w in self.work)
        # Finals go ahead of interims in the engine's queue.
        assert self.engine.by_priority == {
            DecodePriority.FINAL: len(self.finals),
            DecodePriority.INTERIM: sum(w.interim_decodes for w in self.work),
        }
        assert self.engine.samples == sum(w.interim_samples + max(w.audio_samples, MIN_FINAL_SAMPLES) for w in self.work)
        # Answered at once, no interim ever waits, so none is skipped: these are the counts without contention.
        assert all(w.skipped_interims == 0 for w in self.work), self.work


async def test_interims_cost_the_same_per_utterance_at_the_end_of_a_stream_as_at_its_start() -> None:
    # Three utterances of different lengths, repeated for five minutes; whole pieces and VAD frames per block,
    # so every block is cut and decoded exactly alike if nothing depends on how long the stream has run.
    lengths_s = (1.7, 4.3, 9.1)
    parts = [silence(1.5)]
    for i, length_s in enumerate(lengths_s):
        parts += [noise(length_s, seed=i), silence(1.5)]
    block = np.concatenate(parts)
    block = np.pad(block, (0, -block.shape[0] % np.lcm(PIECE_SAMPLES, FRAME_SAMPLES)))
    blocks = int(5 * 60 * RATE_HZ // block.shape[0])
    run = Run(EndpointSettings())
    await run.feed_all(np.tile(block, blocks))

    per_block = len(lengths_s)
    assert [f.utterance_index for f in run.finals] == list(range(blocks * per_block))
    assert len(run.work) == blocks * per_block
    run.check_one_decode_per_interim()

    def costs(w: UtteranceWork) -> tuple[int, int, int]:
        return w.audio_samples, w.interim_decodes, w.interim_samples

    second = [costs(w) for w in run.work[per_block : 2 * per_block]]
    last = [costs(w) for w in run.work[-per_block:]]
    assert second == last
    trailing = EndpointSettings().trailing_silence_ms * RATE_HZ // 1000
    for w in run.work:
        # At most one interim per interval of the utterance's audio and the silence that closes it (plus the piece
        # that brought the close), each covering at most that much audio.
        covered = w.audio_samples + trailing + PIECE_SAMPLES
        assert 1 <= w.interim_decodes <= covered // (INTERVAL_MS * RATE_HZ // 1000), w
        assert w.interim_samples <= w.interim_decodes * covered, w


async def test_no_interim_decodes_more_than_max_utterance_ms_however_long_the_speech_goes_on() -> None:
    endpoint = EndpointSettings(max_utterance_ms=5_000)
    max_samples = endpoint.max_utterance_samples
    run = Run(endpoint)
    await run.feed_all(np.concatenate([silence(1.0), noise(90.0, seed=7), silence(2.0)]))

    run.check_one_decode_per_interim()
    # Ninety seconds without a pause are cut into utterances of at most max_utterance_ms...
    assert len(run.finals) >= 90 * 1000 // endpoint.max_utterance_ms
    assert all(w.audio_samples <= max_samples for w in run.work), run.work
    # ...and no decode, interim or final, covers more than one of them: an interim sees the open utterance, which
    # is at most max_utterance_ms long once its frames went through the endpointer, plus the samples of a frame
    # that the endpointer checks next and of the partial frame that the VAD holds back.
    assert run.engine.max_samples <= max_samples + 2 * FRAME_SAMPLES
    per_utterance_bound = (max_samples // (INTERVAL_MS * RATE_HZ // 1000) + 1) * (max_samples + 2 * FRAME_SAMPLES)
    assert all(w.interim_samples <= per_utterance_bound for w in run.work), run.work
