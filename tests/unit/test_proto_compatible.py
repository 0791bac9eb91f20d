"""The v1 contract only grows: every message field, enum value and method of a released proto (snapshot of
proto/qwenasr/v1/asr.proto at commit 884cc63, before Align and request ids) keeps its number, type and shape, so
an old client's messages decode as they did, and the new server's decode in the old client (new fields are unknown
fields to it). Field numbers are never reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from qwenasr.v1 import asr_pb2 as pb

BASELINE = Path(__file__).resolve().parents[1] / "data" / "asr_v1_contract_884cc63.json"


def _current() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    snap: dict[str, Any] = {"messages": {}, "enums": {}, "methods": {}}

    def walk(prefix: str, messages: Any) -> None:
        for m in messages:
            name = prefix + m.name
            snap["messages"][name] = {f.name: [f.number, f.type, f.label, f.type_name] for f in m.field}
            walk(name + ".", m.nested_type)

    walk("qwenasr.v1.", proto.message_type)
    for e in proto.enum_type:
        snap["enums"]["qwenasr.v1." + e.name] = {v.name: v.number for v in e.value}
    for service in proto.service:
        for method in service.method:
            snap["methods"][method.name] = [
                method.input_type, method.output_type, method.client_streaming, method.server_streaming
            ]
    return snap


def test_every_released_field_enum_value_and_method_is_unchanged() -> None:
    old = json.loads(BASELINE.read_text(encoding="utf-8"))
    new = _current()
    for message, fields in old["messages"].items():
        assert message in new["messages"], f"message {message} was removed"
        for name, shape in fields.items():
            assert new["messages"][message].get(name) == shape, f"{message}.{name} changed: {shape}"
        numbers = [shape[0] for shape in new["messages"][message].values()]
        assert len(numbers) == len(set(numbers)), f"{message} reuses a field number"
    for enum, values in old["enums"].items():
        for name, number in values.items():
            assert new["enums"][enum].get(name) == number, f"{enum}.{name} changed"
    for method, shape in old["methods"].items():
        assert new["methods"].get(method) == shape, f"rpc {method} changed"

