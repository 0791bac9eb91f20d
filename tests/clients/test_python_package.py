"""clients/python installs on its own (`pip install ./clients/python`): a wheel with asr_client and the generated
qwenasr.v1 stubs, that works without the server package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.clients.servers import REPO_ROOT, threaded_server
from tests.helpers import fake_config, tone, wav_bytes


def test_the_client_wheel_carries_its_stubs_and_runs_without_the_server(tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build/ directory.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "clients" / "python", checkout / "clients" / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    shutil.copytree(REPO_ROOT / "proto", checkout / "proto")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(checkout / "clients" / "python")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("qwen_asr_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"asr_client/client.py", "asr_client/py.typed", "qwenasr/v1/asr_pb2.py", "qwenasr/v1/asr_pb2_grpc.py",
            "qwenasr/v1/asr_pb2.pyi"} <= names
    assert not any(name.startswith("asr_server") for name in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    wav = tmp_path / "a.wav"
    wav.write_bytes(wav_bytes(tone(1.0, seed=1)))
    script = (
        "import sys; sys.modules['asr_server'] = None  # importing the server would fail\n"
        "import asr_client, asr_client.aio, asr_client.cli\n"
        "from asr_client import AsrClient\n"
        f"assert asr_client.__file__.startswith({str(site)!r}), asr_client.__file__\n"
        "with AsrClient(sys.argv[1]) as client:\n"
        "    print(client.transcribe(sys.argv[2])[0].text)\n"
    )
    with threaded_server(fake_config()) as (_, target):
        run = subprocess.run([sys.executable, "-c", script, target, str(wav)], capture_output=True, text=True,
                             timeout=60, check=False, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("w")
