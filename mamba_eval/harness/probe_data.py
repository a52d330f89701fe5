"""Long-context probe data: generated at load time from a fixed seed, sized in model tokens.

Three probe families, each an lm-eval task per context length (configs in ``tasks/probes/``,
written by :func:`shipped_task_configs`); lm-eval calls the ``*_dataset`` functions below
through ``custom_dataset: !function mamba_eval.harness.probe_data.<fn>`` with the task's ``metadata``
merged with the run's ``--model_args`` (and ``--metadata``), so the data is built with the
tokenizer of the model under test. Nothing is downloaded and no data file is shipped.

**Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention", the setup reused by most
long-context papers). A 5-digit key sits in repeated filler text at a chosen *depth*::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    them. I will quiz you about the important information there. The grass is green. The sky
    is blue. ... The pass key is 71432. Remember it. 71432 is the pass key. The grass is
    green. ... What is the pass key? The pass key is

Depth d puts ``round(d * n)`` of the ``n`` filler sentences before the key (0: right after
the introduction, 1: right before the question). Scored two ways: ``mamba_passkey_<len>``,
multiple choice among the key and ``num_candidates - 1`` other random 5-digit keys (sum of
log-likelihoods, chance 1/num_candidates); ``mamba_passkey_gen_<len>``, greedy generation until
``"."`` or a newline, exact match of the leading digits. Both variants use the same documents.

**Multi-query associative recall** (MQAR; Arora et al. 2023, "Zoology"). Key-value pairs of
words, then, scattered in noise words, queries of the other keys each followed by its value,
and at the very end one more key, never queried before, whose value is the answer::

    pear 41 stone 77 lamp 12 ... the of and lamp 12 so the ... pear 41 as ... stone  ->  " 77"

Keys, values and noise words come from three disjoint word lists (:data:`KEY_WORDS`,
:data:`VALUE_WORDS`, :data:`NOISE_WORDS`), so a model can tell noise from content; Zoology
draws noise from the whole vocabulary instead. The scored key is the last token of the
context, about ``length`` tokens after its pair was stated. ``acc`` is lm-eval's greedy
accuracy (the value is the argmax of the next-token distribution over the whole vocabulary,
Zoology's metric); a model that only knows "some value seen earlier" scores about 1/pairs.

**Perplexity by position.** A long text (WikiText-2 test, ``wiki.test.raw`` rebuilt from the
offline data folder and checked against its MD5, or any UTF-8 text file) is cut into
non-overlapping windows of ``length`` tokens from its start. Each window becomes one
``loglikelihood`` request per position bucket: context = the window's text before the bucket,
continuation = the bucket's text, so a bucket's log-likelihood is conditioned on everything
before it in the window (the window's first token is context only, so every request's sequence
starts at the same token) (lm-eval's rolling requests return one number per document and cannot
say where the loss is). Buckets double: ``0-256, 256-512, 512-1k, 1k-2k, ...``; metric
``loss_<bucket>`` is the bucket's mean loss in nats per token over all windows (token-weighted),
``loss`` the mean over every scored token. Requests of one window cost about twice the window
in tokens (each re-reads its prefix). Every split is checked to reproduce the window's own
tokens through lm-eval's context/continuation split (lm.py ``encode_pairs`` semantics: the
context's trailing whitespace moves to the continuation); a split that would not is moved right
by a token.

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
string that names all of them. A change to what is generated bumps the version (the task
configs carry it in ``metadata.version``).

**Long contexts need max_length.** lm-eval's model classes truncate from the left at
``max_length`` (``--model mamba``: 2048 by default). The dataset functions raise
:class:`~mamba_eval.errors.MambaEvalError` when the run's ``max_length`` is missing or too small
for the longest request; ``mamba-eval probe`` sets it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mamba_eval.errors import MambaEvalError

__all__ = [
    "DEFAULT_SEED",
    "FAMILIES",
    "KEY_WORDS",
    "NOISE_WORDS",
    "PROBE_DATA_VERSION",
    "VALUE_WORDS",
    "docs_digest",
    "include_path",
    "length_name",
    "mqar_dataset",
    "mqar_docs",
    "mqar_words",
    "parse_length",
    "parse_lengths",
    "passkey_dataset",
    "passkey_docs",
    "passkey_gen_results",
    "passkey_mc_results",
    "position_buckets",
    "ppl_docs",
    "ppl_position_dataset",
    "ppl_position_results",
    "read_text",
    "required_max_length",
    "shipped_task_configs",
    "task_config",
    "task_name",
    "token_loss",
    "write_task_configs",
]

#: Version of the generated data; bumped whenever a generator's output changes.
PROBE_DATA_VERSION = 1
DEFAULT_SEED = 1234

#: The default model of ``--model mamba`` (MambaLM's default ``pretrained``) and its tokenizer.
_DEFAULT_PRETRAINED = "state-spaces/mamba-130m"
_DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"

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
    return _DEFAULT_TOKENIZER, None


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


class _Counter:
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


def _rng(*parts) -> random.Random:
    """A generator seeded by a string naming the data version and everything given."""
    return random.Random(":".join(["mamba_eval.harness.probe_data", f"v{PROBE_DATA_VERSION}", *map(str, parts)]))


def _meta_int(meta: Mapping, key: str, default: int, minimum: int = 1) -> int:
    value = meta.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise MambaEvalError(f"probe metadata {key}={value!r}: expected an integer") from None
    if number < minimum:
        raise MambaEvalError(f"probe metadata {key}={value!r}: must be at least {minimum}")
    return number


def _meta_length(meta: Mapping) -> int:
    if "context_length" not in meta:
        raise MambaEvalError("probe task metadata has no context_length")
    return parse_length(meta["context_length"])


def _check_max_length(meta: Mapping, needed: int, task: str) -> None:
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


def _dataset(docs: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def docs_digest(docs: Sequence[Mapping]) -> str:
    """SHA-256 of the documents (canonical JSON), to compare generated data across runs."""
    blob = json.dumps(list(docs), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- passkey

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
#: The filler, one sentence per unit, repeated in this order.
PASSKEY_FILLER = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_CANDIDATES = 10
#: Tokens generated for the generative variant (a 5-digit key is 2-5 tokens in common tokenizers).
PASSKEY_GEN_TOKENS = 8


def depth_label(depth: float) -> str:
    """0.5 -> ``"50"``, 0.125 -> ``"12.5"`` (percent; used in metric names ``acc_depth_<label>``)."""
    pct = round(depth * 100, 6)
    return str(int(pct)) if pct == int(pct) else f"{pct:g}"


def _parse_depths(value) -> list[float]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        depths = [float(v) for v in value]
    except (TypeError, ValueError):
        raise MambaEvalError(f"bad depths {value!r}: expected numbers between 0 and 1") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise MambaEvalError(f"bad depths {value!r}: expected numbers between 0 and 1")
    if len(set(depths)) != len(depths):
        raise MambaEvalError(f"bad depths {value!r}: a depth is repeated")
    return depths


def passkey_docs(
    tokenizer,
    context_length: int,
    depths: Sequence[float] = PASSKEY_DEPTHS,
    samples_per_depth: int = 10,
    num_candidates: int = PASSKEY_CANDIDATES,
    seed: int = DEFAULT_SEED,
) -> list[dict]:
    """Passkey documents: ``samples_per_depth`` per depth, depths in the order given.

    Fields: ``context`` (ends with "The pass key is"), ``choices`` (5-digit keys, shuffled),
    ``label`` (index of the key), ``answer`` (the key), ``depth``, ``context_length`` (the
    target), ``context_tokens`` (measured), ``filler_sentences`` / ``sentences_before``
    (filler sentences in all and before the key), ``version``, ``seed``.
    """
    count = _Counter(tokenizer)
    if not 2 <= num_candidates <= 1000:
        raise MambaEvalError(f"num_candidates={num_candidates}: expected 2 to 1000")
    units = [count(s) for s in PASSKEY_FILLER]
    docs = []
    for depth in _parse_depths(depths):
        for i in range(samples_per_depth):
            rng = _rng("passkey", seed, context_length, depth_label(depth), i)
            key = rng.randint(10000, 99999)
            others: set[int] = set()
            while len(others) < num_candidates - 1:
                k = rng.randint(10000, 99999)
                if k != key:
                    others.add(k)
            choices = [str(key), *map(str, sorted(others))]
            rng.shuffle(choices)
            needle = PASSKEY_NEEDLE.format(key=key)
            fixed = count(PASSKEY_INTRO) + count(needle) + count(PASSKEY_QUESTION)
            if context_length < fixed:
                raise MambaEvalError(
                    f"passkey context_length={context_length} is shorter than the prompt without "
                    f"filler ({fixed} tokens)"
                )
            n = _fill(units, context_length - fixed)
            for _ in range(4):  # re-count the assembled context; adjust if counts are not additive
                context, before = _passkey_context(n, depth, needle)
                measured = count.full(context)
                if context_length - max(units) < measured <= context_length:
                    break
                n = max(0, n + _step(units, context_length - measured))
            else:
                raise MambaEvalError(
                    f"passkey: cannot size a context to {context_length} tokens with this tokenizer "
                    f"(got {measured})"
                )
            docs.append({
                "context": context, "choices": choices, "label": choices.index(str(key)),
                "answer": str(key), "depth": float(depth), "context_length": context_length,
                "context_tokens": measured, "filler_sentences": n, "sentences_before": before,
                "version": PROBE_DATA_VERSION, "seed": seed,
            })
    return docs


def _fill(units: Sequence[int], budget: int) -> int:
    """How many filler units, taken cyclically from the first, fit in ``budget`` tokens."""
    if budget <= 0:
        return 0
    cycle = sum(units)
    n = (budget // cycle) * len(units)
    left = budget - (n // len(units)) * cycle
    for u in units:
        if u > left:
            break
        left -= u
        n += 1
    return n


def _step(units: Sequence[int], delta: int) -> int:
    """Units to add (negative: remove) to move a count by about ``delta`` tokens."""
    mean = sum(units) / len(units)
    return int(delta // mean) if delta > 0 else -math.ceil(-delta / mean)


def _passkey_context(n: int, depth: float, needle: str) -> tuple[str, int]:
    before = round(depth * n)
    filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n)]
    text = PASSKEY_INTRO + "".join(filler[:before]) + needle + "".join(filler[before:]) + PASSKEY_QUESTION
    return text, before


def passkey_dataset(**meta):
    """lm-eval ``custom_dataset`` of the passkey tasks (both variants). Metadata:
    ``context_length`` (required), ``depths``, ``samples_per_depth``, ``num_candidates``,
    ``seed``, ``gen_tokens`` (the generative variant's max_gen_toks, for the max_length check);
    plus the run's model_args (``tokenizer``, ``pretrained``, ``revision``, ``max_length``)."""
    length = _meta_length(meta)
    tokenizer = tokenizer_for(meta)
    docs = passkey_docs(
        tokenizer, length,
        depths=meta.get("depths", PASSKEY_DEPTHS),
        samples_per_depth=_meta_int(meta, "samples_per_depth", 10),
        num_candidates=_meta_int(meta, "num_candidates", PASSKEY_CANDIDATES, minimum=2),
        seed=_meta_int(meta, "seed", DEFAULT_SEED, minimum=0),
    )
    count = _Counter(tokenizer)
    longest_choice = max(count(" " + c) for d in docs for c in d["choices"])
    gen_tokens = _meta_int(meta, "gen_tokens", PASSKEY_GEN_TOKENS)
    needed = max(d["context_tokens"] for d in docs) + max(longest_choice, gen_tokens)
    _check_max_length(meta, needed, f"passkey (context_length={length})")
    return _dataset(docs)


def _depth_metrics(prefix: str, doc: Mapping, score: float) -> dict:
    return {prefix: score, f"{prefix}_depth_{depth_label(doc['depth'])}": score}


def passkey_mc_results(doc: Mapping, results: Sequence) -> dict:
    """``process_results`` of the likelihood variant: ``acc`` and ``acc_depth_<pct>``
    (the key has the highest log-likelihood among the candidates)."""
    lls = [float(r[0]) for r in results]
    best = max(range(len(lls)), key=lls.__getitem__)
    return _depth_metrics("acc", doc, float(best == int(doc["label"])))


_LEADING_DIGITS = re.compile(r"^\s*(\d+)")


def passkey_gen_results(doc: Mapping, results: Sequence[str]) -> dict:
    """``process_results`` of the generative variant: ``exact_match`` and
    ``exact_match_depth_<pct>`` (the generation's leading digits are the key)."""
    match = _LEADING_DIGITS.match(results[0] if results else "")
    hit = bool(match) and match.group(1) == doc["answer"]
    return _depth_metrics("exact_match", doc, float(hit))


# --------------------------------------------------------------------------- MQAR

#: Keys: 64 common nouns (one GPT-NeoX token each after a space).
KEY_WORDS = tuple("""
apple river house table chair horse garden window bottle pencil castle forest island
doctor engine flower hammer jacket kitchen ladder market mirror needle orange pillow rabbit
saddle silver spider summer ticket tiger tower valley wallet whale winter yellow anchor basket
bridge button candle carpet circle copper desert dragon finger hunter lemon letter magnet
monkey museum sword planet pocket rocket shadow spring stone
""".split())
#: Values: the two-digit numbers.
VALUE_WORDS = tuple(str(n) for n in range(10, 100))
#: Noise: 32 function words, disjoint from keys and values.
NOISE_WORDS = tuple("""
the of and to in is was it for on with as at by from this that but or so if then very more
some any each other such only also
""".split())
MQAR_PAIRS = (4, 8, 16)


def mqar_words(rng: random.Random, pairs: int, total_tokens: int, cost: Callable[[str, bool], int] | None = None):
    """One MQAR sequence as words; returns ``(words, answer_positions)``.

    The words are ``k1 v1 ... kP vP``, then ``P - 1`` query pairs ``k v`` (every key but the
    last queried one, in random order) scattered uniformly among noise words, then the last
    queried key and its value. ``answer_positions`` are the indices of the P queried values
    (the last is ``len(words) - 1``). The words before the final value cost ``total_tokens``
    tokens as measured by ``cost(word, first)`` (``first``: the word opens the text, no space
    before it), filled with noise to within one noise word; by default every word costs 1.
    """
    cost = cost or (lambda word, first: 1)
    if not 1 <= pairs <= min(len(KEY_WORDS), len(VALUE_WORDS)):
        raise MambaEvalError(f"MQAR pairs={pairs}: expected 1 to {min(len(KEY_WORDS), len(VALUE_WORDS))}")
    keys = rng.sample(KEY_WORDS, pairs)
    values = rng.sample(VALUE_WORDS, pairs)
    value_of = dict(zip(keys, values))
    order = rng.sample(keys, pairs)  # query order; the last one is scored at the end
    slots = sorted(rng.random() for _ in range(pairs - 1))  # where the answered queries go, in [0, 1)
    # (noise words are drawn last, so the amount of noise never changes the draws above)

    head = [w for k in keys for w in (k, value_of[k])]
    used = sum(cost(w, i == 0) for i, w in enumerate(head))
    used += sum(cost(k, False) + cost(value_of[k], False) for k in order[:-1]) + cost(order[-1], False)
    budget = total_tokens - used
    if budget < 0:
        raise MambaEvalError(
            f"MQAR length {total_tokens} is too short for {pairs} pairs (needs {used} tokens without noise)"
        )
    costs = {w: cost(w, False) for w in NOISE_WORDS}
    if min(costs.values()) < 1:
        raise MambaEvalError(f"MQAR: a noise word encodes to no tokens ({costs})")
    if len(set(costs.values())) == 1:  # the usual case: every noise word costs the same
        noise = rng.choices(NOISE_WORDS, k=budget // next(iter(costs.values())))
    else:
        noise = []
        cheapest = min(costs.values())
        while budget >= cheapest:
            word = rng.choice(NOISE_WORDS)
            if costs[word] <= budget:
                noise.append(word)
                budget -= costs[word]
    words = list(head)
    answers = []
    at = 0
    for slot, key in zip(slots, order[:-1]):
        cut = int(slot * (len(noise) + 1))
        words += noise[at:cut]
        at = max(at, cut)
        words.append(key)
        words.append(value_of[key])
        answers.append(len(words) - 1)
    words += noise[at:]
    words += [order[-1], value_of[order[-1]]]
    answers.append(len(words) - 1)
    return words, answers


def mqar_docs(tokenizer, context_length: int, pairs: int, num_samples: int = 100, seed: int = DEFAULT_SEED) -> list[dict]:
    """MQAR documents. Fields: ``context`` (ends with the scored key), ``target`` (" value"),
    ``pairs``, ``context_length`` (target), ``context_tokens`` (measured), ``version``, ``seed``."""
    count = _Counter(tokenizer)

    def cost(word: str, first: bool) -> int:
        return count(word) if first else count(" " + word)

    docs = []
    for i in range(num_samples):
        target = context_length
        for _ in range(4):  # re-count the assembled context; adjust if counts are not additive
            words, _answers = mqar_words(_rng("mqar", seed, context_length, pairs, i), pairs, target, cost)
            context = " ".join(words[:-1])
            measured = count.full(context)
            if context_length - _max_noise_cost(cost) < measured <= context_length:
                break
            target += context_length - measured
        else:
            raise MambaEvalError(f"MQAR: cannot size a context to {context_length} tokens with this tokenizer (got {measured})")
        docs.append({
            "context": context, "target": " " + words[-1], "pairs": pairs,
            "context_length": context_length, "context_tokens": measured,
            "version": PROBE_DATA_VERSION, "seed": seed,
        })
    return docs


def _max_noise_cost(cost) -> int:
    return max(cost(w, False) for w in NOISE_WORDS)


def mqar_dataset(**meta):
    """lm-eval ``custom_dataset`` of the MQAR tasks. Metadata: ``context_length`` (required),
    ``pairs``, ``num_samples``, ``seed``; plus the run's model_args."""
    length = _meta_length(meta)
    tokenizer = tokenizer_for(meta)
    docs = mqar_docs(
        tokenizer, length, pairs=_meta_int(meta, "pairs", 8), num_samples=_meta_int(meta, "num_samples", 100),
        seed=_meta_int(meta, "seed", DEFAULT_SEED, minimum=0),
    )
    count = _Counter(tokenizer)
    needed = max(d["context_tokens"] + count(d["target"]) for d in docs)
    _check_max_length(meta, needed, f"MQAR (context_length={length})")
    return _dataset(docs)


# --------------------------------------------------------------------------- perplexity by position

#: Bucket edges (tokens from the window start) below 1k; from 1k on they double.
_FIRST_EDGES = (0, 256, 512)


def position_buckets(length: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``: 0-256, 256-512, 512-1k, then doubling, the last one cut at ``length``."""
    edges = [e for e in _FIRST_EDGES if e < length]
    edge = 1024
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges, edges[1:]))


def bucket_name(lo: int, hi: int) -> str:
    return f"{length_name(lo) if lo else '0'}-{length_name(hi)}"


def read_text(text_file: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, description of its source): ``text_file`` (UTF-8) if given, else ``wiki.test.raw``
    of WikiText-2 rebuilt from ``data_dir`` (default ``$MAMBA_EVAL_DATA_DIR``) as in
    :mod:`mamba_eval.harness.offline`, MD5-checked."""
    if text_file:
        path = Path(text_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MambaEvalError(f"text file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise MambaEvalError(f"cannot read text file {path}: {err}") from None
        if not text.strip():
            raise MambaEvalError(f"text file {path} is empty")
        return text, str(path)
    from mamba_eval.harness.offline import DATA_DIR_ENV, WIKITEXT2_TEST_RAW_MD5, rebuild_wikitext_raw

    folder = data_dir or os.environ.get(DATA_DIR_ENV, "").strip()
    if not folder:
        raise MambaEvalError(
            f"perplexity by position needs a text: give text_file (mamba-eval probe --text FILE) or a data "
            f"folder with wikitext/wikitext-2-raw-v1_test.jsonl (--data-dir or ${DATA_DIR_ENV})"
        )
    rows_path = Path(folder).expanduser() / "wikitext" / "wikitext-2-raw-v1_test.jsonl"
    try:
        lines = rows_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MambaEvalError(f"WikiText-2 test rows not found: {rows_path}") from None
    rows = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rows.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MambaEvalError(f"{rows_path}:{i + 1}: expected a JSON object with a 'text' field") from None
    raw = rebuild_wikitext_raw(rows)
    digest = hashlib.md5(raw.encode("utf-8")).hexdigest()
    if digest != WIKITEXT2_TEST_RAW_MD5:
        raise MambaEvalError(f"{rows_path}: does not rebuild WikiText-2 wiki.test.raw (md5 {digest})")
    return raw, f"WikiText-2 wiki.test.raw ({rows_path})"


def _pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as ``--model mamba`` makes them from two strings
    (lm.py ``encode_pairs``, which follows lm-eval's ``TemplateLM``)."""
    if context == "":
        return [], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx):]


def _split_points(tokenizer, text: str, ids: list[int], wanted: list[int], max_shift: int = 64) -> list[int]:
    """Token indices at or after each of ``wanted`` (increasing, >= 1) where the window can be
    cut into a context/continuation pair that reproduces its tokens (at most ``len(ids)``)."""
    points = []
    for want in wanted:
        want = max(want, points[-1] if points else 1)
        if want >= len(ids):
            points.append(len(ids))
            continue
        for b in range(want, min(len(ids), want + max_shift)):
            prefix = tokenizer.decode(ids[:b])
            if not text.startswith(prefix):
                continue
            ctx = _pair_tokens(tokenizer, prefix, "x")[0]  # only the context side matters here
            if ctx == ids[:b]:
                points.append(b)
                break
        else:
            raise MambaEvalError(
                f"perplexity by position: no clean token boundary within {max_shift} tokens of "
                f"position {want} (is the tokenizer lossless, decode(encode(text)) == text?)"
            )
    return points


def ppl_docs(tokenizer, text: str, window_length: int, num_windows: int = 8) -> list[dict]:
    """Per-bucket requests of up to ``num_windows`` non-overlapping windows of ``window_length``
    tokens from the start of ``text``. Fields: ``context``, ``continuation``, ``window``,
    ``bucket`` (name), ``bucket_start``/``bucket_end`` (token positions in the window, after
    moving splits to clean boundaries), ``n_tokens``, ``context_length`` (window), ``version``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    all_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    available = len(all_ids) // window_length
    if available < 1:
        raise MambaEvalError(
            f"perplexity by position: the text has {len(all_ids)} tokens, fewer than one window of "
            f"{window_length}; give a longer text"
        )
    buckets = position_buckets(window_length)
    docs = []
    for w in range(min(num_windows, available)):
        start, stop = w * window_length, (w + 1) * window_length
        window_text = text[offsets[start][0]:offsets[stop - 1][1]]
        ids = tokenizer.encode(window_text, add_special_tokens=False)
        if tokenizer.decode(ids) != window_text:
            raise MambaEvalError("perplexity by position needs a lossless tokenizer (decode(encode(text)) == text)")
        # The window's first token is context only: every request then starts its sequence at
        # the same token (an empty context would start it at lm-eval's prefix token instead).
        edges = _split_points(tokenizer, window_text, ids, [1] + [lo for lo, _ in buckets][1:])
        edges = [*edges, len(ids)]
        for (lo_name, hi_name), lo, hi in zip(buckets, edges, edges[1:]):
            if hi <= lo:
                continue
            context = tokenizer.decode(ids[:lo])
            continuation = window_text[len(context):len(tokenizer.decode(ids[:hi]))]
            ctx, cont = _pair_tokens(tokenizer, context, continuation)
            if ctx != ids[:lo] or cont != ids[lo:hi]:
                raise MambaEvalError(
                    f"perplexity by position: window {w} bucket {bucket_name(lo_name, hi_name)} does not "
                    f"re-tokenise to the window's tokens"
                )
            docs.append({
                "context": context, "continuation": continuation, "window": w,
                "bucket": bucket_name(lo_name, hi_name), "bucket_start": lo, "bucket_end": hi,
                "n_tokens": hi - lo, "context_length": window_length, "version": PROBE_DATA_VERSION,
            })
    return docs


def ppl_position_dataset(**meta):
    """lm-eval ``custom_dataset`` of the perplexity-by-position tasks. Metadata:
    ``context_length`` (the window, required), ``num_windows``, ``text_file`` (else WikiText-2
    from ``data_dir`` / ``$MAMBA_EVAL_DATA_DIR``); plus the run's model_args."""
    length = _meta_length(meta)
    text, _source = read_text(meta.get("text_file"), meta.get("data_dir"))
    tokenizer = tokenizer_for(meta)
    docs = ppl_docs(tokenizer, text, length, num_windows=_meta_int(meta, "num_windows", 8))
    _check_max_length(meta, max(d["bucket_end"] for d in docs), f"perplexity by position (window {length})")
    return _dataset(docs)


def ppl_position_results(doc: Mapping, results: Sequence) -> dict:
    """``process_results``: ``(log-likelihood, tokens)`` under ``loss_<bucket>`` and ``loss``."""
    ll = float(results[0][0])
    item = (ll, int(doc["n_tokens"]))
    return {f"loss_{doc['bucket']}": item, "loss": item}


def token_loss(items: Sequence[tuple[float, int]]) -> float:
    """Aggregation: mean loss in nats per token, ``-sum(ll) / sum(tokens)``."""
    items = list(items)
    tokens = sum(n for _, n in items)
    return -math.fsum(ll for ll, _ in items) / tokens if tokens else float("nan")


# --------------------------------------------------------------------------- task configs


class _Function(str):
    """A YAML ``!function`` reference (lm-eval imports it when it loads the config)."""


def _function_representer(dumper, value):
    return dumper.represent_scalar("!function", str(value), style="")


def _str_representer(dumper, value):
    style = '"' if any(c in value for c in "\n\r\t") else None  # "\n", not a quoted blank line
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_MODULE = "mamba_eval.harness.probe_data"  # not __name__: the configs must name it under python -m too


def _fn(name: str) -> _Function:
    return _Function(f"{_MODULE}.{name}")


#: family -> (task-name prefix, group name, lengths shipped in tasks/probes/)
FAMILIES = {
    "passkey": ("mamba_passkey", "mamba_passkey", ("1k", "4k", "16k", "64k", "256k", "1m")),
    "passkey_gen": ("mamba_passkey_gen", "mamba_passkey_gen", ("1k", "4k", "16k", "64k", "256k", "1m")),
    "mqar": ("mamba_mqar", "mamba_mqar", ("256", "1k", "4k", "16k", "64k")),
    "ppl": ("mamba_ppl_position", "mamba_ppl_position", ("4k", "16k", "64k")),
}


def task_name(family: str, length: int, pairs: int | None = None) -> str:
    """``mamba_passkey_4k``, ``mamba_passkey_gen_1m``, ``mamba_mqar_4k_p8``, ``mamba_ppl_position_16k``."""
    if family not in FAMILIES:
        raise MambaEvalError(f"unknown probe family {family!r}; known: {', '.join(FAMILIES)}")
    name = f"{FAMILIES[family][0]}_{length_name(length)}"
    if family == "mqar":
        if pairs is None:
            raise MambaEvalError("an MQAR task needs a number of pairs")
        name += f"_p{pairs}"
    return name


def default_samples(family: str, length: int) -> int:
    """Documents per task (passkey: per depth; ppl: windows) unless told otherwise."""
    if family in ("passkey", "passkey_gen"):
        return 10 if length <= 16 * 1024 else 4 if length <= 64 * 1024 else 2
    if family == "mqar":
        return 100 if length <= 4096 else 50 if length <= 16 * 1024 else 20 if length <= 64 * 1024 else 10
    return 8


def task_config(
    family: str,
    length: int,
    *,
    pairs: int | None = None,
    samples: int | None = None,
    depths: Sequence[float] = PASSKEY_DEPTHS,
    num_candidates: int = PASSKEY_CANDIDATES,
    seed: int = DEFAULT_SEED,
    text_file: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """The lm-eval task config (a dict; ``!function`` values as :class:`_Function`)."""
    name = task_name(family, length, pairs)
    samples = samples if samples is not None else default_samples(family, length)
    meta: dict[str, Any] = {"version": PROBE_DATA_VERSION, "context_length": length, "seed": seed}
    base: dict[str, Any] = {"task": name, "dataset_path": "", "test_split": "test"}
    if family in ("passkey", "passkey_gen"):
        depths = _parse_depths(depths)
        meta.update(depths=[float(d) for d in depths], samples_per_depth=samples, num_candidates=num_candidates)
        base["custom_dataset"] = _fn("passkey_dataset")
        if family == "passkey":
            metric = "acc"
            base.update(
                output_type="multiple_choice", doc_to_text="context", doc_to_choice="choices",
                doc_to_target="label", target_delimiter=" ", process_results=_fn("passkey_mc_results"),
            )
        else:
            metric = "exact_match"
            meta["gen_tokens"] = PASSKEY_GEN_TOKENS
            base.update(
                output_type="generate_until", doc_to_text="context", doc_to_target="answer",
                process_results=_fn("passkey_gen_results"),
                generation_kwargs={"until": ["\n", "."], "max_gen_toks": PASSKEY_GEN_TOKENS, "do_sample": False, "temperature": 0.0},
            )
        names = [metric] + [f"{metric}_depth_{depth_label(d)}" for d in depths]
        base["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]
    elif family == "mqar":
        if pairs is None:
            raise MambaEvalError("an MQAR task needs a number of pairs")
        meta.update(pairs=int(pairs), num_samples=samples)
        base.update(
            custom_dataset=_fn("mqar_dataset"), output_type="loglikelihood", doc_to_text="context",
            doc_to_target="target", target_delimiter="",
            metric_list=[
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        )
    elif family == "ppl":
        meta.update(num_windows=samples)
        if text_file:
            meta["text_file"] = str(text_file)
        if data_dir:
            meta["data_dir"] = str(data_dir)
        names = ["loss"] + [f"loss_{bucket_name(lo, hi)}" for lo, hi in position_buckets(length)]
        base.update(
            custom_dataset=_fn("ppl_position_dataset"), output_type="loglikelihood", doc_to_text="context",
            doc_to_target="continuation", target_delimiter="", process_results=_fn("ppl_position_results"),
            metric_list=[{"metric": m, "aggregation": _fn("token_loss"), "higher_is_better": False} for m in names],
        )
    else:  # pragma: no cover - task_name() has refused it
        raise MambaEvalError(f"unknown probe family {family!r}")
    base["metadata"] = meta
    return base


def _group_config(family: str, tasks: Sequence[str]) -> dict:
    return {"group": FAMILIES[family][1], "task": list(tasks), "metadata": {"version": PROBE_DATA_VERSION}}


def render_yaml(config: Mapping, header: str = "") -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function, _function_representer)
    Dumper.add_representer(str, _str_representer)
    return header + yaml.dump(dict(config), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)


_HEADER = (
    "# Written by mamba_eval.harness.probe_data (python -m mamba_eval.harness.probe_data --write DIR); do not edit.\n"
    "# The documents are generated when lm-eval loads the task; see that module's docstring.\n"
)


def shipped_task_configs() -> dict[str, str]:
    """File name -> YAML text of the task configs shipped in ``tasks/probes/``."""
    files: dict[str, str] = {}
    for family, (_prefix, group, lengths) in FAMILIES.items():
        names = []
        for text in lengths:
            length = parse_length(text)
            for pairs in (MQAR_PAIRS if family == "mqar" else (None,)):
                cfg = task_config(family, length, pairs=pairs)
                files[f"{cfg['task']}.yaml"] = render_yaml(cfg, _HEADER)
                names.append(cfg["task"])
        files[f"{group}.yaml"] = render_yaml(_group_config(family, names), _HEADER)
    return files


def write_task_configs(folder: str | os.PathLike, configs: Mapping[str, str]) -> Path:
    """Write ``{file name: YAML text}`` into ``folder`` (each file atomically); return the folder."""
    from mamba_eval.utils import atomic_write

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        atomic_write(out / name, text)
    return out


def include_path() -> Path:
    """The installed ``tasks/probes`` folder, for ``lm_eval --include_path``."""
    import importlib.resources

    return Path(str(importlib.resources.files("mamba_eval.tasks") / "probes"))


def required_max_length(lengths: Sequence[int]) -> int:
    """A ``max_length`` that holds every request of the probe tasks up to ``max(lengths)``."""
    return max(lengths) + 64


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mamba_eval.harness.probe_data``: print the include path of the probe tasks, or
    ``--write DIR``: write the shipped task configs into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mamba_eval.harness.probe_data", description=main.__doc__)
    parser.add_argument("--write", metavar="DIR", help="write the shipped task configs into DIR")
    args = parser.parse_args(argv)
    if args.write:
        write_task_configs(args.write, shipped_task_configs())
        print(args.write)
    else:
        print(include_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
