"""Batched log-mel features in torch, on any device: per clip what the processor's feature extractor returns for
that clip alone (transformers' Qwen3ASRFeatureExtractor called with padding=True, truncation=False, n_window).

What the extractor does to one clip, reproduced here per row of a batch:
- zero-pad to `min_length` samples (8000: 0.5 s), attention mask included (as upstream, the mask covers the pad);
- centred STFT (reflect padding of n_fft // 2 at both ends, periodic Hann window, n_fft 400, hop 160), the last
  frame dropped: a clip of n samples has n // 160 frames, the same count as its attention mask;
- power spectrum through the extractor's own mel filterbank, log10 of it clamped at 1e-10;
- the floor: the clip's own maximum - 8 over its own frames, then (x + 4) / 4;
- zeros (features and mask) up to a multiple of 2 * n_window frames.
Batching must be invisible, so each row gets its own reflect padding (gathered from its own samples, not from the
zeros after it), its own floor (a max over its own valid frames) and zeros past its own frames: the batched
extractor instead pads the waveforms first, so a short clip's last frames and its floor see the padding.

The filterbank is the extractor's array and the window is the same torch.hann_window call, made on the CPU as the
extractor makes it, then moved: nothing is re-derived. The math is float32 throughout, as the extractor's. The
STFT runs on one padded batch; frames past a row's end are computed and discarded (cheap next to the encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_MAX_CACHED_COUNTS = 1 << 16

# Measured against the extractor itself on the CPU (tests/integration/test_features_torch.py states the figure).
REFERENCE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ClipFeatures:
    input_features: torch.Tensor  # float32 (1, mel_bins, frames), frames a multiple of 2 * n_window
    input_features_mask: torch.Tensor  # int32 (1, frames), as the extractor's attention_mask
    num_audio_tokens: int


@dataclass(frozen=True)
class FeatureBatch:
    """Rows zero-padded to the longest row: exactly a batch of per-clip features padded with zeros."""

    input_features: torch.Tensor  # float32 (batch, mel_bins, max_frames)
    input_features_mask: torch.Tensor  # int32 (batch, max_frames)
    frames: list[int]  # per row: its own padded frame count (a multiple of 2 * n_window)
    num_audio_tokens: list[int]
    valid_frames: list[int]  # per row: the frames its mask covers (known on the host: no device sync)
    # With `stats_window_frames`: per row its clamp floor (its own maximum - 8, before the scaling), shape
    # (batch,), and per window of that many frames the minimum of its valid frames' log-mel before the clamp,
    # shape (batch, windows; +inf for a window with no valid frame). A live stream's cache reuses a window's
    # encoder output only when these prove its features unchanged (stream_cache.py).
    floors: torch.Tensor | None = None
    window_min: torch.Tensor | None = None

    def clip(self, row: int) -> ClipFeatures:
        frames = self.frames[row]
        return ClipFeatures(
            self.input_features[row : row + 1, :, :frames],
            self.input_features_mask[row : row + 1, :frames],
            self.num_audio_tokens[row],
        )


class TorchFeatureExtractor:
    def __init__(self, processor: Any, *, n_window: int, device: torch.device | str = "cpu") -> None:
        extractor = processor.feature_extractor
        if float(getattr(extractor, "dither", 0.0)) != 0.0:
            raise ValueError("the feature extractor dithers (random noise): its output cannot be reproduced")
        self._processor = processor
        self._device = torch.device(device)
        self._n_fft = int(extractor.n_fft)
        self._hop = int(extractor.hop_length)
        self._min_samples = int(extractor.min_length)
        self._multiple = 2 * n_window
        self._n_window = n_window
        # Read and written by several preparation threads: single dict operations, atomic under the GIL.
        self._tokens_by_frames: dict[int, int] = {}
        # (mel_bins, freq_bins): the extractor computes mel_filters.T @ magnitudes with float32 filters.
        filters = torch.from_numpy(np.asarray(extractor.mel_filters)).to(torch.float32)
        self._filters_t = filters.T.contiguous().to(self._device)
        self._window = torch.hann_window(self._n_fft).to(self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def hop_samples(self) -> int:
        return self._hop

    @property
    def reach_samples(self) -> int:
        """How far a frame's STFT reads on either side of its hop (the centred window's half length)."""
        return self._n_fft // 2

    def num_audio_tokens(self, num_samples: int) -> int:
        """The prompt's audio placeholders for a clip of `num_samples` samples, without computing its features."""
        frames = max(num_samples, self._min_samples) // self._hop
        tokens = self._tokens_by_frames.get(frames)
        if tokens is None:
            # transformers' own count (tensor arithmetic, ~30 us) once per frame count: every interim of every
            # stream asks, and the counts repeat. Bounded: a clip has at most --max-audio-duration-s of frames.
            if len(self._tokens_by_frames) >= _MAX_CACHED_COUNTS:
                self._tokens_by_frames.clear()
            tokens = int(self._processor._get_audio_token_length(torch.tensor([frames]), self._n_window)[0])
            self._tokens_by_frames[frames] = tokens
        return tokens

    def __call__(
        self, clips: Sequence[np.ndarray[Any, Any]], *, stats_window_frames: int | None = None
    ) -> FeatureBatch:
        if not clips:
            raise ValueError("no clips")
        lengths = [max(int(np.asarray(c).shape[-1]), self._min_samples) for c in clips]
        half = self._n_fft // 2
        if min(lengths) <= half:
            raise ValueError(f"a clip needs more than {half} samples for the centred STFT's reflect padding")
        longest = max(lengths)
        waves = np.zeros((len(clips), longest), dtype=np.float32)
        for row, clip in enumerate(clips):
            samples = np.asarray(clip, dtype=np.float32).reshape(-1)
            waves[row, : samples.shape[0]] = samples
        # Non-blocking copies: a blocking one waits for everything queued on the stream before it.
        host = torch.from_numpy(waves)
        wave = (host.pin_memory() if self._device.type == "cuda" else host).to(self._device, non_blocking=True)
        length = torch.tensor(lengths, dtype=torch.long).to(self._device, non_blocking=True)
        valid = [n // self._hop for n in lengths]
        log_spec, inside, floors, window_min = self._log_mel(
            _reflect_pad_rows(wave, length, half), valid, stats_window_frames
        )
        frames = [-(-v // self._multiple) * self._multiple if self._multiple > 1 else v for v in valid]
        extra = max(frames) - max(valid)
        features = torch.nn.functional.pad(log_spec, (0, extra))
        mask = torch.nn.functional.pad(inside, (0, extra)).to(torch.int32)
        counts = self._processor._get_audio_token_length(torch.tensor(valid), self._n_window)
        return FeatureBatch(features, mask, frames, [int(c) for c in counts], valid, floors, window_min)

    def _log_mel(
        self, padded: torch.Tensor, valid: list[int], stats_window_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(batch, mel_bins, max(valid)) normalised log-mel, zero past each row's `valid` frames; and the
        (batch, frames) bool mask of those frames. Each row's floor is its own maximum - 8. With
        `stats_window_frames`, also the floors and the per-window minima before the clamp (FeatureBatch)."""
        stft = torch.stft(padded, self._n_fft, self._hop, window=self._window, center=False, return_complex=True)
        max_valid = max(valid)
        power = stft[..., :max_valid].abs() ** 2
        log_spec = torch.clamp(self._filters_t @ power, min=1e-10).log10()
        frame = torch.arange(max_valid, device=self._device)
        inside = frame[None, :] < torch.tensor(valid).to(self._device, non_blocking=True)[:, None]
        outside = ~inside[:, None, :]
        peak = log_spec.masked_fill(outside, float("-inf")).amax(dim=(1, 2), keepdim=True)
        floor = peak - 8.0
        floors: torch.Tensor | None = None
        window_min: torch.Tensor | None = None
        if stats_window_frames:
            # The same float32 values the clamp below compares with the floor: no re-derivation.
            per_frame = log_spec.masked_fill(outside, float("inf")).amin(dim=1)  # (batch, frames)
            windows = -(-max_valid // stats_window_frames)
            per_frame = torch.nn.functional.pad(
                per_frame, (0, windows * stats_window_frames - max_valid), value=float("inf")
            )
            window_min = per_frame.view(len(valid), windows, stats_window_frames).amin(dim=2)
            floors = floor.reshape(-1)
        log_spec = (torch.maximum(log_spec, floor) + 4.0) / 4.0
        return log_spec.masked_fill(outside, 0.0), inside, floors, window_min


def _reflect_pad_rows(wave: torch.Tensor, length: torch.Tensor, half: int) -> torch.Tensor:
    """Each row reflect-padded by `half` at both ends of its own `length` samples (torch.stft's centre padding,
    per row); positions past a row's padded end read sample 0 and only feed frames that are discarded."""
    rows, longest = wave.shape
    position = torch.arange(longest + 2 * half, device=wave.device)[None, :] - half  # (1, L + 2 half)
    last = (length - 1)[:, None]
    source = torch.where(position < 0, -position, position)
    source = torch.where(source > last, 2 * last - source, source)
    source = source.clamp(min=0, max=longest - 1)
    return torch.gather(wave, 1, source.expand(rows, -1))
