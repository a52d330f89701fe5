"""``mamba-eval probe`` (mamba_eval/commands/probe.py): bad input, complete reports, OOM recording."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from helpers_data import require_data_dir

from mamba_eval.commands.cli import main as cli_main
from mamba_eval.errors import MambaEvalError
from mamba_eval.commands.probe import ProbeSpec, run_probe


# Many small forwards: one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def word_model(checkpoint, tmp_path_factory):
    """The conftest's tiny random Mamba-1 (256 embedding rows) with the probe's word tokenizer."""
    from mamba_eval.commands.probe_model import build_tokenizer

    folder = tmp_path_factory.mktemp("word_tok")
    build_tokenizer(folder)
    return f"pretrained={checkpoint('mamba1-small').ssm_dir},tokenizer={folder}"


@pytest.fixture(scope="module")
def neox_model(tmp_path_factory):
    from mamba_eval.commands.demo import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("neox_ckpt"), 50277)
    return f"pretrained={ckpt},tokenizer={require_data_dir() / 'tokenizers' / 'gpt-neox-20b'}"


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    cases = [
        (dict(family="needle"), "unknown probe family 'needle'"),
        (dict(family="mqar", lengths="4q"), "bad length '4q'"),
        (dict(family="mqar", lengths="1k,1k"), "repeated"),
        (dict(family="mqar", depths="0.5"), "--depths applies to the passkey families"),
        (dict(family="passkey", pairs="4"), "--pairs applies to the mqar family"),
        (dict(family="passkey", depths="0,1.5"), "bad depths"),
        (dict(family="mqar", pairs="0"), "--pairs"),
        (dict(family="mqar", lengths="32", pairs="16"), "too short for 16 pairs"),
        (dict(family="ppl", text=str(tmp_path / "nope.txt")), "text file not found"),
        (dict(family="mqar", text="x.txt"), "apply to the ppl family"),
        (dict(family="mqar", samples=0), "--samples"),
    ]
    for kwargs, message in cases:
        family = kwargs.pop("family")
        with pytest.raises(MambaEvalError, match=message.replace("(", r"\(").replace("'", "'")):
            ProbeSpec(family, kwargs.pop("lengths", None), **kwargs)
    with pytest.raises(MambaEvalError, match="give --model_args pretrained"):
        run_probe("passkey", out=tmp_path / "x")
    # Through the command: one line, exit status 1, nothing written.
    status = cli_main(["probe", "--family", "needle", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert status == 1 and err.strip() == (
        "mamba-eval: error: unknown probe family 'needle'; choose one of mqar, passkey, passkey_gen, ppl")
    assert not (tmp_path / "cli").exists()


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _check_report(out: Path, results: dict, n_tasks: int) -> None:
    for name in ("report.md", "results.json", "results.csv", "memory_time_vs_length.png"):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file left behind
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["family"] == results["family"] and len(on_disk["tasks"]) == n_tasks
    for t in on_disk["tasks"]:
        assert t["status"] == "ok", t
        assert (out / "tasks" / f"{t['task']}.yaml").is_file()
        assert (out / "lm_eval" / f"{t['task']}.json").is_file()
        assert t["peak_memory"]["peak_bytes"] > 0 and t["eval_seconds"] > 0 and t["n_docs"] > 0
        lm_eval_out = json.loads((out / "lm_eval" / f"{t['task']}.json").read_text())
        assert t["task"] in lm_eval_out["results"]
    with (out / "results.csv").open() as f:  # pytablewriter's dialect (mamba_eval.commands.table_writers)
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {t["task"] for t in on_disk["tasks"]}
    for t in on_disk["tasks"]:  # every metric and its value, as results.json holds them
        written = {r["metric"]: r["value"] for r in rows if r["task"] == t["task"]}
        assert written == {k: str(v) for k, v in t["metrics"].items()}
    assert (out / "report.md").read_text().startswith("# ")
    with (out / "memory_time_vs_length.png").open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_mqar_probe_writes_a_complete_report(word_model, tmp_path):
    out = tmp_path / "mqar"
    results = run_probe("mqar", model_args=word_model, lengths="64,128", pairs="2,4", samples=4,
                        device="cpu", out=out, log=lambda m: None)
    _check_report(out, results, 4)
    assert (out / "accuracy_vs_length.png").is_file()
    names = [t["task"] for t in results["tasks"]]
    assert names == ["mamba_mqar_64_p2", "mamba_mqar_64_p4", "mamba_mqar_128_p2", "mamba_mqar_128_p4"]
    for t in results["tasks"]:
        assert t["context_tokens_min"] == t["context_tokens_max"] == t["length"]
        assert 0.0 <= t["metrics"]["acc"] <= 1.0 and t["n_docs"] == 4
    assert results["model_args"]["max_length"] >= 128
    report = (out / "report.md").read_text()
    table = _table_rows(report)
    assert ["length", "acc, 2 pairs", "acc, 4 pairs"] in table
    acc = {(t["length"], t["pairs"]): f"{t['metrics']['acc']:.3f}" for t in results["tasks"]}
    assert ["128", acc[128, 2], acc[128, 4]] in table
    assert "process RSS" in report  # the CPU's memory figure says what it is


def test_passkey_probe_through_the_command(neox_model, tmp_path, capsys):
    out = tmp_path / "pk"
    status = cli_main(["probe", "--family", "passkey", "--model_args", neox_model, "--lengths", "256,512",
                       "--depths", "0,1", "--samples", "1", "--device", "cpu", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert ["length", "all depths", "depth 0", "depth 1"] in _table_rows(printed)
    assert f"report: {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    _check_report(out, results, 2)
    # Short lengths: the output and the report say how to run the long ones.
    command = results["longer"]["command"]
    assert command.startswith("mamba-eval probe --family passkey ") and "--lengths " in command
    assert f"    {command}" in printed.splitlines()
    assert command in (out / "report.md").read_text()
    for t in results["tasks"]:
        assert set(t["metrics"]) >= {"acc", "acc_depth_0", "acc_depth_100"} and t["n_docs"] == 2
        assert t["length"] - 5 < t["context_tokens_min"] <= t["length"]


def test_ppl_probe_on_a_text_file(neox_model, tmp_path):
    essays = require_data_dir() / "long_context" / "paul_graham_essays"
    text = max(essays.glob("*.txt"), key=lambda p: p.stat().st_size)
    out = tmp_path / "ppl"
    results = run_probe("ppl", model_args=neox_model, lengths="512", samples=2, text=str(text),
                        device="cpu", out=out, log=lambda m: None)
    _check_report(out, results, 1)
    assert (out / "loss_vs_position.png").is_file()
    metrics = results["tasks"][0]["metrics"]
    assert {"loss", "loss_0-256", "loss_256-512"} <= set(metrics)
    assert all(m > 0 for k, m in metrics.items() if k.startswith("loss") and not k.endswith("stderr")
               and isinstance(m, float))
    table = _table_rows((out / "report.md").read_text())
    assert ["window", "loss (all)", "0-256", "256-512"] in table
    assert ["512", *(f"{metrics[m]:.3f}" for m in ("loss", "loss_0-256", "loss_256-512"))] in table


def test_out_of_memory_at_one_length_is_recorded(word_model, tmp_path, monkeypatch):
    """An OOM at one length becomes that length's result; the other lengths still run."""
    import lm_eval
    import torch

    real = lm_eval.simple_evaluate
    calls = []

    def flaky(*args, **kwargs):
        calls.append(kwargs["tasks"][0].config.task)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", flaky)
    out = tmp_path / "oom"
    results = run_probe("mqar", model_args=word_model, lengths="64,96,128", pairs="2", samples=2,
                        device="cpu", out=out, plots=False, log=lambda m: None)
    statuses = [t["status"] for t in results["tasks"]]
    assert statuses == ["ok", "out of memory", "ok"]
    assert "80.00 GiB" in results["tasks"][1]["error"]
    assert "out of memory" in (out / "report.md").read_text()
