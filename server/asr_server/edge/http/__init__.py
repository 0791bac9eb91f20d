"""The OpenAI-compatible HTTP front (docs/http.md): a second edge beside the gRPC one, over the same Transcriber.

Starlette on uvicorn, served inside the server's own event loop. Nothing here imports gRPC or protobuf; domain
errors become HTTP statuses in one place, `errors.py`, as edge/rpc.py makes them gRPC statuses.
"""
