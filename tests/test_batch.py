"""``mamba-eval batch``: real runs over tiny random checkpoints on the CPU with the offline task
data (interrupted with ``kill -9`` and resumed; submitit's LocalExecutor with a failing
checkpoint), and the pieces that need no model: slugs, manifests, lm-eval flags, stale results,
half-written files, GPU slots, and a SLURM submission through a stand-in ``sbatch``."""

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


def _batch_args(out: Path, *extra: str) -> list[str]:
    data = require_data_dir()
    tokenizer = data / "tokenizers" / "gpt-neox-20b"
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


# ------------------------------------------------------------------------- no model needed


def test_slugs_are_unique_stable_and_independent_of_labels(tmp_path):
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    ckpts = batch.expand_checkpoints([tmp_path / "a" / "model", tmp_path / "b" / "model", "state-spaces/mamba-130m"])
    jobs = batch.plan_jobs(ckpts, ["piqa"], tmp_path / "out")
    slugs = [j.slug for j in jobs]
    assert len(set(slugs)) == 3 and slugs[0].startswith("model-") and slugs[2].startswith("mamba-130m-")
    assert [j.name for j in jobs] == ["a/model", "b/model", "state-spaces/mamba-130m"]
    again = batch.plan_jobs(list(reversed(ckpts)) + ckpts, ["piqa"], tmp_path / "out")  # duplicates dropped
    assert sorted(j.slug for j in again) == sorted(slugs)
    renamed = batch.plan_jobs([batch.Checkpoint(ckpts[0].pretrained, name="nice")], ["piqa"], tmp_path / "out")
    assert renamed[0].slug == slugs[0] and renamed[0].name == "nice"
    other_args = batch.plan_jobs(ckpts[:1], ["piqa"], tmp_path / "out", model_args="dtype=bfloat16")
    runtime_args = batch.plan_jobs(ckpts[:1], ["piqa"], tmp_path / "out", model_args="batch_size=8,device=cuda")
    assert other_args[0].slug != slugs[0] and runtime_args[0].slug == slugs[0]


def test_manifest(tmp_path):
    for name in ("s1", "s2", "final"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "model_args: dtype=bfloat16,max_length=4096\n"
        "checkpoints:\n"
        "  - ckpts/s*\n"
        "  - pretrained: ckpts/final\n"
        "    name: the-final-one\n"
        "    model_args: {dtype: float32}\n"
        "    n_parameters: 1234\n"
        "  - state-spaces/mamba2-130m\n")
    ckpts = batch.read_manifest(manifest, model_args={"max_length": 1024})
    assert [c.pretrained for c in ckpts] == [str(tmp_path / "ckpts" / "s1"), str(tmp_path / "ckpts" / "s2"),
                                             str(tmp_path / "ckpts" / "final"), "state-spaces/mamba2-130m"]
    assert ckpts[0].model_args == {"dtype": "bfloat16", "max_length": 1024}  # command line over manifest
    assert ckpts[2].model_args == {"dtype": "float32", "max_length": 1024}  # the entry over both
    assert (ckpts[2].name, ckpts[2].n_parameters) == ("the-final-one", 1234)

    text = tmp_path / "list.txt"
    text.write_text("# checkpoints\nckpts/final  # the last one\n\nstate-spaces/mamba-130m\n")
    assert [c.label for c in batch.read_manifest(text)] == ["final", "state-spaces/mamba-130m"]

    for body, message in [
        ("checkpoints:\n  - {name: x}\n", "'pretrained' .* is required"),
        ("checkpoints:\n  - {pretrained: a, n_parameters: -3}\n", "n_parameters must be a positive integer"),
        ("checkpoints:\n  - {pretrained: a, revision: main}\n", r"unknown key\(s\) \['revision'\]"),
        ("checkpoints:\n  - {pretrained: a, model_args: 'pretrained=b'}\n", "not inside model_args"),
        ("checkpoints: []\n", "non-empty list"),
        ("checkpoints:\n  - ckpts/nothing*\n", "no checkpoint folder matches"),
    ]:
        manifest.write_text(body)
        with pytest.raises(MambaEvalError, match=message):
            batch.read_manifest(manifest)


def test_lm_eval_flags_are_checked_and_recorded(tmp_path):
    ckpts = [batch.Checkpoint("state-spaces/mamba-130m")]
    job = batch.plan_jobs(ckpts, ["piqa"], tmp_path, lm_eval_args=["--limit", "4", "--batch_size", "8"])[0]
    assert job.settings == {"limit": 4.0}  # the batch size does not change results
    for args, message in [(["--frobnicate"], "unrecognized arguments"), (["--output_path", "x"], "use --output"),
                          (["--limit", "many"], "lm-eval argument")]:
        with pytest.raises(MambaEvalError, match=message):
            batch.plan_jobs(ckpts, ["piqa"], tmp_path, lm_eval_args=args)
    with pytest.raises(MambaEvalError, match="batch takes task names"):
        batch.plan_jobs(ckpts, ["my/task.yaml"], tmp_path)
    with pytest.raises(MambaEvalError, match="must not set 'pretrained'"):
        batch.plan_jobs(ckpts, ["piqa"], tmp_path, model_args="pretrained=x")


def _write_result(folder: Path, task: str, fingerprint: str, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.json").write_text(json.dumps({
        "results": {task: {"acc,none": 0.5}},
        batch.RESULT_KEY: {"task": task, "fingerprint": fingerprint, "settings": settings}}))


def test_stale_and_half_written_results(tmp_path):
    ckpts = [batch.Checkpoint("state-spaces/mamba-130m")]
    flags = ["--limit", "4"]
    job = batch.plan_jobs(ckpts, ["piqa", "arc_easy", "winogrande"], tmp_path, lm_eval_args=flags)[0]
    folder = Path(job.folder)
    _write_result(folder, "piqa", job.fingerprints["piqa"], job.settings)  # done
    (folder / "arc_easy.json").write_text('{"results": {"arc_easy": {"acc,none": 0.')  # cut short
    assert batch.unit_state(folder, "piqa", job.fingerprints["piqa"]) == "done"
    assert batch.unit_state(folder, "arc_easy", job.fingerprints["arc_easy"]) == "missing"

    quiet = open(os.devnull, "w")
    run = dict(lm_eval_args=flags, dry_run=True, stream=quiet)
    plan = batch.run_batch(ckpts, ["piqa", "arc_easy", "winogrande"], tmp_path, **run)
    assert [plan.states[(job.slug, t)] for t in ("piqa", "arc_easy", "winogrande")] == ["done", "pending", "pending"]

    _write_result(folder, "winogrande", "0" * 16, {"limit": 8.0})  # made with --limit 8
    with pytest.raises(MambaEvalError, match=r"winogrande.json \(limit: 8.0 -> 4.0\).*--redo-stale"):
        batch.run_batch(ckpts, ["piqa", "arc_easy", "winogrande"], tmp_path, **run)
    plan = batch.run_batch(ckpts, ["piqa", "arc_easy", "winogrande"], tmp_path, redo_stale=True, **run)
    assert plan.states[(job.slug, "winogrande")] == "pending"


def test_gpu_slots(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert batch.detect_gpus("auto") == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert batch.detect_gpus("auto") == [] and batch.detect_gpus("none") == []
    assert batch._local_slots("0,1,2,3", 1, None) == [("0",), ("1",), ("2",), ("3",)]
    assert batch._local_slots("0,1,2,3,4", 2, None) == [("0", "1"), ("2", "3")]
    assert batch._local_slots("0,1,2,3", 1, 2) == [("0",), ("1",)]
    assert batch._local_slots("none", 1, 3) == [None, None, None]
    with pytest.raises(MambaEvalError, match="needs GPUs"):
        batch._local_slots("none", 2, None)
    job = batch.plan_jobs([batch.Checkpoint("state-spaces/mamba-130m")], ["piqa"], "/tmp/x")[0]
    import dataclasses

    command = batch._worker_command(dataclasses.replace(job, processes=4, port=29503), Path("/tmp/x/spec.json"))
    assert command[1:4] == ["-m", "mamba_eval.commands.batch", "--exec"]
    assert command[5:7] == ["-m", "accelerate.commands.launch"] and "29503" in command
    assert command[-4:] == ["-m", "mamba_eval.commands.batch", "--worker", "/tmp/x/spec.json"]


def test_slurm_job_array_submission(tmp_path, monkeypatch):
    """With stand-ins for srun and sbatch on PATH, the slurm executor submits one job array with
    one task per checkpoint and the requested resources, and returns without waiting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("a", "b", "c"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
    options = batch.SlurmOptions(partition="gpu", time_min=batch._parse_minutes("4:30:00"), array_parallelism=2,
                                 setup=("source /venv/bin/activate",), additional={"reservation": "eval"})
    result = batch.run_batch(batch.expand_checkpoints([f"{tmp_path}/ckpts/*"]), ["piqa", "hellaswag"],
                             tmp_path / "out", executor="slurm", gpus_per_checkpoint=2, slurm=options, wait=False,
                             stream=open(os.devnull, "w"))
    assert result.jobs == ["4242_0", "4242_1", "4242_2"]
    assert set(result.states.values()) == {"submitted"}
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=270", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --reservation=eval", "source /venv/bin/activate"):
        assert line in script, script
    status = json.loads((tmp_path / "out" / batch.STATUS_FILE).read_text())
    assert [c["job_id"] for c in status["checkpoints"]] == result.jobs
    with pytest.raises(MambaEvalError, match="--slurm-time"):
        batch._parse_minutes("soon")
