"""Host time of the audio encoder's convolutions over ever-new batch sizes (live streams give every encoder
micro-batch a new number of 1 s chunks), with cuDNN as torch uses it and with cuDNN off, first call against a
shape seen before. One CUDA device, the audio tower of a checkpoint (random weights do); prints ms per call,
synchronised.

    python bench/conv_shapes.py --model /tmp/rand-0.6b
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def convs(tower: torch.nn.Module, chunks: torch.Tensor) -> torch.Tensor:
    x = F.gelu(tower.conv2d1(chunks))
    x = F.gelu(tower.conv2d2(x))
    return F.gelu(tower.conv2d3(x))


def run(label: str, tower: torch.nn.Module, counts: list[int], dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    times = []
    for n in counts:
        chunks = torch.randn(n, 1, 128, 100, device=dev, dtype=dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        convs(tower, chunks)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print(
        f"{label:34s} {len(times)} batch sizes: ms per call p50 {times[len(times) // 2]:.2f} "
        f"p90 {times[int(len(times) * 0.9)]:.2f} max {times[-1]:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    from transformers import Qwen3ASRForConditionalGeneration

    model = Qwen3ASRForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda")
    tower = model.model.audio_tower
    with torch.inference_mode():
        run("cuDNN on, new sizes", tower, list(range(1, 400, 7)), torch.bfloat16)
        run("cuDNN on, sizes seen", tower, list(range(1, 400, 7)), torch.bfloat16)
        run("cuDNN on, new sizes (2nd set)", tower, list(range(3, 400, 7)), torch.bfloat16)
        with torch.backends.cudnn.flags(enabled=False):
            run("cuDNN off, new sizes", tower, list(range(5, 400, 7)), torch.bfloat16)
            run("cuDNN off, sizes seen", tower, list(range(5, 400, 7)), torch.bfloat16)
        torch.backends.cudnn.benchmark = True
        run("cuDNN benchmark, new sizes", tower, list(range(2, 400, 7)), torch.bfloat16)


if __name__ == "__main__":
    main()
