"""Bad input ends an evaluation with one line that names the problem and a non-zero exit,
through `mamba-eval run` (in process) and through lm-eval's own command line (`python -m lm_eval`
and the `lm_eval` console script); a program that calls lm-eval as a library gets the exception
and Python's ordinary report."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
                               "decode_state_dtype='int8' is not one of "),
    "max_length not a number": (lambda d, m: f"pretrained={m},max_length=abc",
                                "max_length='abc': expected a positive integer"),
    # lm-eval's parser makes 1.5 a float and true a bool; int() would take them as 1
    "max_length not whole": (lambda d, m: f"pretrained={m},max_length=1.5", "max_length=1.5: expected a positive integer"),
    "context_chunk a bool": (lambda d, m: f"pretrained={m},context_chunk=true",
                             "context_chunk=True: expected a positive integer"),
    "batch_size auto:N not a number": (lambda d, m: f"pretrained={m},batch_size=auto:x",
                                       "batch_size='auto:x': expected an integer or 'auto'"),
    "prefix_token_id outside the vocabulary": (lambda d, m: f"pretrained={m},prefix_token_id=-1",
                                               "prefix_token_id=-1: not a token id of this model"),
    "triton backend without a GPU": (lambda d, m: f"pretrained={m},backend=triton",
                                     "backend=triton needs a CUDA GPU, but the model runs on cpu; use backend=ref"),
}


def _one_line_error(status: int, err: str, expected: str, output: Path) -> None:
    """The run failed with exactly one line of ours naming the problem, no traceback, and wrote no
    results under ``output``."""
    ours = [line for line in err.splitlines() if line.startswith("mamba-eval:")]
    assert status == 1
    assert len(ours) == 1, ours
    assert ours[0].startswith("mamba-eval: error: ") and expected in ours[0], ours[0]
    assert "Traceback" not in err
    assert not (output.exists() and any(output.iterdir())), sorted(output.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_mamba_eval_run_reports_one_line(case, demo, tmp_path, capsys, monkeypatch):
    from mamba_eval.kernels import utils as kernel_utils

    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)  # its notes are not errors
    monkeypatch.setattr(kernel_utils, "INTERPRETED", False)  # the tests' Triton interpreter is no GPU
    folders = _bad_folders(tmp_path, demo["model"])
    make_args, expected = CASES[case]
    model_args = make_args(folders if case != "nonexistent path" else tmp_path, demo["model"])
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", model_args, "--tasks", DEMO_TASK,
                       "--include_path", str(demo["tasks"]), "--device", "cpu", "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err, expected, output)


GEN_KWARGS_CASES = {
    "max_gen_toks zero": ({"max_gen_toks": 0}, "generation kwarg max_gen_toks=0: expected a positive integer"),
    "until not strings": ({"until": [".", 3]},
                          "generation kwarg until=['.', 3]: expected a string or a list of strings"),
    "unsupported kwarg": ({"repetition_penalty": 1.2, "until": "."},
                          "generation kwargs not supported by --model mamba: repetition_penalty (supported: until, "),
    "no room for the prompt": ({"max_gen_toks": 64},
                               "max_gen_toks=64 leaves no room for the prompt within max_length=64"),
}


@pytest.mark.parametrize("case", list(GEN_KWARGS_CASES))
def test_bad_generation_kwargs(case, demo, tmp_path, capsys, monkeypatch):
    """A generation task's bad gen_kwargs end the run with one line naming the task and the
    key, before anything is generated (the checks themselves: test_generation.py)."""
    from helpers_data import write_generation_task

    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    gen_kwargs, expected = GEN_KWARGS_CASES[case]
    tasks = write_generation_task(tmp_path / "tasks", "mamba_eval_test_bad_gen", ["The key is", "Once upon"],
                                  gen_kwargs)
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']},max_length=64", "--tasks",
                       "mamba_eval_test_bad_gen", "--include_path", str(tasks), "--device", "cpu",
                       "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err, f"task mamba_eval_test_bad_gen: {expected}", output)


def test_chat_template_without_template(demo, tmp_path, capsys, monkeypatch):
    """--apply_chat_template with a tokenizer that has no chat template (``hf`` fails with
    transformers' traceback): one line that names the tokenizer."""
    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']}", "--tasks", DEMO_TASK,
                       "--include_path", str(demo["tasks"]), "--device", "cpu", "--limit", "2",
                       "--apply_chat_template", "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err,
                    f"--apply_chat_template: the tokenizer '{demo['model']}' has no chat template", output)


def test_cuda_device_beyond_the_machines(demo, tmp_path, capsys, monkeypatch):
    """device=cuda:N past the machine's GPUs: one line before any CUDA call (which would fail
    with a traceback), on a machine with one GPU as far as the run can tell."""
    import torch

    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']},device=cuda:7", "--tasks", DEMO_TASK,
                       "--include_path", str(demo["tasks"]), "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err,
                    "device='cuda:7': this machine has 1 CUDA device(s), numbered from 0", output)


def test_unknown_task_in_run(demo, data_dir, tmp_path, capsys, monkeypatch):
    """`run` names every unknown task in batch's words, with lm-eval's offline tasks in view
    (whose override warnings are not shown either)."""
    monkeypatch.setenv("MAMBA_EVAL_DATA_DIR", str(data_dir))
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']}", "--tasks", "no_such_task,piqa,nor_this",
                       "--device", "cpu", "--output_path", str(output)])
    err = capsys.readouterr().err
    _one_line_error(status, err, "unknown tasks 'no_such_task', 'nor_this' (see 'lm-eval ls tasks'", output)
    assert "overrides existing task" not in err


def _no_lm_eval(*args):
    raise AssertionError("lm-eval ran: the error should have come before")


def test_offline_without_data_folder_fails_before_lm_eval(demo, tmp_path, capsys, monkeypatch):
    """HF_DATASETS_OFFLINE=1, no data folder, a stock task not in datasets' cache: one line that
    says how to give a data folder, before lm-eval builds tasks and loads the model."""
    import datasets

    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network calls from the tests
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cli, "_call_lm_eval", _no_lm_eval)
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']}", "--tasks", "hellaswag",
                       "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err,
                    "Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled); without network "
                    "access pass --data-dir DIR or set MAMBA_EVAL_DATA_DIR", output)


@pytest.mark.parametrize("data_folder", [False, True])
def test_unreachable_hub_data(data_folder, demo, data_dir, tmp_path, capsys, monkeypatch):
    """The Hub unreachable without the environment saying so (datasets' ConnectionError, in
    lm-eval's task building): one line; with a data folder, it names the tasks the folder serves."""
    import datasets

    from mamba_eval.harness import offline

    monkeypatch.setattr(offline, "hub_offline", lambda: False)  # datasets itself stays offline
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network calls from the tests
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    if data_folder:
        monkeypatch.setenv("MAMBA_EVAL_DATA_DIR", str(data_dir))
        task, hint = "sciq", f"the data folder {data_dir} serves only {', '.join(offline.offline_task_names())}"
    else:
        monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
        task, hint = "hellaswag", "without network access pass --data-dir DIR or set MAMBA_EVAL_DATA_DIR"
    output = tmp_path / "results"
    status = cli.main(["run", "--model_args", f"pretrained={demo['model']}", "--tasks", task, "--device", "cpu",
                       "--output_path", str(output)])
    _one_line_error(status, capsys.readouterr().err, f"on the Hub (OfflineModeIsEnabled); {hint}", output)


def test_offline_check_leaves_cached_and_local_tasks_alone(monkeypatch):
    """The early check asks datasets' own cache lookup: a data set it finds passes, and so does
    every task that is not a stock task mirrored offline."""
    import datasets

    from mamba_eval.harness import offline

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    asked = []
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, name=None: asked.append((path, name)))
    offline.check_hub_data(["hellaswag", "arc_challenge", DEMO_TASK, "no_such_task"])
    assert asked == [("Rowan/hellaswag", None), ("allenai/ai2_arc", "ARC-Challenge")]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # online: lm-eval fetches, nothing to check
    offline.check_hub_data(["piqa"])
    assert len(asked) == 2


LM_EVAL_COMMANDS = {
    "python -m lm_eval": [sys.executable, "-m", "lm_eval"],
    "console script": [str(Path(sys.executable).parent / "lm_eval")],
}


@pytest.mark.parametrize("command", list(LM_EVAL_COMMANDS))
def test_plain_lm_eval_reports_one_line(command, demo, tmp_path):
    """`lm_eval` itself (not our CLI): the error still ends the process as one line, no traceback."""
    res = subprocess.run(
        [*LM_EVAL_COMMANDS[command], "--model", "mamba", "--model_args",
         f"pretrained={demo['model']},dtype=float33", "--tasks", DEMO_TASK,
         "--include_path", str(demo["tasks"]), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "mamba-eval: error: dtype='float33' is not one of auto, float32, bfloat16, float16"
    )


LIBRARY_CALL = """
    import sys
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from mamba_eval.errors import MambaEvalError

    def evaluate():
        simple_evaluate(model="mamba", model_args=sys.argv[1], tasks=[sys.argv[2]],
                        task_manager=TaskManager(include_path=sys.argv[3]), device="cpu")

    try:
        evaluate()
    except MambaEvalError as exc:
        print("caught:", type(exc).__name__, exc)
    assert "mamba_eval.harness.lm" in sys.modules
    print("excepthook untouched:", sys.excepthook is sys.__excepthook__)
    evaluate()  # uncaught: Python's own report
"""


def test_library_call_raises_an_ordinary_exception(demo, tmp_path):
    missing = tmp_path / "no-such-model"
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIBRARY_CALL), f"pretrained={missing}", DEMO_TASK, str(demo["tasks"])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    caught, untouched = res.stdout.splitlines()[-2:]
    assert caught.startswith("caught: ") and "does not exist" in caught, res.stderr
    assert untouched == "excepthook untouched: True"
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert "mamba-eval: error:" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert f"{caught.split()[1]}: " in last and "does not exist" in last, last  # Python's own last line
