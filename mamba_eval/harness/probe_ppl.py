"""Perplexity by position. A long text (WikiText-2 test, ``wiki.test.raw`` rebuilt from the
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
by a token. The max_length check: :mod:`mamba_eval.harness.probe_common`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.probe_common import (
    PROBE_DATA_VERSION,
    as_dataset,
    check_max_length,
    length_name,
    meta_int,
    meta_length,
    tokenizer_for,
)
from mamba_eval.utils import DATA_DIR_ENV, data_dir_from_env

__all__ = [
    "bucket_name",
    "pair_tokens",
    "position_buckets",
    "ppl_docs",
    "ppl_position_dataset",
    "ppl_position_results",
    "read_text",
    "token_loss",
]

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
    """``(1024, 2048)`` -> ``"1k-2k"`` (used in metric names ``loss_<bucket>``)."""
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
    from mamba_eval.harness.offline import WIKITEXT2_TEST_RAW_MD5, rebuild_wikitext_raw

    folder = data_dir or data_dir_from_env()
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


def pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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
            ctx = pair_tokens(tokenizer, prefix, "x")[0]  # only the context side matters here
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
            ctx, cont = pair_tokens(tokenizer, context, continuation)
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
    length = meta_length(meta)
    text, _source = read_text(meta.get("text_file"), meta.get("data_dir"))
    tokenizer = tokenizer_for(meta)
    docs = ppl_docs(tokenizer, text, length, num_windows=meta_int(meta, "num_windows", 8))
    check_max_length(meta, max(d["bucket_end"] for d in docs), f"perplexity by position (window {length})")
    return as_dataset(docs)


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
