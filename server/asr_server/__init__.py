"""Qwen3-ASR gRPC inference server."""

__version__ = "0.1.0"
