"""Host time of scaled_dot_product_attention over ever-new shapes (as live streams' prefills give), by backend set:
torch's default choice against the engine's (no cuDNN). One CUDA device; prints ms per call, synchronised.

    python bench/sdpa_shapes.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(label: str, backends: list[SDPBackend] | None, lengths: list[int], masked: bool) -> None:
    dev = torch.device("cuda")
    times = []
    for n in lengths:
        q = torch.randn(8, 16, n, 128, device=dev, dtype=torch.bfloat16)
        mask = torch.ones(8, 1, n, n, device=dev, dtype=torch.bool).tril() if masked else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if backends is None:
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=not masked)
        else:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=not masked)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print(
        f"{label:28s} masked={masked!s:5s} {len(times)} new shapes: ms per call p50 {times[len(times) // 2]:.2f} "
        f"max {times[-1]:.2f}"
    )


def main() -> None:
    import transformers  # noqa: F401 - imported as the engine process imports it (it may set SDPA preferences)

    engine = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for masked in (False, True):
        run("default", None, list(range(40, 100, 3)), masked)
        run("engine (no cuDNN)", engine, list(range(41, 101, 3)), masked)
        run("default, shapes seen", None, list(range(40, 100, 3)), masked)


if __name__ == "__main__":
    main()
