"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", the setup reused by most
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
Lengths, determinism and the max_length check: :mod:`mamba_eval.harness.probe_common`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.probe_common import (
    DEFAULT_SEED,
    PROBE_DATA_VERSION,
    TokenCounter,
    as_dataset,
    check_max_length,
    doc_rng,
    meta_int,
    meta_length,
    tokenizer_for,
)

__all__ = [
    "PASSKEY_CANDIDATES",
    "PASSKEY_DEPTHS",
    "PASSKEY_FILLER",
    "PASSKEY_GEN_TOKENS",
    "PASSKEY_INTRO",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "depth_label",
    "parse_depths",
    "passkey_dataset",
    "passkey_docs",
    "passkey_gen_results",
    "passkey_mc_results",
]

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


def parse_depths(value) -> list[float]:
    """Depths in [0, 1], distinct, from ``"0,0.5,1"`` or a sequence of numbers."""
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
    count = TokenCounter(tokenizer)
    if not 2 <= num_candidates <= 1000:
        raise MambaEvalError(f"num_candidates={num_candidates}: expected 2 to 1000")
    units = [count(s) for s in PASSKEY_FILLER]
    docs = []
    for depth in parse_depths(depths):
        for i in range(samples_per_depth):
            rng = doc_rng("passkey", seed, context_length, depth_label(depth), i)
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
    length = meta_length(meta)
    tokenizer = tokenizer_for(meta)
    docs = passkey_docs(
        tokenizer, length,
        depths=meta.get("depths", PASSKEY_DEPTHS),
        samples_per_depth=meta_int(meta, "samples_per_depth", 10),
        num_candidates=meta_int(meta, "num_candidates", PASSKEY_CANDIDATES, minimum=2),
        seed=meta_int(meta, "seed", DEFAULT_SEED, minimum=0),
    )
    count = TokenCounter(tokenizer)
    longest_choice = max(count(" " + c) for d in docs for c in d["choices"])
    gen_tokens = meta_int(meta, "gen_tokens", PASSKEY_GEN_TOKENS)
    needed = max(d["context_tokens"] for d in docs) + max(longest_choice, gen_tokens)
    check_max_length(meta, needed, f"passkey (context_length={length})")
    return as_dataset(docs)


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
