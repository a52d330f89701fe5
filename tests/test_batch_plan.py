"""``mamba-eval batch`` without a model: slugs, manifests, lm-eval flags, stale results,
half-written files, GPU slots and worker command lines, and a SLURM submission through a
stand-in ``sbatch``. Real runs are in ``test_batch.py``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from mamba_eval.commands import batch
from mamba_eval.commands.batch.executors import local_slots, parse_minutes, worker_command
from mamba_eval.errors import MambaEvalError


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
                          (["--limit", "many"], "lm-eval argument"),
                          (["--fewshot_as_multiturn"], "--fewshot_as_multiturn needs --apply_chat_template")]:
        with pytest.raises(MambaEvalError, match=message):
            batch.plan_jobs(ckpts, ["piqa"], tmp_path, lm_eval_args=args)


def test_chat_settings_are_recorded_as_lm_eval_applies_them(tmp_path):
    """Chat-template flags change results, so they are settings; --fewshot_as_multiturn only
    where it differs from lm-eval's default for the run (true exactly with a chat template)."""
    ckpts = [batch.Checkpoint("state-spaces/mamba-130m")]

    def settings(*args):
        return batch.plan_jobs(ckpts, ["piqa"], tmp_path, lm_eval_args=list(args))[0].settings

    chat = {"apply_chat_template": True}
    assert settings("--apply_chat_template") == settings("--apply_chat_template", "--fewshot_as_multiturn") == chat
    assert settings("--apply_chat_template", "--fewshot_as_multiturn", "false") == {
        **chat, "fewshot_as_multiturn": False}
    assert settings("--fewshot_as_multiturn", "false") == {}
    assert settings("--apply_chat_template", "chatml") == {"apply_chat_template": "chatml"}
    assert settings("--system_instruction", "Be brief.") == {"system_instruction": "Be brief."}
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
    assert local_slots("0,1,2,3", 1, None) == [("0",), ("1",), ("2",), ("3",)]
    assert local_slots("0,1,2,3,4", 2, None) == [("0", "1"), ("2", "3")]
    assert local_slots("0,1,2,3", 1, 2) == [("0",), ("1",)]
    assert local_slots("none", 1, 3) == [None, None, None]
    with pytest.raises(MambaEvalError, match="needs GPUs"):
        local_slots("none", 2, None)
    job = batch.plan_jobs([batch.Checkpoint("state-spaces/mamba-130m")], ["piqa"], "/tmp/x")[0]
    command = worker_command(dataclasses.replace(job, processes=4, port=29503), Path("/tmp/x/spec.json"))
    assert command[1:4] == ["-m", "mamba_eval.commands.batch", "--exec"]
    assert command[5:7] == ["-m", "accelerate.commands.launch"] and "29503" in command
    assert command[-4:] == ["-m", "mamba_eval.commands.batch", "--worker", "/tmp/x/spec.json"]


def test_a_killed_worker_runs_again_on_another_slot(tmp_path, monkeypatch):
    """A checkpoint whose evaluation process dies by a signal goes back to the queue and runs on the
    other GPU, once; killed again, its unfinished units fail. Every other unit runs exactly once."""
    import io
    import threading
    import time

    from mamba_eval.commands.batch import executors
    from mamba_eval.commands.batch.store import Progress

    jobs = batch.plan_jobs([batch.Checkpoint(f"org/model-{c}") for c in "abcd"], ["piqa", "arc_easy"], tmp_path)
    once, always = jobs[0].slug, jobs[1].slug
    calls, lock = [], threading.Lock()

    def fake_run_checkpoint(job):
        with lock:
            calls.append((job.slug, job.gpus, job.retry_if_killed))
        time.sleep(0.05)
        summary = {"slug": job.slug, "done": list(job.tasks), "failed": {}, "busy": None, "returncode": 0}
        killed = job.slug == always or (job.slug == once and job.retry_if_killed)
        if killed and job.retry_if_killed:
            return {**summary, "done": ["piqa"], "returncode": -9, "killed": "SIGKILL"}
        if killed:
            return {**summary, "done": ["piqa"], "returncode": -9, "failed": {"arc_easy": "exited with status -9"}}
        return summary

    monkeypatch.setattr(executors, "run_checkpoint", fake_run_checkpoint)
    states = {(j.slug, t): "pending" for j in jobs for t in j.tasks}
    stream = io.StringIO()
    executors.run_local(jobs, [("0",), ("1",)], 1, Progress(tmp_path, jobs, states, stream, "local"))

    runs = {j.slug: [(gpus, retry) for slug, gpus, retry in calls if slug == j.slug] for j in jobs}
    assert len(runs[once]) == len(runs[always]) == 2 and runs[once][0][1] and runs[always][0][1]
    for slug in (once, always):  # the second run is on the other GPU and is the last chance
        assert runs[slug][0][0] != runs[slug][1][0] and runs[slug][1][1] is False
    assert [len(runs[j.slug]) for j in jobs[2:]] == [1, 1]
    assert states == {**{k: "done" for k in states}, (always, "arc_easy"): "failed"}
    log = stream.getvalue()
    assert log.count("killed by SIGKILL on GPU(s)") == 2 and "run again on another worker" in log
    assert log.count(": done") == 7 and log.count("FAILED") == 1


def test_run_checkpoint_when_its_worker_is_killed(tmp_path, monkeypatch):
    """An evaluation process killed by a signal: its units stay pending when another try will
    follow, and fail with the exit status when not."""
    import sys

    from mamba_eval.commands.batch import executors
    from mamba_eval.commands.batch.store import error_path

    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(executors, "worker_command", lambda job, spec: suicide)
    (job,) = batch.plan_jobs([batch.Checkpoint("org/model")], ["piqa"], tmp_path)
    summary = executors.run_checkpoint(dataclasses.replace(job, retry_if_killed=True))
    assert summary["killed"] == "SIGKILL" and summary["failed"] == {} and summary["done"] == []
    assert not error_path(job.folder, "piqa").exists()
    summary = executors.run_checkpoint(job)
    assert "killed" not in summary and "exited with status -9" in summary["failed"]["piqa"]


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
    options = batch.SlurmOptions(partition="gpu", time_min=parse_minutes("4:30:00"), array_parallelism=2,
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
        parse_minutes("soon")


def test_cluster_executors_without_submitit_say_which_extra(tmp_path, monkeypatch):
    """submitit is the `slurm` extra: without it, one line names the extra to install."""
    import sys

    from mamba_eval.commands.batch.executors import make_executor

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    for kind in ("slurm", "submitit-local"):
        with pytest.raises(MambaEvalError, match=rf"--executor {kind} needs submitit: .*mamba-eval\[slurm\]"):
            make_executor(kind, tmp_path, n_jobs=1, gpus_per_job=0)
