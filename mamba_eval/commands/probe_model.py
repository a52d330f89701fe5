"""The probe model: a tiny Mamba trained on multi-query associative recall, on the CPU.

It is the default model of ``mamba-eval probe`` and the end-to-end check that the probes
measure something: the model solves MQAR at its training length (256 tokens) and the probe
report shows how its accuracy holds as the distance to the recalled pair grows far beyond it
(the Mamba paper's induction-heads experiment, Gu & Dao 2023, section 4.1.2, trained at 256
and tested up to 1M tokens).

- Data: :func:`mamba_eval.harness.probe_mqar.mqar_words`, the very generator of the ``mamba_mqar_*``
  tasks, at 256 tokens with 1 to :data:`TRAIN_MAX_PAIRS` pairs; the loss is the cross-entropy
  of every queried value (all P of them, the ``P - 1`` scattered queries and the final one).
  Training samples use seeds of their own, never those of the evaluation documents.
- Tokenizer: word level, one token per key, value and noise word (:func:`build_tokenizer`),
  ``<|endoftext|>`` id 0 (bos = eos), ``<|padding|>`` id 1, ``<|unk|>`` id 2; saved as a
  transformers tokenizer folder so that ``--model mamba`` loads it from the checkpoint folder.
- Model: :data:`MODEL_CONFIG`, a Mamba-2 of 2 layers, d_model 64, in mamba_ssm's config
  dialect, trained with the reference ops (plain PyTorch; autograd runs through them) on the
  CPU. Mamba-2 because its reference scan is chunked and vectorised: a training step costs
  about a fifth of the Mamba-1 reference's step-by-step loop.
- Checkpoint: ``config.json`` (mamba_ssm dialect) + ``model.safetensors`` (fp32) + tokenizer
  files + ``probe_model.json`` (training record: settings, every step's loss, held-out accuracy,
  and under ``"run"`` what differs between machines: time, torch version, processor). Loading it
  reads JSON and safetensors only: no pickle, no code.

The trained model ships inside the package, in :data:`SHIPPED_DIR` (package data, about 0.3 MB),
so ``mamba-eval probe`` starts evaluating at once. ``scripts/train_probe_model.py`` regenerates
it: training is deterministic (fixed seeds, one torch thread, CPU, fp32), and the script's
``--check`` retrains and compares every file with the shipped ones. Any change to the data,
model or schedule bumps :data:`TRAIN_VERSION` and needs the shipped folder regenerated (the
tests compare the shipped record with the code's settings and the first training steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mamba_eval.utils import atomic_write_json

__all__ = [
    "MODEL_CONFIG",
    "RECORD_FILE",
    "SHIPPED_DIR",
    "TRAIN_LENGTH",
    "TRAIN_VERSION",
    "TrainConfig",
    "build_tokenizer",
    "default_probe_model",
    "evaluate_recall",
    "model_config",
    "torch_threads",
    "train",
    "train_probe_model",
    "vocabulary",
]

#: Bumped whenever training (data, model, schedule) changes; the shipped record carries it.
TRAIN_VERSION = 1
#: The shipped checkpoint folder (package data; see setup.cfg).
SHIPPED_DIR = Path(__file__).resolve().with_name("probe_checkpoint")
RECORD_FILE = "probe_model.json"
TRAIN_LENGTH = 256
TRAIN_MAX_PAIRS = 8
DEFAULT_TRAIN_SEED = 0

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>", "<|unk|>")

#: mamba_ssm ``config.json`` of the probe model (``vocab_size`` filled in from the tokenizer).
MODEL_CONFIG: dict = {
    "d_model": 64,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": None,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 64},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
}


def model_config() -> dict:
    """The probe model's ``config.json`` (mamba_ssm dialect)."""
    return {**MODEL_CONFIG, "vocab_size": len(vocabulary())}


def vocabulary() -> list[str]:
    """The probe tokenizer's tokens in id order: specials, keys, values, noise words."""
    from mamba_eval.harness.probe_mqar import KEY_WORDS, NOISE_WORDS, VALUE_WORDS

    words = [*SPECIAL_TOKENS, *KEY_WORDS, *VALUE_WORDS, *NOISE_WORDS]
    if len(set(words)) != len(words):
        raise AssertionError("probe vocabulary has a repeated word")
    return words


def build_tokenizer(out_dir: str | os.PathLike):
    """Write a word-level tokenizer (whitespace split, one token per word) as a transformers
    tokenizer folder; returns the ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>",
               "pad_token": "<|padding|>"}
    atomic_write_json(out / "tokenizer_config.json", {
        **special, "model_max_length": 1 << 30, "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    })
    atomic_write_json(out / "special_tokens_map.json", special)
    return tok


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`train_probe_model` does; the defaults are the shipped default model's."""

    steps: int = 1200
    warm_steps: int = 300  # the first steps: short sequences with few pairs, where recall is learnt fastest
    warm_length: int = 64
    warm_pairs: int = 4
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 50
    weight_decay: float = 0.1
    cosine: bool = True  # cosine decay of the learning rate to 0 over the steps (else constant after warm-up)
    length: int = TRAIN_LENGTH
    max_pairs: int = TRAIN_MAX_PAIRS
    seed: int = DEFAULT_TRAIN_SEED
    # torch threads during training; one, because the reference ops are many small kernels and
    # two OpenMP threads on a 2-core machine that is also busy elsewhere can run 40x slower.
    threads: int | None = 1
    eval_samples: int = 256  # held-out samples per pair count for the final accuracy
    eval_pairs: tuple[int, ...] = (2, 4, 8)

    def as_dict(self) -> dict:
        """JSON-ready (tuples as lists), as the record stores it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _batch(rng: random.Random, ids: dict[str, int], n: int, length: int, max_pairs: int, pairs: int | None = None):
    """``n`` MQAR sequences of ``length`` tokens: inputs [n, length] and targets [n, length]
    (-100 except where the next token is a queried value)."""
    import torch

    from mamba_eval.harness.probe_mqar import mqar_words

    inputs, targets = [], []
    for _ in range(n):
        words, answers = mqar_words(rng, pairs or rng.randint(1, max_pairs), length - 1)
        tokens = [ids[w] for w in words]  # length + 1 - (noise shortfall) tokens
        tokens += [ids["<|padding|>"]] * (length + 1 - len(tokens))
        target = [-100] * length
        for a in answers:
            target[a - 1] = tokens[a]
        inputs.append(tokens[:length])
        targets.append(target)
    return torch.tensor(inputs), torch.tensor(targets)


def evaluate_recall(model, length: int, pairs: int, samples: int, seed: int, batch_size: int = 64) -> float:
    """Greedy accuracy on the final query of ``samples`` held-out MQAR sequences (the scoring
    of the ``mamba_mqar_*`` tasks, computed directly on token ids)."""
    import torch

    ids = {w: i for i, w in enumerate(vocabulary())}
    rng = random.Random(f"probe_model:eval:{seed}:{length}:{pairs}")
    correct = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            x, y = _batch(rng, ids, n, length, TRAIN_MAX_PAIRS, pairs)
            last = (y != -100).long().cumsum(1).argmax(1)  # position of the last scored value
            hidden, _ = model.backbone_forward(x)
            rows = torch.arange(n)
            pred = model.lm_logits(hidden[rows, last]).argmax(-1)
            correct += int((pred == y[rows, last]).sum())
    model.train(was_training)
    return correct / samples


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``threads`` torch threads (None: as they are) inside the block. The same count gives the
    same result: a CPU reduction split over threads adds in another order."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: TrainConfig = TrainConfig(), steps: int | None = None,
          log: Callable[[str], None] | None = None):
    """Train the probe model in memory, reproducibly (torch seeded with ``config.seed`` in a fork
    of its generator, ``config.threads`` threads); returns ``(model, losses)``. ``steps`` stops
    after that many steps of ``config``'s schedule, the first steps of the full run."""
    import torch

    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train(config, steps, log or (lambda _msg: None))


def _train(config: TrainConfig, steps: int | None, log: Callable[[str], None]):
    import torch
    import torch.nn.functional as F

    from mamba_eval.models.formats import config_from_dict
    from mamba_eval.models.model import LanguageModel

    ids = {w: i for i, w in enumerate(vocabulary())}
    model = LanguageModel(config_from_dict(model_config(), Path("<probe model>")), backend="ref", device="cpu",
                          dtype=torch.float32)
    model.requires_grad_(True)
    model.train()
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, A_log, D, Δ bias, conv bias
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    rng = random.Random(f"probe_model:train:{config.seed}")
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(config.steps if steps is None else min(steps, config.steps)):
        warm = min(1.0, (step + 1) / max(1, config.warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * step / config.steps)) if config.cosine else 1.0
        for group in opt.param_groups:
            group["lr"] = config.lr * warm * cosine
        if step < config.warm_steps:
            length, pairs = config.warm_length, min(config.warm_pairs, config.max_pairs)
        else:
            length, pairs = config.length, config.max_pairs
        x, y = _batch(rng, ids, config.batch_size, length, pairs)
        hidden, _ = model.backbone_forward(x)
        mask = y != -100
        loss = F.cross_entropy(model.lm_logits(hidden[mask]), y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}/{config.steps}  length {length}  loss {losses[-1]:.3f}  "
                f"{time.perf_counter() - start:6.1f} s")
    model.requires_grad_(False)
    model.eval()
    return model, losses


def train_probe_model(out_dir: str | os.PathLike, config: TrainConfig = TrainConfig(),
                      log: Callable[[str], None] | None = print) -> dict:
    """Train the probe model and save it into ``out_dir`` (created); returns the training record
    (also written to :data:`RECORD_FILE`). The same ``config`` on the same torch gives the same
    files, byte for byte, but for the record's ``"run"``."""
    import platform

    import torch
    from safetensors.torch import save_file

    log = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    atomic_write_json(out / "config.json", model_config())
    start = time.perf_counter()
    model, losses = train(config, log=log)
    train_seconds = time.perf_counter() - start
    with torch_threads(config.threads):
        accuracy = {
            str(p): evaluate_recall(model, config.length, p, config.eval_samples, seed=config.seed)
            for p in config.eval_pairs
        }
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied: the loader takes the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    record = {
        "train_version": TRAIN_VERSION,
        "config": config.as_dict(),
        "final_loss": losses[-1] if losses else None,
        "heldout_accuracy_at_train_length": accuracy,
        "heldout_samples": config.eval_samples,
        "losses": losses,
        "run": {"train_seconds": round(train_seconds, 1), "torch": torch.__version__,
                "machine": platform.machine(), "processor": _processor()},
    }
    atomic_write_json(out / RECORD_FILE, record)
    log(f"trained in {train_seconds:.0f} s; held-out accuracy at {config.length} tokens by pairs: {accuracy}")
    return record


def _processor() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def default_probe_model() -> Path:
    """The shipped probe model's folder (:data:`SHIPPED_DIR`), checked to be there and to be
    the one this code trains."""
    import json

    from mamba_eval.errors import MambaEvalError

    record = SHIPPED_DIR / RECORD_FILE
    regenerate = f"regenerate it with `python scripts/train_probe_model.py --out {SHIPPED_DIR}`"
    if not (record.is_file() and (SHIPPED_DIR / "model.safetensors").is_file()):
        raise MambaEvalError(f"the probe model is missing from {SHIPPED_DIR} (an incomplete installation?); {regenerate}")
    version = json.loads(record.read_text()).get("train_version")
    if version != TRAIN_VERSION:
        raise MambaEvalError(f"the shipped probe model has training version {version}, the code {TRAIN_VERSION}; "
                             f"{regenerate}")
    return SHIPPED_DIR


if __name__ == "__main__":  # pragma: no cover
    print(default_probe_model())
    sys.exit(0)
