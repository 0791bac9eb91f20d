"""The continuous engine on a CUDA device against `model.generate`, on the tiny checkpoint (fp32): CUDA graphs, the
Triton kernels, both page policies, torch features, and a KV cache poisoned with NaN first.

    python bench/gpu_engine_smoke.py [--device cuda:0]

Prints one line per configuration (MATCH or the differing request ids) and exits 1 if any differs. The tiny
checkpoint is built on the spot (no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()

    from asr_server.config import ContinuousConfig
    from asr_server.engine.continuous.core import ContinuousEngine
    from asr_server.engine.generate_core import GenerateEngine
    from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
    from asr_server.models.loading import load_asr_model
    from asr_server.models.tiny_checkpoint import build_all

    root = tempfile.mkdtemp(prefix="tiny-")
    tiny = build_all(root, seed=0)
    loaded = load_asr_model(str(tiny.asr_hf), dtype="float32", device=args.device)
    rng = np.random.default_rng(0)
    requests = [
        DecodeRequest(
            f"r{i}",
            (0.1 * rng.standard_normal(int(rng.uniform(0.3, 6.0) * 16000))).astype(np.float32),
            DecodeOptions(None, "", 16),
        )
        for i in range(24)
    ]

    def item(request: DecodeRequest) -> WorkItem:
        return WorkItem(request, time.time_ns(), time.monotonic())

    reference = GenerateEngine(loaded, max_batch_size=1)
    expected = {}
    for r in requests:
        (out,) = reference._run_batch([item(r)])
        assert out.result is not None
        expected[r.request_id] = out.result.token_ids

    base = ContinuousConfig(max_running=8, page_size=16, kv_cache_tokens=4096)
    configs = {
        "full pages, graphs (prefill beside the decodes)": base,
        "full pages, graphs, prefill in the step": dataclasses.replace(base, async_prefill="off"),
        "lazy pages, graphs": dataclasses.replace(base, kv_reservation="lazy", kv_cache_tokens=1024),
        "torch features": dataclasses.replace(base, features="torch"),
        "reference features": dataclasses.replace(base, features="reference"),
        # Chunked prefill: prompts over several steps beside the decodes (chunks attend through their pages).
        "chunked prefill, 24-token steps": dataclasses.replace(base, max_step_tokens=24),
        "chunked prefill, lazy pages": dataclasses.replace(
            base, max_step_tokens=24, kv_reservation="lazy", kv_cache_tokens=1024
        ),
        "no graphs": dataclasses.replace(base, cuda_graphs=False),
    }
    failed = False
    for name, config in configs.items():
        engine = ContinuousEngine(loaded, config)
        engine.warmup()
        for poisoned in (False, True):
            if poisoned:
                for layer in range(len(engine._cache.keys)):
                    engine._cache.keys[layer].fill_(float("nan"))
                    engine._cache.values[layer].fill_(float("nan"))
            pending = list(requests)
            got: dict[str, object] = {}
            order = np.random.default_rng(1)
            while pending or engine.num_waiting() or engine.num_running():
                for _ in range(int(order.integers(0, 4))):
                    if pending:
                        engine.add(item(pending.pop(0)))
                if pending and not engine.num_waiting() and not engine.num_running():
                    engine.add(item(pending.pop(0)))
                for output in engine.step():
                    got[output.request_id] = output.result.token_ids if output.result else output.error
            wrong = [rid for rid, tokens in expected.items() if got.get(rid) != tokens]
            label = f"{name}{', NaN-poisoned cache' if poisoned else ''}"
            print(f"{label}: {'MATCH' if not wrong else 'DIFF ' + ','.join(wrong)} ({len(expected)} requests)")
            failed = failed or bool(wrong)
        engine.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
