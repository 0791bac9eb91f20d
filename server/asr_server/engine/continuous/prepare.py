"""Per-clip preprocessing with the prompt's token ids cached: the reference result at a fraction of the host time.

generate_core.prepare_single (the reference) renders the chat template with Jinja and tokenizes a prompt holding
one <|audio_pad|> per audio token (1,560 for 120 s) on every call. With many short requests that Python work,
holding the GIL, competes with the engine thread and the gRPC thread. The ids around the audio run depend only on
(language, context), so they are taken once per combination from the reference itself, run on a probe clip (a
streaming continuation prefix is appended as tokens after them, as the reference appends it); each request then
needs only its features (the processor's own feature-extractor call, with the processor's own audio arguments) and
its audio-token count (the processor's own formula). The result is checked equal to the reference on the probe,
and tests compare the two over many lengths.

With features="torch" the features come from features.py instead (the same values, computed in torch on the
engine's device when it is CUDA, else on the CPU); the probe's self-check then compares them with the reference
within features.REFERENCE_TOLERANCE. With `compute_features=False` (what the continuous engine uses with torch
features) a request's features are left out (None): the model runner computes them for every clip of a step in
one batched call on its device, and only the ids are made here (the audio-token count from the sample count).

The cache is keyed without the prefix because every interim of a stream carries a different one: keyed with it,
each interim missed (a full reference run per interim) and the dict grew by one entry per interim. Contexts are
caller text too, so the cache keeps only the most recently used combinations.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.engine.continuous.features import REFERENCE_TOLERANCE, TorchFeatureExtractor
from asr_server.engine.generate_core import (
    PreparedInputs,
    prepare_single,
    require_bounded_samples,
    require_finite_features,
)
from asr_server.engine.types import DecodeRequest
from asr_server.models.loading import LoadedAsrModel

logger = logging.getLogger(__name__)

_Template = tuple[list[int], list[int]]
FEATURE_MODES = ("reference", "torch")


class FastPreparer:
    def __init__(
        self,
        loaded: LoadedAsrModel,
        max_templates: int = 1024,
        features: str = "reference",
        *,
        compute_features: bool = True,
    ) -> None:
        if features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, not {features!r}")
        if not compute_features and features != "torch":
            raise ValueError("features are left to the engine only with features='torch'")
        self._compute_features = compute_features
        self._loaded = loaded
        processor: Any = loaded.processor
        self._processor = processor
        self._audio_token_id = int(loaded.model.config.audio_token_id)
        self._n_window = int(getattr(loaded.model.config.audio_config, "n_window", 50))
        self._torch: TorchFeatureExtractor | None = None
        if features == "torch":
            device = loaded.device if loaded.device.type == "cuda" else torch.device("cpu")
            self._torch = TorchFeatureExtractor(processor, n_window=self._n_window, device=device)
        self._max_templates = max_templates
        self._templates: OrderedDict[tuple[str | None, str], _Template | None] = OrderedDict()
        self._lock = threading.Lock()

    def features(self, audio: np.ndarray[Any, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_features, input_features_mask, number of audio tokens) as the processor computes them."""
        if self._torch is not None:
            clip = self._torch([audio]).clip(0)
            return clip.input_features, clip.input_features_mask, clip.num_audio_tokens
        out = self._processor.feature_extractor(
            [audio],
            sampling_rate=MODEL_SAMPLE_RATE_HZ,
            padding=True,
            truncation=False,
            return_attention_mask=True,
            n_window=self._n_window,
            return_tensors="pt",
        )
        mask = out["attention_mask"]
        count = int(self._processor._get_audio_token_length(mask.sum(-1), self._n_window)[0])
        return out["input_features"], mask, count

    @property
    def cached_templates(self) -> int:
        return len(self._templates)

    def _template(self, request: DecodeRequest) -> _Template | None:
        key = (request.options.language, request.options.context)
        with self._lock:
            if key in self._templates:
                self._templates.move_to_end(key)
                return self._templates[key]
        probe_audio = (0.05 * np.random.default_rng(0).standard_normal(MODEL_SAMPLE_RATE_HZ)).astype(np.float32)
        probe = DecodeRequest("probe", probe_audio, request.options)
        reference = prepare_single(self._loaded, probe)
        ids = reference.input_ids[0].tolist()
        where = [i for i, t in enumerate(ids) if t == self._audio_token_id]
        template: _Template | None = None
        if where and where[-1] - where[0] + 1 == len(where):
            template = (ids[: where[0]], ids[where[-1] + 1 :])
            # Self-check on the probe; any mismatch disables the fast path for this combination.
            mine = self._build(probe, template)
            if not (
                torch.equal(mine.input_ids, reference.input_ids)
                and self._features_match(mine.input_features, reference.input_features)
                and torch.equal(mine.input_features_mask.cpu(), reference.input_features_mask)
            ):
                logger.warning("fast preprocessing differs from the reference on the probe; using the reference")
                template = None
        with self._lock:
            self._templates[key] = template
            while len(self._templates) > self._max_templates:
                self._templates.popitem(last=False)
        return template

    def _features_match(self, mine: torch.Tensor, reference: torch.Tensor) -> bool:
        if self._torch is None:
            return torch.equal(mine, reference)
        mine = mine.cpu()
        return mine.shape == reference.shape and bool((mine - reference).abs().max() <= REFERENCE_TOLERANCE)

    def _build(self, request: DecodeRequest, template: _Template, *, compute_features: bool = True) -> PreparedInputs:
        features: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if compute_features or self._torch is None:
            features, mask, count = self.features(request.audio_16k)
        else:
            count = self._torch.num_audio_tokens(int(np.asarray(request.audio_16k).shape[-1]))
        head, tail = template
        prefix: list[int] = []
        if request.prefix_text:
            prefix = list(self._processor.tokenizer(request.prefix_text, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([[*head, *([self._audio_token_id] * count), *tail, *prefix]], dtype=torch.long)
        return PreparedInputs(ids, features, mask)

    def __call__(self, request: DecodeRequest) -> PreparedInputs:
        template = self._template(request)
        if template is None:
            return prepare_single(self._loaded, request)
        if not self._compute_features:
            require_bounded_samples(request.audio_16k)
            return self._build(request, template, compute_features=False)
        return require_finite_features(self._build(request, template))
