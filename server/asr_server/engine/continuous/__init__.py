"""Continuous-batching engine core: iteration-level scheduling over a paged KV cache.

Modules:
- attention: decode attention over the paged cache (a Triton kernel on CUDA, a torch reference elsewhere);
- decoder: the Qwen3 text decoder re-driven from the checkpoint's own modules (prefill and one decode step);
- graphs: CUDA-graph capture of the decode step per batch-size bucket;
- core: ContinuousEngine, the EngineCore the runner drives.

Built from the config by engine/factory.py; replicas (one runner per device) are engine/replicas.py.
"""
