"""bench/streaming_bench.py --results-json: the shape of bench/results/h200-streaming.json, written by the bench
itself (here against an in-process fake-engine server, 10 s of audio: finals within the last 2 s, flushed by the
half-close, are not timed)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "model", "streams", "finals_expected", "finals", "decode_ms", "final_after_speech_ms", "interim_ms", "interims",
    "real_time_held", "date", "commit", "front_processes", "client_processes", "duration_s", "gpu_busy_pct",
    "host_cpu",
}


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streaming_bench", REPO / "bench" / "streaming_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_results_json_appends_one_object_per_level_in_the_published_shape(tmp_path: Path) -> None:
    results = tmp_path / "results" / "streaming.json"
    results.parent.mkdir()
    results.write_text(json.dumps([{"model": "earlier run"}]))
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "streaming_bench.py"), "--serve", "--engine fake --no-warmup",
         "--streams", "2", "--duration-s", "10", "--results-json", str(results), "--label", "fake-engine"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    objects = json.loads(results.read_text())
    assert objects[0] == {"model": "earlier run"} and len(objects) == 2  # appended, the earlier run kept
    level = objects[1]
    assert set(level) == KEYS
    assert level["model"] == "fake-engine" and level["streams"] == 2
    assert set(level["decode_ms"]) == {"p50", "p90", "p99"}
    assert set(level["final_after_speech_ms"]) == {"p50", "p99"} and set(level["interim_ms"]) == {"p50", "p99"}
    assert level["finals_expected"] >= 2 and level["finals"] == level["finals_expected"]
    assert level["interims"] > 0 and isinstance(level["interims"], int)
    assert all(isinstance(v, int) for part in ("decode_ms", "final_after_speech_ms") for v in level[part].values())
    assert level["real_time_held"] is (level["decode_ms"]["p99"] <= 400)
    assert level["date"].endswith("+00:00") and level["commit"]
    # What the level kept busy: no GPU here; the server process (the fake engine runs in it) and this script's
    # own client work measured in cores, the machine as a share of its cores.
    assert level["gpu_busy_pct"] is None or shutil.which("nvidia-smi")
    host = level["host_cpu"]
    assert 0 <= host["machine_busy_pct"] <= 100 and host["machine_cores"] >= 1
    assert host["server_process_cores"] and host["server_cores"] == pytest.approx(sum(host["server_process_cores"]))
    assert 0 < host["server_cores"] < host["machine_cores"] and 0 < host["client_cores"] < host["machine_cores"]


def test_expected_finals_count_each_sentence_in_the_window_once() -> None:
    bench = _bench()
    audio, spans = synthesize_sentences(["Hello there, how are you today?", "The quick brown fox."], silence_s=1.0)
    pcm = pcm16(audio)
    assert bench.expected_utterances(pcm) == 2
    # A window from the middle of the first sentence, once round the recording: the rest of the first, the second,
    # the first half of the first again (the window's last second ends inside it).
    offset_ms = int((spans[0][0] + spans[0][1]) / 2 * 1000)
    duration_s = round(len(audio) / 16000)
    assert abs(duration_s - len(audio) / 16000) < (spans[0][1] - spans[0][0]) / 2
    assert bench.expected_utterances(bench.sent_window(pcm, offset_ms, duration_s)) == 3
    assert bench.expected_utterances(bytes(32000)) == 0
