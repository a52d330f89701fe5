"""The scoring engine's machinery: a memory model and token budget, the token store, scores kept
on the device, and the executor that runs padded batches with out-of-memory recovery.

``mamba_eval.harness.engine`` decides *what* runs (which pairs share a context, in which order);
this module runs it. See that module's docstring for the rules (budget, batch invariance, long
sequences, little host work per forward).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from mamba_eval.errors import MambaEvalError
from mamba_eval.models.rows import DEFAULT_CHUNK as DEFAULT_CONTEXT_CHUNK
from mamba_eval.models.rows import padded_shape, ranges

log = logging.getLogger(__name__)

# Progress callback: (requests finished, tokens run through the model) since the last call.
ProgressFn = Callable[[int, int], None]

#: Share of the free memory that ``batch_size=auto`` gives to one forward.
AUTO_MEMORY_FRACTION = 0.25
#: A batch is cut in two where that saves more padded positions than a forward costs
#: (:meth:`Executor.pack`): the cost of a position is estimated as the model's FLOPs per token
#: at ``ASSUMED_FLOPS`` (about half an H200's bf16 peak), the cost of a forward as
#: ``FORWARD_OVERHEAD_S`` of host work (the engine's bookkeeping and some 10 kernel launches
#: per layer). Both are assumptions, not measurements. For mamba-130m a cut would have to save
#: more positions than a forward holds, so its batches are never cut.
ASSUMED_FLOPS = 4e14
FORWARD_OVERHEAD_S = 0.015


@dataclass
class EngineStats:
    """Counters of one engine call (for progress reports, benchmarks and tests)."""

    requests: int = 0  # requests (pairs or documents) asked for
    unique: int = 0  # distinct ones computed
    shared_contexts: int = 0  # contexts run once for several continuations
    shared_requests: int = 0  # requests that read a shared context
    forward_calls: int = 0
    tokens: int = 0  # tokens run through the model, padding excluded
    padded_tokens: int = 0  # positions run through the model, padding and filler rows included
    fork_tokens: int = 0  # of ``tokens``: those of forwards from forked context states (continuations)
    fork_padded_tokens: int = 0  # of ``padded_tokens``: the positions of those forwards
    budget: int = 0  # the token budget at the end (smaller than at the start after an OOM)
    ooms: int = 0  # out-of-memory errors recovered from
    max_rows: int = 0  # the largest forward, rows x length
    max_length: int = 0
    max_logit_rows: int = 0  # the largest LM-head product, in rows


# ---------------------------------------------------------------------------------------------
# Memory model and budget


@dataclass(frozen=True)
class CostModel:
    """Rough memory of a forward, per token, to turn memory into a token budget.

    The model runs layer by layer, so one layer's temporaries are alive at a time, next to the
    residual stream. A recurrent state is kept for every layer at once; ``state_tokens`` expresses
    its size in tokens of ``token_bytes``.
    """

    token_bytes: int  # activation bytes per token
    state_tokens: int  # one sequence's state (all layers), in tokens
    logit_row_bytes: int  # one row of fp32 logits with its log-softmax and temporaries
    kv_bytes: int = 0  # attention layers' key/value cache per position of a sequence (hybrids)

    def state_tokens_at(self, length: int) -> int:
        """One sequence's state after ``length`` positions, in tokens: the recurrent part, plus
        the key/value caches of attention layers, which grow with the sequence."""
        return self.state_tokens + math.ceil(length * self.kv_bytes / self.token_bytes)

    @classmethod
    def of(cls, model) -> CostModel:
        hints = model.cost
        return cls(
            token_bytes=hints.token_bytes,
            state_tokens=max(1, math.ceil(hints.state_bytes / hints.token_bytes)),
            logit_row_bytes=hints.logit_row_bytes,
            kv_bytes=hints.kv_bytes,
        )


def split_positions(model) -> int:
    """Padded positions a cut must save to pay for the extra forward (:data:`ASSUMED_FLOPS`,
    :data:`FORWARD_OVERHEAD_S`): the forward's overhead over the cost of one position."""
    return max(1, int(FORWARD_OVERHEAD_S * ASSUMED_FLOPS / max(model.cost.flops_per_token, 1)))


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def token_budget(
    model, batch_size: int | str, longest: int, device: torch.device, max_batch_size: int | None = None
) -> int:
    """Tokens one forward may hold: ``batch_size`` rows of the longest request, or for ``"auto"``
    :data:`AUTO_MEMORY_FRACTION` of the free memory (capped at ``max_batch_size`` rows of the
    longest request when that is given). Never less than one longest request."""
    longest = max(1, int(longest))
    if batch_size == "auto":
        budget = int(_free_memory(device) * AUTO_MEMORY_FRACTION // CostModel.of(model).token_bytes)
        if max_batch_size:
            budget = min(budget, int(max_batch_size) * longest)
        return max(longest, budget)
    size = int(batch_size)
    if size < 1:
        raise MambaEvalError(f"batch_size must be at least 1, got {batch_size!r}")
    return size * longest


class TokenStore:
    """The token sequences of one engine call, end to end in one int64 array: sequence ``i`` is
    ``tokens[starts[i] : starts[i] + lengths[i]]``. Padded rows, picks and targets of a forward
    are cut from it with a few array operations (no per-token Python)."""

    def __init__(self, seqs: Sequence[Sequence[int]]):
        self.lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        self.starts = np.zeros(len(seqs), np.int64)
        np.cumsum(self.lengths[:-1], out=self.starts[1:])
        self.tokens = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(self.lengths.sum()))


class Scores:
    """Scores kept on the device as batches produce them and read once at the end, so that the
    host never waits for the GPU between batches (it prepares the next batch meanwhile)."""

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self.greedy: list[torch.Tensor] = []
        self.size = 0

    def add(self, values: torch.Tensor, greedy: torch.Tensor) -> int:
        """Store one batch's scores; returns the index of its first."""
        start = self.size
        self.values.append(values)
        self.greedy.append(greedy)
        self.size += values.shape[0]
        return start

    def fetch(self) -> tuple[np.ndarray, np.ndarray]:
        """Every score on the host (float32 log-probabilities, bool is-greedy): the one wait for
        the device."""
        if not self.values:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return torch.cat(self.values).cpu().numpy(), torch.cat(self.greedy).cpu().numpy()


#: A result's scores: ranges ``(start, count)`` of a :class:`Scores`.
Ranges = list[tuple[int, int]]


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off inside the block or decorated function (restored
    after it; nesting allowed).

    Scoring builds hundreds of thousands of short-lived lists (token ids, rows, picks) and no
    reference cycles; with the collector on, those allocations trigger collections that walk
    every object of the process (lm-eval's task index, datasets, ...): a quarter to a third of
    the host time of a HellaSwag run. Objects without cycles are freed by reference counting
    as usual; cycles made meanwhile wait for the next collection after the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# The executor: padded forwards, chunked LM head, budget with out-of-memory recovery


class Executor:
    """Runs batches of rows cut from a :class:`TokenStore`. A batch is given as index arrays:
    row ``r`` is ``store.tokens[starts[r] : starts[r] + lengths[r]]``, and the positions to keep
    are columns ``pick_first[r] .. pick_first[r] + pick_count[r] - 1`` of row ``r``. Each forward
    makes one host-to-device copy (rows, picks, state owners and the caller's targets packed
    together), and nothing in it waits for the device."""

    def __init__(self, model, device: torch.device, pad_id: int, budget: int, stats: EngineStats,
                 on_progress: ProgressFn | None, store: TokenStore, context_chunk: int = DEFAULT_CONTEXT_CHUNK):
        if context_chunk < 1:
            raise MambaEvalError(f"context_chunk must be at least 1, got {context_chunk}")
        self.context_chunk = int(context_chunk)
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.budget = budget
        self.stats = stats
        self.on_progress = on_progress
        self.store = store
        self.cost = CostModel.of(model)
        # batch invariance (mamba_eval.models.invariance): filler rows and aligned shapes on the CPU
        self.min_rows = model.invariance.min_rows()
        self.align = model.invariance.alignment()
        self.scores = Scores()
        stats.budget = budget
        self.split_positions = split_positions(model)

    # -- budget ------------------------------------------------------------------------------
    def pack(self, lengths: np.ndarray, start: int, extra: int, same_length: bool = False) -> int:
        """End of the batch that starts at item ``start`` (``lengths`` non-increasing): as many
        items as fit ``rows x (longest + extra) <= budget``, at least one; with ``same_length``,
        only items as long as the first. Otherwise the batch ends early at the item ``j`` where
        that saves the most padding, if it saves at least ``split_positions`` positions: items
        ``j ..`` then pad to ``lengths[j]`` instead of the first's length."""
        first = int(lengths[start])
        end = min(len(lengths), start + max(1, self.budget // (first + extra)))
        if same_length:
            return start + int(np.searchsorted(-lengths[start:end], -first, side="right"))
        if end - start > 1 and self.split_positions:
            # saved[k] for a cut before item start + 1 + k: the items from there on, each padded
            # to that item's length instead of the first's
            tail = lengths[start + 1:end]
            saved = (first - tail) * (end - start - 1 - np.arange(len(tail)))
            k = int(np.argmax(saved))
            if saved[k] >= self.split_positions:
                return start + 1 + k
        return end

    def drain(self, lengths: np.ndarray, extra: int, process: Callable[[int, int], None],
              same_length: bool = False) -> None:
        """Run ``process(i, j)`` over items ``0 .. len(lengths) - 1`` (their lengths, longest first)
        cut into batches ``[i, j)`` by the budget; an out-of-memory error halves the budget and
        cuts the rest again (a batch of one item is retried while the LM-head chunks can still
        shrink). ``process`` must be safe to repeat."""
        i = 0
        while i < len(lengths):
            j = self.pack(lengths, i, extra, same_length)
            try:
                process(i, j)
            except RuntimeError as err:
                if not is_oom(err) or (j - i == 1 and self.logit_chunk() <= self.min_rows):
                    raise
                failed = True
            else:
                failed = False
            if failed:  # outside the except clause, so the failed batch's tensors are freed first
                self._shrink((j - i) * (int(lengths[i]) + extra), j - i)
                continue
            i = j

    def _shrink(self, cost: int, rows: int) -> None:
        old = self.budget
        self.budget = max(1, min(self.budget, cost) // 2)
        self.stats.ooms += 1
        self.stats.budget = self.budget
        gc.collect()  # tensors held by reference cycles of the failed batch (the collector may be paused)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory with %d rows (%d tokens); token budget %d -> %d", rows, cost, old, self.budget)

    # -- model calls ---------------------------------------------------------------------------
    def _rows(self, starts: np.ndarray, lengths: np.ndarray, lo: int, width: int, total: int) -> np.ndarray:
        """[total, width] token ids: columns ``lo .. lo + width - 1`` of each row, padding after
        a row's end and in the filler rows past ``len(starts)``."""
        ids = np.full((total, width), self.pad_id, np.int64)
        cols = np.arange(lo, lo + width, dtype=np.int64)
        real = cols < lengths[:, None]
        ids[:len(starts)][real] = self.store.tokens[(starts[:, None] + cols)[real]]
        return ids

    def forward(self, starts: np.ndarray, lengths: np.ndarray, pick_first: np.ndarray, pick_count: np.ndarray,
                state=None, owners: np.ndarray | None = None, return_state: bool = False,
                extra: Sequence[np.ndarray] = (), ragged: bool = False):
        """Right-padded forward of the rows (class docstring) through ``model.run_rows``; returns
        the hidden states at the picked positions ([P, D], row by row), the final state with
        ``return_state`` (else None), and the int64 host arrays ``extra`` as device tensors
        (copied with the rows). ``state``, if given, is forked per row: row ``r`` starts from
        ``state`` row ``owners[r]``. Filler rows and columns of padding make up the shape of
        :func:`~mamba_eval.models.rows.forward_shape`; the final state includes them and is
        meaningful for the rows as long as the longest, except with ``ragged`` (rows that
        ``can_share_padded_pass``): then the row lengths go to the model and the final state of
        every row is its state after its own last token, padding columns or not.

        Rows longer than ``context_chunk`` tokens run in chunks of that many positions, all
        ``context_chunk`` wide (the last padded on the right), so a position's computation does
        not depend on the batch's longest row; except where the final state is returned: that
        needs the exact last chunk (those rows have equal lengths). Every chunk's rows x width
        meets the shape rules: the full ones and the last.
        """
        n = len(starts)
        longest = int(lengths.max())
        ragged = ragged and return_state
        if ragged and longest > self.context_chunk:
            raise AssertionError("ragged rows longer than context_chunk")  # callers keep those apart
        keep = (np.repeat(np.arange(n, dtype=np.int64), pick_count), ranges(pick_first, pick_count))
        row_lengths = None
        step = self.context_chunk
        if longest <= step:  # one pass (padding columns may make it wider than a chunk)
            total, width = padded_shape(n, longest, step, self.min_rows, self.align,
                                        fixed_length=return_state and not ragged)
            ids, step = self._rows(starts, lengths, 0, width, total), max(step, width)
            if ragged:  # the filler rows count as full rows (their state is never read)
                row_lengths = np.concatenate([lengths, np.full(total - n, width, np.int64)])
        else:  # chunks, all a whole chunk wide unless the final state is wanted
            width = longest if return_state else -(-longest // step) * step
            total, width = padded_shape(n, width, step, self.min_rows, self.align, fixed_length=True)

            def ids(lo: int, hi: int) -> np.ndarray:
                return self._rows(starts, lengths, lo, hi - lo, total)

        forks = self._forks(owners, total) if state is not None else None
        out = self.model.run_rows(ids, width=width, keep=keep, state=state, owners=forks, lengths=row_lengths,
                                  return_state=return_state, chunk=step, extra=extra)
        for k, w in enumerate(out.widths):
            self._count(int(lengths.sum()) if k == 0 else 0, total, w, forked=state is not None)
        return out.hidden, out.state, out.extra

    @staticmethod
    def _forks(owners: np.ndarray, total: int) -> np.ndarray:
        """The state row each of ``total`` rows starts from: its owner; filler rows the first's."""
        return np.concatenate([owners, np.full(total - len(owners), owners[0], np.int64)])

    def _count(self, tokens: int, total_rows: int, length: int, forked: bool = False) -> None:
        st = self.stats
        st.forward_calls += 1
        st.tokens += tokens
        st.padded_tokens += total_rows * length
        if forked:
            st.fork_tokens += tokens
            st.fork_padded_tokens += total_rows * length
        if total_rows * length > st.max_rows * max(st.max_length, 1):
            st.max_rows, st.max_length = total_rows, length

    def logit_chunk(self) -> int:
        """Rows per LM-head product: about the memory the budget allows for activations."""
        rows = self.budget * self.cost.token_bytes // self.cost.logit_row_bytes
        return max(self.min_rows, int(rows))

    def score_rows(self, hidden_rows: torch.Tensor, targets: torch.Tensor,
                   rows: tuple[np.ndarray, torch.Tensor] | None = None) -> int:
        """Log-probabilities of ``targets[i]`` (on the device) under the next-token distribution
        of ``hidden_rows[i]``, or with ``rows`` (the same index array on the host and on the
        device, non-decreasing) of ``hidden_rows[rows[i]]``; and whether each target is the
        argmax. The results stay on the device (:class:`Scores`); returns the index of the
        first, the others follow in order."""
        total = hidden_rows.shape[0]
        chunk = self.logit_chunk()
        values: list[torch.Tensor] = []
        greedy: list[torch.Tensor] = []
        lo = 0
        for start in range(0, total, chunk):
            h = hidden_rows[start:start + chunk]
            n = h.shape[0]
            if n < self.min_rows:
                h = torch.cat([h, h.new_zeros(self.min_rows - n, h.shape[1])])
            logprobs = torch.log_softmax(self.model.lm_logits(h).float(), dim=-1)
            self.stats.max_logit_rows = max(self.stats.max_logit_rows, h.shape[0])
            if rows is None:
                t = targets[start:start + n]
                logprobs = logprobs[:n]
                values.append(logprobs.gather(1, t.unsqueeze(1)).squeeze(1))
                greedy.append(logprobs.argmax(dim=-1) == t)
                continue
            hi = int(np.searchsorted(rows[0], start + n, side="left"))
            if hi == lo:
                continue
            r = rows[1][lo:hi] - start
            t = targets[lo:hi]
            values.append(logprobs[r, t])
            greedy.append(logprobs.argmax(dim=-1)[r] == t)
            lo = hi
        if not values:
            return self.scores.add(hidden_rows.new_zeros(0, dtype=torch.float32),
                                   torch.zeros(0, dtype=torch.bool, device=hidden_rows.device))
        if len(values) == 1:
            return self.scores.add(values[0], greedy[0])
        return self.scores.add(torch.cat(values), torch.cat(greedy))

    def progress(self, requests: int, tokens: int) -> None:
        if self.on_progress is not None and (requests or tokens):
            self.on_progress(requests, tokens)


# ---------------------------------------------------------------------------------------------
# loglikelihood


