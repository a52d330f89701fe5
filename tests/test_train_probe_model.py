"""The probe model (mamba_eval/commands/probe_model.py): autograd through the reference ops, and the
model shipped in the package: data files only, the settings and first training steps of the code
that trains it (scripts/train_probe_model.py), the held-out accuracy its record states, the
default of ``mamba-eval probe``, and part of the wheel.

Full retraining (4-5 minutes) is ``python scripts/train_probe_model.py --check``, not a test."""

from __future__ import annotations

import configparser
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from helpers import assert_close

from mamba_eval.commands.probe_model import (
    RECORD_FILE,
    SHIPPED_DIR,
    TRAIN_VERSION,
    TrainConfig,
    build_tokenizer,
    default_probe_model,
    evaluate_recall,
    model_config,
    train,
)

# Many small forwards: one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: Training steps the prefix test replays (the first 300 steps are short sequences: about 5 s).
PREFIX_STEPS = 30


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
def record() -> dict:
    return json.loads((SHIPPED_DIR / RECORD_FILE).read_text())


def test_shipped_model_is_data_files_of_this_code(record, tmp_path):
    """JSON and safetensors only (nothing a loader could execute), the config and tokenizer this
    code writes, and a record of this code's training version and default settings."""
    names = {p.name for p in SHIPPED_DIR.iterdir()}
    assert names == {"config.json", "model.safetensors", RECORD_FILE, *TOKENIZER_FILES}
    assert sum(p.stat().st_size for p in SHIPPED_DIR.iterdir()) < 2 ** 20
    assert json.loads((SHIPPED_DIR / "config.json").read_text()) == model_config()
    build_tokenizer(tmp_path)
    for name in TOKENIZER_FILES:
        assert (SHIPPED_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert record["train_version"] == TRAIN_VERSION
    assert record["config"] == TrainConfig().as_dict()
    assert len(record["losses"]) == record["config"]["steps"]


def test_first_training_steps_are_those_of_the_shipped_run(record):
    """The script's training, replayed for its first steps, gives the recorded losses: data, model,
    initialisation, optimiser and schedule are still those that trained the shipped weights. (On
    the torch and processor of the record the losses are identical; elsewhere rounding may differ
    in the last bits.)"""
    _, losses = train(TrainConfig(), steps=PREFIX_STEPS)
    assert len(losses) == PREFIX_STEPS
    assert_close(torch.tensor(losses, dtype=torch.float64),
                 torch.tensor(record["losses"][:PREFIX_STEPS], dtype=torch.float64), rtol_max=1e-4,
                 name="first training losses")


def test_shipped_model_reaches_its_recorded_accuracy(record, monkeypatch):
    """Loaded without unpickling anything, the shipped weights give the held-out accuracy the
    record states (the script's own evaluation), clearly above chance."""
    from mamba_eval.models.checkpoint import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("the probe model must load without unpickling")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    model = load_model(SHIPPED_DIR)
    config, samples = record["config"], record["heldout_samples"]
    for pairs, recorded in record["heldout_accuracy_at_train_length"].items():
        acc = evaluate_recall(model, config["length"], int(pairs), samples, seed=config["seed"])
        assert abs(acc - recorded) <= 2 / samples, (pairs, acc, recorded)  # an argmax tie may round either way
        chance = 1 / int(pairs)
        assert acc > chance + 4 * math.sqrt(chance * (1 - chance) / samples), (pairs, acc)


def test_default_probe_run_uses_the_shipped_model(record, tmp_path):
    """``mamba-eval probe`` without --model_args evaluates the shipped folder through lm-eval, and
    lm-eval's accuracy at the training length agrees with the record's direct evaluation."""
    from mamba_eval.commands.probe import run_probe

    samples = 60
    results = run_probe("mqar", lengths="256", pairs="2", samples=samples, device="cpu", out=tmp_path,
                        plots=False, log=lambda m: None)
    assert results["model_args"]["pretrained"] == str(SHIPPED_DIR)
    trained = results["trained_probe_model"]
    assert trained["train_version"] == TRAIN_VERSION and "losses" not in trained
    acc = results["tasks"][0]["metrics"]["acc"]
    direct = record["heldout_accuracy_at_train_length"]["2"]
    # Different samples, same distribution: within a few binomial standard deviations.
    sd = math.sqrt(direct * (1 - direct) * (1 / samples + 1 / record["heldout_samples"]))
    assert abs(acc - direct) < 4 * sd + 0.05, (acc, direct)


def test_a_stale_shipped_model_is_refused(monkeypatch):
    import mamba_eval.commands.probe_model as pm
    from mamba_eval.errors import MambaEvalError

    assert default_probe_model() == SHIPPED_DIR
    monkeypatch.setattr(pm, "TRAIN_VERSION", TRAIN_VERSION + 1)
    with pytest.raises(MambaEvalError, match="scripts/train_probe_model.py"):
        default_probe_model()


def test_package_data_includes_the_shipped_model():
    """setup.cfg's package_data patterns for mamba_eval.commands match every shipped file (the
    wheel installs them beside the module)."""
    setup_cfg = Path(__file__).resolve().parent.parent / "setup.cfg"
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    patterns = [p.strip() for p in parser["options.package_data"].get("mamba_eval.commands", "").split(",")]
    package = SHIPPED_DIR.parent
    matched = {p for pattern in patterns if pattern for p in package.glob(pattern) if p.is_file()}
    assert set(SHIPPED_DIR.iterdir()) <= matched
