"""bench/loadgen.py against a real server process (fake engine): the figures it prints come from the server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clients.servers import server_process

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_loadgen_reports_throughput_latency_and_the_servers_first_token_time(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    with server_process("--engine", "fake", "--no-warmup", "--fake-batch-delay-ms", "20") as target:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "loadgen.py"), "--target", target, "--mode", mode,
             "--concurrency", "4", "--requests", "8", "--audio-s", "2", "--json", str(out)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "gen" / "python"), os.environ.get("PYTHONPATH", "")])},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 8 and report["errors"] == 0
    assert report["audio_s_per_s"] > 0
    # The fake engine reports its tokens at the end of its 20 ms batches: the first token comes after >= 20 ms.
    first_token = report["server_first_token_ms"]
    assert not math.isnan(first_token["p50"]) and first_token["p50"] >= 20
    assert "srv first token p50/p99" in result.stdout


def test_loadgen_appends_a_results_row_of_the_committed_shape(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"side": "generate", "earlier": True}]))
    with server_process("--engine", "fake", "--no-warmup") as target:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "loadgen.py"), "--target", target, "--concurrency", "2",
             "--requests", "4", "--audio-s", "1", "--results-json", str(results), "--model-name", "fake",
             "--side", "ours", "--commit", "abc123"],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "gen" / "python"), os.environ.get("PYTHONPATH", "")])},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(results.read_text())
    assert rows[0] == {"side": "generate", "earlier": True}  # appended, not overwritten
    row = rows[1]
    assert {k: row[k] for k in ("concurrency", "audio_s", "mode", "model", "side", "commit", "requests", "errors")} == {
        "concurrency": 2, "audio_s": 1.0, "mode": "unary", "model": "fake", "side": "ours", "commit": "abc123",
        "requests": 4, "errors": 0,
    }
    assert row["audio_s_per_s"] > 0
    assert set(row["latency_ms"]) == {"p50", "p90", "p99"} and set(row["ttft_ms"]) == {"p50", "p99"}
    assert row["date"].endswith("Z")
