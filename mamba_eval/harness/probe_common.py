"""What the long-context probe families share: lengths in model tokens, the run's tokenizer,
token counting, per-document random generators, and the checks of a task's metadata.

**Lengths are model tokens.** A context of length L has between ``L - u + 1`` and ``L`` tokens
of the model's tokenizer, u being the largest filler unit (a passkey filler sentence: 4-5 tokens
with GPT-NeoX; one noise word for MQAR, 1 token for the words used here with GPT-NeoX and the
probe model's word-level tokenizer). Pieces are counted once each, and the assembled context is
tokenised once more to check (adjusting the filler if a tokenizer is not additive over the
pieces); every document records its measured ``context_tokens``. What is drawn at random (keys,
candidates, pair order, scatter positions) does not depend on the tokenizer, only the amount of
filler does.

**Determinism and versions.** Documents depend only on (family, parameters, seed, tokenizer,
:data:`PROBE_DATA_VERSION`): each document draws from its own ``random.Random`` seeded with a
string that names all of them (:func:`doc_rng`). A change to what is generated bumps the version
(the task configs carry it in ``metadata.version``).

**Long contexts need max_length.** lm-eval's model classes truncate from the left at
``max_length`` (``--model mamba``: 2048 by default). The dataset functions raise
:class:`~mamba_eval.errors.MambaEvalError` when the run's ``max_length`` is missing or too small
for the longest request (:func:`check_max_length`); ``mamba-eval probe`` sets it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.tokenization import DEFAULT_TOKENIZER

__all__ = [
    "DEFAULT_SEED",
    "PROBE_DATA_VERSION",
    "TokenCounter",
    "as_dataset",
    "check_max_length",
    "doc_rng",
    "docs_digest",
    "length_name",
    "meta_int",
    "meta_length",
    "parse_length",
    "parse_lengths",
    "tokenizer_for",
]

#: Version of the generated data; bumped whenever a generator's output changes.
PROBE_DATA_VERSION = 1
DEFAULT_SEED = 1234

#: The default model of ``--model mamba`` (MambaLM's default ``pretrained``).
_DEFAULT_PRETRAINED = "state-spaces/mamba-130m"

# --------------------------------------------------------------------------- lengths

_LENGTH_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """``"4096"`` / ``"4k"`` / ``"1m"`` (k = 1024, m = 1024**2) -> tokens."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _LENGTH_RE.match(str(text))
        if not match:
            raise MambaEvalError(f"bad length {text!r}: expected tokens such as 4096, 4k or 1m")
        value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()]
    if value < 1:
        raise MambaEvalError(f"bad length {text!r}: must be at least 1 token")
    return value


def parse_lengths(text: str) -> list[int]:
    """A comma-separated list of lengths (see :func:`parse_length`), in the order given, no repeats."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise MambaEvalError(f"bad length list {text!r}: expected e.g. 1k,4k,16k")
    lengths = [parse_length(p) for p in parts]
    if len(set(lengths)) != len(lengths):
        raise MambaEvalError(f"bad length list {text!r}: a length is repeated")
    return lengths


def length_name(tokens: int) -> str:
    """4096 -> ``"4k"``, 1048576 -> ``"1m"``, 1000 -> ``"1000"`` (used in task and metric names)."""
    if tokens >= 1024 ** 2 and tokens % 1024 ** 2 == 0:
        return f"{tokens // 1024 ** 2}m"
    if tokens >= 1024 and tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return str(tokens)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_source(meta: Mapping[str, Any]) -> tuple[str, str | None]:
    """(name or folder, revision) of the tokenizer the model of this run uses, chosen as
    ``--model mamba`` chooses it: ``tokenizer`` if given, else the checkpoint's own tokenizer
    files, else GPT-NeoX-20B."""
    tokenizer = meta.get("tokenizer")
    if isinstance(tokenizer, str) and tokenizer:
        return tokenizer, None
    pretrained = meta.get("pretrained") or _DEFAULT_PRETRAINED
    revision = meta.get("revision") or None
    from mamba_eval.models.checkpoint import has_tokenizer_files, resolve_checkpoint

    path = resolve_checkpoint(str(pretrained), revision)
    if has_tokenizer_files(path):
        return str(path), revision
    return DEFAULT_TOKENIZER, None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str, revision: str | None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, use_fast=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MambaEvalError(f"probe data: cannot load tokenizer {name!r}: {first}") from None
    if not tok.encode("The quick brown fox jumps over the lazy dog."):
        raise MambaEvalError(f"probe data: tokenizer {name!r} encodes text to no tokens")
    return tok


def tokenizer_for(meta: Mapping[str, Any]):
    """The (cached) tokenizer for the run described by ``meta`` (task metadata + model_args)."""
    return _load_tokenizer(*_tokenizer_source(meta))


class TokenCounter:
    """Token counts of strings under one tokenizer, each distinct string counted once.

    Counts are those of ``tokenizer.encode(s)`` as ``--model mamba`` encodes a context (the
    tokenizer's default special tokens; GPT-NeoX adds none)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = len(self.tokenizer.encode(text))
        return n

    def full(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


def doc_rng(*parts) -> random.Random:
    """A generator seeded by a string naming the data version and everything given. The prefix
    is the module the generators were first written in: part of the seed, it stays as it is, or
    every document would change without a version bump."""
    return random.Random(":".join(["mamba_eval.harness.probe_data", f"v{PROBE_DATA_VERSION}", *map(str, parts)]))


def meta_int(meta: Mapping, key: str, default: int, minimum: int = 1) -> int:
    """``meta[key]`` as an integer of at least ``minimum`` (``default`` when absent)."""
    value = meta.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise MambaEvalError(f"probe metadata {key}={value!r}: expected an integer") from None
    if number < minimum:
        raise MambaEvalError(f"probe metadata {key}={value!r}: must be at least {minimum}")
    return number


def meta_length(meta: Mapping) -> int:
    """The task's ``context_length`` (required) in tokens."""
    if "context_length" not in meta:
        raise MambaEvalError("probe task metadata has no context_length")
    return parse_length(meta["context_length"])


def check_max_length(meta: Mapping, needed: int, task: str) -> None:
    """Refuse a run whose model would truncate the contexts (see the module docstring)."""
    value = meta.get("max_length")
    if value is None:
        if needed <= 2048:
            return
        raise MambaEvalError(
            f"{task}: requests need {needed} tokens but no max_length is given; pass "
            f"--model_args ...,max_length={needed} (or more): --model mamba truncates contexts "
            f"to 2048 tokens by default, which would drop the start of every context"
        )
    try:
        max_length = int(value)
    except (TypeError, ValueError):
        raise MambaEvalError(f"{task}: max_length={value!r} is not an integer") from None
    if max_length < needed:
        raise MambaEvalError(
            f"{task}: requests need {needed} tokens but max_length={max_length}; pass "
            f"max_length={needed} (or more) in --model_args, or the model truncates the contexts"
        )


def as_dataset(docs: list[dict]):
    """What lm-eval's ``custom_dataset`` returns: the documents as the ``test`` split."""
    import datasets

    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def docs_digest(docs: Sequence[Mapping]) -> str:
    """SHA-256 of the documents (canonical JSON), to compare generated data across runs."""
    blob = json.dumps(list(docs), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
