"""On a GPU: the scoring engine's results do not depend on the batch size or the order of the
requests, bit for bit, with the batch-invariant Triton ops (as ``--model mamba`` builds the model
by default) in bf16 at the published 130m shapes.

Skipped without CUDA (CI has no GPU); run on the GPU machine with
``python -m pytest -q -s tests/test_gpu_engine.py``. ``MAMBA_EVAL_GPU_DOCS`` sets the number of
HellaSwag documents (default 150, four requests each).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from helpers_data import require_data_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = ["mamba-130m", "mamba2-130m"]


def _model(name):
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.models.releases import release_config

    torch.manual_seed(0)
    model = LanguageModel(release_config(name), backend="triton", device="cuda", dtype=torch.bfloat16,
                          batch_invariant=True)
    with torch.no_grad():  # a spread-out output distribution
        model.backbone.embedding.weight.normal_(0.0, 0.5)
    return model


def _pairs(limit):
    from transformers import AutoTokenizer

    data = require_data_dir()
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizers" / "gpt-neox-20b"))
    rows = [json.loads(line) for line in (data / "hellaswag" / "hellaswag_val.jsonl").open()][:limit]
    pairs = []
    for r in rows:
        ctx = tok(r["ctx"], add_special_tokens=False)["input_ids"]
        pairs += [(ctx, tok(" " + e, add_special_tokens=False)["input_ids"]) for e in r["endings"]]
    return pairs


@pytest.mark.parametrize("name", SHAPES)
def test_scores_do_not_depend_on_the_batch(name):
    from mamba_eval.harness.engine import score_continuations

    model = _model(name)
    pairs = _pairs(int(os.environ.get("MAMBA_EVAL_GPU_DOCS", "150")))
    dev = torch.device("cuda")
    perm = list(range(len(pairs)))
    random.Random(0).shuffle(perm)
    failures = []
    for share in (True, False):
        runs = {bs: score_continuations(model, pairs, max_length=2048, batch_size=bs, device=dev, share_context=share)
                for bs in (1, 7, 64, "auto")}
        shuffled = score_continuations(model, [pairs[i] for i in perm], max_length=2048, batch_size=7, device=dev,
                                       share_context=share)
        runs["7, shuffled"] = [shuffled[perm.index(i)] for i in range(len(pairs))]
        for bs, got in runs.items():
            diff = [abs(a[0] - b[0]) for a, b in zip(got, runs[1]) if a != b]
            print(f"{name} share_context={share} batch_size={bs}: {len(diff)}/{len(pairs)} differ from batch 1"
                  + (f", largest {max(diff):.3e}" if diff else ""))
            if diff:
                failures.append((share, bs, len(diff)))
    assert not failures
