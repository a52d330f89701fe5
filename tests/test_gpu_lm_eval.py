"""On a GPU: lm-eval on real documents of hellaswag, piqa, arc_easy, winogrande and
lambada_openai gives the same accuracies with our Triton kernels as with the reference ops, on
the same bf16 weights at the published 130m shapes.

Skipped without CUDA (CI has no GPU); run on the GPU machine with
``python -m pytest -q -s tests/test_gpu_lm_eval.py``. ``MAMBA_EVAL_GPU_DOCS`` sets the number of
documents per task (default 300; ``full`` for the whole sets).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers_data import require_data_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {"mamba-130m": {"ssm_cfg": {}, "pad_vocab_size_multiple": 8},
          "mamba2-130m": {"ssm_cfg": {"layer": "Mamba2"}, "pad_vocab_size_multiple": 16}}


def _checkpoint(folder, name):
    from mamba_eval.models.checkpoint import read_config
    from mamba_eval.models.model import LanguageModel

    folder.mkdir(parents=True)
    config = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "rms_norm": True,
              "residual_in_fp32": True, "tie_embeddings": True, **SHAPES[name]}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = LanguageModel(read_config(folder), device="cuda", dtype=torch.float32)
    with torch.no_grad():  # a spread-out output distribution, so that answers are ranked
        model.backbone.embedding.weight.normal_(0.0, 0.5)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


TASKS = ["hellaswag", "piqa", "arc_easy", "winogrande", "lambada_openai"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_and_ref_score_alike(tmp_path, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.offline import prepare_offline_tasks

    data = require_data_dir()
    ckpt = _checkpoint(tmp_path / name, name)
    tasks = TaskManager(include_path=str(prepare_offline_tasks(data)))
    docs = os.environ.get("MAMBA_EVAL_GPU_DOCS", "300")
    limit = None if docs == "full" else int(docs)
    out = {}
    for backend in ("ref", "triton"):
        out[backend] = simple_evaluate(
            model="mamba", tasks=TASKS, limit=limit, device="cuda", batch_size=64,
            model_args=f"pretrained={ckpt},tokenizer={data / 'tokenizers' / 'gpt-neox-20b'},"
                       f"dtype=bfloat16,backend={backend}",
            task_manager=tasks, log_samples=True, bootstrap_iters=0,
        )
    for task in TASKS:
        ref, tri = (out[b]["results"][task] for b in ("ref", "triton"))
        lls = [(float(a["resps"][i][0][0]), float(b["resps"][i][0][0]))
               for a, b in zip(out["ref"]["samples"][task], out["triton"]["samples"][task])
               for i in range(len(a["resps"]))]
        worst = max(abs(x - y) / max(1.0, abs(x)) for x, y in lls)
        accs = {k: (ref[k], tri[k]) for k in ("acc,none", "acc_norm,none") if k in ref}
        print(f"{name} {task}: ref / triton {accs}; worst relative loglikelihood difference {worst:.2e} "
              f"over {len(lls)} requests")
        for key, (a, b) in accs.items():
            assert a == b, (task, key, a, b)
        assert worst < 2e-2, task
