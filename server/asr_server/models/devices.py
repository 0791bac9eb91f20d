"""Device names: the `--devices` list and "auto". Below the edge, so the engine and the aligner sidecar resolve
devices the same way without importing the gRPC layer."""

from __future__ import annotations


def parse_device_list(text: str) -> tuple[str, ...]:
    """ "cuda:0, cuda:1" -> ("cuda:0", "cuda:1"); "" -> (). Empty entries ("cuda:0,,") are refused."""
    if not text.strip():
        return ()
    devices = tuple(part.strip() for part in text.split(","))
    if any(not device for device in devices):
        raise ValueError(f"an empty device name in {text[:100]!r}; give devices as cuda:0,cuda:1")
    return devices


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda:0" when CUDA is available, else "cpu"; any other name as given."""
    if device != "auto":
        return device
    import torch  # lazily: resolving a named device must not cost a torch import

    return "cuda:0" if torch.cuda.is_available() else "cpu"
