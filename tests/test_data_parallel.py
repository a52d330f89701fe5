"""Data parallelism, checked on the CPU: ``lm_eval --model mamba`` under ``torchrun`` with two
processes (what ``accelerate launch`` starts, one process per GPU) shards the requests by rank and
gathers them on rank 0; every per-sample response equals a one-process run bit for bit. The
launch and the comparison are those of ``scripts/bench_data_parallel.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

TASKS = ["hellaswag", "lambada_openai"]
LIMIT = 12


def test_two_processes_score_as_one(tmp_path, data_dir):
    import bench_data_parallel as dp
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.offline import prepare_offline_tasks
    from mamba_eval.models.releases import release, write_random_checkpoint

    include = prepare_offline_tasks(data_dir)
    tokenizer = data_dir / "tokenizers" / "gpt-neox-20b"
    ckpt = write_random_checkpoint(tmp_path / "ckpt", release("mamba-130m", d_model=64, n_layer=2), seed=0,
                                   device="cpu")
    one = simple_evaluate(model="mamba", model_args=f"pretrained={ckpt},tokenizer={tokenizer},dtype=float32",
                          tasks=TASKS, limit=LIMIT, device="cpu", batch_size=4,
                          task_manager=TaskManager(include_path=str(include)), log_samples=True, bootstrap_iters=0)

    args = SimpleNamespace(dtype="float32", tasks=",".join(TASKS), batch_size=4, device="cpu", limit=LIMIT)
    two = dp.run_one(args, "tiny", "mamba", 2, ckpt, tokenizer, include, tmp_path)
    assert two["ranks_building_requests"] == [0, 1]  # each rank built its own share
    assert two["command"].startswith("-m torch.distributed.run")
    expected = {(task, s["doc_id"]): dp._text(s["resps"]) for task, rows in one["samples"].items() for s in rows}
    assert len(expected) == LIMIT * len(TASKS)
    assert two["samples"] == expected
    for task in TASKS:
        assert two["metrics"][task]["acc"] == one["results"][task]["acc,none"]
