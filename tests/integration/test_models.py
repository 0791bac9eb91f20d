"""Tiny checkpoints and the model loader: tokenizer, prompt format, both layouts, the reference decode paths."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asr_server.errors import FailedPrecondition
from asr_server.models import loading
from asr_server.models.loading import LoadedAlignerModel, LoadedAsrModel, load_aligner_model, load_asr_model
from asr_server.models.tiny_checkpoint import (
    ALIGNER_NUM_LABELS,
    MARKER_FILE,
    PLAIN_ADDED_TOKENS,
    SPECIAL_TOKENS,
    TinyCheckpoints,
    build_all,
)

AUDIO_TOKENS_PER_SECOND = 13
REAL_IDS = {"<|audio_pad|>": 151676, "<timestamp>": 151705, "<|im_end|>": 151645}


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    signal = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    return signal.astype(np.float32)


def expected_prompt(context: str, n_audio: int, language: str | None) -> str:
    return (
        f"<|im_start|>system\n{context}<|im_end|>\n"
        f"<|im_start|>user\n<|audio_start|>{'<|audio_pad|>' * n_audio}<|audio_end|><|im_end|>\n"
        "<|im_start|>assistant\n" + (f"language {language}<asr_text>" if language else "")
    )


def rendered_prompt(processor: Any, audio: np.ndarray, **kwargs: Any) -> str | None:
    """The prompt string before audio expansion, where this transformers has `tokenize=False` (5.24 does, 5.17
    hard-codes tokenize=True)."""
    if "tokenize" not in inspect.signature(processor.apply_transcription_request).parameters:
        return None
    prompts = processor.apply_transcription_request(audio, tokenize=False, **kwargs)
    assert isinstance(prompts, list) and len(prompts) == 1
    return str(prompts[0])


@pytest.fixture(scope="module")
def asr(tiny_checkpoints: TinyCheckpoints) -> dict[str, LoadedAsrModel]:
    return {
        "hf": load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32"),
        "original": load_asr_model(str(tiny_checkpoints.asr_original), dtype="float32"),
    }


@pytest.fixture(scope="module")
def aligner(tiny_checkpoints: TinyCheckpoints) -> dict[str, LoadedAlignerModel]:
    return {
        "hf": load_aligner_model(str(tiny_checkpoints.aligner_hf), dtype="float32"),
        "original": load_aligner_model(str(tiny_checkpoints.aligner_original), dtype="float32"),
    }


# ---------------------------------------------------------------------------------------------------------------
# The checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------


def test_build_all_writes_both_layouts_with_readme_and_marker(tiny_checkpoints: TinyCheckpoints) -> None:
    for path in (tiny_checkpoints.asr_hf, tiny_checkpoints.aligner_hf):
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "qwen3_asr" and "thinker_config" not in config
        assert (path / "model.safetensors").is_file()
    for path in (tiny_checkpoints.asr_original, tiny_checkpoints.aligner_original):
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "qwen3_asr" and "audio_config" in config["thinker_config"]
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"} <= {
            p.name for p in path.iterdir()
        }
    for path in vars(tiny_checkpoints).values():
        assert "random" in (path / "README.txt").read_text().lower()
        assert (path / MARKER_FILE).is_file()

    aligner_original = json.loads((tiny_checkpoints.aligner_original / "config.json").read_text())
    assert aligner_original["thinker_config"]["classify_num"] == ALIGNER_NUM_LABELS
    assert aligner_original["thinker_config"]["model_type"] == "qwen3_forced_aligner"


def test_original_weights_use_the_original_names(tiny_checkpoints: TinyCheckpoints) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoints.asr_original / "model.safetensors"), "pt") as f:
        asr_keys = set(f.keys())
    with safe_open(str(tiny_checkpoints.aligner_original / "model.safetensors"), "pt") as f:
        aligner_keys = set(f.keys())
    assert all(key.startswith("thinker.") for key in asr_keys | aligner_keys)
    for keys in (asr_keys, aligner_keys):
        assert {"thinker.audio_tower.proj1.weight", "thinker.audio_tower.proj2.bias", "thinker.lm_head.weight"} <= keys
        assert "thinker.model.embed_tokens.weight" in keys
        assert any(key.startswith("thinker.audio_tower.layers.1.") for key in keys)
        assert any(key.startswith("thinker.model.layers.1.") for key in keys)


def test_build_all_reuses_current_dirs_and_rebuilds_damaged_ones_identically(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path
) -> None:
    root = tmp_path / "copy"
    for path in vars(tiny_checkpoints).values():
        shutil.copytree(path, root / path.name)
    original_bytes = (root / "tiny-asr-original" / "model.safetensors").read_bytes()
    untouched = (root / "tiny-aligner-hf" / "model.safetensors").stat().st_mtime_ns
    (root / "tiny-asr-original" / "model.safetensors").unlink()

    rebuilt = build_all(root, seed=0)

    assert (rebuilt.asr_original / "model.safetensors").read_bytes() == original_bytes  # deterministic for a seed
    assert (rebuilt.aligner_hf / "model.safetensors").stat().st_mtime_ns == untouched  # not rebuilt
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging dirs left


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and ids
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_special_tokens_have_the_ids_in_the_config(
    asr: dict[str, LoadedAsrModel], aligner: dict[str, LoadedAlignerModel], layout: str
) -> None:
    model, processor = asr[layout].model, asr[layout].processor
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS)}
    assert len(set(ids.values())) == len(ids)
    assert model.config.audio_token_id == ids["<|audio_pad|>"] == processor.audio_token_id
    assert processor.audio_bos_token_id == ids["<|audio_start|>"]
    assert processor.audio_eos_token_id == ids["<|audio_end|>"]
    assert (processor.audio_token, processor.audio_bos_token, processor.audio_eos_token) == (
        "<|audio_pad|>",
        "<|audio_start|>",
        "<|audio_end|>",
    )
    assert list(model.generation_config.eos_token_id) == [ids["<|endoftext|>"], ids["<|im_end|>"]]
    assert model.generation_config.pad_token_id == ids["<|im_end|>"]
    assert model.generation_config.do_sample is False
    assert aligner[layout].model.config.timestamp_token_id == ids["<timestamp>"]
    assert aligner[layout].model.config.audio_token_id == ids["<|audio_pad|>"]
    # A compact vocabulary: code that hard-codes the real checkpoints' ids fails against these.
    for token, real_id in REAL_IDS.items():
        assert ids[token] != real_id
    # Like the real ones, the embeddings have more rows than the tokenizer has tokens.
    assert model.get_input_embeddings().weight.shape[0] > len(tokenizer)
    # Which tokens are special.
    special = set(tokenizer.all_special_tokens)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|audio_pad|>"} <= special
    assert not special & set(PLAIN_ADDED_TOKENS)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_asr_text_survives_skip_special_tokens(asr: dict[str, LoadedAsrModel], layout: str) -> None:
    processor = asr[layout].processor
    tokenizer = processor.tokenizer
    ids = tokenizer.encode("language English<asr_text>Hello world, 你好<|im_end|>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<asr_text>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "language English<asr_text>Hello world, 你好"
    assert processor.decode(ids, return_format="parsed") == {
        "language": "English",
        "transcription": "Hello world, 你好",
    }
    assert processor.decode(ids, return_format="transcription_only") == "Hello world, 你好"


def test_both_layouts_tokenize_identically(asr: dict[str, LoadedAsrModel]) -> None:
    text = "<|im_start|>system\nThe quick brown fox, 今天天气很好。こんにちは 12345!<|im_end|>\n<asr_text><timestamp>"
    hf_ids = asr["hf"].processor.tokenizer.encode(text, add_special_tokens=False)
    original_ids = asr["original"].processor.tokenizer.encode(text, add_special_tokens=False)
    assert hf_ids == original_ids
    assert asr["hf"].processor.tokenizer.decode(hf_ids) == text


# ---------------------------------------------------------------------------------------------------------------
# Prompt format
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize(
    ("language", "prompt", "shown_language", "context"),
    [
        ("English", "hello", "English", "hello"),
        ("en", None, "English", ""),
        (None, None, None, ""),
        ("zh", "", "Chinese", ""),
    ],
)
def test_transcription_prompt_renders_the_real_format(
    asr: dict[str, LoadedAsrModel],
    layout: str,
    language: str | None,
    prompt: str | None,
    shown_language: str | None,
    context: str,
) -> None:
    processor = asr[layout].processor
    audio = clip(3.0)

    rendered = rendered_prompt(processor, audio, language=language, prompt=prompt)
    if rendered is not None:
        assert rendered == expected_prompt(context, 1, shown_language)

    inputs = processor.apply_transcription_request(audio, language=language, prompt=prompt)
    n_audio = int((inputs["input_ids"][0] == processor.audio_token_id).sum())
    assert n_audio == 3 * AUDIO_TOKENS_PER_SECOND
    decoded = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert decoded == expected_prompt(context, n_audio, shown_language)
    assert inputs["input_features"].shape[1:] == (128, 300)
    assert int(inputs["input_features_mask"].sum()) == 300


def test_aligner_input_interleaves_words_with_timestamp_markers(aligner: dict[str, LoadedAlignerModel]) -> None:
    for loaded in aligner.values():
        processor = loaded.processor
        inputs, words = processor.prepare_forced_aligner_inputs(clip(2.0), "Hello, world! 你好", language="English")
        assert words == [["Hello", "world", "你", "好"]]
        decoded = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
        pads = "<|audio_pad|>" * (2 * AUDIO_TOKENS_PER_SECOND)
        assert decoded == (
            f"<|audio_start|>{pads}<|audio_end|>"
            "Hello<timestamp><timestamp>world<timestamp><timestamp>你<timestamp><timestamp>好<timestamp><timestamp>"
        )


# ---------------------------------------------------------------------------------------------------------------
# The two layouts are the same model
# ---------------------------------------------------------------------------------------------------------------


def test_original_layout_loads_the_same_weights(
    asr: dict[str, LoadedAsrModel], aligner: dict[str, LoadedAlignerModel]
) -> None:
    for pair in (asr, aligner):
        hf_state = pair["hf"].model.state_dict()
        original_state = pair["original"].model.state_dict()
        assert hf_state.keys() == original_state.keys()
        for name, tensor in hf_state.items():
            assert torch.equal(tensor, original_state[name]), name
    assert asr["original"].layout == "original" and asr["hf"].layout == "hf"
    assert asr["original"].model.lm_head.weight is asr["original"].model.get_input_embeddings().weight  # tied
    assert aligner["original"].model.config.num_labels == ALIGNER_NUM_LABELS


def test_original_layout_generates_the_same_tokens(asr: dict[str, LoadedAsrModel]) -> None:
    outputs = {}
    for layout, loaded in asr.items():
        inputs = loaded.processor.apply_transcription_request(clip(3.0, seed=1), language="English", prompt="hello")
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        outputs[layout] = out[:, inputs["input_ids"].shape[1] :]
    assert outputs["hf"].shape == (1, 16)
    assert torch.equal(outputs["hf"], outputs["original"])


def test_original_layout_gives_the_same_aligner_logits(aligner: dict[str, LoadedAlignerModel]) -> None:
    logits = {}
    for layout, loaded in aligner.items():
        inputs, _ = loaded.processor.prepare_forced_aligner_inputs(clip(2.0), "hello world", language="English")
        with torch.inference_mode():
            logits[layout] = loaded.model(**inputs).logits
    assert logits["hf"].shape[-1] == ALIGNER_NUM_LABELS
    torch.testing.assert_close(logits["hf"], logits["original"], rtol=0, atol=0)


def test_the_output_depends_on_the_audio(asr: dict[str, LoadedAsrModel]) -> None:
    loaded = asr["hf"]
    outputs = []
    for audio in (clip(2.0, seed=1), np.zeros(32000, dtype=np.float32)):
        inputs = loaded.processor.apply_transcription_request(audio)
        with torch.inference_mode():
            outputs.append(loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, -8:].tolist())
    assert outputs[0] != outputs[1]


# ---------------------------------------------------------------------------------------------------------------
# The reference decode paths end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_transcription_reference_path(asr: dict[str, LoadedAsrModel], layout: str) -> None:
    loaded = asr[layout]
    processor = loaded.processor
    inputs = processor.apply_transcription_request([clip(1.0), clip(2.5, seed=3)], language=["English", None])
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    for row in new_tokens:
        parsed = processor.decode(row, return_format="parsed")
        assert isinstance(parsed, dict) and set(parsed) == {"language", "transcription"}
        assert isinstance(parsed["transcription"], str)
    batch = processor.decode(new_tokens, return_format="parsed")
    assert isinstance(batch, list) and len(batch) == 2

    # What a trained model answers parses into language and text.
    tokenizer = processor.tokenizer
    answer = tokenizer.encode("language German<asr_text>Guten Tag<|im_end|>", add_special_tokens=False)
    assert processor.decode(torch.tensor(answer), return_format="parsed") == {
        "language": "German",
        "transcription": "Guten Tag",
    }


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_alignment_reference_path(aligner: dict[str, LoadedAlignerModel], layout: str) -> None:
    loaded = aligner[layout]
    processor = loaded.processor
    inputs, words = processor.prepare_forced_aligner_inputs(clip(3.0), "the quick brown fox 你好", language="English")
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], ALIGNER_NUM_LABELS)
    result = processor.decode_forced_alignment(
        logits, inputs["input_ids"], words, timestamp_token_id=loaded.model.config.timestamp_token_id
    )
    assert len(result) == 1
    assert [item["text"] for item in result[0]] == ["the", "quick", "brown", "fox", "你", "好"]
    previous = 0.0
    for item in result[0]:
        assert isinstance(item["start_time"], float) and isinstance(item["end_time"], float)
        assert previous <= item["start_time"] <= item["end_time"] <= ALIGNER_NUM_LABELS * 0.08
        previous = item["start_time"]


# ---------------------------------------------------------------------------------------------------------------
# Loader options and errors
# ---------------------------------------------------------------------------------------------------------------


def test_dtype_options(tiny_checkpoints: TinyCheckpoints) -> None:
    auto = load_asr_model(str(tiny_checkpoints.asr_original))
    assert auto.dtype == torch.float32 and auto.device == torch.device("cpu")  # "auto" on CPU
    for path in (tiny_checkpoints.asr_hf, tiny_checkpoints.asr_original):
        loaded = load_asr_model(str(path), dtype="bf16", attn_implementation="sdpa")
        assert loaded.dtype == torch.bfloat16
        assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
        inputs = loaded.processor.apply_transcription_request(clip(1.0), language="English")
        inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_asr_model(str(tiny_checkpoints.asr_hf), dtype="int8")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="does not exist"):
        load_asr_model(str(tmp_path / "nope"))
    with pytest.raises(FailedPrecondition, match="does not exist"):
        load_aligner_model("./models/Qwen3-ForcedAligner-0.6B")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="no config.json"):
        load_asr_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(FailedPrecondition, match="not a Qwen3-ASR checkpoint.*whisper"):
        load_asr_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="cannot read"):
        load_asr_model(str(tmp_path))
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FailedPrecondition, match="is a file"):
        load_asr_model(str(file))


def test_checkpoint_without_weights(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    expected = {
        tiny_checkpoints.asr_hf: "cannot load the model in .*model.safetensors",
        tiny_checkpoints.asr_original: r"has no \*.safetensors weights",
    }
    for source, message in expected.items():
        target = tmp_path / source.name
        shutil.copytree(source, target)
        (target / "model.safetensors").unlink()
        with pytest.raises(FailedPrecondition, match=message):
            load_asr_model(str(target))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_requested_without_a_gpu(tiny_checkpoints: TinyCheckpoints) -> None:
    with pytest.raises(FailedPrecondition, match="CUDA is not available"):
        load_asr_model(str(tiny_checkpoints.asr_hf), device="cuda")
    with pytest.raises(ValueError, match="invalid device"):
        load_asr_model(str(tiny_checkpoints.asr_hf), device="gpu0")


def test_wrong_kind(tiny_checkpoints: TinyCheckpoints) -> None:
    for path in (tiny_checkpoints.aligner_hf, tiny_checkpoints.aligner_original):
        with pytest.raises(FailedPrecondition, match="forced aligner checkpoint"):
            load_asr_model(str(path))
    for path in (tiny_checkpoints.asr_hf, tiny_checkpoints.asr_original):
        with pytest.raises(FailedPrecondition, match="speech recognition model checkpoint"):
            load_aligner_model(str(path))


def test_hub_id_that_cannot_be_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: Any, **kwargs: Any) -> str:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FailedPrecondition, match="'Qwen/Qwen3-ASR-1.7B' is not a local directory and could not be"):
        load_asr_model("Qwen/Qwen3-ASR-1.7B")


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_checkpoint_with_a_missing_weight_is_refused(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, layout: str
) -> None:
    """transformers would initialise a missing weight randomly and only log it: the loader refuses."""
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoints.asr_hf if layout == "hf" else tiny_checkpoints.asr_original
    target = tmp_path / source.name
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    dropped = next(key for key in sorted(weights) if "layers.1.mlp.down_proj" in key)
    del weights[dropped]
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FailedPrecondition, match="missing weights.*layers.1.mlp.down_proj"):
        load_asr_model(str(target))


def test_original_config_flattening_matches_the_hf_config(tiny_checkpoints: TinyCheckpoints) -> None:
    from transformers import Qwen3ASRConfig

    for original, hf, kind in (
        (tiny_checkpoints.asr_original, tiny_checkpoints.asr_hf, "asr"),
        (tiny_checkpoints.aligner_original, tiny_checkpoints.aligner_hf, "aligner"),
    ):
        raw = json.loads((original / "config.json").read_text())
        assert loading.detect_layout(raw) == "original" and loading.detect_kind(raw) == kind
        flat = Qwen3ASRConfig(**loading.flatten_original_config(raw))
        native = Qwen3ASRConfig.from_pretrained(str(hf))
        for field in ("d_model", "encoder_layers", "encoder_attention_heads", "n_window", "n_window_infer",
                      "output_dim", "max_position_embeddings", "downsample_hidden_size"):  # fmt: skip
            assert getattr(flat.audio_config, field) == getattr(native.audio_config, field), field
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "tie_word_embeddings", "rope_parameters"):  # fmt: skip
            assert getattr(flat.text_config, field) == getattr(native.text_config, field), field
        assert flat.audio_token_id == native.audio_token_id
        assert flat.num_labels == native.num_labels
        if kind == "aligner":
            assert flat.timestamp_token_id == native.timestamp_token_id


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_a_cuda_device_map_without_cuda_is_a_clear_failed_precondition(
    tiny_checkpoints: TinyCheckpoints, layout: str
) -> None:
    path = tiny_checkpoints.asr_hf if layout == "hf" else tiny_checkpoints.asr_original
    with pytest.raises(FailedPrecondition, match="device_map 'cuda:0' requested but CUDA is not available"):
        load_asr_model(str(path), device_map="cuda:0")
