"""Bad input ends an evaluation with one line that names the problem and a non-zero exit,
through `mamba-eval run` (in process) and through lm-eval's own `lm_eval` command."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from mamba_eval.commands import cli
from mamba_eval.commands.demo import DEMO_TASK, build_demo


@pytest.fixture(autouse=True)
def _log_to_current_stderr():
    """lm-eval attaches its log handler to the sys.stderr of the first run; in pytest that is a
    capture stream closed after the test, so point the handlers at the current one."""
    for name in (None, "lm_eval"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # (setStream would flush the closed one)
    yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


def _bad_folders(root, model_dir):
    empty = root / "empty"
    empty.mkdir()
    unknown = root / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shapes = root / "shapes"
    shutil.copytree(model_dir, shapes)
    cfg = json.loads((shapes / "config.json").read_text())
    cfg["d_model"] += 16
    (shapes / "config.json").write_text(json.dumps(cfg))
    return empty, unknown, shapes


CASES = {
    "nonexistent path": (lambda d, m: f"pretrained={d}/no-such-model", "does not exist"),
    "folder without config": (lambda d, m: f"pretrained={d[0]}", "no config.json"),
    "unknown architecture": (lambda d, m: f"pretrained={d[1]}", "unsupported model_type 'gpt2'"),
    "weights not matching config": (lambda d, m: f"pretrained={d[2]}", "backbone.embedding.weight"),
    "unknown model_args key": (lambda d, m: f"pretrained={m},colour=blue", "unknown model_args key(s) for --model mamba: colour"),
    "misspelled dtype": (lambda d, m: f"pretrained={m},dtype=bfloat61", "dtype='bfloat61'"),
    "bad decode_state_dtype": (lambda d, m: f"pretrained={m},decode_state_dtype=int8",
                               "decode_state_dtype='int8' is not one of float32, bfloat16, float16, auto"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mamba_eval_run_reports_one_line(case, demo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)  # its notes are not errors
    folders = _bad_folders(tmp_path, demo["model"])
    make_args, expected = CASES[case]
    model_args = make_args(folders if case != "nonexistent path" else tmp_path, demo["model"])
    status = cli.main(["run", "--model_args", model_args, "--tasks", DEMO_TASK,
                       "--include_path", str(demo["tasks"]), "--device", "cpu"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("mamba-eval:")]
    assert status == 1
    assert len(ours) == 1, ours
    assert ours[0].startswith("mamba-eval: error: ") and expected in ours[0], ours[0]
    assert "Traceback (most recent call last)" not in err


def test_plain_lm_eval_reports_one_line(demo, tmp_path):
    """`lm_eval` itself (not our CLI): the error still ends the process as one line, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "mamba", "--model_args",
         f"pretrained={demo['model']},dtype=float33", "--tasks", DEMO_TASK,
         "--include_path", str(demo["tasks"]), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "mamba-eval: error: dtype='float33' is not one of auto, float32, bfloat16, float16"
    )
