"""Prompts and the metric of ``mamba_gen_long`` (see the YAML beside this file).

The prompts are English-like requests of 60 to 140 words built from fixed word lists with a seeded
generator, so every run and every model gets the same requests without a data download.
"""

from __future__ import annotations

import random

_SUBJECTS = ["a lighthouse keeper", "an old river", "the last train of the night", "a small bakery",
             "a mountain village", "a forgotten library", "two rival chess players", "a winter storm",
             "a travelling musician", "an abandoned observatory", "a city garden", "a fishing boat"]
_ASKS = ["Write a long story about", "Describe in detail", "Tell the history of", "Write a letter from",
         "Explain what happens to", "Write a travel diary about"]
_WORDS = ("the of and a to in is was that for on with as by at from his her their it they this which "
          "time people year way day man world life hand part child eye woman place work week case point "
          "light water night house morning road window voice city field story wind bread stone music "
          "quiet early late slowly always never often together across under between around before after "
          "walked found carried opened remembered listened watched waited followed returned").split()


def prompts(**meta):
    """lm-eval ``custom_dataset``: ``num_prompts`` documents from ``seed``."""
    import datasets

    rng = random.Random(int(meta.get("seed", 1234)))
    docs = []
    for i in range(int(meta.get("num_prompts", 128))):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(60, 140))]
        sentences = [" ".join(words[j:j + 12]).capitalize() + "." for j in range(0, len(words), 12)]
        ask = f"{rng.choice(_ASKS)} {rng.choice(_SUBJECTS)}."
        docs.append({"id": i, "prompt": " ".join(sentences) + f"\n\n{ask}\n"})
    return {"test": datasets.Dataset.from_list(docs)}


def answer_length(doc, results):
    """``process_results``: the answer's length in characters (random-init weights answer nonsense;
    the benchmark is about time, and this shows every model answered at full length)."""
    return {"answer_chars": len(results[0])}
