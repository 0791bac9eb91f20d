"""Continuous-batching engine core: iteration-level scheduling over a paged KV cache, split as vLLM v1's is.

Modules:
- kv_manager: the KV pages' accounting (free list, scratch page 0, reference counts); torch-free;
- scheduler: waiting queue, running rows, admission and each step's plan (prefills, decodes); torch-free;
- model_runner: the device side (encoder, prefill, decode step, CUDA graphs, the KV cache tensors);
- output: sampled tokens into each request's output, finished requests into results;
- core: ContinuousEngine, the thin EngineCore the runner drives, composing the four;
- attention: decode attention over the paged cache (a Triton kernel on CUDA, a torch reference elsewhere);
- decoder: the Qwen3 text decoder re-driven from the checkpoint's own modules (prefill and one decode step);
- prepare: per-clip preprocessing equal to the reference's.

Built from the config (`EngineConfig.continuous`, a `ContinuousConfig`) by engine/factory.py; replicas (one runner
per device) are engine/replicas.py.
"""
