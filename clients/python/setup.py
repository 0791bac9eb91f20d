"""Generates the qwenasr.v1 stubs from the repository's proto/ into the build, so they are never committed."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"


class BuildWithStubs(build_py):
    def run(self) -> None:
        from grpc_tools import protoc

        protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "qwenasr" / "v1").glob("*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files under {PROTO_ROOT}: build from a checkout of the repository")
        out = Path(self.build_lib)
        out.mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        if protoc.main([*args, *protos]) != 0:
            raise RuntimeError("protoc failed")
        for package in (out / "qwenasr", out / "qwenasr" / "v1"):
            (package / "__init__.py").touch()
        (out / "qwenasr" / "py.typed").touch()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
