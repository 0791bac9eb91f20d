#!/usr/bin/env bash
# Installs the Node client's two dependencies (@grpc/grpc-js, @grpc/proto-loader) from npm.
# The .proto files are loaded at run time, so there is nothing to compile.
set -euo pipefail
cd "$(dirname "$0")"
npm install --no-audit --no-fund --silent
node --check client.js
echo "built $(pwd)/client.js"
