"""The public contract documents every message, enum, field, enum value, service and method."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto field numbers
# (the path elements of SourceCodeInfo.Location).
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_VALUE, _METHOD = 2, 2


def _undocumented(proto: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            proto,
        ],
        check=True,
    )
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    comments = {
        tuple(loc.path): loc.leading_comments.strip() or loc.trailing_comments.strip()
        for loc in file.source_code_info.location
    }
    missing: list[str] = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(name)

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        check(path, prefix + e.name)
        for i, value in enumerate(e.value):
            check((*path, _VALUE, i), f"{prefix}{e.name}.{value.name}")

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        check(path, prefix + m.name)
        for i, f in enumerate(m.field):
            check((*path, _FIELD, i), f"{prefix}{m.name}.{f.name}")
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:
                message((*path, _NESTED, i), nested, f"{prefix}{m.name}.")
        for i, e in enumerate(m.enum_type):
            enum((*path, _NESTED_ENUM, i), e, f"{prefix}{m.name}.")

    for i, m in enumerate(file.message_type):
        message((_MESSAGE, i), m, "")
    for i, e in enumerate(file.enum_type):
        enum((_ENUM, i), e, "")
    for i, s in enumerate(file.service):
        check((_SERVICE, i), s.name)
        for j, method in enumerate(s.method):
            check((_SERVICE, i, _METHOD, j), f"{s.name}.{method.name}")
    return missing


@pytest.mark.parametrize("proto", ["qwenasr/v1/asr.proto", "qwenasr/aligner/v1/aligner.proto"])
def test_every_element_has_a_comment(proto: str, tmp_path: Path) -> None:
    assert _undocumented(proto, tmp_path) == []
