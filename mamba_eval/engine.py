"""The request engine: turns tokenised lm-eval requests into scores.

``score_continuations`` answers ``loglikelihood`` (one ``(logprob, is_greedy)`` per
``(context, continuation)`` pair); ``loglikelihood_rolling`` is built on it by the adapter,
with lm-eval's own window logic. The engine knows tokens and the model interface of
``mamba_eval.model`` and nothing of lm-eval's request objects or of checkpoint formats.

Numerics, as lm-eval's HF wrappers: the input is ``(context + continuation)`` truncated from
the left to ``max_length + 1`` tokens, minus its last token; the continuation is scored from the
logits at its own positions with an fp32 log-softmax over every row of the (padded) vocabulary.
Padding goes on the right, where a causal recurrence cannot see it, and padded positions are
never scored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

# A (context tokens, continuation tokens) pair, as lm-eval's TemplateLM produces them.
TokenPair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class _Item:
    index: int  # position in the caller's list
    tokens: list[int]  # model input: (ctx + cont)[-(max_length + 1):][:-1]
    targets: list[int]  # continuation tokens (the last len(targets) inputs predict them)


def _prepare(requests: Sequence[TokenPair], max_length: int) -> list[_Item]:
    items = []
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError(f"request {i}: empty context (lm-eval supplies a prefix token)")
        if len(cont) == 0:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_length:
            raise ValueError(
                f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}"
            )
        whole = list(ctx) + list(cont)
        items.append(_Item(i, whole[-(max_length + 1):][:-1], list(cont)))
    return items


def batches_by_size(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """Longest first (any out-of-memory error happens at once), ties broken by tokens and index
    so that the order, and with it every batch, is a function of the requests alone."""
    order = sorted(items, key=lambda it: (-len(it.tokens), it.tokens, it.index))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def _score_batch(model, batch: list[_Item], device: torch.device, pad_id: int):
    length = max(len(it.tokens) for it in batch)
    inp = torch.full((len(batch), length), pad_id, dtype=torch.long)
    for row, it in enumerate(batch):
        inp[row, :len(it.tokens)] = torch.tensor(it.tokens, dtype=torch.long)
    hidden, _ = model.backbone_forward(inp.to(device))
    # Only the rows that predict continuation tokens go through the LM head.
    rows, cols, targets = [], [], []
    for row, it in enumerate(batch):
        n, end = len(it.targets), len(it.tokens)
        rows += [row] * n
        cols += range(end - n, end)
        targets += it.targets
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    logprobs = torch.log_softmax(model.lm_logits(hidden[rows_t, cols_t]).float(), dim=-1)
    targets_t = torch.tensor(targets, device=device)
    picked = logprobs.gather(1, targets_t[:, None])[:, 0].double().cpu()
    greedy = (logprobs.argmax(dim=-1) == targets_t).cpu()
    out, start = [], 0
    for it in batch:
        n = len(it.targets)
        out.append((float(picked[start:start + n].sum()), bool(greedy[start:start + n].all())))
        start += n
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def auto_batch_size(model, max_len: int, device: torch.device, max_batch_size: int) -> int:
    """Largest batch that fits a quarter of the free device memory, estimated from the
    activations of one layer at a time (the model is evaluated layer by layer, so only one
    layer's temporaries are alive at once), capped by ``max_batch_size``."""
    if device.type != "cuda":
        return max(1, min(max_batch_size, 64))
    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    # fp32 residual + hidden + in_proj output + scan temporaries, per token, bytes.
    per_token = 4 * (3 * cfg.d_model + 4 * cfg.d_in_proj + 2 * cfg.d_inner)
    fit = int(free * 0.25 // max(1, per_token * max_len))
    return max(1, min(max_batch_size, fit))


def score_continuations(
    model,
    requests: Sequence[TokenPair],
    *,
    max_length: int,
    batch_size: int | str,
    max_batch_size: int = 64,
    device: torch.device,
    pad_id: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, and whether greedy decoding
    would have produced it; results in the order of ``requests``."""
    items = _prepare(requests, max_length)
    if not items:
        return []
    if batch_size == "auto":
        size = auto_batch_size(model, max(len(it.tokens) for it in items), device, max_batch_size)
    else:
        size = int(batch_size)
    results: list[tuple[float, bool] | None] = [None] * len(items)
    pending = batches_by_size(items, size)
    while pending:
        batch = pending.pop(0)
        try:
            scored = _score_batch(model, batch, device, pad_id)
        except RuntimeError as err:  # out of memory: halve the batch and carry on
            if not _is_oom(err) or len(batch) == 1:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = math.ceil(len(batch) / 2)
            log.warning("out of memory at batch size %d; retrying with %d", len(batch), half)
            pending[:0] = [batch[:half], batch[half:]]
            continue
        for it, res in zip(batch, scored):
            results[it.index] = res
        if on_progress is not None:
            on_progress(len(batch))
    return results  # type: ignore[return-value]
