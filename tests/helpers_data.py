"""Where the tests find real task data and the real tokenizer; small tasks and a chat tokenizer made
from them.

``MAMBA_EVAL_DATA_DIR`` names the data folder (laid out as documented in tasks/README.md);
it defaults to ``../shared/data`` beside the repository. Without it the tests that need it skip
with a reason containing "data folder not found", which `.ci/run` treats as a failure.
"""

from __future__ import annotations

import json
import os
import shutil
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


#: A chat template in the plain style of instruct checkpoints: each message a turn ended by the EOS
#: text, the assistant's turn opened on request.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_chat_tokenizer(tok_dir: Path, out_dir: Path, chat_template: str = CHAT_TEMPLATE) -> Path:
    """A copy of the tokenizer folder ``tok_dir`` whose ``tokenizer_config.json`` carries
    ``chat_template``, as an instruct checkpoint's does."""
    shutil.copytree(tok_dir, out_dir)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


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
