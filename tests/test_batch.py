"""``mamba-eval batch``: real runs over tiny random checkpoints on the CPU with the offline task
data (interrupted with ``kill -9`` and resumed; submitit's LocalExecutor with a failing
checkpoint), and the worker's use of lm-eval's result writer. The pieces that need no model are
in ``test_batch_plan.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_data import require_data_dir
from mamba_eval.commands import batch
from mamba_eval.errors import MambaEvalError

SCRIPT = Path(sys.executable).parent / "mamba-eval"
VOCAB_ROWS = 50280  # GPT-NeoX-20B's 50277 tokens padded to a multiple of 8
TASKS = ("piqa", "lambada_openai")


def _tiny_checkpoint(folder: Path, seed: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=VOCAB_ROWS, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=4,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.MambaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints in folders that are both named ``model``."""
    root = tmp_path_factory.mktemp("batch-ckpts")
    return [_tiny_checkpoint(root / "run1" / "model", 1), _tiny_checkpoint(root / "run2" / "model", 2)]


def _batch_args(out: Path, *extra: str, tokenizer: Path | None = None) -> list[str]:
    data = require_data_dir()
    tokenizer = tokenizer or data / "tokenizers" / "gpt-neox-20b"
    return [str(SCRIPT), "batch", "--output", str(out), "--data-dir", str(data), "--gpus", "none",
            "--model_args", f"tokenizer={tokenizer},dtype=float32", "--limit", "4", "--batch_size", "4",
            "--device", "cpu", *extra]


def _results(out: Path) -> dict[Path, tuple[int, bytes]]:
    """Finished result files: path -> (mtime_ns, bytes)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*/*.json"))
            if p.name != batch.CHECKPOINT_FILE and not p.name.startswith(".")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # an unreaped zombie has exited


# ------------------------------------------------------------------ real runs (subprocesses)


def test_kill_9_then_resume(tmp_path, ckpts):
    """kill -9 the batch right after its first result lands: the evaluation process dies with it,
    finished results stay complete, and a rerun does only the rest."""
    out = tmp_path / "out"
    command = _batch_args(out, "--checkpoints", str(ckpts[0]), str(ckpts[1]), "--tasks", ",".join(TASKS))
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([*command, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not _results(out):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no result within 240 s"
            time.sleep(0.05)
        locks = [p.read_text() for p in out.glob("*/.lock")]
        workers = [int(text.rsplit("worker pid ", 1)[1].rstrip(")")) for text in locks if "worker pid" in text]
        assert any(_alive(pid) for pid in workers), locks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "an evaluation process outlived the killed batch"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    before = _results(out)
    assert 1 <= len(before) < 4, sorted(before)
    for path in before:  # whatever landed is complete
        data = json.loads(path.read_text())
        assert data[batch.RESULT_KEY]["task"] == path.stem and path.stem in data["results"]

    # The rerun schedules one checkpoint per "GPU": ids the CPU build of torch ignores, but each
    # evaluation process must get its own CUDA_VISIBLE_DEVICES.
    logs_before = {p: p.read_text() for p in out.glob("*/worker.log")}
    proc = subprocess.run([*command, "--gpus", "0,1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 worker(s) with GPUs 0, 1" in proc.stderr
    devices = []
    for log in out.glob("*/worker.log"):
        new = log.read_text()[len(logs_before.get(log, "")):]
        devices += [line.rsplit("=", 1)[1] for line in new.splitlines() if "CUDA_VISIBLE_DEVICES=" in line]
    assert len(devices) == len(set(devices)) >= 1 and set(devices) <= {"0", "1"}, devices
    assert f"{len(before)} already done, {4 - len(before)} to run" in proc.stderr
    assert proc.stderr.count(": done") == 4 - len(before)
    after = _results(out)
    assert len(after) == 4
    for path, (mtime, content) in before.items():  # not redone
        assert after[path] == (mtime, content), path
    assert not list(out.rglob(".*.tmp-*"))  # stale temporary files were cleaned

    slugs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(slugs) == 2 and all(s.startswith("model-") for s in slugs)  # same folder name, no collision
    status = json.loads((out / batch.STATUS_FILE).read_text())
    assert status["counts"] == {"total": 4, "done": 4} and status["previously_done"] == len(before)
    assert sorted(c["name"] for c in status["checkpoints"]) == ["run1/model", "run2/model"]

    from mamba_eval.commands.table import make_table

    table = make_table([out])
    assert sorted(r.label for r in table.rows) == ["run1/model", "run2/model"]
    assert all({"piqa", "lambada_acc", "lambada_ppl"} <= set(r.cells) for r in table.rows)
    # Reported by the model; by hand: embedding 50280*16, one layer (d_inner 32, dt_rank 1, d_state 4):
    # in_proj 16*64, conv 32*4+32, x_proj 32*9, dt_proj 32+32, A_log 32*4, D 32, out_proj 32*16, norm 16; norm_f 16.
    assert [r.n_parameters for r in table.rows] == [806_720, 806_720]


def test_submitit_local_executor_with_a_failing_checkpoint(tmp_path, ckpts):
    """The cluster code path (submitit job array, pickled job function) through submitit's
    LocalExecutor; a checkpoint without config.json fails alone, reported with its error."""
    out = tmp_path / "out"
    bad = tmp_path / "no-config"
    bad.mkdir()
    proc = subprocess.run(_batch_args(out, "--checkpoints", str(ckpts[0]), str(bad), "--tasks", "piqa",
                                      "--executor", "submitit-local"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [ln for ln in proc.stderr.splitlines() if "FAILED no-config" in ln and "(piqa)" in ln]
    assert len(failed) == 1 and failed[0].endswith(f"{bad}: no config.json in the checkpoint folder"), proc.stderr
    assert "1 of 2 units done" in proc.stderr

    status = json.loads((out / batch.STATUS_FILE).read_text())
    assert status["executor"] == "submitit-local"
    units = {c["name"]: c["units"]["piqa"] for c in status["checkpoints"]}
    assert units["model"]["state"] == "done"
    assert units["no-config"]["state"] == "failed" and "no config.json" in units["no-config"]["error"]
    assert all(c.get("job_id") for c in status["checkpoints"])
    assert list((out / ".submitit").glob("*_result.pkl"))  # submitit ran the jobs
    good = next(out.glob("model-*"))
    result = json.loads((good / "piqa.json").read_text())
    assert result["config"]["model"] == "mamba" and result["n-samples"]["piqa"]["effective"] == 4

    # Same layout as the local executor: a local rerun sees the finished unit as done.
    plan = batch.run_batch(batch.expand_checkpoints([ckpts[0], bad]), ["piqa"], out, dry_run=True,
                           model_args={"tokenizer": str(require_data_dir() / "tokenizers" / "gpt-neox-20b"),
                                       "dtype": "float32"},
                           lm_eval_args=["--limit", "4", "--batch_size", "4", "--device", "cpu"],
                           stream=open(os.devnull, "w"))
    assert sorted(plan.states.values()) == ["done", "pending"]


def test_chat_template_flags_reach_the_worker(tmp_path, ckpts, chat_tok_dir):
    """--apply_chat_template, --fewshot_as_multiturn and --system_instruction pass through to the
    evaluation process, whose prompts are rendered with the tokenizer's chat template; they are
    among the recorded settings, so a result made without them is stale for a run with them."""
    out = tmp_path / "out"
    chat = ["--apply_chat_template", "--fewshot_as_multiturn", "--system_instruction", "Be brief."]
    proc = subprocess.run(_batch_args(out, "--checkpoints", str(ckpts[0]), "--tasks", "arc_easy", "--num_fewshot", "1",
                                      "--log_samples", *chat, tokenizer=chat_tok_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    result = json.loads((folder / "arc_easy.json").read_text())
    assert result[batch.RESULT_KEY]["settings"] == {"apply_chat_template": True, "limit": 4.0, "num_fewshot": 1,
                                                    "system_instruction": "Be brief."}
    assert result["config"]["model"] == "mamba" and result["n-samples"]["arc_easy"]["effective"] == 4
    rows = [json.loads(line) for line in (folder / "arc_easy.samples.jsonl").read_text().splitlines()]
    prompt = rows[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|system|>\nBe brief.<|endoftext|>\n<|user|>\n") and prompt.count("<|user|>") == 2

    plain = dict(model_args={"tokenizer": str(chat_tok_dir), "dtype": "float32"}, dry_run=True,
                 data_dir=str(require_data_dir()), stream=open(os.devnull, "w"))
    again = batch.run_batch(batch.expand_checkpoints([ckpts[0]]), ["arc_easy"], out,
                            lm_eval_args=["--limit", "4", "--num_fewshot", "1", "--apply_chat_template",
                                          "--system_instruction", "Be brief."], **plain)
    assert list(again.states.values()) == ["done"]  # --fewshot_as_multiturn is the default with a template
    with pytest.raises(MambaEvalError, match="made with other settings: .*apply_chat_template: True -> None"):
        batch.run_batch(batch.expand_checkpoints([ckpts[0]]), ["arc_easy"], out,
                        lm_eval_args=["--limit", "4", "--num_fewshot", "1"], **plain)


def test_worker_saves_with_lm_eval_tracker(tmp_path):
    """The evaluation process (lm-eval's ``dummy`` model, no checkpoint) saves each task through
    lm-eval's EvaluationTracker into the documented layout: ``<task>.json`` with batch's record
    and the tracker's fields, ``<task>.samples.jsonl`` with ``--log_samples``, nothing staged
    left behind; a task that fails gets its ``.error`` and does not stop the others."""
    from mamba_eval.harness.offline import prepare_offline_tasks

    folder = tmp_path / "dummy-00000000"
    folder.mkdir()
    spec = {"folder": str(folder), "slug": folder.name, "name": "dummy", "model": "dummy", "model_args": {},
            "tasks": ["no_such_task", "piqa"], "settings": {"limit": 3.0},
            "fingerprints": {"no_such_task": "f" * 16, "piqa": "0123456789abcdef"},
            "lm_eval_args": ["--limit", "3", "--log_samples"],
            "include_path": str(prepare_offline_tasks(require_data_dir()))}
    (folder / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "mamba_eval.commands.batch", "--worker", str(folder / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]  # one task failed, one done
    assert "unknown task 'no_such_task'" in (folder / "no_such_task.error").read_text()

    result = json.loads((folder / "piqa.json").read_text())
    assert result[batch.RESULT_KEY] == {"format": 1, "task": "piqa", "fingerprint": "0123456789abcdef",
                                        "settings": {"limit": 3.0}, "slug": folder.name, "name": "dummy"}
    assert result["n-samples"]["piqa"]["effective"] == 3 and "acc,none" in result["results"]["piqa"]
    assert result["config"]["model"] == result["model_source"] == "dummy"
    assert float(result["total_evaluation_time_seconds"]) > 0 and result["task_hashes"]["piqa"]
    assert "samples" not in result
    rows = [json.loads(line) for line in (folder / "piqa.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["doc_hash"] for r in rows)
    assert batch.unit_state(folder, "piqa", "0123456789abcdef") == "done"
    assert sorted(p.name for p in folder.iterdir()) == [
        "no_such_task.error", "piqa.json", "piqa.samples.jsonl", "spec.json"]  # no staging folder left


def test_worker_records_the_device_the_model_used(tmp_path, ckpts):
    """lm-eval records its --device flag (cuda:0 when not given) as the run's device; the worker
    records the device the model took (here model_args' cpu, with no --device)."""
    from mamba_eval.harness.offline import prepare_offline_tasks

    data = require_data_dir()
    folder = tmp_path / "model-00000000"
    folder.mkdir()
    spec = {"folder": str(folder), "slug": folder.name, "name": "model", "model": "mamba",
            "model_args": {"pretrained": str(ckpts[0]), "tokenizer": str(data / "tokenizers" / "gpt-neox-20b"),
                           "dtype": "float32", "device": "cpu"},
            "tasks": ["piqa"], "settings": {"limit": 2.0}, "fingerprints": {"piqa": "0123456789abcdef"},
            "lm_eval_args": ["--limit", "2"], "include_path": str(prepare_offline_tasks(data))}
    (folder / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "mamba_eval.commands.batch", "--worker", str(folder / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((folder / "piqa.json").read_text())["config"]["device"] == "cpu"
