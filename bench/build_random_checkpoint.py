"""Write a random-weight Qwen3-ASR checkpoint of the real 0.6B or 1.7B size, offline.

Real weights cannot be downloaded on the benchmark machine and a 4 GB checkpoint cannot be carried there, so the
benchmark builds one in place: the exact architecture and vocabulary size of the real model (what sets the speed),
random weights (transformers' own init, std 0.02), and the tiny checkpoint's tokenizer and processor (the token
ids differ from the real ones; nothing in the server hard-codes them). Transcripts are gibberish; use the server's
--bench-forced-tokens-per-audio-s so every request generates a realistic number of tokens.

    python bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "1.7b": (
        {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
         "output_dim": 2048},
        {"hidden_size": 2048, "intermediate_size": 6144},
    ),
    "0.6b": (
        {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584,
         "output_dim": 1024},
        {"hidden_size": 1024, "intermediate_size": 3072},
    ),
}  # fmt: skip


def build(size: str, out: Path, device: str) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    from asr_server.models.tiny_checkpoint import build_processor, build_tokenizer, token_ids

    audio_sizes, text_sizes = SIZES[size]
    tokenizer = build_tokenizer()
    ids = token_ids(tokenizer)
    audio = {
        "num_mel_bins": 128,
        "downsample_hidden_size": 480,
        "n_window": 50,
        "n_window_infer": 800,
        "max_position_embeddings": 13,
        **audio_sizes,
    }
    text = {
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        **text_sizes,
    }
    config = Qwen3ASRConfig(
        audio_config=audio,
        text_config=text,
        audio_token_id=ids["<|audio_pad|>"],
        timestamp_token_id=ids["<timestamp>"],
        pad_token_id=ids["<|im_end|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        tie_word_embeddings=True,
        architectures=["Qwen3ASRForConditionalGeneration"],
    )
    start = time.monotonic()
    with torch.device(device):
        model = Qwen3ASRForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=list(config.eos_token_id), pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=512
    )
    params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    build_processor(tokenizer, "asr").save_pretrained(str(out))
    print(f"random {size}: {params / 1e9:.2f} B parameters written to {out} in {time.monotonic() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    args = parser.parse_args(argv)
    build(args.size, args.out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
