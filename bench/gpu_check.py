"""In-process GPU checks and engine profile (no gRPC): run on the GPU machine by bench/run_gpu.sh.

    python bench/gpu_check.py kernel
    python bench/gpu_check.py parity --model DIR [--n 24 --max-new 48]
    python bench/gpu_check.py engine --model DIR [--n 128 --audio-s 120]

kernel: the Triton paged decode attention against the torch reference on random bf16 data (relative error).
parity: bf16 greedy tokens of the continuous engine against `model.generate` run on each request alone; prints
  the share of requests whose tokens match exactly and where the others first differ.
engine: throughput of the continuous engine alone (all requests submitted at once, forced 4 tokens/s + 6), then
  the same with per-phase synchronisation for a breakdown (encoder, prefill, decode, host), then one request alone;
  then the arrivals run below. With `--device cpu` (the tiny checkpoint, a few seconds) only the arrivals run.

arrivals (part of engine): requests decoding in the background while others arrive staggered (one every few
  steps), once with chunked prefill off and once with `--max-step-tokens` (and the same with torch features):
  median and max step time in steps that carry prefill work ("with arrivals") and in steps that only decode,
  and time to first token p50/p99 of the arrivals. A step's wall time is the host's time between two step()
  calls: the host reads the step before's tokens, so in steady state it tracks the device time of a step.

    python bench/gpu_check.py engine --model DIR --device cpu   # e.g. the tiny checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from asr_server.engine.bench_mode import forced_tokens
from asr_server.engine.continuous.attention import (
    num_splits_for,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
)
from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.models.loading import load_asr_model


def kernel_check() -> dict[str, Any]:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    heads, kv_heads, dim, page = 16, 8, 128, 64
    pages_total = 16384
    k = torch.randn(pages_total, kv_heads, page, dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    results = {}
    for batch in (1, 7, 64, 128):
        lens = torch.randint(1, 2600, (batch,), device=dev, dtype=torch.int32)
        width = 64
        perm = torch.randperm(pages_total - 1, device=dev)[: batch * width].reshape(batch, width) + 1
        table = perm.to(torch.int32)
        q = torch.randn(batch, heads, dim, device=dev, dtype=torch.bfloat16)
        max_pages = int((lens.max().item() + page - 1) // page)
        ref = paged_decode_attention_torch(q.float(), k.float(), v.float(), table, lens, dim**-0.5, max_pages)
        splits = num_splits_for(batch, kv_heads, sms)
        out = paged_decode_attention_triton(q, k, v, table, lens, dim**-0.5, splits).float()
        rel = float((out - ref).norm() / ref.norm())
        results[f"batch{batch}_splits{splits}"] = rel
        print(f"kernel batch {batch:4d} splits {splits:2d}: rel err {rel:.2e}", flush=True)
    return results


def make_requests(n: int, seed: int, lengths_s: list[float], max_new: int, forced: bool) -> list[DecodeRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        audio_s = lengths_s[i % len(lengths_s)]
        audio = (0.1 * rng.standard_normal(int(audio_s * 16000))).astype(np.float32)
        options = DecodeOptions(language=None, context="", max_new_tokens=max_new)
        out.append(
            DecodeRequest(f"r{i}", audio, options, forced_num_tokens=forced_tokens(audio_s, 4.0) if forced else None)
        )
    return out


def run_engine(engine: ContinuousEngine, requests: list[DecodeRequest]) -> tuple[dict[str, tuple[int, ...]], float]:
    start = time.perf_counter()
    for r in requests:
        engine.add(WorkItem(r, time.time_ns(), time.monotonic()))
    got: dict[str, tuple[int, ...]] = {}
    while engine.num_waiting() or engine.num_running():
        for o in engine.step():
            if o.error is not None:
                print("ERROR", o.request_id, o.error, flush=True)
            elif o.result is not None:
                got[o.request_id] = o.result.token_ids
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return got, time.perf_counter() - start


def arrivals_run(
    loaded: Any,
    config: ContinuousConfig,
    *,
    background: int,
    background_s: float,
    arrivals: int,
    arrival_s: float,
    every_steps: int,
) -> dict[str, Any]:
    """Background decodes, then `arrivals` requests one every `every_steps` steps: step times with and without
    prefill work in the step, and the arrivals' time to first token."""
    engine = ContinuousEngine(loaded, config)
    engine.warmup()
    schedule = engine._scheduler.schedule
    prefill_tokens: list[int] = []

    def recording(now_s: float, **kwargs: Any) -> Any:
        plan = schedule(now_s, **kwargs)
        prefill_tokens.append(plan.prefill_tokens)
        return plan

    engine._scheduler.schedule = recording  # type: ignore[method-assign]
    # Background rows decode longer than the arrivals take (forced lengths ignore EOS).
    span = (arrivals + 2) * every_steps + 64 * arrivals
    for r in make_requests(background, 5, [background_s], 8192, forced=False):
        forced = DecodeRequest(r.request_id, r.audio_16k, r.options, forced_num_tokens=span)
        engine.add(WorkItem(forced, time.time_ns(), time.monotonic()))
    while engine.num_waiting() or any(p.prefilling for p in engine._scheduler.running()):
        engine.step()
    for _ in range(3):
        engine.step()
    prefill_tokens.clear()
    incoming = [
        DecodeRequest(f"a{r.request_id}", r.audio_16k, r.options, forced_num_tokens=16)
        for r in make_requests(arrivals, 6, [arrival_s], 8192, forced=False)
    ]
    step_s: list[float] = []
    ttft_ms: list[float] = []
    step = 0
    last = time.perf_counter()
    while incoming or len(ttft_ms) < arrivals:
        if incoming and step % every_steps == 0:
            engine.add(WorkItem(incoming.pop(0), time.time_ns(), time.monotonic()))
        for o in engine.step():
            if o.result is not None and o.request_id.startswith("a"):
                ttft_ms.append((o.result.first_token_ns - o.result.enqueued_ns) / 1e6)
            elif o.error is not None:
                raise RuntimeError(f"{o.request_id}: {o.error}")
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
        step += 1
    for r in engine._scheduler.running():
        engine.abort(r.request_id)
    on_device = engine._runner.features_on_device
    engine.close()
    with_prefill = [t * 1000 for t, n in zip(step_s, prefill_tokens, strict=False) if n]
    decode_only = [t * 1000 for t, n in zip(step_s, prefill_tokens, strict=False) if not n]

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {"steps": 0}
        return {"steps": len(values), "median_ms": float(np.median(values)), "max_ms": float(np.max(values))}

    return {
        "max_step_tokens": config.max_step_tokens,
        "features": config.features,
        "features_on_device": on_device,
        "steps_with_arrivals": stats(with_prefill),
        "steps_without_arrivals": stats(decode_only),
        "ttft_ms": {"p50": float(np.percentile(ttft_ms, 50)), "p99": float(np.percentile(ttft_ms, 99))},
    }


def arrivals_bench(loaded: Any, device: str, max_step_tokens: int) -> list[dict[str, Any]]:
    """Chunked prefill off and on (and on with torch features), at a size that suits the device."""
    if device == "cpu":
        base = ContinuousConfig(max_running=8, page_size=16, kv_cache_tokens=16384, cuda_graphs=False)
        sizes = {"background": 4, "background_s": 2.0, "arrivals": 6, "arrival_s": 9.0, "every_steps": 3}
    else:
        base = ContinuousConfig(max_running=128)
        sizes = {"background": 64, "background_s": 120.0, "arrivals": 32, "arrival_s": 120.0, "every_steps": 8}
    runs = []
    other = "torch" if device == "cpu" else "reference"  # the feature path "auto" does not pick on this device
    for step_tokens, features in ((0, "auto"), (max_step_tokens, "auto"), (max_step_tokens, other)):
        config = dataclasses.replace(base, max_step_tokens=step_tokens, features=features)  # type: ignore[arg-type]
        run = arrivals_run(loaded, config, **sizes)  # type: ignore[arg-type]
        w, wo, ttft = run["steps_with_arrivals"], run["steps_without_arrivals"], run["ttft_ms"]
        print(
            f"arrivals, max_step_tokens={step_tokens} features={features} (on device: {run['features_on_device']}): "
            "steps with arrivals "
            f"median {w.get('median_ms', 0):.2f} ms max {w.get('max_ms', 0):.2f} ms ({w['steps']}), without "
            f"median {wo.get('median_ms', 0):.2f} ms ({wo['steps']}); ttft p50 {ttft['p50']:.1f} ms "
            f"p99 {ttft['p99']:.1f} ms",
            flush=True,
        )
        runs.append(run)
    return runs


def parity(model_dir: str, n: int, max_new: int) -> dict[str, Any]:
    loaded = load_asr_model(model_dir, dtype="bfloat16", device="cuda")
    requests = make_requests(n, 1, [0.4, 1.5, 3.0, 5.0, 9.0, 17.0, 30.0], max_new, forced=False)
    generate = GenerateEngine(loaded, max_batch_size=1)
    ref = {}
    for r in requests:
        out = generate._run_batch([WorkItem(r, time.time_ns(), time.monotonic())])[0]
        if out.result is not None:
            ref[r.request_id] = out.result.token_ids
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=32, kv_cache_tokens=200_000))
    engine.warmup()
    got, _ = run_engine(engine, requests)
    exact = sum(1 for k in ref if got.get(k) == ref[k])
    diverge = []
    for k in ref:
        a, b = ref[k], got.get(k, ())
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            diverge.append(first)
    print(f"parity bf16: {exact}/{len(ref)} requests exact; first differing token at {sorted(diverge)}", flush=True)
    engine.close()
    return {"exact": exact, "total": len(ref), "first_divergence": sorted(diverge)}


def engine_bench(model_dir: str, n: int, audio_s: float, out_dir: str, device: str, step_tokens: int) -> dict[str, Any]:
    if device == "cpu":
        loaded = load_asr_model(model_dir, dtype="float32", device="cpu")
        return {"arrivals": arrivals_bench(loaded, "cpu", step_tokens or 32)}
    loaded = load_asr_model(model_dir, dtype="bfloat16", device=device)
    results: dict[str, Any] = {}
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=max(128, n)))
    t = time.perf_counter()
    engine.warmup()
    results["warmup_s"] = time.perf_counter() - t
    print(f"warmup + graph capture {results['warmup_s']:.1f} s", flush=True)
    for label, count, secs in (("single_120s", 1, 120.0), ("single_5s", 1, 5.0), ("single_5s_b", 1, 5.0)):
        _, wall = run_engine(engine, make_requests(count, 2, [secs], 8192, forced=True))
        results[label] = wall
        results[label + "_ttft_ms"] = engine.ttft_ms[-1]
        print(f"{label}: {wall * 1000:.0f} ms, first token after {engine.ttft_ms[-1]:.0f} ms", flush=True)
    requests = make_requests(n, 3, [audio_s], 8192, forced=True)
    _, wall = run_engine(engine, requests)
    results["throughput_audio_s_per_s"] = n * audio_s / wall
    results["throughput_wall_s"] = wall
    ttft = list(engine.ttft_ms)[-n:]
    results["throughput_ttft_ms_p50_p99"] = [float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99))]
    print(f"engine alone: {n} x {audio_s:.0f} s in {wall:.2f} s = {n * audio_s / wall:.0f} audio-s/s", flush=True)
    # Kernel-level profile of 24 long requests (prefill + decode): where the GPU time goes.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(engine, make_requests(24, 4, [audio_s], 8192, forced=True))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    if out_dir:
        with open(f"{out_dir}/torch_profile.txt", "w", encoding="utf-8") as fh:
            fh.write(table)
    print("\n".join(table.splitlines()[:18]), flush=True)
    engine.close()
    del engine
    torch.cuda.empty_cache()
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=max(128, n), profile=True))
    engine.warmup()
    engine.profile.clear()
    engine.decode_ms_by_bucket.clear()
    _, wall = run_engine(engine, make_requests(n, 3, [audio_s], 8192, forced=True))
    results["profile_wall_s"] = wall
    results["profile_s"] = dict(engine.profile)
    results["decode_ms_by_bucket"] = {
        str(b): {"steps": len(v), "median_ms": float(np.median(v))} for b, v in engine.decode_ms_by_bucket.items()
    }
    print(
        f"profile (synchronised) wall {wall:.2f} s: " + json.dumps({k: round(v, 3) for k, v in engine.profile.items()})
    )
    print("decode ms by bucket: " + json.dumps(results["decode_ms_by_bucket"]), flush=True)
    results["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    engine.close()
    del engine
    torch.cuda.empty_cache()
    # The same load with an fp8 KV cache (half the bytes per decode step).
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=max(128, n), kv_cache_dtype="fp8"))
    engine.warmup()
    _, wall = run_engine(engine, make_requests(1, 2, [120.0], 8192, forced=True))
    results["fp8_single_120s"] = wall
    _, wall = run_engine(engine, make_requests(n, 3, [audio_s], 8192, forced=True))
    results["fp8_throughput_audio_s_per_s"] = n * audio_s / wall
    print(
        f"fp8 KV: single 120 s {results['fp8_single_120s'] * 1000:.0f} ms; "
        f"{n} x {audio_s:.0f} s in {wall:.2f} s = {n * audio_s / wall:.0f} audio-s/s",
        flush=True,
    )
    engine.close()
    del engine
    torch.cuda.empty_cache()
    results["arrivals"] = arrivals_bench(loaded, device, step_tokens or 2048)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("kernel", "parity", "engine"))
    parser.add_argument("--model", default="")
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--audio-s", type=float, default=120.0)
    parser.add_argument("--json", default="")
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--device", default="cuda", help="engine part: cuda (full run) or cpu (arrivals only)")
    parser.add_argument("--max-step-tokens", type=int, default=0, help="arrivals: the chunked budget (0: 2048/32)")
    args = parser.parse_args()
    if args.part == "kernel":
        out = kernel_check()
    elif args.part == "parity":
        out = parity(args.model, args.n or 24, args.max_new)
    else:
        out = engine_bench(args.model, args.n or 128, args.audio_s, args.out_dir, args.device, args.max_step_tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
