"""Forced-aligner throughput in audio-seconds per second, at the real 0.6B size, batch 1, 8 and 32.

    PYTHONPATH=server python bench/aligner_bench.py [--clip-s 60 180] [--batches 1 8 32] [--device cuda]

Offline: the model is `Qwen3ASRForTokenClassification` with the exact architecture of Qwen3-ForcedAligner-0.6B
(audio encoder 1024/24 layers, text decoder 1024/28 layers, vocabulary 152064, 5000 timestamp classes), built from a
config with random weights on the device; the processor is the tiny checkpoint's (same feature extractor and prompt,
a compact tokenizer). Each clip carries 2.5 words per second of English text (about what speech has).

What is timed is exactly what the sidecar's batcher runs per batch (`AlignerCore.align_batch`): per-clip feature
extraction and tokenisation on the CPU, one padded forward pass, argmax at the <timestamp> positions, and the
monotonicity repair; the preparation share is also shown alone. Needs only torch, transformers and numpy.

Before the timings, a parity check on the tiny aligner (fp32, CPU): the core alone and in a batch against
transformers' reference path (`prepare_forced_aligner_inputs` -> model -> `decode_forced_alignment`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "server"))

from asr_server.aligner.core import AlignerCore, AlignJob  # noqa: E402
from asr_server.models.loading import LoadedAlignerModel  # noqa: E402

WORDS = (
    "the quick brown fox jumps over the lazy dog while we record speech at sixteen kilohertz and align every word "
    "with its start and end time so that subtitles appear exactly when the speaker says them"
).split()
WORDS_PER_S = 2.5

# Qwen3-ForcedAligner-0.6B (see /work/shared/notes/qwen3-asr-facts.md).
AUDIO_SIZES: dict[str, Any] = {
    "num_mel_bins": 128,
    "d_model": 1024,
    "encoder_layers": 24,
    "encoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "output_dim": 1024,
    "downsample_hidden_size": 480,
    "n_window": 50,
    "n_window_infer": 800,
    "max_position_embeddings": 13,
}
TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 152064,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
}


def build_real_size(device: str, dtype: Any) -> LoadedAlignerModel:
    import torch
    from transformers import Qwen3ASRConfig, Qwen3ASRForTokenClassification

    from asr_server.models.tiny_checkpoint import build_processor, build_tokenizer, token_ids

    tokenizer = build_tokenizer()
    ids = token_ids(tokenizer)
    config = Qwen3ASRConfig(
        audio_config=AUDIO_SIZES,
        text_config=TEXT_SIZES,
        audio_token_id=ids["<|audio_pad|>"],
        timestamp_token_id=ids["<timestamp>"],
        pad_token_id=ids["<|im_end|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        tie_word_embeddings=False,
        num_labels=5000,
        architectures=["Qwen3ASRForTokenClassification"],
    )
    with torch.device(device):
        model = Qwen3ASRForTokenClassification._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    processor = build_processor(tokenizer, "aligner")
    return LoadedAlignerModel(model, processor, "random-Qwen3-ForcedAligner-0.6B", "hf", dtype, torch.device(device))


def make_jobs(count: int, clip_s: float, seed: int) -> list[AlignJob]:
    rng = np.random.default_rng(seed)
    n_words = max(1, int(clip_s * WORDS_PER_S))
    jobs = []
    for index in range(count):
        t = np.arange(int(clip_s * 16000)) / 16000
        audio = (0.2 * np.sin(2 * np.pi * (150 + 10 * index) * t) + 0.05 * rng.standard_normal(t.size)).astype(
            np.float32
        )
        text = " ".join(WORDS[(index + i) % len(WORDS)] for i in range(n_words))
        jobs.append(AlignJob(f"{clip_s}-{index}", audio, text, "English"))
    return jobs


def parity_check() -> dict[str, Any]:
    import torch

    from asr_server.models.loading import load_aligner_model
    from asr_server.models.tiny_checkpoint import build_all

    root = Path(tempfile.mkdtemp(prefix="tiny-"))
    loaded = load_aligner_model(str(build_all(root).aligner_hf), dtype="float32", device="cpu")
    core = AlignerCore(loaded)
    processor, model = loaded.processor, loaded.model
    jobs = make_jobs(4, 3.0, seed=7)
    jobs[0] = AlignJob("short", jobs[0].audio_16k[:4800], "short clip here", "English")
    jobs[1] = AlignJob("zh", jobs[1].audio_16k, "今天天气很好", "Chinese")

    def reference(job: AlignJob) -> list[tuple[str, int, int]]:
        inputs, words = processor.prepare_forced_aligner_inputs(
            audio=[job.audio_16k], transcript=[job.text], language=[job.language]
        )
        with torch.inference_mode():
            logits = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                input_features=inputs["input_features"],
                input_features_mask=inputs["input_features_mask"],
            ).logits
        out = processor.decode_forced_alignment(logits, inputs["input_ids"], words, model.config.timestamp_token_id)
        return [(w["text"], round(w["start_time"] * 1000), round(w["end_time"] * 1000)) for w in out[0]]

    def timed(words: Any) -> list[tuple[str, int, int]]:
        if isinstance(words, Exception):
            raise words
        return [(w.text, w.start_ms, w.end_ms) for w in words]

    refs = [reference(j) for j in jobs]
    single = all(timed(core.align_batch([j])[0]) == r for j, r in zip(jobs, refs, strict=True))
    batched = all(timed(w) == r for w, r in zip(core.align_batch(jobs), refs, strict=True))
    return {"parity_single": single, "parity_batched": batched, "jobs": len(jobs)}


def bench(loaded: LoadedAlignerModel, clip_s: float, batch: int, repeats: int) -> dict[str, Any]:
    import torch

    core = AlignerCore(loaded)
    jobs = make_jobs(batch, clip_s, seed=batch)
    row: dict[str, Any] = {"clip_s": clip_s, "batch": batch, "words_per_clip": int(clip_s * WORDS_PER_S)}
    try:
        core.align_batch(jobs)  # warm-up: kernels, allocator
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            outcomes = core.align_batch(jobs)
            times.append(time.perf_counter() - started)
        if any(isinstance(o, Exception) for o in outcomes):
            raise RuntimeError(next(o for o in outcomes if isinstance(o, Exception)))
        started = time.perf_counter()
        for job in jobs:
            core.prepare(job)
        prepare_s = time.perf_counter() - started
    except torch.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        torch.cuda.empty_cache()
        return row
    best = min(times)
    row.update(
        {
            "best_s": round(best, 4),
            "median_s": round(float(np.median(times)), 4),
            "audio_s_per_s": round(batch * clip_s / best, 1),
            "prepare_s": round(prepare_s, 4),
            "prepare_share": round(prepare_s / best, 3),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0,
        }
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-s", type=float, nargs="+", default=[60.0, 180.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = parser.parse_args()

    import torch
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    if not args.no_parity:
        parity = parity_check()
        print(json.dumps(parity), flush=True)
        meta.update(parity)
    started = time.perf_counter()
    loaded = build_real_size(args.device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in loaded.model.parameters())
    meta["params_b"] = round(params / 1e9, 3)
    meta["build_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"params_b": meta["params_b"], "build_s": meta["build_s"]}), flush=True)
    for clip_s in args.clip_s:
        for batch in args.batches:
            row = bench(loaded, clip_s, batch, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "aligner_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\n{meta['device']}, transformers {meta['transformers']}, {args.dtype}, {meta['params_b']} B params")
    print("| clip | batch | audio-s per s | s per batch | CPU prep share | peak GPU GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['clip_s']:.0f} s | {row['batch']} | {row['error']} | | | |")
        else:
            print(
                f"| {row['clip_s']:.0f} s | {row['batch']} | {row['audio_s_per_s']} | {row['best_s']} | "
                f"{row['prepare_share']:.0%} | {row['peak_gpu_gib']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
