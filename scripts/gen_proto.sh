#!/usr/bin/env bash
# Generates the Python stubs (with mypy stubs) for the contract in proto/ into gen/python.
# Generated code is never committed; `make proto` runs this.
set -euo pipefail
py=${1:-python3}
cd "$(dirname "$0")/.."
out=gen/python
rm -rf "$out/qwenasr"
mkdir -p "$out"
bindir=$(dirname "$py")
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  $(find proto -name '*.proto')
# Namespace packages confuse setuptools' package discovery and mypy; make them regular packages.
find "$out/qwenasr" -type d -exec touch {}/__init__.py \;
touch "$out/qwenasr/py.typed"
