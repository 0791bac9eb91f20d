#!/usr/bin/env bash
# Builds build/asr-client.jar with javac and Debian's grpc-java 1.41 jars in /usr/share/java (no Maven).
# Needs: clients/setup.sh (libgrpc-java, protobuf-compiler-grpc-java-plugin, libprotobuf-java, ...).
# Run: java -cp "$(cat build/classpath)" ai.qwenasr.example.AsrClientExample [--target host:port] FILE.wav
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto=$(cd "$here/../../proto" && pwd)
build="$here/build"
rm -rf "$build/gen" "$build/classes" && mkdir -p "$build/gen" "$build/classes"
protoc -I"$proto" -I/usr/share/grpc-proto \
  --java_out="$build/gen" --grpc-java_out="$build/gen" --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  qwenasr/v1/asr.proto grpc/health/v1/health.proto
jars=(grpc-api grpc-core grpc-context grpc-stub grpc-protobuf grpc-protobuf-lite grpc-netty protobuf protobuf-util
      gson guava perfmark-api geronimo-annotation-1.3-spec
      netty-common netty-buffer netty-transport netty-resolver netty-codec netty-codec-http netty-codec-http2
      netty-handler netty-handler-proxy netty-codec-socks)
classpath=""
for jar in "${jars[@]}"; do
  classpath+="/usr/share/java/$jar.jar:"
done
javac -nowarn -d "$build/classes" -cp "$classpath" \
  $(find "$build/gen" "$here/src" -name '*.java') 2> >(grep -v '^Note:' >&2)
jar cf "$build/asr-client.jar" -C "$build/classes" .
echo "$build/asr-client.jar:$classpath" > "$build/classpath"
echo "built $build/asr-client.jar"
