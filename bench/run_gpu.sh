#!/usr/bin/env bash
# The GPU benchmark, in one call of the device tool (or by hand on any CUDA machine). Sections:
#   bash bench/run_gpu.sh setup      # install carried wheels (.whl/, from bench/fetch_gpu_wheels.sh) into /tmp/site
#   bash bench/run_gpu.sh gputests   # the opt-in GPU tests (pytest -m gpu tests/gpu), output in $OUT/gputests.txt
#   bash bench/run_gpu.sh kernel     # Triton paged attention vs torch reference
#   bash bench/run_gpu.sh engine17   # build the random 1.7B, in-process engine throughput + profile
#   bash bench/run_gpu.sh grpc17     # gRPC server with the random 1.7B + the load generator table
#   bash bench/run_gpu.sh grpc17fp8  # the same server with --kv-cache-dtype fp8
#   bash bench/run_gpu.sh parity06   # build the random 0.6B, bf16 token parity share vs model.generate
#   bash bench/run_gpu.sh grpc06     # gRPC server with the random 0.6B, 128 x 120 s
#   bash bench/run_gpu.sh replicas   # two replicas (--devices cuda:0,cuda:1) vs one, same load
#   bash bench/run_gpu.sh table17 table06 ratio
#                                    # issue 11's table: ours and plain model.generate (--engine transformers,
#                                    # padded batches of 64) at the same loads, one after the other in this run;
#                                    # each row appended to $RESULTS (bench/results/h200-engine.json's shape)
#   bash bench/run_gpu.sh ours17 chunk17  # ours only (the generate rows change with no commit of ours); chunk17:
#                                    # the same server with --max-step-tokens $STEP_TOKENS (chunked prefill)
#   bash bench/run_gpu.sh streamdiag # live streams ($DIAG_STREAMS, default 64; $DIAG_SIZE) with the engine's timeline
#                                    # (--bench-trace-path, summarised by bench/trace_report.py), py-spy of the
#                                    # front and the engine process, and the GPU's utilisation, sampled
#   bash bench/run_gpu.sh stream17   # live streams (bench/streaming_bench.py, $SPEECH WAV, 1/64/128/256 streams;
#                                    # $FRONTS front processes, $CLIENTS client processes); stream06: the 0.6B
#                                    # at $STREAMS06; streamlong: memory over a long 256-stream run,
#                                    # rows appended to $STREAM_RESULTS (bench/results/h200-streaming.json's shape)
# Results go to $OUT (or bench/out) as JSON and logs; each load line is printed as it finishes.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:server:gen/python:clients/python
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
PORT=${PORT:-50551}
RESULTS=${RESULTS:-$OUT/h200-engine.json}
COMMIT=${COMMIT:-unknown}
STREAM_RESULTS=${STREAM_RESULTS:-$OUT/h200-streaming.json}
STEP_TOKENS=${STEP_TOKENS:-2048}
SPEECH=${SPEECH:-.benchdata/speech.wav}
SERVER_PID=""

start_server() {  # $1 model dir, $2 log name, rest: extra flags
  local model=$1 log=$2
  shift 2
  $PY -m asr_server.cli serve --model "$model" --port "$PORT" --engine continuous \
    --bench-forced-tokens-per-audio-s 4 --max-batch-wait-ms 0 --max-inference-batch-size 128 \
    --max-running-requests 128 --no-reflection "$@" >"$OUT/$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    if grep -q "asr-server: serving" "$OUT/$log"; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server died:"; tail -30 "$OUT/$log"; return 1; fi
    sleep 1
  done
  echo "server did not start"; tail -30 "$OUT/$log"; return 1
}

stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""; fi
}

load() {  # label, then loadgen flags
  local label=$1
  shift
  $PY bench/loadgen.py --target "localhost:$PORT" --label "$label" --json "$OUT/load-$label.json" "$@" \
    | tee -a "$OUT/table.txt"
}

row() {  # model, side, label, then loadgen flags: a load whose result is also appended to $RESULTS
  local model=$1 side=$2
  shift 2
  load "$@" --results-json "$RESULTS" --model-name "$model" --side "$side" --commit "$COMMIT"
}

# A 2 s batch window: with 128 callers uploading 120 s clips at once, 100 ms formed batches of 16, 64 and 48.
GENERATE_FLAGS=(--engine transformers --max-inference-batch-size 64 --max-batch-wait-ms 2000)

ours_rows() {  # size, model name, label suffix
  local size=$1 name=$2 tag=$3
  row "$name" ours "$size-$tag-alone-120s" --concurrency 1 --audio-s 120 --requests 3
  row "$name" ours "$size-$tag-alone-5s" --concurrency 1 --audio-s 5 --requests 20
  row "$name" ours "$size-$tag-c64-5s" --concurrency 64 --audio-s 5 --requests 640
  row "$name" ours "$size-$tag-c128-120s" --concurrency 128 --audio-s 120 --requests 256
}

table() {  # size (1.7b | 0.6b), model name: ours, then plain generate at the same loads
  local size=$1 name=$2 dir=/tmp/rand-$1
  [ -d "$dir" ] || $PY bench/build_random_checkpoint.py --size "$size" --out "$dir" --device cuda
  if start_server "$dir" "server-$size-ours.log"; then
    row "$name" ours "$size-ours-alone-120s" --concurrency 1 --audio-s 120 --requests 3
    row "$name" ours "$size-ours-alone-5s" --concurrency 1 --audio-s 5 --requests 20
    row "$name" ours "$size-ours-c64-5s" --concurrency 64 --audio-s 5 --requests 640
    row "$name" ours "$size-ours-c128-120s" --concurrency 128 --audio-s 120 --requests 256
    if [ "$size" = 1.7b ]; then
      row "$name" ours "$size-ours-c128-120s-stream" --concurrency 128 --audio-s 120 --requests 128 --mode stream
    fi
    stop_server
  fi
  # Plain model.generate: no warm-up request (the server warms up itself; one 120 s request takes ~45 s here).
  if start_server "$dir" "server-$size-generate.log" "${GENERATE_FLAGS[@]}"; then
    row "$name" generate "$size-gen-alone-120s" --concurrency 1 --audio-s 120 --requests 1 --warmup 0
    if [ "$size" = 1.7b ]; then
      row "$name" generate "$size-gen-alone-5s" --concurrency 1 --audio-s 5 --requests 10 --warmup 0
      row "$name" generate "$size-gen-c64-5s" --concurrency 64 --audio-s 5 --requests 192 --warmup 0
    fi
    row "$name" generate "$size-gen-c128-120s" --concurrency 128 --audio-s 120 --requests 128 --warmup 0
    stop_server
  fi
}

streams() {  # size, label, levels: live streams over $FRONTS fronts from $CLIENTS client processes
  local size=$1 label=$2 levels=$3 dir=/tmp/rand-$1
  [ -d "$dir" ] || $PY bench/build_random_checkpoint.py --size "$size" --out "$dir" --device cuda
  # Each level's GPU and host utilisation is measured and printed by the bench itself ("  busy: ..." lines).
  $PY bench/streaming_bench.py --serve "--model $dir --engine continuous --bench-forced-tokens-per-audio-s 4 \
    --max-batch-wait-ms 0 --max-inference-batch-size 128 --max-running-requests 512 --max-live-streams-per-replica 2048 \
    --no-reflection --front-processes ${FRONTS:-1} ${STREAM_SERVER_FLAGS:-}" --switch-interval-ms 0.5 \
    --client-processes "${CLIENTS:-1}" --warmup-streams "${WARMUP_STREAMS:-0}" --streams "$levels" \
    --duration-s "${STREAM_S:-25}" --speech "$SPEECH" --label "$label" --commit "$COMMIT" \
    --results-json "$STREAM_RESULTS" --json "$OUT/stream-$size.json" 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee -a "$OUT/table.txt"
}

for section in "$@"; do
  case $section in
    setup)
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
      $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
      ;;
    gputests)
      $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gputests.txt" | tail -15
      ;;
    kernel)
      $PY bench/gpu_check.py kernel --json "$OUT/kernel.json"
      ;;
    engine17)
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      $PY bench/gpu_check.py engine --model /tmp/rand-1.7b --json "$OUT/engine17.json" --out-dir "$OUT" 2>&1 \
        | grep -v "Loading weights"
      ;;
    grpc17)
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      start_server /tmp/rand-1.7b server17.log || continue
      load 1.7b-alone-120s --concurrency 1 --audio-s 120 --requests 3
      load 1.7b-alone-5s --concurrency 1 --audio-s 5 --requests 20
      if [ -x /tmp/site/bin/py-spy ]; then
        /tmp/site/bin/py-spy record -p "$SERVER_PID" -d 8 -r 40 -f raw --threads -o "$OUT/pyspy-c64.txt" \
          >/dev/null 2>&1 &
        SPY_PID=$!
      fi
      load 1.7b-c64-5s --concurrency 64 --audio-s 5 --requests 640
      [ -n "${SPY_PID:-}" ] && wait "$SPY_PID"
      load 1.7b-c128-120s --concurrency 128 --audio-s 120 --requests 256
      load 1.7b-c128-120s-stream --concurrency 128 --audio-s 120 --requests 128 --mode stream
      grep -E "continuous engine on|captured|ERROR|Traceback" "$OUT/server17.log" | head -20
      stop_server
      ;;
    grpc17fp8)
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      start_server /tmp/rand-1.7b server17fp8.log --kv-cache-dtype fp8 || continue
      load 1.7b-fp8-alone-120s --concurrency 1 --audio-s 120 --requests 3
      load 1.7b-fp8-c64-5s --concurrency 64 --audio-s 5 --requests 640
      load 1.7b-fp8-c128-120s --concurrency 128 --audio-s 120 --requests 256
      stop_server
      ;;
    parity06)
      [ -d /tmp/rand-0.6b ] || $PY bench/build_random_checkpoint.py --size 0.6b --out /tmp/rand-0.6b --device cuda
      $PY bench/gpu_check.py parity --model /tmp/rand-0.6b --n 24 --max-new 48 --json "$OUT/parity06.json" 2>&1 \
        | grep -v "Loading weights"
      ;;
    grpc06)
      [ -d /tmp/rand-0.6b ] || $PY bench/build_random_checkpoint.py --size 0.6b --out /tmp/rand-0.6b --device cuda
      start_server /tmp/rand-0.6b server06.log || continue
      load 0.6b-alone-120s --concurrency 1 --audio-s 120 --requests 3
      load 0.6b-c128-120s --concurrency 128 --audio-s 120 --requests 256
      stop_server
      ;;
    replicas)
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      start_server /tmp/rand-1.7b server-1gpu.log --devices cuda:0 || continue
      load 1.7b-1gpu-alone-120s --concurrency 1 --audio-s 120 --requests 2
      load 1.7b-1gpu-alone-5s --concurrency 1 --audio-s 5 --requests 10
      load 1.7b-1gpu-c64-5s --concurrency 64 --audio-s 5 --requests 320
      load 1.7b-1gpu-c128-120s --concurrency 128 --audio-s 120 --requests 256
      stop_server
      start_server /tmp/rand-1.7b server-2gpu.log --devices cuda:0,cuda:1 || continue
      load 1.7b-2gpu-c256-120s --concurrency 256 --audio-s 120 --requests 512
      stop_server
      ;;
    table17) table 1.7b 1.7B ;;
    ours17|chunk17)
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      if [ "$section" = ours17 ]; then
        start_server /tmp/rand-1.7b server-ours17.log || continue
        ours_rows 1.7b 1.7B ours
      else
        start_server /tmp/rand-1.7b server-chunk17.log --max-step-tokens "$STEP_TOKENS" || continue
        ours_rows 1.7b "1.7B chunked-prefill-$STEP_TOKENS" chunk
      fi
      grep -E "engine process|ERROR|Traceback" "$OUT/server-$section.log" | head -10
      stop_server
      ;;
    stream17) streams 1.7b Qwen3-ASR-1.7B "${STREAMS:-1,64,128,256}" ;;
    stream06) streams 0.6b Qwen3-ASR-0.6B "${STREAMS06:-256,400}" ;;
    streamlong)
      # Memory over a long run: $LONG_STREAMS streams for $LONG_S s; host RSS of every server process and the
      # GPU's memory sampled every 15 s, the engine's KV pages in use from its timeline.
      [ -d /tmp/rand-1.7b ] || $PY bench/build_random_checkpoint.py --size 1.7b --out /tmp/rand-1.7b --device cuda
      rm -f "$OUT/trace-long.jsonl"
      start_server /tmp/rand-1.7b server-long.log --max-running-requests 512 --max-live-streams-per-replica 2048 \
        --front-processes "${FRONTS:-4}" --bench-trace-path "$OUT/trace-long.jsonl" || continue
      (
        t0=$(date +%s)
        while sleep 15; do
          pids="$SERVER_PID $(pgrep -d ' ' -P "$SERVER_PID")"
          rss=$(ps -o rss= -p "${pids// /,}" | awk '{s+=$1} END {printf "%.0f", s/1024}')
          gpu=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)
          echo "t=$(( $(date +%s) - t0 ))s host_rss_mib=$rss gpu_mib=$gpu"
        done
      ) >"$OUT/memory-long.txt" &
      MEM_PID=$!
      $PY bench/streaming_bench.py --target "localhost:$PORT" --client-processes "${CLIENTS:-4}" \
        --streams "${LONG_STREAMS:-256}" --duration-s "${LONG_S:-150}" --speech "$SPEECH" \
        --target-front-processes "${FRONTS:-4}" \
        --label Qwen3-ASR-1.7B --commit "$COMMIT" --results-json "$STREAM_RESULTS" \
        --json "$OUT/stream-long.json" 2>&1 | tee -a "$OUT/table.txt"
      kill "$MEM_PID"
      cat "$OUT/memory-long.txt" | tee -a "$OUT/table.txt"
      $PY - "$OUT/trace-long.jsonl" <<'PYEOF' | tee -a "$OUT/table.txt"
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if '"k":"step"' in line]
t0 = steps[0]["t"]
by_30s = {}
for s in steps:
    by_30s.setdefault(int((s["t"] - t0) / 30e9), []).append(s.get("kv_used", 0))
for k, used in sorted(by_30s.items()):
    print(f"kv pages in use, {30 * k}-{30 * k + 30} s: max {max(used)}, mean {sum(used) / len(used):.0f}")
PYEOF
      stop_server
      rm -f "$OUT/trace-long.jsonl"
      ;;
    streamdiag)
      # $DIAG_SIZE (1.7b or 0.6b) over $FRONTS fronts, fresh server; Triton's compile cache is fresh too, so the
      # kernels it compiles while streams run show up with their time since the server started.
      dsize=${DIAG_SIZE:-1.7b}
      [ -d "/tmp/rand-$dsize" ] || $PY bench/build_random_checkpoint.py --size "$dsize" --out "/tmp/rand-$dsize" --device cuda
      rm -rf "$OUT/trace.jsonl" /tmp/triton-diag
      touch "$OUT/trace.jsonl"
      t_start=$(date +%s)
      export TRITON_CACHE_DIR=/tmp/triton-diag
      start_server "/tmp/rand-$dsize" server-streamdiag.log \
        --max-running-requests 512 --max-live-streams-per-replica 2048 --front-processes "${FRONTS:-1}" \
        --bench-trace-path "$OUT/trace.jsonl" || continue
      unset TRITON_CACHE_DIR
      t_serving=$(date +%s)
      echo "server up in $((t_serving - t_start)) s" | tee -a "$OUT/table.txt"
      for streams in ${DIAG_STREAMS:-64}; do
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 >"$OUT/gpu-util-$streams.txt" &
        SMI_PID=$!
        from_line=$(( $(wc -l <"$OUT/trace.jsonl" 2>/dev/null || echo 0) + 1 ))
        (
          sleep "${DIAG_SPY_AT_S:-14}"
          for pid in "$SERVER_PID" $(pgrep -P "$SERVER_PID"); do
            /tmp/site/bin/py-spy dump -p "$pid" >"$OUT/pyspy-dump-$streams-$pid.txt" 2>&1
            /tmp/site/bin/py-spy record -p "$pid" -d 8 -r 50 -f raw --threads -o "$OUT/pyspy-$streams-$pid.txt" \
              >/dev/null 2>&1 &
          done
          wait
        ) &
        SPY_PID=$!
        (sleep "${DIAG_SPY_AT_S:-14}"; top -b -H -n 2 -d 4 -w 200 | head -80 >"$OUT/top-$streams.txt") &
        $PY bench/streaming_bench.py --target "localhost:$PORT" --client-processes "${CLIENTS:-1}" \
          --streams "$streams" --duration-s "${STREAM_S:-25}" --speech "$SPEECH" \
          --target-front-processes "${FRONTS:-1}" --json "$OUT/streamdiag-$streams.json" ${DIAG_BENCH_FLAGS:-} 2>&1 \
          | tee -a "$OUT/table.txt"
        wait "$SPY_PID"
        kill "$SMI_PID" 2>/dev/null
        awk '{s+=$1; n++} END {if (n) printf "GPU utilisation mean %.0f%% over %d samples\n", s/n, n}' \
          "$OUT/gpu-util-$streams.txt" | tee -a "$OUT/table.txt"
        tail -n "+$from_line" "$OUT/trace.jsonl" >"$OUT/trace-$streams.jsonl"
        $PY bench/trace_report.py "$OUT/trace-$streams.jsonl" --by-s 5 | tee -a "$OUT/table.txt"
      done
      echo "Triton kernels compiled, seconds after the server was up:" | tee -a "$OUT/table.txt"
      find /tmp/triton-diag -name "*.json" ! -name "__grp__*" -printf "%T@ %f\n" 2>/dev/null | sort -n \
        | awk -v t0="$t_serving" '{printf "  %+.1f s %s\n", $1 - t0, $2}' | tee -a "$OUT/table.txt"
      stop_server
      rm -f "$OUT/trace.jsonl"
      ;;
    table06) table 0.6b 0.6B ;;
    ratio)
      $PY - "$RESULTS" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))
key = lambda r: (r["model"], r["mode"], r["concurrency"], r["audio_s"])
gen = {key(r): r for r in rows if r["side"] == "generate"}
for r in rows:
    g = gen.get(key(r))
    if r["side"] == "ours" and g and g["audio_s_per_s"]:
        print(f"{r['model']} {r['mode']} c={r['concurrency']} {r['audio_s']:g}s: ours {r['audio_s_per_s']} / generate "
              f"{g['audio_s_per_s']} audio-s/s = {r['audio_s_per_s'] / g['audio_s_per_s']:.1f}x; latency p50 "
              f"{r['latency_ms']['p50']} vs {g['latency_ms']['p50']} ms")
PYEOF
      ;;
    replicas2)
      start_server /tmp/rand-1.7b server-2gpu.log --devices cuda:0,cuda:1 || continue
      load 1.7b-2gpu-c256-120s --concurrency 256 --audio-s 120 --requests 512
      stop_server
      ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
echo "==== table"
cat "$OUT/table.txt" 2>/dev/null
# The device tool brings back at most 8 files: pack the details into one archive.
( cd "$OUT" && files=$(ls | grep -v -e '^results.tgz$' -e '^table.txt$') && [ -n "$files" ] \
  && tar czf results.tgz --remove-files $(echo "$files" | grep -v -e '^h200-engine.json$' -e '^h200-streaming.json$') )
# Nothing to pack (setup alone) is not a failure: `setup && ...` must go on.
exit 0
