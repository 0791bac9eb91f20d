"""`make demo`'s script, as a fresh machine runs it: server on the tiny checkpoint, the Python CLI transcribes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from asr_server.models.tiny_checkpoint import TinyCheckpoints

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_script_prints_health_and_a_transcript(tiny_checkpoints: TinyCheckpoints) -> None:
    venv = Path(sys.executable).parent.parent  # the environment running the tests has asr-server and asr-client
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), str(venv), str(tiny_checkpoints.asr_hf)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "health: SERVING" in result.stdout
    lines = result.stdout.splitlines()
    start = lines.index("[")
    end = start + lines[start:].index("]")
    (item,) = json.loads("\n".join(lines[start : end + 1]))
    # Random weights: gibberish text, but a transcript with the forced language and the audio's length.
    assert item["language"] == "English" and item["text"] and item["duration"] > 0.5
