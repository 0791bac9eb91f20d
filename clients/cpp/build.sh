#!/usr/bin/env bash
# Builds build/asr-client-cpp with Debian's gRPC C++ 1.51 / protobuf 3.21 (pkg-config grpc++ protobuf).
# Needs: clients/setup.sh (libgrpc++-dev, libprotobuf-dev, protobuf-compiler-grpc, grpc-proto, pkg-config).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto=$(cd "$here/../../proto" && pwd)
build="$here/build"
gen="$build/gen"
rm -rf "$gen" && mkdir -p "$gen" "$build/obj"
protoc -I"$proto" -I/usr/share/grpc-proto \
  --cpp_out="$gen" --grpc_out="$gen" --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
  qwenasr/v1/asr.proto grpc/health/v1/health.proto
cxxflags="-std=c++17 -O1 -I$gen $(pkg-config --cflags grpc++ protobuf)"
sources=("$gen/qwenasr/v1/asr.pb.cc" "$gen/qwenasr/v1/asr.grpc.pb.cc" "$gen/grpc/health/v1/health.pb.cc"
         "$gen/grpc/health/v1/health.grpc.pb.cc" "$here/main.cc")
# One compiler per source, all at once: the generated files dominate and the machine has cores to spare.
pids=()
for src in "${sources[@]}"; do
  g++ $cxxflags -c "$src" -o "$build/obj/$(basename "$src" .cc).o" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
g++ -o "$build/asr-client-cpp" "$build"/obj/*.o $(pkg-config --libs grpc++ protobuf)
echo "built $build/asr-client-cpp"
