"""Python client for the Qwen3-ASR gRPC server."""

from asr_client.client import AsrClient

__all__ = ["AsrClient"]
