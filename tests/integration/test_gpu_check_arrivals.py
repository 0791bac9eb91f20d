"""bench/gpu_check.py's engine part on the CPU (tiny checkpoint): the arrivals run reports step times with and
without arrivals and the arrivals' time to first token, with chunked prefill off and on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from asr_server.models.tiny_checkpoint import TinyCheckpoints

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_engine_part_runs_the_arrivals_on_the_cpu(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    path = os.pathsep.join(str(REPO_ROOT / p) for p in ("server", "clients/python", "gen/python"))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "engine", "--model",
         str(tiny_checkpoints.asr_hf), "--device", "cpu", "--max-step-tokens", "24", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["arrivals"]
    assert [(r["max_step_tokens"], r["features_on_device"]) for r in runs] == [(0, False), (24, False), (24, True)]
    for run in runs:
        assert run["steps_with_arrivals"]["steps"] > 0 and run["steps_without_arrivals"]["steps"] > 0
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"]
    # 9 s arrivals (~140 prompt tokens) in chunks of a 24-token budget: many more steps carry prefill work.
    assert runs[1]["steps_with_arrivals"]["steps"] > 2 * runs[0]["steps_with_arrivals"]["steps"]
    assert "arrivals, max_step_tokens=24" in result.stdout
