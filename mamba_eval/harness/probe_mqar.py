"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"). Key-value pairs of
words, then, scattered in noise words, queries of the other keys each followed by its value,
and at the very end one more key, never queried before, whose value is the answer::

    pear 41 stone 77 lamp 12 ... the of and lamp 12 so the ... pear 41 as ... stone  ->  " 77"

Keys, values and noise words come from three disjoint word lists (:data:`KEY_WORDS`,
:data:`VALUE_WORDS`, :data:`NOISE_WORDS`), so a model can tell noise from content; Zoology
draws noise from the whole vocabulary instead. The scored key is the last token of the
context, about ``length`` tokens after its pair was stated. ``acc`` is lm-eval's greedy
accuracy (the value is the argmax of the next-token distribution over the whole vocabulary,
Zoology's metric); a model that only knows "some value seen earlier" scores about 1/pairs.
Lengths, determinism and the max_length check: :mod:`mamba_eval.harness.probe_common`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

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

__all__ = ["KEY_WORDS", "MQAR_PAIRS", "NOISE_WORDS", "VALUE_WORDS", "mqar_dataset", "mqar_docs", "mqar_words"]

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
#: The pair counts of the shipped MQAR tasks.
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
    count = TokenCounter(tokenizer)

    def cost(word: str, first: bool) -> int:
        return count(word) if first else count(" " + word)

    docs = []
    for i in range(num_samples):
        target = context_length
        for _ in range(4):  # re-count the assembled context; adjust if counts are not additive
            words, _answers = mqar_words(doc_rng("mqar", seed, context_length, pairs, i), pairs, target, cost)
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
    length = meta_length(meta)
    tokenizer = tokenizer_for(meta)
    docs = mqar_docs(
        tokenizer, length, pairs=meta_int(meta, "pairs", 8), num_samples=meta_int(meta, "num_samples", 100),
        seed=meta_int(meta, "seed", DEFAULT_SEED, minimum=0),
    )
    count = TokenCounter(tokenizer)
    needed = max(d["context_tokens"] + count(d["target"]) for d in docs)
    check_max_length(meta, needed, f"MQAR (context_length={length})")
    return as_dataset(docs)
