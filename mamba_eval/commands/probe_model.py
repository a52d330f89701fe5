"""The probe model: a tiny Mamba trained on multi-query associative recall, on the CPU.

It is the offline default of ``mamba-eval probe`` and the end-to-end check that the probes
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
- Checkpoint: ``config.json`` (mamba_ssm dialect) + ``model.safetensors`` + tokenizer files +
  ``probe_model.json`` (training record: seed, steps, time, held-out accuracy).

:func:`default_probe_model` returns the cached checkpoint folder
``$XDG_CACHE_HOME/mamba_eval/probe_model/v<TRAIN_VERSION>-seed<seed>``, training it on first
use (a few minutes on 2 cores; written under a temporary name and renamed into place).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mamba_eval.utils import atomic_write_json, cache_dir

__all__ = [
    "MODEL_CONFIG",
    "TRAIN_LENGTH",
    "TRAIN_VERSION",
    "TrainConfig",
    "build_tokenizer",
    "default_probe_model",
    "evaluate_recall",
    "probe_cache_root",
    "train_probe_model",
    "vocabulary",
]

#: Bumped whenever training (data, model, schedule) changes, so cached models are not reused.
TRAIN_VERSION = 1
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
    extra: dict = field(default_factory=dict)


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


def train_probe_model(out_dir: str | os.PathLike, config: TrainConfig = TrainConfig(),
                      log: Callable[[str], None] | None = print) -> dict:
    """Train the probe model and save it into ``out_dir`` (created); returns the training record
    (also written to ``probe_model.json``)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from mamba_eval.models.checkpoint import read_config
    from mamba_eval.models.model import LanguageModel

    log = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    atomic_write_json(out / "config.json", {**MODEL_CONFIG, "vocab_size": tokenizer.get_vocab_size()})
    ids = {w: i for i, w in enumerate(vocabulary())}

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LanguageModel(read_config(out), backend="ref", device="cpu", dtype=torch.float32)
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
            losses = []
            for step in range(config.steps):
                warm = min(1.0, (step + 1) / max(1, config.warmup))
                decay = 0.5 * (1 + math.cos(math.pi * step / config.steps)) if config.cosine else 1.0
                lr = config.lr * warm * decay
                for group in opt.param_groups:
                    group["lr"] = lr
                if step < config.warm_steps:
                    length = config.warm_length
                    pairs = min(config.warm_pairs, config.max_pairs)
                else:
                    length, pairs = config.length, config.max_pairs
                x, y = _batch(rng, ids, config.batch_size, length, pairs)
                hidden, _ = model.backbone_forward(x)
                mask = y != -100
                logits = model.lm_logits(hidden[mask])
                loss = F.cross_entropy(logits, y[mask])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(loss.item())
                if step % 100 == 0 or step == config.steps - 1:
                    log(f"step {step:5d}/{config.steps}  length {length}  loss {losses[-1]:.3f}  "
                        f"{time.perf_counter() - start:6.1f} s")
            train_seconds = time.perf_counter() - start
            accuracy = {
                str(p): evaluate_recall(model, config.length, p, config.eval_samples, seed=config.seed)
                for p in config.eval_pairs
            }
    finally:
        torch.set_num_threads(threads)
    model.requires_grad_(False)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied: the loader takes the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    record = {
        "train_version": TRAIN_VERSION,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "train_seconds": round(train_seconds, 1),
        "torch_threads": config.threads or threads,
        "final_loss": losses[-1] if losses else None,
        "heldout_accuracy_at_train_length": accuracy,
        "heldout_samples": config.eval_samples,
    }
    atomic_write_json(out / "probe_model.json", record)
    log(f"trained in {train_seconds:.0f} s; held-out accuracy at {config.length} tokens by pairs: {accuracy}")
    return record


def probe_cache_root() -> Path:
    """``$XDG_CACHE_HOME/mamba_eval/probe_model`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    return cache_dir("probe_model")


def default_probe_model(cache_root: str | os.PathLike | None = None, seed: int = DEFAULT_TRAIN_SEED,
                        log: Callable[[str], None] | None = print) -> Path:
    """The default probe model's folder, trained into the cache on first use."""
    root = Path(cache_root).expanduser() if cache_root else probe_cache_root()
    final = root / f"v{TRAIN_VERSION}-seed{seed}"
    if (final / "probe_model.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"training the probe model into {final} (once; a few minutes on a 2-core CPU)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)
        train_probe_model(tmp, TrainConfig(seed=seed), log=log)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "probe_model.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same model first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


if __name__ == "__main__":  # pragma: no cover
    print(default_probe_model())
    sys.exit(0)
