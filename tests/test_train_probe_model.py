"""The probe model (mamba_eval/commands/probe_model.py): autograd through the reference ops, the word
tokenizer, and a short training run that clearly beats chance, checked through lm-eval's own
MQAR task at the training length."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mamba_eval.commands.probe_model import TrainConfig, default_probe_model, evaluate_recall, train_probe_model


# Many small forwards: one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(arch: str):
    from mamba_eval.models.config import mamba_stack
    from mamba_eval.models.model import LanguageModel

    if arch == "mamba1":
        cfg = mamba_stack(arch="mamba1", d_model=32, n_layer=2, vocab_size=64, d_state=8, d_conv=4, expand=2,
                          dt_rank=2, headdim=0, ngroups=1, chunk_size=0)
    else:
        cfg = mamba_stack(arch="mamba2", d_model=32, n_layer=2, vocab_size=64, d_state=8, d_conv=4, expand=2,
                          dt_rank=0, headdim=16, ngroups=1, chunk_size=8)
    torch.manual_seed(0)
    return LanguageModel(cfg, backend="ref", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_autograd_runs_through_the_reference_ops(arch):
    """Every parameter gets a finite gradient that is not zero, and a step along it lowers the loss
    (no op of the reference path writes in place into a tensor autograd needs)."""
    model = _tiny(arch)
    model.requires_grad_(True)
    x = torch.randint(0, 64, (3, 21))  # L not a multiple of the SSD chunk
    logits, _ = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        after, _ = model(x[:, :-1])
        assert torch.nn.functional.cross_entropy(after.flatten(0, 1), x[:, 1:].flatten()) < loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short training run: 400 steps at 64 tokens, 1-4 pairs, constant learning rate, one thread
    (about 25 s; seeds 0-3 reached 0.87-0.99 at 2 pairs and 0.62-0.86 at 4 pairs)."""
    out = tmp_path_factory.mktemp("probe_model")
    config = TrainConfig(steps=400, warm_steps=0, length=64, max_pairs=4, batch_size=32, cosine=False, threads=1,
                         eval_samples=200, eval_pairs=(2, 4))
    record = train_probe_model(out, config, log=None)
    return out, record


def test_short_training_beats_chance_clearly(trained):
    out, record = trained
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "probe_model.json").read_text()) == json.loads(json.dumps(record))
    acc = record["heldout_accuracy_at_train_length"]
    # Chance: 1/90 for a uniform guess over the values, 1/P for "one of the P values seen earlier";
    # with 200 samples one binomial standard deviation is at most 0.035.
    assert acc["2"] > 0.75 and acc["4"] > 0.45, record


def test_trained_checkpoint_scores_through_lm_eval(trained, tmp_path):
    """The saved folder is a normal checkpoint: --model mamba loads it with its own tokenizer, and
    the mamba_mqar task at the training length gives what the direct evaluation gives."""
    from mamba_eval.models.checkpoint import load_model
    from mamba_eval.commands.probe import run_probe

    out, record = trained
    model = load_model(out)
    direct = evaluate_recall(model, 64, 2, 200, seed=123)
    results = run_probe("mqar", model_args=f"pretrained={out}", lengths="64", pairs="2", samples=60,
                        device="cpu", out=tmp_path / "report", plots=False, log=lambda m: None)
    acc = results["tasks"][0]["metrics"]["acc"]
    assert acc > 0.7, acc  # chance 0.5
    # Different samples, same distribution: within a few binomial standard deviations.
    sd = math.sqrt(direct * (1 - direct) / 60 + direct * (1 - direct) / 200) + 1e-9
    assert abs(acc - direct) < 4 * sd + 0.05, (acc, direct)


def test_default_model_is_cached(tmp_path, monkeypatch):
    """default_probe_model trains once into <cache>/v<version>-seed<seed> and reuses the folder."""
    import mamba_eval.commands.probe_model as pm

    calls = []

    def fake_train(folder, config, log=None):
        calls.append(config.seed)
        (folder / "probe_model.json").write_text("{}")
        return {}

    monkeypatch.setattr(pm, "train_probe_model", fake_train)
    first = default_probe_model(tmp_path, seed=5, log=None)
    second = default_probe_model(tmp_path, seed=5, log=None)
    assert first == second == tmp_path / f"v{pm.TRAIN_VERSION}-seed5" and calls == [5]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
