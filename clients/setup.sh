#!/usr/bin/env bash
# Toolchains for the Go, Java, C++ and Node clients, from Debian's packages and npm only.
# Idempotent: apt-get runs only for what is missing (after one `apt-get update`), npm only when
# clients/node/node_modules is missing or older than package.json. `make client-deps` (so `make setup`) runs this.
set -euo pipefail
cd "$(dirname "$0")"

packages=(
  # C++: grpc 1.51 / protobuf 3.21, health.proto from grpc-proto
  g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc grpc-proto
  # Go 1.19 with grpc-go 1.33, built offline in GOPATH mode
  golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-goprotobuf-dev protoc-gen-go-grpc
  # Java: grpc-java 1.41 jars in /usr/share/java, compiled with javac
  libgrpc-java protobuf-compiler-grpc-java-plugin libprotobuf-java libnetty-java libperfmark-java
  libguava-java libgeronimo-annotation-1.3-spec-java libgoogle-gson-java
)
command -v javac >/dev/null || packages+=(default-jdk-headless)
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "clients/setup.sh: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node/node_modules ] || [ node/package.json -nt node/node_modules ]; then
  (cd node && npm install --no-audit --no-fund --silent && touch node_modules)
fi
