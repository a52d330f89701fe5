"""A self-contained demo that evaluates a real (tiny) Mamba checkpoint with no hub access.

The project ships no third-party data or tokenizer files, so everything the demo needs is
generated here from a fixed seed, byte for byte the same on every machine:

1. :func:`build_tokenizer`: a byte-level BPE tokenizer trained with ``tokenizers`` on English-
   like text from :func:`demo_corpus`, saved as a transformers tokenizer folder laid out like
   GPT-NeoX-20B's (``<|endoftext|>`` id 0 = bos = eos = unk, ``<|padding|>`` id 1, no prefix
   space, so ``decode(encode(s)) == s``).
2. :func:`write_random_checkpoint`: a Mamba-1 checkpoint in mamba_ssm format (``config.json`` +
   ``pytorch_model.bin``, fp32, ``lm_head.weight`` tied to the embedding) with the model's own
   random initialisation (``LanguageModel.init_weights``), d_model 64, 2 layers, the
   embedding padded to a multiple of 8 rows. Untrained, it scores near chance
   (:func:`chance_accuracy`); a trained checkpoint written into the same folder can replace it.
3. :func:`write_demo_task`: an lm-eval task of our own, :data:`DEMO_TASK`: multiple choice,
   "which continuation repeats the key stated earlier" (a recall test, which selective SSMs are
   built for), :data:`DEMO_NUM_DOCS` documents, :data:`DEMO_NUM_CHOICES` choices each, metrics
   ``acc`` / ``acc_norm``.

:func:`build_demo` runs the three steps. The evaluation it prepares is::

    lm_eval --model mamba --model_args pretrained=OUT/model --tasks mamba_eval_demo_recall \\
        --include_path OUT/tasks --device cpu --batch_size 8

(:func:`demo_lm_eval_args` returns that argument list; ``mamba-eval demo`` runs it and then prints
:func:`chance_note`, so that a reader of the near-chance accuracy knows it is expected.)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mamba_eval.utils import atomic_write_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DEMO_NUM_CHOICES",
    "DEMO_NUM_DOCS",
    "DEMO_SEED",
    "DEMO_TASK",
    "MODEL_CONFIG",
    "build_demo",
    "build_tokenizer",
    "chance_accuracy",
    "chance_note",
    "demo_corpus",
    "demo_lm_eval_args",
    "demo_paths",
    "pad_vocab_size",
    "write_demo_task",
    "write_random_checkpoint",
]

DEMO_SEED = 20240531
DEMO_TASK = "mamba_eval_demo_recall"
DEMO_NUM_DOCS = 200
DEMO_NUM_CHOICES = 4  # the key and its distractors
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
#: Requested BPE vocabulary size, specials included (the trainer stops early if the corpus runs
#: out of merges). Deliberately not a multiple of 8, like GPT-NeoX's 50277, so that the
#: checkpoint's embedding padding is exercised.
TOKENIZER_VOCAB_SIZE = 1021

#: mamba_ssm ``config.json`` of the demo checkpoint (``vocab_size`` is filled in from the tokenizer).
#: ``ssm_cfg`` is empty as in the released Mamba-1 checkpoints: d_state 16, d_conv 4, expand 2.
MODEL_CONFIG: dict = {
    "d_model": 64,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": None,
    "ssm_cfg": {},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}

# --------------------------------------------------------------------------- text

_COLORS = "amber azure black blue brown coral crimson cyan gold gray green indigo ivory jade lemon lilac maroon olive orange pink plum red rose ruby silver tan teal violet white yellow".split()
_ANIMALS = "badger bat bear beaver bison camel cat crab crane crow deer dog dove eagle ferret finch fox frog goat goose hare hawk heron horse lynx mole moose mouse otter owl panda pig raven seal sheep snake swan tiger toad trout whale wolf yak zebra".split()
_NOUNS = "river garden city market forest village harbor valley bridge castle island road tower library school station kitchen window mountain desert field lake meadow ship train letter story song map lamp clock door wall table chair book stone tree cloud storm morning evening winter summer".split()
_VERBS = "found saw carried painted crossed watched opened closed followed built visited remembered described measured counted cleaned repaired lost kept shared".split()
_ADJS = "old small quiet bright dark long narrow warm cold busy empty green distant hidden famous simple heavy gentle strange wooden".split()
_NAMES = "Ada Ben Clara David Elena Felix Grace Henry Iris Jonas Kira Leo Maya Nora Oscar Paula Quinn Rosa Sam Tara".split()
_PREPS = "near across behind beside under over through past".split()


def _sentence(rng: random.Random) -> str:
    """One sentence of the demo's small English-like language."""
    form = rng.randrange(4)
    if form == 0:
        return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_PREPS)} the {rng.choice(_NOUNS)}."
    if form == 1:
        return f"The {rng.choice(_NOUNS)} was {rng.choice(_ADJS)}, and the {rng.choice(_NOUNS)} was {rng.choice(_ADJS)}."
    if form == 2:
        n = rng.randint(2, 999)
        return f"There were {n} {rng.choice(_NOUNS)}s {rng.choice(_PREPS)} the {rng.choice(_NOUNS)}."
    return f'"{rng.choice(_NAMES)}, look at the {rng.choice(_COLORS)} {rng.choice(_ANIMALS)}!" said {rng.choice(_NAMES)}.'


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_COLORS)} {rng.choice(_ANIMALS)} {rng.randint(10, 99)}"


def demo_corpus(seed: int = DEMO_SEED, num_sentences: int = 20000) -> Iterator[str]:
    """Deterministic English-like lines (plain sentences and key statements) for tokenizer training."""
    rng = random.Random(seed)
    for _ in range(num_sentences):
        if rng.random() < 0.1:
            yield f"The key is {_key(rng)}. Remember the key."
        else:
            yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: str | Path, seed: int = DEMO_SEED, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> "Tokenizer":
    """Train the demo's byte-level BPE tokenizer and save it as a transformers tokenizer folder.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``out_dir`` and returns the ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1, as in GPT-NeoX-20B
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(seed), trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "add_prefix_space": False,
        **special,
        "pad_token": PAD_TOKEN,
        "model_max_length": 2048,
        "tokenizer_class": "GPTNeoXTokenizer",
    }
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json", {**special, "pad_token": PAD_TOKEN})
    return tok


# --------------------------------------------------------------------------- checkpoint


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """Embedding rows for ``vocab_size`` tokens, rounded up to ``multiple`` as mamba_ssm does."""
    return -(-vocab_size // multiple) * multiple


def write_random_checkpoint(model_dir: str | Path, vocab_size: int, seed: int = DEMO_SEED) -> Path:
    """Write ``config.json`` and ``pytorch_model.bin`` of a randomly initialised demo model; return the folder."""
    from mamba_eval.models import releases

    return releases.write_random_checkpoint(model_dir, {**MODEL_CONFIG, "vocab_size": int(vocab_size)}, seed=seed)


# --------------------------------------------------------------------------- task


def _recall_doc(rng: random.Random) -> dict:
    key = _key(rng)
    distractors: list[str] = []
    while len(distractors) < DEMO_NUM_CHOICES - 1:
        d = _key(rng)
        if d != key and d not in distractors:
            distractors.append(d)
    filler = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))
    choices = [key, *distractors]
    rng.shuffle(choices)
    return {
        "context": f"The key is {key}. Remember the key. {filler} What was the key? The key is",
        "choices": choices,
        "label": choices.index(key),
    }


def write_demo_task(tasks_dir: str | Path, seed: int = DEMO_SEED, num_docs: int = DEMO_NUM_DOCS) -> Path:
    """Write the demo task's data (``<task>.jsonl``) and lm-eval config (``<task>.yaml``); return the YAML path.

    The YAML names the data file by its absolute path (lm-eval resolves relative data paths
    from the current directory), so ``tasks_dir`` works as ``--include_path`` from anywhere.
    """
    import yaml

    out = Path(tasks_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)  # a stream of its own, apart from the tokenizer corpus
    data_path = out / f"{DEMO_TASK}.jsonl"
    with data_path.open("w", encoding="utf-8") as fh:
        for _ in range(num_docs):
            fh.write(json.dumps(_recall_doc(rng)) + "\n")
    config = {
        "task": DEMO_TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "seed": seed, "num_docs": num_docs},
    }
    yaml_path = out / f"{DEMO_TASK}.yaml"
    chance = chance_accuracy(data_path)
    header = (
        "# Generated by mamba_eval.commands.demo.write_demo_task: pick the continuation that repeats the key\n"
        f"# stated at the start of the context ({DEMO_NUM_CHOICES} choices, chance = {chance:.2f}).\n"
    )
    yaml_path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return yaml_path


# --------------------------------------------------------------------------- all together


def build_demo(out_dir: str | Path) -> dict[str, Path]:
    """Build the offline demo into ``out_dir``.

    Returns paths: ``model`` (checkpoint and tokenizer folder, pass as ``pretrained=``),
    ``tokenizer`` (the same folder), ``tasks`` (pass as ``--include_path``), ``task_yaml`` and
    ``task_data``. The task is named :data:`DEMO_TASK`.
    """
    paths = demo_paths(out_dir)
    tokenizer = build_tokenizer(paths["model"])
    write_random_checkpoint(paths["model"], tokenizer.get_vocab_size())
    write_demo_task(paths["tasks"])
    return paths


def demo_paths(out_dir: str | Path) -> dict[str, Path]:
    """The paths :func:`build_demo` writes under ``out_dir`` (absolute), without writing anything."""
    out = Path(out_dir).expanduser().resolve()
    tasks = out / "tasks"
    return {
        "model": out / "model",
        "tokenizer": out / "model",
        "tasks": tasks,
        "task_yaml": tasks / f"{DEMO_TASK}.yaml",
        "task_data": tasks / f"{DEMO_TASK}.jsonl",
    }


def _choice_counts(task_data: str | Path) -> list[int]:
    """The number of choices of each document of a JSON-lines task file (a ``choices`` list each)."""
    lines = Path(task_data).read_text(encoding="utf-8").splitlines()
    return [len(json.loads(line)["choices"]) for line in lines if line.strip()]


def chance_accuracy(task_data: str | Path) -> float:
    """The accuracy expected from guessing on the task file ``task_data``: the mean over its
    documents of 1 / number of choices."""
    counts = _choice_counts(task_data)
    return sum(1 / n for n in counts) / len(counts)


def chance_note(paths: Mapping[str, Path]) -> str:
    """One line for under the demo's results (``paths`` from :func:`build_demo`): the model is
    untrained, so its accuracy is to be read against the chance level of the task it ran."""
    counts = sorted(set(_choice_counts(paths["task_data"])))
    choices = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"the demo model is untrained (random weights), so expect accuracy near chance: "
            f"{chance_accuracy(paths['task_data']):.2f} on {DEMO_TASK} (1 right answer in {choices} choices)")


def demo_lm_eval_args(paths: Mapping[str, Path], device: str = "cpu", batch_size: int = 8) -> list[str]:
    """lm_eval command-line arguments (without the program name) that evaluate the demo of ``paths``."""
    return [
        "--model", "mamba",
        "--model_args", f"pretrained={paths['model']}",
        "--tasks", DEMO_TASK,
        "--include_path", str(paths["tasks"]),
        "--device", device,
        "--batch_size", str(batch_size),
    ]  # fmt: skip
