"""Where the tests find real task data and the real tokenizer; small tasks made from them.

``MAMBA_EVAL_DATA_DIR`` names the data folder (laid out as documented in tasks/README.md);
it defaults to ``../shared/data`` beside the repository. Without it the tests that need it skip
with a reason containing "data folder not found", which `.ci/run` treats as a failure.
"""

from __future__ import annotations

import json
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


def write_generation_task(folder: Path, name: str, prompts: list[str], generation_kwargs: dict,
                          targets: list[str] | None = None, **config) -> Path:
    """An lm-eval ``generate_until`` task ``name`` (metric exact_match) over ``prompts``, with
    these ``generation_kwargs`` and any other task ``config`` keys, written into ``folder`` (give
    it as ``--include_path``)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                            for p, t in zip(prompts, targets or [""] * len(prompts))))
    # JSON is YAML: every value is written exactly as given
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
              "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
              "doc_to_target": "{{target}}", "generation_kwargs": generation_kwargs,
              "metric_list": [{"metric": "exact_match"}], "metadata": {"version": 1}, **config}
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2))
    return folder
