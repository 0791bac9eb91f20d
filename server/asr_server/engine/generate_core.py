"""Engine core on transformers' own `model.generate`: one padded batch per step.

Batching must not change any request's tokens. Two things make a padded batch differ from single runs in
transformers' native path, and both are avoided here:
- features are computed per clip (processor on one clip, exactly the reference preprocessing) and padded
  with zeros afterwards; the batched feature extractor would fill the frames past a short clip's end with the
  log-mel of silence, which leaks into that clip's last encoder chunk;
- prompts are left-padded with an attention mask, which `generate` handles as in any decoder-only batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.audio.raw import MAX_FLOAT_SAMPLE_MAGNITUDE
from asr_server.engine.core import CoreStats, EngineOutput, StepCounter
from asr_server.engine.types import BatchStats, DecodeRequest, DecodeResult, WaitingQueue, WorkItem
from asr_server.errors import AsrError, InvalidInput
from asr_server.models.loading import LoadedAsrModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedInputs:
    input_ids: Any  # torch.LongTensor (1, L)
    input_features: Any  # torch.FloatTensor (1, mel_bins, frames)
    input_features_mask: Any  # torch.LongTensor (1, frames)


def prepare_single(loaded: LoadedAsrModel, request: DecodeRequest) -> PreparedInputs:
    """The reference preprocessing for one clip: apply_transcription_request, plus a continuation prefix."""
    processor = loaded.processor
    options = request.options
    prompt = options.context if options.context else None
    inputs = processor.apply_transcription_request(audio=request.audio_16k, language=options.language, prompt=prompt)
    input_ids = inputs["input_ids"]
    if request.prefix_text:
        import torch

        # Appended as tokens, not text: transformers 5.17's apply_transcription_request cannot return the prompt
        # string, and the prompt ends at a special token or a newline, where BPE never merges across anyway.
        prefix_ids = processor.tokenizer(request.prefix_text, add_special_tokens=False)["input_ids"]
        input_ids = torch.cat([input_ids, torch.tensor([prefix_ids], dtype=input_ids.dtype)], dim=1)
    return require_finite_features(PreparedInputs(input_ids, inputs["input_features"], inputs["input_features_mask"]))


def require_finite_features(prepared: PreparedInputs) -> PreparedInputs:
    """Refuses a clip whose log-mel is not finite. The audio layer bounds samples, so this is the second line: a
    NaN feature makes NaN logits and NaN keys and values, and the request fails alone instead of decoding "!"."""
    import torch

    if not bool(torch.isfinite(prepared.input_features).all()):
        raise InvalidInput(
            "the audio's log-mel features are not finite (NaN or Inf); send audio with finite samples in [-1, 1]"
        )
    return prepared


def require_bounded_samples(audio: np.ndarray[Any, Any]) -> None:
    """The same guarantee as `require_finite_features` from the samples alone, on the host, for features made on the
    device (checking them there would make the prefill wait for the device): finite samples within
    +-MAX_FLOAT_SAMPLE_MAGNITUDE give a finite log-mel (its power spectrum stays far below float32's range)."""
    samples = np.asarray(audio)
    # NaN makes the peak NaN, which fails the comparison.
    if samples.size and not float(np.max(np.abs(samples))) <= MAX_FLOAT_SAMPLE_MAGNITUDE:
        raise InvalidInput(
            f"the audio has NaN, Inf or a sample beyond +-{MAX_FLOAT_SAMPLE_MAGNITUDE:g}, which makes its log-mel "
            "features not finite; send audio with finite samples in [-1, 1]"
        )


def request_error(request_id: str, stage: str, exc: Exception) -> Exception:
    """What the caller of a request that failed alone is told: the request's own fault as it is (the edge maps it
    to a precise status, e.g. INVALID_ARGUMENT for non-finite features), anything else as an engine failure."""
    if isinstance(exc, AsrError):
        logger.info("request %s failed in %s: %s", request_id, stage, exc)
        return exc
    logger.error("request %s failed in %s: %s: %s", request_id, stage, type(exc).__name__, exc)
    return RuntimeError(f"{stage} failed: {type(exc).__name__}: {exc}")


def parse_transcription(processor: Any, request: DecodeRequest, ids: list[int]) -> tuple[str, str]:
    """(text, language) of a request's generated ids, as processor.decode parses them; a continuation's prefix is
    put back in front first, so the parse sees the whole answer."""
    if request.prefix_text:
        raw = request.prefix_text + processor.tokenizer.decode(ids, skip_special_tokens=True)
        parsed = processor.parse_output(raw)
    else:
        parsed = processor.decode(ids, return_format="parsed")
    language = request.options.language or parsed.get("language") or ""
    return str(parsed.get("transcription") or ""), str(language)


def asr_text_token_id(processor: Any) -> int | None:
    """The id of `<asr_text>`, the token after which the model writes the transcription; None if unknown."""
    token_id = processor.tokenizer.convert_tokens_to_ids("<asr_text>")
    unknown = processor.tokenizer.unk_token_id
    return int(token_id) if isinstance(token_id, int) and token_id != unknown else None


def text_token_span(ids: list[int], asr_text_id: int | None, eos_ids: frozenset[int]) -> tuple[int, int]:
    """[start, end) of the generated tokens that spell the transcription: after the first `<asr_text>` (a detected
    language's tag; with a forced language or a continuation prefix the prompt holds it, and the text starts at 0),
    before the first EOS."""
    start = 0
    if asr_text_id is not None and asr_text_id in ids:
        start = ids.index(asr_text_id) + 1
    end = next((i for i in range(start, len(ids)) if ids[i] in eos_ids), len(ids))
    return start, end


def text_pieces(processor: Any, ids: list[int]) -> tuple[str, ...]:
    """What each token of `ids` adds to their decoded text (tokenizers' DecodeStream: "" while a multi-byte
    character is incomplete, then the whole character); () for a tokenizer without a fast backend."""
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ()
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    return tuple(stream.step(backend, token) or "" for token in ids)


def collate(prepared: list[PreparedInputs], pad_token_id: int) -> dict[str, Any]:
    """Left-pads prompts, right-pads features with zeros (exactly what a single run's mel padding holds)."""
    import torch

    max_len = max(p.input_ids.shape[1] for p in prepared)
    max_frames = max(p.input_features.shape[2] for p in prepared)
    batch = len(prepared)
    mel_bins = prepared[0].input_features.shape[1]
    input_ids = torch.full((batch, max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
    # On the features' own device: features computed on the GPU (continuous/features.py) stay there.
    device = prepared[0].input_features.device
    features = torch.zeros((batch, mel_bins, max_frames), dtype=prepared[0].input_features.dtype, device=device)
    features_mask = torch.zeros((batch, max_frames), dtype=prepared[0].input_features_mask.dtype, device=device)
    for row, p in enumerate(prepared):
        length = p.input_ids.shape[1]
        frames = p.input_features.shape[2]
        input_ids[row, max_len - length :] = p.input_ids[0]
        attention_mask[row, max_len - length :] = 1
        features[row, :, :frames] = p.input_features[0]
        features_mask[row, :frames] = p.input_features_mask[0]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_features": features,
        "input_features_mask": features_mask,
    }


class ChosenLogprobs:
    """A logits processor for greedy `generate` (the last in its list, so it sees the scores the token is chosen
    from): per step, each row's log-softmax at its argmax, i.e. the greedy token's log-probability. Two (batch,)
    tensors a step stay on the device until the end."""

    def __init__(self) -> None:
        self._steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores32 = scores.float()
        self._steps.append(scores32.max(dim=-1).values - torch.logsumexp(scores32, dim=-1))
        return scores

    def per_row(self) -> list[list[float]]:
        """(batch, steps) log-probabilities as lists; rows that ended early continue with padding's values."""
        import torch

        if not self._steps:
            return []
        values: list[list[float]] = torch.stack(self._steps, dim=1).cpu().tolist()
        return values


class GenerateEngine:
    """EngineCore running `model.generate` on padded batches of up to max_batch_size requests."""

    def __init__(self, loaded: LoadedAsrModel, *, max_batch_size: int) -> None:
        self._loaded = loaded
        self.model_id = loaded.model_id
        self._max_batch_size = max_batch_size
        # By priority, then arrival: a live stream's final is not batched after the interims queued before it.
        self._waiting = WaitingQueue()
        self._counter = StepCounter()
        tokenizer = loaded.processor.tokenizer
        config = loaded.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self._pad_token_id = int(pad)
        eos = loaded.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self._eos_ids = frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        self._asr_text_id = asr_text_token_id(loaded.processor)

    def warmup(self) -> None:
        from asr_server.engine.types import DecodeOptions

        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(MODEL_SAMPLE_RATE_HZ)).astype(np.float32)
        request = DecodeRequest("warmup", audio, DecodeOptions(language=None, context="", max_new_tokens=2))
        self._run_batch([WorkItem(request, time.time_ns(), time.monotonic())])

    def add(self, item: WorkItem) -> None:
        self._waiting.add(item)

    def abort(self, request_id: str) -> None:
        self._waiting.remove(request_id)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return 0

    def oldest_waiting_monotonic_s(self) -> float | None:
        return self._waiting.oldest_monotonic_s()

    def step(self) -> list[EngineOutput]:
        batch = self._waiting.take(self._max_batch_size)
        if not batch:
            return []
        # One request that cannot be prepared or decoded fails alone; the others of its batch still get results.
        outputs: list[EngineOutput] = []
        ready: list[tuple[WorkItem, PreparedInputs]] = []
        for work in batch:
            try:
                ready.append((work, prepare_single(self._loaded, work.request)))
            except Exception as exc:  # noqa: BLE001 - reported to this request's caller
                outputs.append(self._failed(work, exc))
        if not ready:
            return outputs
        try:
            return outputs + self._run_prepared(ready)
        except Exception as exc:  # noqa: BLE001 - isolated below, each caller gets its own result or error
            if len(ready) == 1:
                return outputs + [self._failed(ready[0][0], exc)]
            logger.exception("batch of %d failed; running its requests one by one", len(ready))
        for pair in ready:
            try:
                outputs.extend(self._run_prepared([pair]))
            except Exception as exc:  # noqa: BLE001 - reported to this request's caller
                outputs.append(self._failed(pair[0], exc))
        return outputs

    @staticmethod
    def _failed(work: WorkItem, exc: Exception) -> EngineOutput:
        return EngineOutput(work.request.request_id, error=request_error(work.request.request_id, "inference", exc))

    def _run_batch(self, batch: list[WorkItem]) -> list[EngineOutput]:
        return self._run_prepared([(w, prepare_single(self._loaded, w.request)) for w in batch])

    def _run_prepared(self, ready: list[tuple[WorkItem, PreparedInputs]]) -> list[EngineOutput]:
        import torch

        start_ns = time.time_ns()
        loaded = self._loaded
        batch = [w for w, _ in ready]
        requests = [w.request for w in batch]
        inputs = collate([p for _, p in ready], self._pad_token_id)
        model = loaded.model
        device = loaded.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        max_new = max(self._budget(r) for r in requests)
        forced = [r.forced_num_tokens for r in requests if r.forced_num_tokens is not None]
        # Each chosen token's log-probability, read at every step (the continuous engine computes the same inside its
        # decode step). Not output_logits: steps x batch x vocabulary logits would be gigabytes for a large batch.
        chosen = ChosenLogprobs()
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "logits_processor": [chosen]}
        if forced:
            # Benchmarks: random weights never emit a sensible EOS, so make every row run its full budget.
            kwargs["min_new_tokens"] = max_new
        with torch.inference_mode():
            sequences = model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = sequences[:, prompt_len:].cpu().tolist()
        step_logprobs = chosen.per_row()
        end_ns = time.time_ns()
        rows = [self._trim(ids, self._budget(r)) for ids, r in zip(new_tokens, requests, strict=True)]
        stats = BatchStats(
            batch_size=len(batch),
            audio_s=sum(r.audio_s for r in requests),
            generated_tokens=sum(len(ids) for ids in rows),
            start_ns=start_ns,
            end_ns=end_ns,
        )
        self._counter.step(len(batch), stats.generated_tokens)
        outputs = []
        for work, ids, logprobs in zip(batch, rows, step_logprobs, strict=True):
            text, language = parse_transcription(self._loaded.processor, work.request, ids)
            span = text_token_span(ids, self._asr_text_id, self._eos_ids)
            result = DecodeResult(
                work.request.request_id,
                text,
                language,
                tuple(ids),
                work.enqueued_ns,
                stats,
                token_logprobs=tuple(logprobs[: len(ids)]),
                text_tokens=span,
                text_token_pieces=text_pieces(self._loaded.processor, ids[span[0] : span[1]]),
            )
            outputs.append(EngineOutput(work.request.request_id, result=result))
        return outputs

    @staticmethod
    def _budget(request: DecodeRequest) -> int:
        if request.forced_num_tokens is not None:
            return request.forced_num_tokens
        return request.options.max_new_tokens

    def _trim(self, ids: list[int], budget: int) -> list[int]:
        """This row's own tokens: up to and including its first EOS, at most its own budget.

        Rows of a batch share one max_new_tokens; greedy tokens of a row do not depend on how long the
        others run, so cutting a row at its budget equals running it alone with that budget.
        """
        out: list[int] = []
        for token in ids[:budget]:
            out.append(token)
            if token in self._eos_ids:
                break
        return out

    def stats(self) -> CoreStats:
        return self._counter.snapshot()

    def close(self) -> None:
        return None
