"""One padded batch through the forced aligner (`Qwen3ASRForTokenClassification`), invisible to each request.

Each request's inputs are built alone by transformers' reference preprocessing
(`Qwen3ASRProcessor.prepare_forced_aligner_inputs`), then collated so that no row can see another:
- features are zero-padded after the per-clip feature extraction, with a zero feature mask; the batched feature
  extractor would fill a short clip's tail with the log-mel of silence, which enters its last encoder chunk;
- token sequences are right-padded: the text model is causal, so a row's real tokens never attend to the padding
  after them and keep the positions 0..n-1 they have alone (left padding would shift them).
The classification head runs only at the `<timestamp>` positions (the reference computes 5000 logits for every token
and reads those), and the times are decoded exactly as `Qwen3ASRProcessor.decode_forced_alignment` does.

No gRPC here and no threads: the batcher owns the thread, the sidecar the service.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from asr_server.aligner.words import fix_timestamps, split_words
from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.errors import InvalidInput, excerpt
from asr_server.languages import ALIGNER_LANGUAGE_NAMES
from asr_server.models.loading import LoadedAlignerModel
from asr_server.results import Word

logger = logging.getLogger(__name__)

# The model predicts one of num_labels classes of timestamp_segment_time ms (5000 x 80 ms = 400 s); the server
# aligns at most 180 s at a time (LimitsConfig.max_chunk_with_timestamps_s, at most 300 s), so 300 s is the cap here.
MAX_AUDIO_S = 300


@dataclass(frozen=True, eq=False)
class AlignJob:
    """One piece of audio and its transcript to time."""

    job_id: str
    audio_16k: npt.NDArray[np.float32]
    text: str
    # Canonical name, one of ALIGNER_LANGUAGE_NAMES; "" when the recogniser detected none: the words are then split
    # as both references split them without a language (CJK per character, other scripts on spaces).
    language: str

    @property
    def audio_s(self) -> float:
        return float(self.audio_16k.shape[0]) / MODEL_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class Prepared:
    words: list[str]
    input_ids: Any  # torch.LongTensor (1, L)
    input_features: Any  # torch.FloatTensor (1, mel_bins, frames)
    input_features_mask: Any  # torch.LongTensor (1, frames)


def check_job(job: AlignJob) -> None:
    """Input checks that do not need the model (the sidecar runs them before queueing)."""
    if job.language and job.language not in ALIGNER_LANGUAGE_NAMES:
        raise InvalidInput(
            f"the forced aligner does not cover {excerpt(job.language)}; it aligns "
            f"{', '.join(sorted(ALIGNER_LANGUAGE_NAMES))}"
        )
    if job.audio_16k.ndim != 1:
        raise InvalidInput("audio must be mono")
    if job.audio_s > MAX_AUDIO_S:
        raise InvalidInput(f"audio of {job.audio_s:.1f} s is longer than the aligner's {MAX_AUDIO_S} s per request")
    if not np.isfinite(job.audio_16k).all():
        raise InvalidInput("audio holds NaN or Inf samples")


class AlignerCore:
    """Turns batches of AlignJobs into words with times (ms from the start of each job's audio)."""

    def __init__(self, loaded: LoadedAlignerModel) -> None:
        self._loaded = loaded
        self.model_id = loaded.model_id
        model = loaded.model
        processor = loaded.processor
        self._timestamp_id = int(model.config.timestamp_token_id)
        segment: Any = getattr(processor, "timestamp_segment_time", None)
        if segment is None:
            segment = getattr(model.config, "timestamp_segment_time", 80.0)
        self._segment_ms = float(segment)
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self._base = getattr(model, model.base_model_prefix)

    @property
    def device(self) -> str:
        return str(self._loaded.device)

    @property
    def dtype(self) -> str:
        return str(self._loaded.dtype).removeprefix("torch.")

    def warmup(self) -> None:
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(2 * MODEL_SAMPLE_RATE_HZ)).astype(np.float32)
        self.align_batch([AlignJob("warmup", audio, "hello world", "English")])

    def prepare(self, job: AlignJob) -> Prepared:
        """The reference preprocessing of one job (raises FailedPrecondition for a missing word splitter)."""
        words = split_words(self._loaded.processor, job.text, job.language)
        if not words:
            return Prepared(words, None, None, None)
        inputs, word_lists = self._loaded.processor.prepare_forced_aligner_inputs(
            audio=[job.audio_16k], transcript=[job.text], language=[job.language] if job.language else None
        )
        return Prepared(
            list(word_lists[0]), inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"]
        )

    def align_batch(self, jobs: list[AlignJob]) -> list[tuple[Word, ...] | Exception]:
        """Words per job, or the exception that job alone failed with. A failure of the batch as a whole raises."""
        outcomes: list[tuple[Word, ...] | Exception] = []
        prepared: list[tuple[int, Prepared]] = []
        for index, job in enumerate(jobs):
            try:
                p = self.prepare(job)
            except Exception as exc:  # noqa: BLE001 - this job's fault; the others go on
                outcomes.append(exc)
                continue
            outcomes.append(())
            if p.words:
                prepared.append((index, p))
        if prepared:
            times = self._forward([p for _, p in prepared])
            for (index, p), ms in zip(prepared, times, strict=True):
                if isinstance(ms, Exception):
                    outcomes[index] = ms
                else:
                    outcomes[index] = tuple(Word(word, ms[2 * i], ms[2 * i + 1]) for i, word in enumerate(p.words))
        return outcomes

    def _forward(self, prepared: list[Prepared]) -> list[list[int] | Exception]:
        import torch

        model = self._loaded.model
        device = self._loaded.device
        batch = len(prepared)
        max_len = max(p.input_ids.shape[1] for p in prepared)
        max_frames = max(p.input_features.shape[2] for p in prepared)
        mel_bins = prepared[0].input_features.shape[1]
        input_ids = torch.full((batch, max_len), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
        features = torch.zeros((batch, mel_bins, max_frames), dtype=torch.float32)
        features_mask = torch.zeros((batch, max_frames), dtype=torch.long)
        for row, p in enumerate(prepared):
            length = p.input_ids.shape[1]
            frames = p.input_features.shape[2]
            input_ids[row, :length] = p.input_ids[0]
            attention_mask[row, :length] = 1
            features[row, :, :frames] = p.input_features[0]
            features_mask[row, :frames] = p.input_features_mask[0]
        input_ids = input_ids.to(device)
        with torch.inference_mode():
            hidden = self._base(
                input_ids=input_ids,
                attention_mask=attention_mask.to(device),
                input_features=features.to(device=device, dtype=model.dtype),
                input_features_mask=features_mask.to(device),
                use_cache=False,
            ).last_hidden_state
            is_timestamp = input_ids == self._timestamp_id
            classes = model.score(hidden[is_timestamp]).argmax(dim=-1)
            counts = is_timestamp.sum(dim=1).tolist()
        # The reference multiplies in float32 before its repair; class x 80 ms is exact in float32 up to 400 s.
        raw_ms = (classes.float() * self._segment_ms).cpu().numpy()
        results: list[list[int] | Exception] = []
        offset = 0
        for p, count in zip(prepared, counts, strict=True):
            row = raw_ms[offset : offset + int(count)]
            offset += int(count)
            if int(count) != 2 * len(p.words):
                # This row's text tokenised oddly (e.g. it holds a literal "<timestamp>"): its request fails, not
                # the batch it shares.
                results.append(RuntimeError(f"expected {2 * len(p.words)} <timestamp> tokens in a row, found {count}"))
                continue
            results.append(fix_timestamps(row))
        return results
