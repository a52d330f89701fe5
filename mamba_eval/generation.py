"""Cached autoregressive generation for ``generate_until``.

The recurrent state is the whole cache: a prompt is run once through ``backbone_forward``,
which returns each layer's conv window and SSM state, then ``model.step`` advances one token at
a time, updating those states in place. Prompts of different lengths are never padded into one
recurrence: they are grouped into buckets of equal length, so no padding token ever passes
through a scan. Each sequence stops on EOS, on any stop string, or at ``max_new_tokens``;
finished sequences leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """lm-eval's ``gen_kwargs`` that change which token is picked. ``temperature == 0`` or
    ``do_sample=False`` is greedy decoding."""

    do_sample: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Pick one token per row of ``logits`` [B, V] (fp32)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (keep at least one).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    done: bool = False


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
    is_stopped: Callable[[list[int]], bool] | None = None,
    batch_size: int = 16,
    device: torch.device,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    ``is_stopped(tokens)`` is asked after every new token (the generated tokens only) and ends
    that sequence when true; the stop string itself is trimmed by the caller. The EOS token is
    not included in the output. Results are in the order of ``prompts``.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (lm-eval supplies at least one token)")
    generator = None
    if not params.greedy and params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    seqs = [_Seq(i, list(p)) for i, p in enumerate(prompts)]
    buckets: dict[int, list[_Seq]] = {}
    for s in seqs:
        buckets.setdefault(len(s.prompt), []).append(s)
    for length in sorted(buckets, reverse=True):
        group = buckets[length]
        for start in range(0, len(group), batch_size):
            _generate_group(model, group[start:start + batch_size], max_new_tokens, params,
                            eos_id, is_stopped, generator, device)
    return [s.out for s in seqs]


def _generate_group(model, group, max_new_tokens, params, eos_id, is_stopped, generator, device):
    if max_new_tokens <= 0:
        return
    ids = torch.tensor([s.prompt for s in group], dtype=torch.long, device=device)
    hidden, state = model.backbone_forward(ids, return_state=True)
    logits = model.lm_logits(hidden[:, -1]).float()
    live = list(range(len(group)))  # rows of `state` still generating
    for _ in range(max_new_tokens):
        tokens = sample_next(logits, params, generator).tolist()
        keep = []
        for row, tok in zip(live, tokens):
            s = group[row]
            if eos_id is not None and tok == eos_id:
                s.done = True
                continue
            s.out.append(tok)
            if len(s.out) >= max_new_tokens or (is_stopped is not None and is_stopped(s.out)):
                s.done = True
            else:
                keep.append((row, tok))
        if not keep:
            return
        if len(keep) < len(live):  # drop finished rows from the recurrent state
            pos = {row: i for i, row in enumerate(live)}
            sel = torch.tensor([pos[row] for row, _ in keep], device=device)
            state = [layer.index_select(sel) for layer in state]
        live = [row for row, _ in keep]
        step_ids = torch.tensor([tok for _, tok in keep], dtype=torch.long, device=device)
        logits = model.step(step_ids, state).float()
