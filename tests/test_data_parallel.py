"""Data parallelism, checked on the CPU: ``lm_eval --model mamba`` under ``torchrun`` with two
processes (what ``accelerate launch`` starts, one process per GPU) shards the requests by rank and
gathers them on rank 0; every per-sample response equals a one-process run bit for bit."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

TASKS = ["hellaswag", "lambada_openai"]
LIMIT = 12


def _leaves_as_text(value):
    """lm-eval's samples files hold each response's values as text (``str``, which round-trips floats)."""
    if isinstance(value, (list, tuple)):
        return [_leaves_as_text(v) for v in value]
    return str(value)


def _responses(samples: dict[str, list[dict]]) -> dict:
    """(task, doc_id) -> the responses as text."""
    return {(task, s["doc_id"]): _leaves_as_text(s["resps"]) for task, rows in samples.items() for s in rows}


def _samples_written(out_dir) -> dict[str, list[dict]]:
    found = {}
    for path in glob.glob(str(out_dir / "*" / "samples_*.jsonl")):
        task = next(t for t in TASKS if os.path.basename(path).startswith(f"samples_{t}_"))
        found[task] = [json.loads(line) for line in open(path)]
    return found


def test_two_processes_score_as_one(tmp_path, data_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.offline import prepare_offline_tasks
    from mamba_eval.models.releases import release, write_random_checkpoint

    include = prepare_offline_tasks(data_dir)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", release("mamba-130m", d_model=64, n_layer=2), seed=0,
                                   device="cpu")
    model_args = f"pretrained={ckpt},tokenizer={data_dir / 'tokenizers' / 'gpt-neox-20b'},dtype=float32"
    one = simple_evaluate(model="mamba", model_args=model_args, tasks=TASKS, limit=LIMIT, device="cpu", batch_size=4,
                          task_manager=TaskManager(include_path=str(include)), log_samples=True, bootstrap_iters=0)

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lm_eval", "--model", "mamba", "--model_args", model_args, "--tasks", ",".join(TASKS),
                           "--limit", str(LIMIT), "--include_path", str(include), "--device", "cpu",
                           "--batch_size", "4", "--log_samples", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # Each rank built its own share of the requests (lm-eval logs the rank that builds them).
    for rank in (0, 1):
        assert f"Building contexts for hellaswag on rank {rank}" in proc.stderr + proc.stdout
    assert len(glob.glob(str(out / "*" / "results_*.json"))) == 1  # rank 0 alone writes
    two = _samples_written(out)
    assert sorted(two) == sorted(TASKS)
    assert _responses(two) == _responses(one["samples"])
    assert len(_responses(two)) == LIMIT * len(TASKS)
