"""Endpointing for recorded audio (Transcribe / TranscribeStream with `endpointing` set): one segment per utterance.

The same VAD and endpointer as live streams, run over decoded 16 kHz audio, so a recorded call sent as one
upload comes back cut exactly where a live stream of it would have been cut. This is only a span planner: the
transcription pipeline (transcription.py) decodes, aligns and merges the utterances as it does fixed chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asr_server.audio.chunking import ChunkSpan
from asr_server.streaming.endpoint import Endpointer, EndpointSettings, UtteranceEnded
from asr_server.streaming.vad import FRAME_SAMPLES, VadBatcher, VadState

# VAD runs over the recording in pieces of this many frames (~60 s), so a 4-hour file never becomes one array
# of windows (9x the audio's size).
_PIECE_FRAMES = 1875


@dataclass(frozen=True)
class UtterancePlanner:
    """Spans of the utterances the endpointer finds; silence between them is not decoded."""

    vad: VadBatcher
    settings: EndpointSettings

    async def plan(self, samples_16k: npt.NDArray[np.float32]) -> Sequence[ChunkSpan]:
        state = VadState()
        endpointer = Endpointer(self.settings)
        spans: list[ChunkSpan] = []
        step = _PIECE_FRAMES * FRAME_SAMPLES
        total = int(samples_16k.shape[0])
        for offset in range(0, total, step):
            probs, energies = await self.vad.frames(state, samples_16k[offset : offset + step])
            for event in endpointer.push(probs, energies):
                if isinstance(event, UtteranceEnded):
                    spans.append(ChunkSpan(event.start_sample, event.end_sample))
        last = endpointer.flush(total)
        if last is not None:
            spans.append(ChunkSpan(last.start_sample, last.end_sample))
        return spans
