"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from asr_server.models.tiny_checkpoint import TinyCheckpoints

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """The four tiny random-weight checkpoints (ASR and aligner, -hf and original layouts), built offline.

    Built under the session's tmp dir (a few seconds), or, when ASR_TINY_DIR names a directory (e.g.
    ASR_TINY_DIR=artifacts/tiny, relative to the repo root), kept there and reused by later runs.
    """
    # Imported here, not at the top: collecting the pure unit tests must not pay for the checkpoint builder.
    from asr_server.models.tiny_checkpoint import build_all

    configured = os.environ.get("ASR_TINY_DIR", "").strip()
    if configured:
        root = Path(configured).expanduser()
        if not root.is_absolute():
            root = REPO_ROOT / root
    else:
        root = tmp_path_factory.mktemp("tiny-checkpoints")
    return build_all(root, seed=0)
