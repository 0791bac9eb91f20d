"""The engine core in its own process, one per replica device (as vLLM v1 runs its EngineCore).

messages.py: what travels over the ZeroMQ socket (msgspec msgpack); child.py: the engine process's main loop;
client.py: the front's proxy and supervisor, with an EngineRunner's interface; link.py: a front's link to an engine
process that several fronts share (--front-processes > 1, edge/fronts.py). docs/operations.md describes the
process layout.
"""
