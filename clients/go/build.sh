#!/usr/bin/env bash
# Builds build/asr-client-go offline with Debian's Go packages (GOPATH mode; no module downloads).
# Needs: clients/setup.sh (golang-go, golang-google-grpc-dev, golang-goprotobuf-dev, protoc-gen-go-grpc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto=$(cd "$here/../../proto" && pwd)
build="$here/build"
pkg="$build/gopath/src/github.com/qwenasr/asr-server/gen/go/qwenasr/v1"
rm -rf "$pkg" && mkdir -p "$pkg"
protoc -I"$proto" \
  --go_out="$pkg" --go_opt=paths=source_relative \
  --go-grpc_out="$pkg" --go-grpc_opt=paths=source_relative \
  qwenasr/v1/asr.proto
mv "$pkg"/qwenasr/v1/*.go "$pkg"/ && rm -rf "$pkg/qwenasr"
cd "$here"
GO111MODULE=off GOPATH="$build/gopath:/usr/share/gocode" GOCACHE="$build/cache" \
  go build -o "$build/asr-client-go" main.go
echo "built $build/asr-client-go"
