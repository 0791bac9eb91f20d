"""Live recognition: VAD, endpointing, interim scheduling and the per-stream session. No gRPC, no protobuf."""
