"""The engine's benchmark timeline records full garbage collections (written by the engine thread, not inside the
collection) and stops listening when closed."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

from asr_server.engine.continuous.trace import EngineTrace


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_full_collection_is_written_before_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    trace = EngineTrace(str(path))
    try:
        gc.collect()
        assert path.read_text(encoding="utf-8") == ""  # queued, not written from inside the collection
        trace.write("step", t=1)
    finally:
        trace.close()
    rows = _lines(path)
    assert [row["k"] for row in rows[:-1]] == ["gc"] * (len(rows) - 1) and rows[-1] == {"k": "step", "t": 1}
    full = [row for row in rows if row["k"] == "gc" and row["gen"] == 2]
    assert full and all(isinstance(row["ms"], float) and row["ms"] >= 0 and row["t"] for row in full)


def test_closing_stops_listening(tmp_path: Path) -> None:
    before = len(gc.callbacks)
    trace = EngineTrace(str(tmp_path / "trace.jsonl"))
    assert len(gc.callbacks) == before + 1
    trace.close()
    assert len(gc.callbacks) == before


def test_trace_report_prints_the_collections(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [
        {"k": "step", "t": 0, "plan_ms": 1.0, "prefill_ms": 0.0, "launch_ms": 1.0, "collect_ms": 1.0,
         "prefills": 0, "prefill_tokens": 0, "rows": 1, "waiting": 0, "outputs": 0},
        {"k": "gc", "t": 2_000_000_000, "gen": 2, "ms": 412.5, "collected": 7},
        {"k": "step", "t": 3_000_000_000, "plan_ms": 1.0, "prefill_ms": 0.0, "launch_ms": 1.0, "collect_ms": 1.0,
         "prefills": 0, "prefill_tokens": 0, "rows": 1, "waiting": 0, "outputs": 0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = Path(__file__).resolve().parents[2] / "bench" / "trace_report.py"
    out = subprocess.run([sys.executable, str(report), str(path)], capture_output=True, text=True, check=True).stdout
    assert "steps: 2 over 3.0 s" in out
    assert "gc: 1 full collections" in out and "at     2.0 s: gen 2, 412.5 ms, 7 collected" in out


def test_trace_report_prints_prefilled_tokens_and_draft_acceptance(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"

    def req(rid: str, draft: int, accepted: int, prefilled: int) -> dict[str, object]:
        return {"k": "req", "id": rid, "priority": "FINAL", "enq": 0, "prepared": 1_000_000, "start": 2_000_000,
                "first": 3_000_000, "end": 4_000_000, "audio_s": 2.0, "tokens": 9, "prompt": 60,
                "prefilled": prefilled, "draft": draft, "draft_accepted": accepted}

    rows = [req("a", 8, 6, 40), req("b", 4, 0, 20), req("c", 0, 0, 60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = Path(__file__).resolve().parents[2] / "bench" / "trace_report.py"
    out = subprocess.run([sys.executable, str(report), str(path)], capture_output=True, text=True, check=True).stdout
    assert "drafts: 2 requests, 6 tokens mean, 50% of draft tokens accepted" in out
    assert "prompt tokens prefilled (the rest reused) p50/p90/p99    40.0" in out
