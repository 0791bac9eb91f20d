"""The forced aligner: word timestamps from a separate sidecar process.

Layers, each usable alone:

* `words`: word splitting as the model expects it and the monotonicity repair of its raw timestamps.
* `core`: one padded batch through `Qwen3ASRForTokenClassification` (torch; no gRPC).
* `batcher`: the thread that owns the model, with its queue and dynamic batcher.
* `sidecar`: the sidecar's gRPC service (`asr-server aligner ...`), unix socket or TCP.
* `client` / `supervisor`: the main server's side: an `AlignBackend` over gRPC with deadlines and readiness,
  and (spawn mode) the child process started, health-checked and restarted with backoff.

docs/aligner.md describes deployment, health and failure behaviour.
"""
