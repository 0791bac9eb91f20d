"""Load Qwen3-ASR and Qwen3-ForcedAligner checkpoints in either layout.

Two layouts exist for the same weights:

* ``hf``: the native transformers layout (``Qwen/Qwen3-ASR-1.7B-hf``): a flat ``Qwen3ASRConfig``
  (``audio_config``/``text_config``), weights named ``model.audio_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.*`` (aligner: ``score.*``), and a ``Qwen3ASRProcessor`` saved alongside.
* ``original``: the layout of the original Qwen releases (``Qwen/Qwen3-ASR-1.7B``, what most users have): a config
  with ``thinker_config`` holding ``audio_config``/``text_config`` (aligner: ``classify_num``), weights named
  ``thinker.audio_tower.*`` (projector as ``proj1``/``proj2``), ``thinker.model.*``, ``thinker.lm_head.*``, a
  ``WhisperFeatureExtractor`` preprocessor config and a chat template that cannot prefill the assistant turn.

Asked to load the original layout, transformers (5.17 and 5.24 checked) ignores `thinker_config`, builds a model of
the default 1.7B size and initialises every weight randomly, with a logged report and no error. So the original
layout is converted here: the config is flattened, the weights are renamed while loading and every
weight is checked to be loaded, and the processor is rebuilt with the native feature extractor and chat template.

Nothing here hard-codes a token id: all ids come from the checkpoint (config, generation config, tokenizer).
Nothing runs at import time; torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from asr_server.errors import FailedPrecondition

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Layout = Literal["hf", "original"]
ModelKind = Literal["asr", "aligner"]

# Renames from the original layout to the native one, applied in order, first match wins (each key matches at most
# one rule). Mirrors transformers' own conversion script (models/qwen3_asr/convert_qwen3_asr_to_hf.py).
_ORIGINAL_TO_HF_ASR: tuple[tuple[str, str], ...] = (
    ("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
    ("thinker.model.", "model.language_model."),
    ("thinker.lm_head.", "lm_head."),
    ("thinker.", "model."),
)
_ORIGINAL_TO_HF_ALIGNER: tuple[tuple[str, str], ...] = tuple(
    (old, "score." if old == "thinker.lm_head." else new) for old, new in _ORIGINAL_TO_HF_ASR
)

# The chat templates of the native checkpoints, rendering exactly the prompt the models were trained on:
#   <|im_start|>system\n{context}<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n
#   <|im_start|>assistant\n{prefill}
# System text is the concatenation of all system messages' text; the user turn holds one audio placeholder per
# audio part (the processor expands <|audio_pad|> to the clip's token count); assistant messages are rendered
# verbatim so that `continue_final_message=True` can prefill "language X<asr_text>".
# The original checkpoints ship a template without the assistant part, so the loader replaces it with this one.
ASR_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_text='', audio_tokens='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system_text = ns.system_text + message.content -%}{%- endif -%}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if message.role == 'system' and part.type == 'text' and (part.text is defined) -%}"
    "{%- set ns.system_text = ns.system_text + part.text -%}"
    "{%- endif -%}"
    "{%- if part.type == 'audio' or ('audio' in part) or ('audio_url' in part) -%}"
    "{%- set ns.audio_tokens = ns.audio_tokens + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n' + ns.system_text + '<|im_end|>\\n' -}}"
    "{{- '<|im_start|>user\\n' + ns.audio_tokens + '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set reply = namespace(text='') -%}"
    "{%- if message.content is string -%}"
    "{%- set reply.text = message.content -%}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'text' and (part.text is defined) -%}"
    "{%- set reply.text = reply.text + part.text -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}"
    "{{- reply.text + '<|im_end|>\\n' -}}"
    "{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The forced aligner's input: the audio placeholder(s), then every word followed by a start and an end <timestamp>
# marker: "<|audio_start|><|audio_pad|><|audio_end|>w1<timestamp><timestamp>w2<timestamp><timestamp>".
ALIGNER_CHAT_TEMPLATE = (
    "{%- set ns = namespace(audio_tokens='', words=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is not string -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'audio' or ('audio' in part) or ('audio_url' in part) -%}"
    "{%- set ns.audio_tokens = ns.audio_tokens + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- endif -%}"
    "{%- if part.type == 'text' and (part.text is defined) -%}"
    "{%- set ns.words = ns.words + [part.text] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.audio_tokens + ns.words | join('<timestamp><timestamp>') + '<timestamp><timestamp>' -}}"
)

# Keys of the original sub-configs that the native configs do not have (or must not inherit).
_AUDIO_KEYS_DROPPED = frozenset(
    {
        "_name_or_path", "architectures", "dtype", "torch_dtype", "model_type", "use_bfloat16", "add_cross_attention",
        "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task",
        "id2label", "label2id", "is_decoder", "is_encoder_decoder", "max_source_positions", "conv_chunksize",
        "output_attentions", "output_hidden_states", "pad_token_id", "bos_token_id", "eos_token_id", "prefix",
        "problem_type", "pruned_heads", "return_dict", "sep_token_id", "task_specific_params", "tf_legacy_loss",
        "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "torchscript", "transformers_version",
    }
)  # fmt: skip
_TEXT_KEYS_DROPPED = frozenset(
    {
        "_name_or_path", "architectures", "dtype", "torch_dtype", "model_type", "use_bfloat16", "add_cross_attention",
        "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task",
        "id2label", "label2id", "is_decoder", "is_encoder_decoder", "output_attentions", "output_hidden_states",
        "prefix", "problem_type", "pruned_heads", "return_dict", "sep_token_id", "task_specific_params",
        "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "torchscript", "transformers_version",
        # MoE fields of the thinker's text config family, unused by the dense decoder
        "decoder_sparse_step", "moe_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob",
        "output_router_logits", "router_aux_loss_coef", "mlp_only_layers",
    }
)  # fmt: skip
# M-RoPE fields: every Qwen3-ASR position is a text position (all three sections equal), i.e. plain RoPE.
_MROPE_KEYS = ("mrope_interleaved", "interleaved", "mrope_section", "type")

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class LoadedAsrModel:
    """A Qwen3-ASR model ready for `generate`, with its processor.

    `model` is a `transformers.Qwen3ASRForConditionalGeneration` in eval mode, `processor` a
    `transformers.Qwen3ASRProcessor` (native feature extractor and chat template whatever the layout). `model_id` is
    what the caller asked for (hub id or directory), `layout` the layout it was stored in, `dtype` and `device` where
    its weights are (with a multi-device `device_map`, the device of the input embeddings).
    """

    model: Any
    processor: Any
    model_id: str
    layout: Layout
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class LoadedAlignerModel:
    """A Qwen3-ForcedAligner (`transformers.Qwen3ASRForTokenClassification`) with its processor; see LoadedAsrModel."""

    model: Any
    processor: Any
    model_id: str
    layout: Layout
    dtype: torch.dtype
    device: torch.device


def load_asr_model(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedAsrModel:
    """Load a Qwen3-ASR checkpoint (hub id or local directory, either layout) and its processor.

    dtype: "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16" or "float16".
    device: where to put the model when `device_map` is None ("cpu", "cuda", "cuda:1", ...).
    device_map: passed to transformers (e.g. "auto") instead of moving the model to `device`.
    attn_implementation: "sdpa", "eager", "flash_attention_2", ... or None for transformers' default.

    Raises FailedPrecondition when the checkpoint cannot be found or is not a Qwen3-ASR model, ValueError on a bad
    argument.
    """
    loaded = _load(model, "asr", dtype=dtype, device=device, device_map=device_map, attn=attn_implementation)
    return LoadedAsrModel(
        model=loaded.model,
        processor=loaded.processor,
        model_id=model,
        layout=loaded.layout,
        dtype=loaded.dtype,
        device=loaded.device,
    )


def load_aligner_model(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedAlignerModel:
    """Load a Qwen3-ForcedAligner checkpoint (hub id or local directory, either layout) and its processor.

    Arguments and errors as for `load_asr_model`.
    """
    loaded = _load(model, "aligner", dtype=dtype, device=device, device_map=device_map, attn=attn_implementation)
    return LoadedAlignerModel(
        model=loaded.model,
        processor=loaded.processor,
        model_id=model,
        layout=loaded.layout,
        dtype=loaded.dtype,
        device=loaded.device,
    )


# ----------------------------------------------------------------------------------------------------------------
# Layout detection and config conversion (pure functions on dicts; also used by the tiny checkpoint builder's tests)
# ----------------------------------------------------------------------------------------------------------------


def detect_layout(config: dict[str, Any]) -> Layout:
    """'original' when the config nests the model under `thinker_config`, 'hf' for a native Qwen3ASRConfig.

    Raises FailedPrecondition for anything else.
    """
    if isinstance(config.get("thinker_config"), dict):
        return "original"
    if config.get("model_type") == "qwen3_asr":
        return "hf"
    raise FailedPrecondition(
        f"not a Qwen3-ASR checkpoint: config.json has model_type={config.get('model_type')!r} and no "
        "thinker_config (expected model_type 'qwen3_asr')"
    )


def detect_kind(config: dict[str, Any]) -> ModelKind:
    """'aligner' for a forced aligner (token classification head), 'asr' for a speech recognition model."""
    thinker = config.get("thinker_config")
    if isinstance(thinker, dict):
        is_aligner = "classify_num" in thinker or thinker.get("model_type") == "qwen3_forced_aligner"
        return "aligner" if is_aligner else "asr"
    architectures = config.get("architectures") or []
    if any("TokenClassification" in str(name) for name in architectures):
        return "aligner"
    if not architectures and len(config.get("id2label") or {}) > 2:  # a classification head without a name
        return "aligner"
    return "asr"


def flatten_original_config(config: dict[str, Any]) -> dict[str, Any]:
    """Turn an original-layout config.json (with `thinker_config`) into kwargs for `transformers.Qwen3ASRConfig`."""
    thinker = config.get("thinker_config")
    if not isinstance(thinker, dict):
        raise FailedPrecondition("original Qwen3-ASR config has no thinker_config")
    audio = thinker.get("audio_config")
    text = thinker.get("text_config")
    if not isinstance(audio, dict) or not isinstance(text, dict):
        raise FailedPrecondition("original Qwen3-ASR config: thinker_config lacks audio_config or text_config")

    audio_config = {k: v for k, v in audio.items() if k not in _AUDIO_KEYS_DROPPED}
    # The native encoder's sinusoidal table only needs the post-CNN positions of one 2*n_window chunk (13 for 100).
    audio_config["max_position_embeddings"] = _post_cnn_length(2 * int(audio_config.get("n_window", 50)))

    text_config = {k: v for k, v in text.items() if k not in _TEXT_KEYS_DROPPED}
    text_config["model_type"] = "qwen3"
    rope_scaling = text_config.get("rope_scaling")
    if isinstance(rope_scaling, dict):
        rope_scaling = {k: v for k, v in rope_scaling.items() if k not in _MROPE_KEYS}
        if rope_scaling.get("rope_type", "default") == "default" and set(rope_scaling) <= {"rope_type"}:
            rope_scaling = None
        text_config["rope_scaling"] = rope_scaling
    tied = bool(text_config.get("tie_word_embeddings", False))

    flat: dict[str, Any] = {
        "architectures": None,
        "audio_config": audio_config,
        "text_config": text_config,
        "tie_word_embeddings": tied,
    }
    for key in ("audio_token_id", "initializer_range"):
        if key in thinker:
            flat[key] = thinker[key]
    for key in ("timestamp_token_id", "timestamp_segment_time"):
        if key in config:
            flat[key] = config[key]
        elif key in thinker:
            flat[key] = thinker[key]
    if detect_kind(config) == "aligner":
        if "classify_num" not in thinker:
            raise FailedPrecondition("original forced aligner config has no thinker_config.classify_num")
        flat["num_labels"] = int(thinker["classify_num"])
        flat["architectures"] = ["Qwen3ASRForTokenClassification"]
    else:
        flat["architectures"] = ["Qwen3ASRForConditionalGeneration"]
    return flat


def original_to_hf_key(key: str, kind: ModelKind) -> str:
    """The native name of an original-layout weight (e.g. thinker.audio_tower.proj1.weight ->
    model.multi_modal_projector.linear_1.weight)."""
    rules = _ORIGINAL_TO_HF_ALIGNER if kind == "aligner" else _ORIGINAL_TO_HF_ASR
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def hf_to_original_key(key: str, kind: ModelKind) -> str:
    """Inverse of `original_to_hf_key` (used to write original-layout checkpoints)."""
    rules = _ORIGINAL_TO_HF_ALIGNER if kind == "aligner" else _ORIGINAL_TO_HF_ASR
    # Most specific native prefix first: model.language_model. before model.
    for old, new in sorted(rules, key=lambda rule: len(rule[1]), reverse=True):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _post_cnn_length(frames: int) -> int:
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    model: Any
    processor: Any
    layout: Layout
    dtype: torch.dtype
    device: torch.device


def _load(
    model_id: str,
    kind: ModelKind,
    *,
    dtype: str,
    device: str,
    device_map: str | None,
    attn: str | None,
) -> _Loaded:
    import torch

    torch_dtype = resolve_dtype(dtype, device=device, device_map=device_map)
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from exc
    if device_map is None and target.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {device!r} requested but CUDA is not available")
    if device_map is not None and device_map.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"device_map {device_map!r} requested but CUDA is not available")

    model_dir = resolve_model_dir(model_id)
    config = read_config(model_dir)
    layout = detect_layout(config)
    found = detect_kind(config)
    if found != kind:
        wanted = "a Qwen3-ASR speech recognition model" if kind == "asr" else "a Qwen3-ForcedAligner model"
        actual = "a forced aligner" if found == "aligner" else "a speech recognition model"
        raise FailedPrecondition(f"{model_id!r} is {actual} checkpoint, expected {wanted}")

    if layout == "hf":
        model = _load_hf_model(model_dir, kind, torch_dtype=torch_dtype, device_map=device_map, attn=attn)
        processor = _load_hf_processor(model_dir)
        if device_map is None:
            model = model.to(target)
    else:
        # The original layout is loaded by hand onto one device: `device_map` names it ("auto": a GPU if there is
        # one). A Qwen3-ASR model fits on one device, so splitting it is not supported for this layout.
        init_device = target if device_map is None else _single_device(device_map)
        processor = _load_original_processor(model_dir, config, kind)
        model = _load_original_model(
            model_dir, config, kind, processor.tokenizer, torch_dtype=torch_dtype, init_device=init_device, attn=attn
        )
    model.eval()
    _check_consistency(model, processor, kind, model_id)
    placed = model.get_input_embeddings().weight.device
    logger.info(
        "loaded %s (%s layout, %s) on %s from %s", model_id, layout, str(torch_dtype).removeprefix("torch."),
        placed, model_dir,
    )  # fmt: skip
    return _Loaded(model=model, processor=processor, layout=layout, dtype=torch_dtype, device=placed)


def _single_device(device_map: str) -> torch.device:
    import torch

    if device_map in ("auto", "balanced", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device_map {device_map!r} is not supported for original-layout checkpoints: use 'auto' or one device"
        ) from exc


def resolve_dtype(dtype: str, *, device: str = "cpu", device_map: str | None = None) -> torch.dtype:
    """Map "auto" to bfloat16 when the model goes to CUDA, float32 otherwise; names like "bf16" are accepted."""
    import torch

    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        on_cuda = device.startswith("cuda") or (
            device_map is not None
            and (device_map.startswith("cuda") or device_map in ("auto", "balanced", "sequential"))
            and torch.cuda.is_available()
        )
        return torch.bfloat16 if on_cuda else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    result: torch.dtype = getattr(torch, _DTYPES[name])
    return result


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; anything else that looks like a hub id is fetched with huggingface_hub."""
    if not model or not model.strip():
        raise ValueError("model must be a hub id (e.g. 'Qwen/Qwen3-ASR-1.7B') or a local directory, got ''")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FailedPrecondition(f"model path {model!r} is a file, expected a checkpoint directory")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model
    if looks_local:
        raise FailedPrecondition(f"model directory {model!r} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise FailedPrecondition(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed to download it"
        ) from exc
    try:
        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"],
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure (offline, 404, auth) becomes one clear message
        raise FailedPrecondition(
            f"{repo_id!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(exc).__name__}: {_first_line(exc)}). Download it beforehand (e.g. `hf download {repo_id}`) "
            "and pass the local directory, or check the network/HF_HUB_OFFLINE/HF_TOKEN settings."
        ) from exc
    return Path(local)


def read_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FailedPrecondition(f"{model_dir} has no config.json: not a model checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise FailedPrecondition(f"{config_path} is not a JSON object")
    return config


def _model_class(kind: ModelKind) -> Any:
    from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

    return Qwen3ASRForTokenClassification if kind == "aligner" else Qwen3ASRForConditionalGeneration


def _load_hf_model(
    model_dir: Path, kind: ModelKind, *, torch_dtype: torch.dtype, device_map: str | None, attn: str | None
) -> Any:
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "output_loading_info": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn is not None:
        kwargs["attn_implementation"] = attn
    try:
        model, info = _model_class(kind).from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise FailedPrecondition(f"cannot load the model in {model_dir}: {_first_line(exc)}") from exc
    _check_loading_info(info, model, model_dir)
    return model


def _check_loading_info(info: dict[str, Any], model: Any, model_dir: Path) -> None:
    tied = _tied_keys(model)
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(entry) for entry in info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"missing weights {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_some(unexpected)}")
    if mismatched:
        problems.append(f"weights of the wrong shape {_some(mismatched)}")
    if problems:
        raise FailedPrecondition(f"checkpoint {model_dir} does not match its config: " + "; ".join(problems))


def _tied_keys(model: Any) -> set[str]:
    """Names of parameters that share storage with another (e.g. lm_head.weight tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _load_original_model(
    model_dir: Path,
    config_json: dict[str, Any],
    kind: ModelKind,
    tokenizer: Any,
    *,
    torch_dtype: torch.dtype,
    init_device: torch.device,
    attn: str | None,
) -> Any:
    import torch
    from transformers import Qwen3ASRConfig

    flat = flatten_original_config(config_json)
    try:
        config = Qwen3ASRConfig(**flat)
    except (TypeError, ValueError) as exc:
        raise FailedPrecondition(f"cannot convert the original config of {model_dir}: {_first_line(exc)}") from exc
    # Ids the original config does not carry come from the checkpoint's generation config and tokenizer, never
    # from transformers' defaults (which are the real checkpoints' ids).
    generation = _original_generation_ids(model_dir)
    if generation is None:
        end_ids = [_token_id(tokenizer, token) for token in ("<|endoftext|>", "<|im_end|>")]
        eos = [token for token in end_ids if token is not None]
        if eos:
            generation = (eos, eos[-1])
    if generation is not None:
        config.eos_token_id, config.pad_token_id = generation
    if "timestamp_token_id" not in flat:
        timestamp_id = _token_id(tokenizer, "<timestamp>")
        if timestamp_id is not None:
            config.timestamp_token_id = timestamp_id

    state = _read_original_state_dict(model_dir, kind)
    cls = _model_class(kind)
    # Built directly on its device (a random init there is cheap), then overwritten with the checkpoint's weights.
    with torch.device(init_device):
        model = cls._from_config(config, dtype=torch_dtype, **({"attn_implementation": attn} if attn else {}))
    expected = set(model.state_dict())
    tied = _tied_keys(model)
    for name in tied:
        # A tied copy in the checkpoint (the original ASR repos store thinker.lm_head next to the embeddings):
        # the embeddings are authoritative, as when the model ties them after loading.
        state.pop(name, None)
    missing = sorted(expected - tied - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected weights {_some(unexpected)}")
        raise FailedPrecondition(f"checkpoint {model_dir} does not match its config: " + "; ".join(parts))
    current = model.state_dict()
    for name, tensor in state.items():
        if tuple(current[name].shape) != tuple(tensor.shape):
            raise FailedPrecondition(
                f"checkpoint {model_dir}: weight {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(current[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    del state

    if kind == "asr":
        # What transformers' conversion script writes for the -hf checkpoints: greedy, the original library's
        # 512-token default; only the ids come from the original generation config / tokenizer.
        from transformers import GenerationConfig as _GenerationConfig

        GenerationConfig: Any = _GenerationConfig
        model.generation_config = GenerationConfig(
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=512
        )
    return model


def _read_original_state_dict(model_dir: Path, kind: ModelKind) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise FailedPrecondition(f"cannot read {index}: {exc}") from exc
        files = sorted({model_dir / name for name in weight_map.values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("model-*.safetensors"))
    if not files:
        raise FailedPrecondition(f"{model_dir} has no *.safetensors weights")
    state: dict[str, Any] = {}
    for file in files:
        try:
            part = load_file(str(file), device="cpu")
        except (OSError, SafetensorError) as exc:
            raise FailedPrecondition(f"cannot read weights {file}: {exc}") from exc
        for key, tensor in part.items():
            state[original_to_hf_key(key, kind)] = tensor
    return state


def _original_generation_ids(model_dir: Path) -> tuple[list[int] | int, int] | None:
    """(eos_token_id, pad_token_id) from an original checkpoint's generation_config.json, if it has them."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"cannot read {path}: {exc}") from exc
    eos = data.get("eos_token_id")
    pad = data.get("pad_token_id")
    if eos is None:
        return None
    if pad is None:
        pad = eos[-1] if isinstance(eos, list) else eos
    return eos, int(pad)


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as a whole token."""
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or index == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(index) != token:
        return None
    return int(index)


def _load_hf_processor(model_dir: Path) -> Any:
    from transformers import Qwen3ASRProcessor

    try:
        return Qwen3ASRProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FailedPrecondition(f"cannot load the processor in {model_dir}: {_first_line(exc)}") from exc


def _load_original_processor(model_dir: Path, config_json: dict[str, Any], kind: ModelKind) -> Any:
    """The native processor for an original checkpoint: its tokenizer, the native feature extractor with the
    checkpoint's mel settings, and the native chat template (the original one cannot prefill the language)."""
    from transformers import AutoTokenizer, Qwen3ASRProcessor
    from transformers import Qwen3ASRFeatureExtractor as _FeatureExtractor

    Qwen3ASRFeatureExtractor: Any = _FeatureExtractor

    audio_tokens = {
        "audio_token": "<|audio_pad|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        missing = {name: tok for name, tok in audio_tokens.items() if getattr(tokenizer, name, None) is None}
        if missing:  # older tokenizer configs do not name the audio tokens
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **missing)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"cannot load the tokenizer in {model_dir}: {_first_line(exc)}") from exc

    pre: dict[str, Any] = {}
    pre_path = model_dir / "preprocessor_config.json"
    if pre_path.is_file():
        try:
            pre = json.loads(pre_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FailedPrecondition(f"cannot read {pre_path}: {exc}") from exc
    audio = config_json["thinker_config"]["audio_config"]
    fe_kwargs: dict[str, Any] = {
        "feature_size": int(pre.get("feature_size", audio.get("num_mel_bins", 128))),
        "n_window": int(audio.get("n_window", 50)),
    }
    for key in ("sampling_rate", "hop_length", "n_fft", "chunk_length", "padding_value", "dither"):
        if key in pre:
            fe_kwargs[key] = pre[key]
    feature_extractor = Qwen3ASRFeatureExtractor(**fe_kwargs)

    template = ALIGNER_CHAT_TEMPLATE if kind == "aligner" else ASR_CHAT_TEMPLATE
    segment = config_json.get("timestamp_segment_time", config_json["thinker_config"].get("timestamp_segment_time"))
    kwargs: dict[str, Any] = {"chat_template": template}
    if segment is not None:
        kwargs["timestamp_segment_time"] = float(segment)
    return Qwen3ASRProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, **kwargs)


def _check_consistency(model: Any, processor: Any, kind: ModelKind, model_id: str) -> None:
    """The tokenizer and the model must agree on the ids the model treats specially."""
    tokenizer = processor.tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(processor.audio_token)
    if audio_id != model.config.audio_token_id:
        raise FailedPrecondition(
            f"{model_id!r}: the tokenizer's audio token {processor.audio_token!r} has id {audio_id}, the model "
            f"config says audio_token_id={model.config.audio_token_id}"
        )
    if kind == "aligner":
        ts_id = tokenizer.convert_tokens_to_ids("<timestamp>")
        if ts_id != model.config.timestamp_token_id:
            raise FailedPrecondition(
                f"{model_id!r}: the tokenizer's <timestamp> has id {ts_id}, the model config says "
                f"timestamp_token_id={model.config.timestamp_token_id}"
            )
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise FailedPrecondition(f"{model_id!r}: the tokenizer has {len(tokenizer)} tokens, the model only {vocab}")


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return re.split(r"\r?\n", text, maxsplit=1)[0] if text else type(exc).__name__
