"""The ``mamba-eval`` command: help, version, usage errors, and ``run``'s pass-through to lm-eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import mamba_eval
from mamba_eval.commands import cli

SCRIPT = Path(sys.executable).parent / "mamba-eval"


def _script(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"console script not installed next to {sys.executable}; run `pip install -e .`"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


# ------------------------------------------------------------- the installed script


def test_help_lists_subcommands():
    proc = _script("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mamba-eval")
    assert "run" in proc.stdout


def test_version():
    proc = _script("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mamba-eval {mamba_eval.__version__} (lm-eval {version('lm_eval')})"


def test_unknown_subcommand_is_one_line_and_exits_2():
    proc = _script("frobnicate", "--tasks", "x")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mamba-eval: error:") and "'frobnicate'" in lines[0]


def test_no_subcommand_prints_help_and_exits_2():
    proc = _script()
    assert proc.returncode == 2
    assert "usage: mamba-eval" in proc.stderr


def test_run_help_shows_ours_then_lm_evals():
    proc = _script("run", "--help")
    assert proc.returncode == 0, proc.stderr
    ours = proc.stdout.index("--data-dir")
    theirs = proc.stdout.index("usage: lm-eval run")
    assert ours < theirs
    assert "--model_args" in proc.stdout[theirs:] and "--include_path" in proc.stdout[theirs:]


def test_run_evaluates_through_lm_eval(tmp_path):
    """A real lm-eval run (its ``dummy`` model on a two-question local task) driven by mamba-eval."""
    rows = [{"q": "Is ice cold?", "choices": ["yes", "no"], "label": 0},
            {"q": "Is fire cold?", "choices": ["yes", "no"], "label": 1}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cli_yes_no.yaml").write_text(
        "task: cli_yes_no\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n"
    )
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != cli.DATA_DIR_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # local data only; never wait on the Hub
    proc = _script(
        "run", "--model", "dummy", "--tasks", "cli_yes_no", "--include_path", str(tmp_path / "tasks"),
        "--output_path", str(out), cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "dummy"
    assert results["results"]["cli_yes_no"]["sample_len"] == 2


# ------------------------------------------------------- run's argument handling


@pytest.fixture
def lm_eval_argv(monkeypatch):
    """Replace lm-eval's CLI entry with a recorder of the argv it would have parsed."""
    import lm_eval.__main__

    calls: list[list[str]] = []

    def fake_cli_evaluate():
        calls.append(list(sys.argv))

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli_evaluate)
    monkeypatch.delenv(cli.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # lm-eval does not run: no Hub data to check first
    return calls


def _default_device() -> list[str]:
    """The ``--device`` that ``run`` passes for ``mamba`` when none is given."""
    from mamba_eval.harness.model_args import parse_device

    return ["--device", str(parse_device(None))]


@pytest.fixture
def offline_calls(monkeypatch, tmp_path):
    import mamba_eval.harness.offline

    calls: list[str] = []
    include = tmp_path / "offline-tasks"

    def fake_prepare(data_dir):
        calls.append(str(data_dir))
        return include

    monkeypatch.setattr(mamba_eval.harness.offline, "prepare_offline_tasks", fake_prepare)
    return calls, str(include)


def test_run_forwards_flags_and_defaults_model_to_mamba(lm_eval_argv):
    assert cli.main(["run", "--tasks", "hellaswag", "piqa", "--limit", "2", "--model_args", "pretrained=x"]) == 0
    assert lm_eval_argv == [["lm-eval", "run", "--tasks", "hellaswag", "piqa", "--limit", "2",
                             "--model_args", "pretrained=x", "--model", "mamba", *_default_device()]]


@pytest.mark.parametrize("given", [["--model", "hf"], ["--model=hf"], ["-M", "hf"]])
def test_run_keeps_an_explicit_model(lm_eval_argv, given):
    assert cli.main(["run", *given, "--tasks", "x"]) == 0
    assert lm_eval_argv == [["lm-eval", "run", "--tasks", "x", "--model", "hf"]]


def test_run_leaves_the_model_to_a_config_file(lm_eval_argv):
    assert cli.main(["run", "--config", "c.yaml"]) == 0
    assert lm_eval_argv == [["lm-eval", "run", "--config", "c.yaml"]]


def test_run_data_dir_adds_the_offline_include_path(lm_eval_argv, offline_calls, tmp_path):
    calls, include = offline_calls
    assert cli.main(["run", "--data-dir", str(tmp_path), "--tasks", "x"]) == 0
    assert calls == [str(tmp_path)]
    assert lm_eval_argv == [["lm-eval", "run", "--tasks", "x", "--model", "mamba", *_default_device(),
                             "--include_path", include]]


def test_run_data_dir_defaults_to_the_environment(lm_eval_argv, offline_calls, tmp_path, monkeypatch):
    calls, include = offline_calls
    monkeypatch.setenv(cli.DATA_DIR_ENV, str(tmp_path))
    assert cli.main(["run", "--tasks", "x"]) == 0
    assert calls == [str(tmp_path)]
    assert lm_eval_argv[0][-2:] == ["--include_path", include]

    # An empty --data-dir switches the environment's folder off.
    assert cli.main(["run", "--data-dir", "", "--tasks", "x"]) == 0
    assert calls == [str(tmp_path)] and "--include_path" not in lm_eval_argv[1]


def test_run_explicit_include_path_beats_the_environment(lm_eval_argv, offline_calls, tmp_path, monkeypatch, capsys):
    calls, _ = offline_calls
    monkeypatch.setenv(cli.DATA_DIR_ENV, str(tmp_path))
    assert cli.main(["run", "--tasks", "x", "--include_path", "mine"]) == 0
    assert calls == []
    assert lm_eval_argv[0][-2:] == ["--include_path", "mine"]
    assert cli.DATA_DIR_ENV in capsys.readouterr().err


def test_run_data_dir_and_include_path_conflict(lm_eval_argv, offline_calls, tmp_path, capsys):
    assert cli.main(["run", "--data-dir", str(tmp_path), "--include_path", "mine", "--tasks", "x"]) == 2
    assert lm_eval_argv == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--include_path" in err[0] and "--data-dir" in err[0]


def test_run_missing_data_dir_is_a_usage_error(lm_eval_argv, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["run", "--data-dir", str(missing), "--tasks", "x"]) == 2
    assert lm_eval_argv == []
    assert str(missing) in capsys.readouterr().err


def _passed_device(argv: list[str]) -> str:
    return argv[max(i for i, a in enumerate(argv) if a == "--device") + 1]  # lm-eval takes the last


@pytest.mark.parametrize("flag", [None, "cuda", "cpu"])
def test_run_passes_the_device_the_model_makes_of_the_flag(lm_eval_argv, flag):
    """lm-eval records its --device in the results (cuda:0 when not given); for `mamba` it is
    the device the model resolves the flag to (the CPU for CUDA where there is none)."""
    from mamba_eval.harness.model_args import parse_device

    assert cli.main(["run", "--tasks", "x", *(["--device", flag] if flag else [])]) == 0
    assert _passed_device(lm_eval_argv[0]) == str(parse_device(flag))


def test_run_passes_model_args_device(lm_eval_argv, caplog):
    """model_args' device is the one the model uses, over --device (which is then said unused)."""
    assert cli.main(["run", "--tasks", "x", "--model_args", "pretrained=x,device=meta"]) == 0
    assert cli.main(["run", "--tasks", "x", "--model_args", "device=meta", "--device", "cpu"]) == 0
    assert [_passed_device(argv) for argv in lm_eval_argv] == ["meta", "meta"]
    assert "model_args device=meta is used; the run's device=cpu" in caplog.text


def test_run_passes_no_device_for_other_models(lm_eval_argv):
    assert cli.main(["run", "--model", "hf", "--tasks", "x"]) == 0
    assert "--device" not in lm_eval_argv[0]


def test_results_record_the_device_used(tmp_path, monkeypatch):
    """A CPU run's results said ``device: cuda:0`` (lm-eval's default flag); model_args'
    ``batch_size`` and ``device`` beside lm-eval's flags are used, not a ``TypeError``."""
    from mamba_eval.commands.demo import DEMO_TASK, build_demo
    from mamba_eval.harness.model_args import parse_device

    monkeypatch.delenv(cli.DATA_DIR_ENV, raising=False)
    demo = build_demo(tmp_path / "demo")
    runs = {"default": ([], str(parse_device(None))),
            "model_args": (["--model_args", f"pretrained={demo['model']},batch_size=4,device=cpu",
                            "--batch_size", "2"], "cpu")}
    for name, (given, device) in runs.items():
        out = tmp_path / name
        args = given or ["--model_args", f"pretrained={demo['model']}"]
        assert cli.main(["run", *args, "--tasks", DEMO_TASK, "--include_path", str(demo["tasks"]),
                         "--limit", "2", "--output_path", str(out)]) == 0
        results = json.loads(next(out.rglob("results_*.json")).read_text())
        assert results["config"]["device"] == device, name


OUTPUT_FLAG_ARGS = {"demo": [], "batch": [], "table": ["runs/b1"], "probe": []}


@pytest.mark.parametrize("command", list(OUTPUT_FLAG_ARGS))
def test_own_commands_share_the_output_flag(command):
    """-o/--output everywhere (lm-eval's `run` has -o/--output_path); --out, the former spelling
    of demo and probe, still works."""
    parser = cli.build_parser()

    def parsed(*flags):
        args, extra = parser.parse_known_args([command, *OUTPUT_FLAG_ARGS[command], *flags])
        assert extra == []
        return vars(args)

    long = parsed("--output", "somewhere")
    assert "somewhere" in json.dumps(long, default=str)
    assert parsed("-o", "somewhere") == long
    if command in ("demo", "probe"):
        assert parsed("--out", "somewhere") == long


def test_run_returns_lm_evals_exit_status(monkeypatch):
    import lm_eval.__main__

    def failing():
        raise SystemExit(3)

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", failing)
    monkeypatch.delenv(cli.DATA_DIR_ENV, raising=False)
    saved = list(sys.argv)
    assert cli.main(["run", "--tasks", "x"]) == 3
    assert sys.argv == saved


def test_options_are_not_passed_to_subcommands_that_take_none(monkeypatch):
    class Recorder:
        def __init__(self):
            self.extra = None

        def __call__(self, args, extra):
            self.extra = extra
            return 0

    recorder = Recorder()

    def add_fake(subparsers):
        parser = subparsers.add_parser("fake-subcommand")
        parser.set_defaults(handler=recorder)

    monkeypatch.setattr(cli, "_SUBCOMMANDS", (*cli._SUBCOMMANDS, add_fake))
    assert cli.main(["fake-subcommand"]) == 0 and recorder.extra == []
    assert cli.main(["fake-subcommand", "--unknown"]) == 2


@pytest.mark.parametrize("given, seen", [(None, "1"), ("0", "0"), ("1", "1")])
def test_commands_run_with_the_harness_caches_unless_switched_off(monkeypatch, given, seen):
    """Every command (and the workers it starts, which inherit the environment) runs with
    ``MAMBA_EVAL_HARNESS_CACHE=1`` unless the user set it; the caller's environment is restored."""
    from mamba_eval.harness.registration import HARNESS_CACHE_ENV

    if given is None:
        monkeypatch.delenv(HARNESS_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(HARNESS_CACHE_ENV, given)
    values = []

    def add_fake(subparsers):
        parser = subparsers.add_parser("fake-subcommand")
        parser.set_defaults(handler=lambda args, extra: values.append(os.environ.get(HARNESS_CACHE_ENV)) or 0)

    monkeypatch.setattr(cli, "_SUBCOMMANDS", (*cli._SUBCOMMANDS, add_fake))
    assert cli.main(["fake-subcommand"]) == 0
    assert values == [seen]
    assert os.environ.get(HARNESS_CACHE_ENV) == given
