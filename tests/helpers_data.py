"""Where the tests find real task data and the real tokenizer.

``MAMBA_EVAL_DATA_DIR`` names the data folder (laid out as documented in tasks/README.md);
it defaults to ``../shared/data`` beside the repository. Without it the tests that need it skip
with a reason containing "data folder not found", which `.ci/run` treats as a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("MAMBA_EVAL_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


def require_data_dir() -> Path:
    path = data_dir()
    if not (path / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
        pytest.skip(f"data folder not found: {path} (set MAMBA_EVAL_DATA_DIR)")
    return path
