#!/usr/bin/env bash
# make demo: start the server on the tiny checkpoint, transcribe a spoken WAV through the Python client, stop.
set -euo pipefail
venv=$1
model=$2
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

if command -v espeak-ng >/dev/null; then
  espeak-ng -w "$work/hello.wav" "Hello from the Qwen three A S R server demo."
else
  "$venv/bin/python" -c "
import numpy as np, soundfile as sf
t = np.arange(32000) / 16000
sf.write('$work/hello.wav', (0.3 * np.sin(2 * np.pi * 440 * t)).astype('float32'), 16000)"
fi

echo "== starting asr-server on $model (tiny RANDOM weights: the transcript will be gibberish)"
"$venv/bin/asr-server" serve --model "$model" --host 127.0.0.1 --port 0 >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 1 120); do
  port=$(grep -oE 'on port [0-9]+' "$work/server.out" | grep -oE '[0-9]+' || true)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.err"; exit 1; }
  sleep 0.5
done
[ -n "${port:-}" ] || { echo "server did not start"; cat "$work/server.err"; exit 1; }
echo "== server up on port $port; health: $("$venv/bin/asr-client" --target "127.0.0.1:$port" health)"
echo "== transcribing $work/hello.wav"
"$venv/bin/asr-client" --target "127.0.0.1:$port" transcribe "$work/hello.wav"
"$venv/bin/asr-client" --target "127.0.0.1:$port" transcribe --json --language English "$work/hello.wav"
echo "== the weights are random, so the text above is gibberish by design; point MODEL= at a real checkpoint"
echo "   (make serve MODEL=Qwen/Qwen3-ASR-1.7B-hf) for real transcripts."
