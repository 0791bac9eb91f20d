"""Tiny random-weight Qwen3-ASR and Qwen3-ForcedAligner checkpoints, built offline, for tests.

`build_all(root, seed)` writes four directories from two sets of weights:

* ``tiny-asr-hf`` / ``tiny-asr-original``: one `Qwen3ASRForConditionalGeneration`, in the native transformers layout
  (`save_pretrained`) and in the layout of the original Qwen releases (``thinker.*`` weights, ``thinker_config``).
* ``tiny-aligner-hf`` / ``tiny-aligner-original``: one `Qwen3ASRForTokenClassification` (the forced aligner), alike.

What is real about them: the architecture (>= 2 encoder and decoder layers, GQA in the decoder, a tied LM head for
ASR and an untied vocabulary for the aligner, 5000 timestamp classes of 80 ms like the real aligner), the mel
front end (128 bins, 100 frames/s, 2 * n_window = 100-frame chunks, n_window_infer = 800), the feature extractor
config, the prompt format and chat templates, the special tokens and which of them are special, and the file
layouts of both kinds of checkpoint. The tokenizer is a real byte-level BPE (the Qwen2 pre-tokenizer) trained on a
small embedded multilingual corpus.

What is not: the weights are random, so the models produce random text; the vocabulary is compact (about a
thousand tokens) so the token ids differ from the real checkpoints' (151643...). That is deliberate: code that
hard-codes a real id fails against these checkpoints. All ids are in config.json, generation_config.json and the
tokenizer files.

The weights are drawn from a `torch.Generator` seeded with `seed`, parameter by parameter in name order, so they do
not depend on transformers' initialisation code: the same seed gives the same checkpoints with any supported
transformers version (the tokenizer training is deterministic too).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asr_server.models.loading import ALIGNER_CHAT_TEMPLATE, ASR_CHAT_TEMPLATE, hf_to_original_key

logger = logging.getLogger(__name__)

# Bump when anything that ends up in the files changes: existing directories are then rebuilt.
TINY_FORMAT_VERSION = 2
MARKER_FILE = ".tiny-checkpoint.json"

ASR_HF_DIR = "tiny-asr-hf"
ASR_ORIGINAL_DIR = "tiny-asr-original"
ALIGNER_HF_DIR = "tiny-aligner-hf"
ALIGNER_ORIGINAL_DIR = "tiny-aligner-original"

Kind = Literal["asr", "aligner"]

# Special tokens of the real checkpoints, in the real relative order (ids follow the BPE vocabulary here).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
)
# Added tokens that are NOT special: `decode(skip_special_tokens=True)` must keep <asr_text>, which the
# processor's output parser splits on; <timestamp> marks word boundaries in the aligner's input.
PLAIN_ADDED_TOKENS: tuple[str, ...] = ("<asr_text>", "<timestamp>")
AUDIO_TOKENS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# The 30 languages of `language=` (what the original config.json lists as support_languages).
SUPPORT_LANGUAGES: tuple[str, ...] = (
    "Chinese", "English", "Cantonese", "Arabic", "German", "French", "Spanish", "Portuguese", "Indonesian",
    "Italian", "Korean", "Russian", "Thai", "Vietnamese", "Japanese", "Turkish", "Hindi", "Malay", "Dutch",
    "Swedish", "Danish", "Finnish", "Polish", "Czech", "Filipino", "Persian", "Greek", "Romanian", "Hungarian",
    "Macedonian",
)  # fmt: skip

# Model sizes. Real: audio 1024/24 layers/16 heads, text 2048/28 layers/16 q heads/8 kv heads/head_dim 128.
AUDIO_SIZES: dict[str, Any] = {
    "num_mel_bins": 128,
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "downsample_hidden_size": 16,
    "n_window": 50,
    "n_window_infer": 800,
    "activation_function": "gelu",
    "scale_embedding": False,
}
TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 65536,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
}
ALIGNER_NUM_LABELS = 5000  # x 80 ms = 400 s, the real aligner's range
TIMESTAMP_SEGMENT_MS = 80.0
BPE_VOCAB_SIZE = 1024  # at most; the corpus decides how many merges are learnt

# A small corpus for the BPE: English, Chinese, Japanese, digits, punctuation, the prompt vocabulary.
_CORPUS: tuple[str, ...] = (
    "Hello, world! This is a tiny test of the speech recognition server.",
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "Please transcribe the following audio clip; then align every word with its start and end time.",
    "We recorded 3 speakers at 16 kHz: 120 seconds, 486 tokens, 2.5% word error rate (WER) on test-clean.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2026 3.14159 -42 +7 1,234,567 50% $19.99",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } - -- / \\ @ # & * _ = + < > | ~ ` ... ",
    "Good morning everyone. Today we will talk about machine learning, audio, and inference servers.",
    'She said: "I can\'t believe it\'s already Friday!" He replied, "Yes, time flies."',
    "The meeting starts at 9:30 AM on Monday, March 3rd. Don't be late, and bring your laptop.",
    "language English",
    "language Chinese",
    "language Japanese",
    "language None",
    " ".join(SUPPORT_LANGUAGES),
    "今天天气很好，我们去公园散步吧。",
    "语音识别是一项重要的人工智能技术。我们正在测试一个很小的模型。",
    "你好，世界！欢迎使用阿里云。请问现在几点了？",
    "北京 上海 广州 深圳 中国 人民 时间 音频 文本 模型 服务器",
    "こんにちは、世界。今日はいい天気ですね。",
    "音声認識のテストです。ありがとうございます。",
    "カタカナ ひらがな 東京 日本語 すみません",
    "Mixed: 我喜欢 Python 和 machine learning。東京で 2026 年に会いましょう!",
)


@dataclass(frozen=True)
class TinyCheckpoints:
    """The four checkpoint directories written by `build_all`."""

    asr_hf: Path
    asr_original: Path
    aligner_hf: Path
    aligner_original: Path


def build_all(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Write the four tiny checkpoints under `root` (created if needed) and return their paths.

    A directory whose marker file records the same format version and seed and whose files are all present is kept
    as is; anything else is rebuilt (atomically: written next to it, then renamed into place).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    result = TinyCheckpoints(
        asr_hf=root / ASR_HF_DIR,
        asr_original=root / ASR_ORIGINAL_DIR,
        aligner_hf=root / ALIGNER_HF_DIR,
        aligner_original=root / ALIGNER_ORIGINAL_DIR,
    )
    targets: list[tuple[Path, Kind, str]] = [
        (result.asr_hf, "asr", "hf"),
        (result.asr_original, "asr", "original"),
        (result.aligner_hf, "aligner", "hf"),
        (result.aligner_original, "aligner", "original"),
    ]
    stale = [(path, kind, layout) for path, kind, layout in targets if not _is_current(path, seed, kind, layout)]
    if not stale:
        return result

    tokenizer = build_tokenizer()
    models: dict[Kind, Any] = {}
    for path, kind, layout in stale:
        if kind not in models:
            models[kind] = build_model(kind, tokenizer, seed)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}-", dir=root) as tmp:
            staging = Path(tmp) / path.name
            staging.mkdir()
            if layout == "hf":
                save_hf_layout(models[kind], tokenizer, kind, staging)
            else:
                save_original_layout(models[kind], tokenizer, kind, staging)
            _write_readme(staging, kind, layout, seed)
            _write_marker(staging, seed, kind, layout)
            if _is_current(path, seed, kind, layout):
                continue  # another process finished the same build meanwhile
            if path.exists():
                shutil.rmtree(path)
            try:
                staging.rename(path)
            except OSError:
                if not _is_current(path, seed, kind, layout):
                    raise
        logger.info("built %s", path)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE with Qwen2's normaliser and pre-tokenizer, trained on the embedded corpus.

    Returns (vocab, merges) without any special token.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {str(token): int(index) for token, index in model["vocab"].items()}
    merges = [_merge_pair(merge) for merge in model["merges"]]
    return vocab, merges


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):  # older tokenizers serialise merges as "a b"
        left, right = merge.split(" ", 1)
        return left, right
    return str(merge[0]), str(merge[1])


def build_tokenizer() -> Any:
    """A `Qwen2Tokenizer` (tokenizers-backed) with the real checkpoints' special and added tokens.

    Ids: the BPE vocabulary first, then SPECIAL_TOKENS, then PLAIN_ADDED_TOKENS, in that order.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer as _Qwen2Tokenizer

    Qwen2Tokenizer: Any = _Qwen2Tokenizer

    vocab, merges = train_bpe()
    full_vocab = dict(vocab)
    for token in (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS):
        full_vocab[token] = len(full_vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        **AUDIO_TOKENS,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]},
        replace_extra_special_tokens=True,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    for token, expected in full_vocab.items():
        if token in (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS) and tokenizer.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(f"tiny tokenizer: {token} got id {tokenizer.convert_tokens_to_ids(token)}")
    return tokenizer


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of the special and added tokens in `tokenizer`."""
    return {token: int(tokenizer.convert_tokens_to_ids(token)) for token in (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS)}


def build_processor(tokenizer: Any, kind: Kind) -> Any:
    """A native `Qwen3ASRProcessor`: the real feature extractor config, `tokenizer`, and the kind's chat template."""
    from transformers import Qwen3ASRFeatureExtractor as _FeatureExtractor
    from transformers import Qwen3ASRProcessor

    Qwen3ASRFeatureExtractor: Any = _FeatureExtractor
    template = ALIGNER_CHAT_TEMPLATE if kind == "aligner" else ASR_CHAT_TEMPLATE
    return Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=template,
        timestamp_segment_time=TIMESTAMP_SEGMENT_MS,
    )


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def vocab_sizes(tokenizer: Any) -> dict[Kind, int]:
    """Embedding rows: like the real checkpoints, more than the tokenizer has (ASR padded to a multiple of 128,
    the aligner one block of 128 more), so the model can emit ids the tokenizer does not know."""
    asr = int(math.ceil(len(tokenizer) / 128) * 128)
    return {"asr": asr, "aligner": asr + 128}


def make_config(kind: Kind, tokenizer: Any) -> Any:
    """The native `Qwen3ASRConfig` of the tiny model of `kind`, with every id taken from `tokenizer`."""
    from transformers import Qwen3ASRConfig

    ids = token_ids(tokenizer)
    text = dict(TEXT_SIZES)
    text["vocab_size"] = vocab_sizes(tokenizer)[kind]
    text["tie_word_embeddings"] = kind == "asr"
    rope_theta = text.pop("rope_theta")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    audio = dict(AUDIO_SIZES)
    audio["output_dim"] = TEXT_SIZES["hidden_size"]
    audio["max_position_embeddings"] = 13  # post-CNN positions of one 100-frame chunk
    kwargs: dict[str, Any] = {
        "audio_config": audio,
        "text_config": text,
        "audio_token_id": ids["<|audio_pad|>"],
        "timestamp_token_id": ids["<timestamp>"],
        "pad_token_id": ids["<|im_end|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|im_end|>"]],
        "tie_word_embeddings": kind == "asr",
    }
    if kind == "aligner":
        kwargs["num_labels"] = ALIGNER_NUM_LABELS
        kwargs["architectures"] = ["Qwen3ASRForTokenClassification"]
    else:
        kwargs["architectures"] = ["Qwen3ASRForConditionalGeneration"]
    return Qwen3ASRConfig(**kwargs)


def build_model(kind: Kind, tokenizer: Any, seed: int) -> Any:
    """The tiny model of `kind` in fp32 and eval mode, with deterministic random weights for `seed`."""
    import torch
    from transformers import GenerationConfig as _GenerationConfig
    from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

    GenerationConfig: Any = _GenerationConfig
    config = make_config(kind, tokenizer)
    cls: Any = Qwen3ASRForTokenClassification if kind == "aligner" else Qwen3ASRForConditionalGeneration
    model = cls._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    _fill_weights(model, seed + (1_000_003 if kind == "aligner" else 0))
    model.eval()
    if kind == "asr":
        model.generation_config = GenerationConfig(
            eos_token_id=list(config.eos_token_id),
            pad_token_id=config.pad_token_id,
            do_sample=False,
            max_new_tokens=512,  # the original library's default
        )
    return model


def _fill_weights(model: Any, seed: int) -> None:
    """Overwrite every parameter from a generator seeded with `seed`, in name order.

    The scales are chosen so that the random model is not degenerate: small token embeddings and strong layers,
    so the output depends on the audio instead of repeating the last prompt token (what a tied LM head over a
    residual stream dominated by the embeddings does). They are independent of transformers' own init.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            shape = tuple(param.shape)
            values = torch.randn(shape, generator=generator, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                values = values * _EMBED_STD
            elif param.dim() >= 2:
                fan_in = math.prod(shape[1:])
                gain = _OUTPUT_GAIN if any(part in name for part in _OUTPUT_PROJECTIONS) else _GAIN
                values = values * (gain / math.sqrt(fan_in))
            elif "norm" in name or name.split(".")[-2].startswith("ln"):
                values = 1.0 + 0.1 * values if name.endswith("weight") else 0.02 * values
            else:  # biases
                values = 0.02 * values
            param.copy_(values.to(param.dtype))


_EMBED_STD = 0.1
_GAIN = 2.0
_OUTPUT_GAIN = 3.0
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "fc2")


# ----------------------------------------------------------------------------------------------------------------
# Writing the two layouts
# ----------------------------------------------------------------------------------------------------------------


def save_hf_layout(model: Any, tokenizer: Any, kind: Kind, out: Path) -> None:
    """The native layout: `save_pretrained` of the model and of a `Qwen3ASRProcessor`."""
    model.save_pretrained(str(out), safe_serialization=True)
    build_processor(tokenizer, kind).save_pretrained(str(out))


def save_original_layout(model: Any, tokenizer: Any, kind: Kind, out: Path) -> None:
    """The layout of the original Qwen releases, from the same weights.

    config.json with `thinker_config`, model.safetensors with `thinker.*` names (the ASR model also stores the tied
    `thinker.lm_head.weight`, as the real ones do), generation_config.json, a WhisperFeatureExtractor
    preprocessor_config.json, the tokenizer as vocab.json/merges.txt/tokenizer_config.json and the original chat
    template (which renders no assistant turn).
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors = {hf_to_original_key(name, kind): tensor.detach().contiguous().clone() for name, tensor in state.items()}
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", original_config(model.config, kind, tokenizer))
    ids = token_ids(tokenizer)
    if kind == "asr":
        _write_json(
            out / "generation_config.json",
            {
                "do_sample": False,
                "eos_token_id": [ids["<|endoftext|>"], ids["<|im_end|>"]],
                "pad_token_id": ids["<|im_end|>"],
                "max_new_tokens": 512,
            },
        )
    _write_json(
        out / "preprocessor_config.json",
        {
            "chunk_length": 30,
            "dither": 0.0,
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": AUDIO_SIZES["num_mel_bins"],
            "hop_length": 160,
            "n_fft": 400,
            "n_samples": 480000,
            "nb_max_frames": 3000,
            "padding_side": "right",
            "padding_value": 0.0,
            "processor_class": "Qwen3ASRProcessor",
            "return_attention_mask": True,
            "sampling_rate": 16000,
        },
    )
    _write_original_tokenizer(tokenizer, out)
    _write_json(out / "chat_template.json", {"chat_template": ORIGINAL_CHAT_TEMPLATE})


# The original repos' chat template (chat_template.json): system text and audio placeholders, no assistant turn.
ORIGINAL_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_text='') -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'system' -%}\n"
    "    {%- if m.content is string -%}\n"
    "      {%- set ns.system_text = ns.system_text + m.content -%}\n"
    "    {%- else -%}\n"
    "      {%- for c in m.content -%}\n"
    "        {%- if c.type == 'text' and (c.text is defined) -%}\n"
    "          {%- set ns.system_text = ns.system_text + c.text -%}\n"
    "        {%- endif -%}\n"
    "      {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set ns2 = namespace(audio_tokens='') -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.content is not string -%}\n"
    "    {%- for c in m.content -%}\n"
    "      {%- if c.type == 'audio' or ('audio' in c) or ('audio_url' in c) -%}\n"
    "        {%- set ns2.audio_tokens = ns2.audio_tokens + '<|audio_start|><|audio_pad|><|audio_end|>' -%}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- '<|im_start|>system\\n' + (ns.system_text if ns.system_text is string else '') + '<|im_end|>\\n' -}}\n"
    "{{- '<|im_start|>user\\n' + ns2.audio_tokens + '<|im_end|>\\n' -}}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)


def original_config(config: Any, kind: Kind, tokenizer: Any) -> dict[str, Any]:
    """The original-layout config.json for a native `Qwen3ASRConfig`."""
    ids = token_ids(tokenizer)
    audio = config.audio_config
    text = config.text_config
    audio_dict: dict[str, Any] = {
        "model_type": "qwen3_asr_audio_encoder",
        "num_mel_bins": audio.num_mel_bins,
        "encoder_layers": audio.encoder_layers,
        "encoder_attention_heads": audio.encoder_attention_heads,
        "encoder_ffn_dim": audio.encoder_ffn_dim,
        "d_model": audio.d_model,
        "dropout": 0,
        "attention_dropout": 0,
        "activation_function": audio.activation_function,
        "activation_dropout": 0,
        "scale_embedding": audio.scale_embedding,
        "initializer_range": 0.02,
        "max_source_positions": 1500,
        "n_window": audio.n_window,
        "output_dim": audio.output_dim,
        "n_window_infer": audio.n_window_infer,
        "conv_chunksize": 500,
        "downsample_hidden_size": audio.downsample_hidden_size,
    }
    half = text.head_dim // 2
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]  # 64 -> [24, 20, 20] in the real ones
    text_dict: dict[str, Any] = {
        "model_type": "qwen3_asr_text",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": text.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": kind == "asr",
        "rope_theta": TEXT_SIZES["rope_theta"],
        "rope_scaling": {
            "interleaved": True,
            "mrope_interleaved": True,
            "mrope_section": mrope_section,
            "rope_type": "default",
            "type": "default",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    thinker: dict[str, Any] = {
        "model_type": "qwen3_forced_aligner" if kind == "aligner" else "qwen3_asr_thinker",
        "architectures": ["Qwen3ASRThinkerForConditionalGeneration"],
        "audio_token_id": ids["<|audio_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "audio_end_token_id": ids["<|audio_end|>"],
        "initializer_range": 0.02,
        "dtype": "float32",
        "audio_config": audio_dict,
        "text_config": text_dict,
    }
    result: dict[str, Any] = {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": list(SUPPORT_LANGUAGES),
    }
    if kind == "aligner":
        thinker["classify_num"] = config.num_labels
        result["timestamp_token_id"] = ids["<timestamp>"]
        result["timestamp_segment_time"] = TIMESTAMP_SEGMENT_MS
    result["thinker_config"] = thinker
    result["dtype"] = "float32"
    return result


def _write_original_tokenizer(tokenizer: Any, out: Path) -> None:
    """vocab.json + merges.txt + a tokenizer_config.json naming the added tokens by id, as the original repos have
    (they ship no tokenizer.json)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {int(entry["id"]): entry for entry in backend["added_tokens"]}
    vocab = {token: index for token, index in backend["model"]["vocab"].items() if index not in added}
    merges = [" ".join(_merge_pair(merge)) for merge in backend["model"]["merges"]]
    _write_json(out / "vocab.json", dict(sorted(vocab.items(), key=lambda item: item[1])))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    decoder = {
        str(index): {
            "content": entry["content"],
            "lstrip": entry["lstrip"],
            "normalized": entry["normalized"],
            "rstrip": entry["rstrip"],
            "single_word": entry["single_word"],
            "special": entry["special"],
        }
        for index, entry in sorted(added.items())
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            **AUDIO_TOKENS,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "processor_class": "Qwen3ASRProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# Markers
# ----------------------------------------------------------------------------------------------------------------


def _marker(seed: int, kind: Kind, layout: str) -> dict[str, Any]:
    return {"format_version": TINY_FORMAT_VERSION, "seed": seed, "kind": kind, "layout": layout}


def _write_marker(directory: Path, seed: int, kind: Kind, layout: str) -> None:
    files = {
        path.name: path.stat().st_size
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MARKER_FILE
    }
    _write_json(directory / MARKER_FILE, {**_marker(seed, kind, layout), "files": files})


def _is_current(directory: Path, seed: int, kind: Kind, layout: str) -> bool:
    try:
        recorded = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in _marker(seed, kind, layout).items()):
        return False
    files = recorded.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = directory / str(name)
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_readme(directory: Path, kind: Kind, layout: str, seed: int) -> None:
    what = (
        "Qwen3-ForcedAligner (Qwen3ASRForTokenClassification)"
        if kind == "aligner"
        else ("Qwen3-ASR (Qwen3ASRForConditionalGeneration)")
    )
    where = (
        "native transformers layout (save_pretrained, like Qwen/Qwen3-ASR-1.7B-hf)"
        if layout == "hf"
        else "original Qwen layout (thinker_config, thinker.* weights, like Qwen/Qwen3-ASR-1.7B)"
    )
    text = (
        f"Tiny {what}, {where}.\n\n"
        f"THE WEIGHTS ARE RANDOM (seed {seed}): this model transcribes nothing; its output is noise.\n"
        "It exists for offline tests of the server: real architecture, real mel settings, real prompt format,\n"
        "a real byte-level BPE tokenizer trained on a tiny corpus, a compact vocabulary (token ids differ from the\n"
        "real checkpoints': read them from config.json / generation_config.json / the tokenizer).\n\n"
        "Built by asr_server.models.tiny_checkpoint.build_all "
        f"(format version {TINY_FORMAT_VERSION}).\n"
    )
    (directory / "README.txt").write_text(text, encoding="utf-8")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
