"""The scoring engine: lm-eval's token-level requests, computed exactly and with little work.

Two entry points, both free of lm-eval's request objects and of checkpoint formats:

- :func:`score_continuations` answers ``loglikelihood``: one ``(logprob, is_greedy)`` per
  ``(context tokens, continuation tokens)`` pair, in the order given.
- :func:`score_documents` answers ``loglikelihood_rolling`` in its stateful form: the log-likelihood
  of whole documents, each token conditioned on everything before it, computed in chunks that carry
  the recurrent state (memory does not grow with the document).

Semantics (those of lm-eval's HF models): a pair's model input is ``(context + continuation)``
truncated from the left to ``max_length + 1`` tokens, minus its last token; the continuation is
scored from the hidden states at its own positions, with an fp32 log-softmax over every row of
the (padded) vocabulary. Padding goes on the right, where a causal recurrence cannot see it, and
padded positions are never scored.

How the work is cut:

1. *Identical pairs* are computed once.
2. *Shared contexts*: pairs with the same context tokens that need no truncation
   (``len(context) + len(continuation) <= max_length + 1``) run the context once, with
   ``return_state=True``. The hidden state at the context's last position predicts the first
   continuation token of every member; the final conv and SSM states are forked
   (``LayerState.index_select``) and each continuation runs only its own tokens but the last
   from the forked state. A pair that needs truncation, or a context with one continuation, runs
   as one sequence, as lm-eval does. Contexts of one pass have equal length: the final state of a
   right-padded row would include its padding.
3. *Logits only where needed*: the LM head and the log-softmax see only the rows that predict a
   scored token, in chunks whose size follows the budget.
4. *A token budget*: every forward holds at most ``budget`` token-equivalents, counting rows x
   padded length plus, for rows that carry a recurrent state, the state's size in tokens (a
   Mamba-2 state can weigh as much as a thousand tokens of activations). ``batch_size=N`` means
   N times the longest request; ``auto`` takes a share of the free memory. An out-of-memory error
   halves the budget and the work carries on.
5. *Batch invariance*: a request's score does not depend on which requests share its batch, so
   ``batch_size`` and the order of the requests do not change a single bit (on one device and
   dtype). The model's operators act on each sequence on its own, and a sequence's computation
   does not depend on the padding after it; what remains is how libraries cut a batch into
   pieces. On the CPU two things depend on the batch's total size and are fixed here:

   - Intel MKL's sgemm computes a row by another code path when a thread gets fewer than about
     4 rows (with 2 threads, products of 1-3, 5-7 and 9-11 rows give other last bits). Every
     product gets at least :func:`min_rows` rows.
   - PyTorch's element-wise kernels (softplus, for one) run 2 SIMD vectors at a time and finish
     each thread's share with a scalar tail that rounds differently; a thread's share is the
     tensor's size divided by the threads. So every forward holds a multiple of
     :func:`cpu_alignment` positions (64 per thread), which puts every share on a vector
     boundary for any per-token width.

   Filler rows of padding (and, where no state is returned, extra padding columns) make up the
   shapes. That costs compute, more with more threads (a context pass of odd length holds at
   least 64 x threads rows); ``batch_invariant=False`` turns it off. On CUDA nothing is filled:
   the element-wise kernels have no tails, and cuBLAS picks its algorithm per shape, which a
   floor would not make invariant; instead the model is built with the batch-invariant ops of
   ``mamba_eval.backend`` (kernels whose launch configuration ignores the batch, and a GEMM
   whose tiling ignores the row count), which ``--model mamba`` does when ``batch_invariant``.
6. *Long sequences*: a sequence longer than ``context_chunk`` tokens (default
   :data:`DEFAULT_CONTEXT_CHUNK`) runs in chunks of that many positions, at fixed offsets, that
   carry the recurrent state; only the hidden states at scored positions are kept. A context of
   a million tokens thus needs the memory of one chunk (long-context probes), and the budget
   counts a row at the chunk's length.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mamba_eval.errors import MambaEvalError

log = logging.getLogger(__name__)

# A (context tokens, continuation tokens) pair, as lm-eval's TemplateLM produces them.
TokenPair = tuple[Sequence[int], Sequence[int]]
# Progress callback: (requests finished, tokens run through the model) since the last call.
ProgressFn = Callable[[int, int], None]

#: Share of the free memory that ``batch_size=auto`` gives to one forward.
AUTO_MEMORY_FRACTION = 0.25
#: Sequences longer than this many tokens run in chunks of it that carry the recurrent state.
DEFAULT_CONTEXT_CHUNK = 16384


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
        cfg = model.config
        elem = torch.finfo(model.dtype).bits // 8
        # Residual stream and normed input in fp32; in_proj output, conv output, scan output and
        # gate in the model dtype, counted at fp32 width for the upcasts the operators make.
        token_bytes = 4 * (3 * cfg.d_model + 4 * cfg.d_in_proj + 2 * cfg.d_inner)
        if getattr(model.ops, "name", "") == "ref" and cfg.arch == "mamba2":
            token_bytes += 4 * 3 * cfg.nheads * cfg.chunk_size  # the chunked scan's decay/score blocks
        if cfg.arch == "mamba1":
            ssm = cfg.d_inner * cfg.d_state
        else:
            ssm = cfg.nheads * cfg.headdim * cfg.d_state
        n_attn = len(getattr(cfg, "attn_layer_idx", ()) or ())
        n_ssm = cfg.n_layer - n_attn
        state_bytes = n_ssm * (cfg.conv_dim * (cfg.d_conv - 1) * elem + 4 * ssm)
        kv_bytes = 0
        if n_attn:
            attn = cfg.attn
            kv_bytes = n_attn * 2 * attn.num_heads_kv * attn.head_dim * elem
            state_bytes += n_attn * attn.qkv_dim * max(attn.d_conv - 1, 0) * elem
            token_bytes += kv_bytes  # a forward's own keys and values
        return cls(
            token_bytes=token_bytes,
            state_tokens=max(1, math.ceil(state_bytes / token_bytes)),
            logit_row_bytes=3 * 4 * cfg.vocab_size,
            kv_bytes=kv_bytes,
        )


def min_rows(device: torch.device) -> int:
    """The fewest rows a matrix product is given on ``device``, so that a row's result does not
    depend on how many rows share the product (module docstring, point 5): on the CPU 8 per
    thread (MKL's small-row path stops below about 4 per thread), on CUDA 1."""
    if device.type == "cpu":
        return max(16, 8 * torch.get_num_threads())
    return 1


def cpu_alignment(device: torch.device) -> int:
    """Token positions (rows x length) of every forward are a multiple of this (module
    docstring, point 5). On the CPU, 64 per intra-op thread: a tensor of ``positions x width``
    elements then splits into thread shares that are whole multiples of 64 elements, the
    widest pair of SIMD vectors PyTorch's element-wise loops use (AVX-512, 16-bit types) — for
    every thread count that divides the number of threads. On CUDA, 1."""
    if device.type == "cpu":
        return 64 * torch.get_num_threads()
    return 1


def forward_shape(n: int, length: int, min_rows_: int, align: int, fixed_length: bool) -> tuple[int, int]:
    """(rows, length) of the padded forward for ``n`` rows of up to ``length`` tokens: at least
    ``min_rows_ / length`` rows, and ``rows x length`` a multiple of ``align``; the least
    positions of those, with the length fixed when ``fixed_length`` (a returned state must be
    the state after the last real token), else possibly grown by padding columns."""
    best = None
    for cols in [length] if fixed_length or align == 1 else range(length, length + align):
        step = align // math.gcd(cols, align)
        rows = max(n, -(-min_rows_ // cols))
        rows = -(-rows // step) * step
        if best is None or rows * cols < best[0] * best[1]:
            best = (rows, cols)
    return best


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


def _upload(data: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of ``data`` on ``device``, copied without making the host wait for the GPU.
    A non-blocking copy from pageable memory returns once the driver has staged the bytes, with
    no stream synchronisation (a blocking one waits for all queued work; pinning each small
    tensor first costs more than it saves)."""
    t = torch.tensor(data, dtype=torch.long)
    if device.type == "cpu":
        return t
    return t.to(device, non_blocking=True)


class _Scores:
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

    def fetch(self) -> tuple[list[float], list[bool]]:
        if not self.values:
            return [], []
        return torch.cat(self.values).tolist(), torch.cat(self.greedy).tolist()


#: A result's scores: ranges ``(start, count)`` of a :class:`_Scores`.
Ranges = list[tuple[int, int]]


def _gather(scores: tuple[list[float], list[bool]], ranges: Ranges) -> tuple[float, bool]:
    values, greedy = scores
    total = math.fsum(v for a, n in ranges for v in values[a:a + n])
    return total, all(g for a, n in ranges for g in greedy[a:a + n])


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


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# The executor: padded forwards, chunked LM head, budget with out-of-memory recovery


class _Executor:
    def __init__(self, model, device: torch.device, pad_id: int, budget: int, stats: EngineStats,
                 on_progress: ProgressFn | None, batch_invariant: bool = True,
                 context_chunk: int = DEFAULT_CONTEXT_CHUNK):
        if context_chunk < 1:
            raise MambaEvalError(f"context_chunk must be at least 1, got {context_chunk}")
        self.context_chunk = int(context_chunk)
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.budget = budget
        self.stats = stats
        self.on_progress = on_progress
        self.cost = CostModel.of(model)
        self.min_rows = min_rows(device) if batch_invariant else 1
        self.align = cpu_alignment(device) if batch_invariant else 1
        self.scores = _Scores()
        stats.budget = budget

    # -- budget ------------------------------------------------------------------------------
    def pack(self, items: list, start: int, length_of: Callable, extra: int, same_length: bool = False) -> int:
        """End of the batch that starts at ``items[start]`` (items sorted by length, longest
        first): as many items as fit ``rows x (longest + extra) <= budget``, at least one."""
        first = length_of(items[start])
        rows_fit = max(1, self.budget // (first + extra))
        end = min(len(items), start + rows_fit)
        if same_length:
            stop = start + 1
            while stop < end and length_of(items[stop]) == first:
                stop += 1
            end = stop
        return end

    def drain(self, items: list, length_of: Callable, extra: int, process: Callable,
              same_length: bool = False) -> None:
        """Run ``process(batch)`` over ``items`` cut into batches by the budget; an out-of-memory
        error halves the budget and cuts the rest again (a batch of one item is retried while
        the LM-head chunks can still shrink). ``process`` must be safe to repeat."""
        i = 0
        while i < len(items):
            j = self.pack(items, i, length_of, extra, same_length)
            try:
                process(items[i:j])
            except RuntimeError as err:
                if not _is_oom(err) or (j - i == 1 and self.logit_chunk() <= self.min_rows):
                    raise
                failed = True
            else:
                failed = False
            if failed:  # outside the except clause, so the failed batch's tensors are freed first
                self._shrink((j - i) * (length_of(items[i]) + extra), j - i)
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
    def forward(self, rows: list[list[int]], pick_rows: list[int], pick_cols: list[int], state=None,
                owners: list[int] | None = None, return_state: bool = False):
        """Right-padded forward of ``rows``; returns the hidden states at the positions
        ``(pick_rows[i], pick_cols[i])`` ([P, D], in that order) and, with ``return_state``, the
        final state. ``state``, if given, is forked per row: row ``r`` starts from ``state`` row
        ``owners[r]``. Filler rows and columns of padding make up the shape of
        :func:`forward_shape`; the final state includes them and is meaningful for the rows as
        long as the longest.

        Rows longer than ``context_chunk`` tokens run in chunks of that many positions (at fixed
        offsets 0, C, 2C, ...) that carry the recurrent state, keeping only the picked positions:
        memory does not grow with the sequence (a million-token context runs like a short one).
        """
        n = len(rows)
        longest = max(len(r) for r in rows)
        chunked = longest > self.context_chunk
        if chunked:  # every chunk's rows x width must meet the shape rules: the full ones and the last
            # Chunks are all context_chunk wide (the last padded on the right), so a position's
            # computation does not depend on the batch's longest row; except where the final state
            # is returned: that needs the exact last chunk (those rows have equal lengths).
            step = self.context_chunk
            last = longest - (longest - 1) // step * step if return_state else step
            total = max(forward_shape(n, step, self.min_rows, self.align, True)[0],
                        forward_shape(n, last, self.min_rows, self.align, True)[0])
            unit = math.lcm(self.align // math.gcd(step, self.align), self.align // math.gcd(last, self.align))
            total, length = -(-total // unit) * unit, longest
        else:
            total, length = forward_shape(n, longest, self.min_rows, self.align, fixed_length=return_state)
        fill = total - n
        pad = self.pad_id
        if state is not None:
            idx = _upload(list(owners) + [owners[0]] * fill, self.device)
            state = [layer.index_select(idx) for layer in state]
        st = self.stats
        if not chunked:
            padded = [r + [pad] * (length - len(r)) for r in rows] + [[pad] * length] * fill
            hidden, final = self.model.backbone_forward(_upload(padded, self.device), state=state,
                                                        return_state=return_state)
            picked = self.pick(hidden, pick_rows, pick_cols)
            del hidden
            self._count(rows, n + fill, length)
            return picked, final
        width = self.model.config.d_model
        picked = torch.empty(len(pick_rows), width, dtype=self.model.dtype, device=self.device)
        cols_t = torch.tensor(pick_cols, dtype=torch.long)
        rows_t = torch.tensor(pick_rows, dtype=torch.long)
        step = self.context_chunk
        for lo in range(0, length, step):
            hi = min(length, lo + step) if return_state else lo + step
            block = [r[lo:hi] + [pad] * (hi - lo - len(r[lo:hi])) for r in rows] + [[pad] * (hi - lo)] * fill
            last = hi >= length
            hidden, state = self.model.backbone_forward(_upload(block, self.device), state=state,
                                                        return_state=return_state or not last)
            sel = ((cols_t >= lo) & (cols_t < hi)).nonzero().flatten()
            if sel.numel():
                got = self.pick(hidden, rows_t[sel].tolist(), (cols_t[sel] - lo).tolist())
                picked.index_copy_(0, sel.to(self.device, non_blocking=True), got)
            del hidden
            self._count(rows if lo == 0 else [], n + fill, hi - lo)
        return picked, (state if return_state else None)

    def _count(self, rows, total_rows: int, length: int) -> None:
        st = self.stats
        st.forward_calls += 1
        st.tokens += sum(len(r) for r in rows)
        st.padded_tokens += total_rows * length
        if total_rows * length > st.max_rows * max(st.max_length, 1):
            st.max_rows, st.max_length = total_rows, length

    def logit_chunk(self) -> int:
        """Rows per LM-head product: about the memory the budget allows for activations."""
        rows = self.budget * self.cost.token_bytes // self.cost.logit_row_bytes
        return max(self.min_rows, int(rows))

    def pick(self, hidden: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
        """``hidden[rows[i], cols[i]]`` for every i: the rows that predict scored tokens."""
        return hidden[_upload(rows, hidden.device), _upload(cols, hidden.device)]

    def score_rows(self, hidden_rows: torch.Tensor, picks_row: list[int], picks_target: list[int]) -> int:
        """Log-probabilities of ``picks_target[i]`` under the next-token distribution of
        ``hidden_rows[picks_row[i]]`` (``picks_row`` non-decreasing), and whether each target is
        the argmax. The results stay on the device (:class:`_Scores`); returns the index of the
        first, the others follow in the order of the picks."""
        total = hidden_rows.shape[0]
        chunk = self.logit_chunk()
        rows_t = _upload(picks_row, self.device)
        targets_t = _upload(picks_target, self.device)
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
            hi = bisect.bisect_left(picks_row, start + n, lo)
            if hi == lo:
                continue
            r = rows_t[lo:hi] - start
            t = targets_t[lo:hi]
            values.append(logprobs[r, t])
            greedy.append(logprobs.argmax(dim=-1)[r] == t)
            lo = hi
        if not values:
            return self.scores.add(hidden_rows.new_zeros(0, dtype=torch.float32),
                                   torch.zeros(0, dtype=torch.bool, device=hidden_rows.device))
        return self.scores.add(torch.cat(values), torch.cat(greedy))

    def progress(self, requests: int, tokens: int) -> None:
        if self.on_progress is not None and (requests or tokens):
            self.on_progress(requests, tokens)


# ---------------------------------------------------------------------------------------------
# loglikelihood


@dataclass(frozen=True)
class _Whole:
    """A pair run as one sequence: ``tokens`` = (ctx + cont)[-(max_length + 1):][:-1]."""

    uid: int
    tokens: list[int]
    targets: list[int]


@dataclass(frozen=True)
class _Group:
    """A context shared by several continuations (``members``: (uid, continuation tokens))."""

    context: list[int]
    members: tuple[tuple[int, list[int]], ...]


def _check_pair(i: int, ctx: Sequence[int], cont: Sequence[int], max_length: int) -> None:
    if len(ctx) == 0:
        raise MambaEvalError(f"request {i}: empty context (lm-eval supplies a prefix token)")
    if len(cont) == 0:
        raise MambaEvalError(f"request {i}: empty continuation")
    if len(cont) > max_length:
        raise MambaEvalError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")


def plan_pairs(
    pairs: Sequence[tuple[list[int], list[int]]], max_length: int, share_context: bool
) -> tuple[list[_Whole], list[_Group]]:
    """Split distinct pairs (uid = position in ``pairs``) into single sequences and shared-context
    groups, each list in a fixed order that depends on the pairs alone (longest first)."""
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    wholes: list[_Whole] = []
    for uid, (ctx, cont) in enumerate(pairs):
        if share_context and len(ctx) + len(cont) <= max_length + 1:
            by_context[tuple(ctx)].append(uid)
        else:
            whole = (ctx + cont)[-(max_length + 1):][:-1]
            wholes.append(_Whole(uid, whole, cont))
    groups: list[_Group] = []
    for ctx, uids in by_context.items():
        if len(uids) == 1:
            ctx_l, cont = pairs[uids[0]]
            wholes.append(_Whole(uids[0], ctx_l + cont[:-1], cont))
        else:
            members = sorted(((u, pairs[u][1]) for u in uids), key=lambda m: (-len(m[1]), m[1]))
            groups.append(_Group(list(ctx), tuple(members)))
    wholes.sort(key=lambda w: (-len(w.tokens), w.tokens, w.targets))
    groups.sort(key=lambda g: (-len(g.context), g.context))
    return wholes, groups


class _PairScorer:
    def __init__(self, ex: _Executor, pairs, weights: list[int]):
        self.ex = ex
        self.pairs = pairs
        self.weights = weights  # how many requests each distinct pair answers
        self.ranges: list[Ranges | None] = [None] * len(pairs)  # where each pair's scores are

    def _commit(self, uid: int, ranges: Ranges) -> int:
        """Record where a result's scores are; returns how many requests it newly answers (0 when
        a batch is repeated after an out-of-memory error)."""
        new = self.ranges[uid] is None
        self.ranges[uid] = ranges
        return self.weights[uid] if new else 0

    def results(self) -> list[tuple[float, bool]]:
        scores = self.ex.scores.fetch()  # the one wait for the GPU
        return [_gather(scores, r) for r in self.ranges]  # type: ignore[arg-type]

    # -- pairs run as one sequence -----------------------------------------------------------
    def run_wholes(self, wholes: list[_Whole]) -> None:
        self.ex.drain(wholes, lambda w: len(w.tokens), 0, self._whole_batch)

    def _whole_batch(self, batch: list[_Whole]) -> None:
        rows, cols, targets = [], [], []
        for row, w in enumerate(batch):
            n, end = len(w.targets), len(w.tokens)
            rows += [row] * n
            cols += range(end - n, end)
            targets += w.targets
        picked, _ = self.ex.forward([w.tokens for w in batch], rows, cols)
        at = self.ex.score_rows(picked, list(range(len(targets))), targets)
        answered = 0
        for w in batch:
            n = len(w.targets)
            answered += self._commit(w.uid, [(at, n)])
            at += n
        self.ex.progress(answered, sum(len(w.tokens) for w in batch))

    # -- shared contexts -----------------------------------------------------------------------
    def run_groups(self, groups: list[_Group]) -> None:
        # The context pass returns every row's state (for hybrids, with key/value caches as long
        # as the context; the groups of one batch have equal contexts lengths, the longest first).
        extra = self.ex.cost.state_tokens_at(len(groups[0].context)) if groups else 0
        self.ex.drain(groups, lambda g: len(g.context), extra, self._context_batch, same_length=True)

    def _context_batch(self, batch: list[_Group]) -> None:
        ex = self.ex
        length = len(batch[0].context)  # equal in a batch
        # [k, D]: the last position predicts each member's first continuation token
        last, states = ex.forward([g.context for g in batch], list(range(len(batch))), [length - 1] * len(batch),
                                  return_state=True)
        picks_row, picks_target = [], []
        for row, g in enumerate(batch):
            for _, cont in g.members:
                picks_row.append(row)
                picks_target.append(cont[0])
        at = ex.score_rows(last, picks_row, picks_target)
        first: dict[int, Ranges] = {}
        conts = []  # (owner row, uid, continuation) of the members with more than one token
        for row, g in enumerate(batch):
            for uid, cont in g.members:
                first[uid] = [(at, 1)]
                at += 1
                if len(cont) > 1:
                    conts.append((row, uid, cont))
        answered = sum(self._commit(uid, first[uid]) for uid in first if len(self.pairs[uid][1]) == 1)
        ex.progress(answered, sum(len(g.context) for g in batch))
        conts.sort(key=lambda c: (-len(c[2]), c[2], c[0]))

        def cont_batch(items) -> None:
            rows, cols, targets = [], [], []
            for r, (_, _, cont) in enumerate(items):
                rows += [r] * (len(cont) - 1)
                cols += range(len(cont) - 1)
                targets += cont[1:]
            picked, _ = ex.forward([c[2][:-1] for c in items], rows, cols, state=states,
                                   owners=[c[0] for c in items])
            k = ex.score_rows(picked, list(range(len(targets))), targets)
            answered = 0
            for _, uid, cont in items:
                n = len(cont) - 1
                answered += self._commit(uid, first[uid] + [(k, n)])
                k += n
            ex.progress(answered, sum(len(c[2]) - 1 for c in items))

        # Continuations run from a forked state, which weighs state_tokens per row. (The k
        # context states stay alive meanwhile: a context batch peaks near twice the budget.)
        ex.drain(conts, lambda c: len(c[2]) - 1, ex.cost.state_tokens_at(len(batch[0].context)), cont_batch)
        ex.stats.shared_contexts += len(batch)
        ex.stats.shared_requests += sum(self.weights[u] for g in batch for u, _ in g.members)


@gc_paused()
def score_continuations(
    model,
    requests: Sequence[TokenPair],
    *,
    max_length: int,
    batch_size: int | str,
    device: torch.device,
    pad_id: int = 0,
    share_context: bool = True,
    batch_invariant: bool = True,
    max_batch_size: int | None = None,
    on_progress: ProgressFn | None = None,
    stats: EngineStats | None = None,
    context_chunk: int = DEFAULT_CONTEXT_CHUNK,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, and whether greedy decoding would
    have produced it; results in the order of ``requests``.

    ``batch_size``: an int (a budget of that many rows of the longest request) or ``"auto"``
    (a share of the free memory, see :func:`token_budget`). ``share_context`` runs each distinct
    context once for all its continuations. ``batch_invariant`` gives the CPU's forwards the
    shapes that keep every score independent of its batch (module docstring, point 5).
    ``on_progress(requests, tokens)`` is called as work finishes; ``stats`` (if given) receives
    the counters of the call. Sequences longer than ``context_chunk`` tokens run in chunks that
    carry the recurrent state (memory flat in the context's length).
    """
    stats = stats if stats is not None else EngineStats()
    stats.requests = len(requests)
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    pairs: list[tuple[list[int], list[int]]] = []
    weights: list[int] = []
    owner: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        _check_pair(i, ctx, cont, max_length)
        key = (tuple(ctx), tuple(cont))
        uid = index.get(key)
        if uid is None:
            uid = index[key] = len(pairs)
            pairs.append((list(ctx), list(cont)))
            weights.append(0)
        weights[uid] += 1
        owner.append(uid)
    stats.unique = len(pairs)
    if not pairs:
        return []
    longest = max(min(len(c) + len(t) - 1, max_length) for c, t in pairs)
    # A longer sequence runs in chunks of context_chunk positions: that is what a row costs.
    budget = token_budget(model, batch_size, min(longest, context_chunk), device, max_batch_size)
    ex = _Executor(model, device, pad_id, budget, stats, on_progress, batch_invariant, context_chunk)
    wholes, groups = plan_pairs(pairs, max_length, share_context)
    scorer = _PairScorer(ex, pairs, weights)
    with torch.inference_mode():
        scorer.run_wholes(wholes)
        scorer.run_groups(groups)
        results = scorer.results()
    return [results[uid] for uid in owner]


# ---------------------------------------------------------------------------------------------
# loglikelihood_rolling, stateful


@gc_paused()
def score_documents(
    model,
    documents: Sequence[Sequence[int]],
    *,
    prefix_token: int,
    chunk_length: int,
    batch_size: int | str,
    device: torch.device,
    pad_id: int = 0,
    batch_invariant: bool = True,
    max_batch_size: int | None = None,
    on_progress: ProgressFn | None = None,
    stats: EngineStats | None = None,
) -> list[float]:
    """Log-likelihood of each whole document, every token conditioned on the whole prefix before
    it (the first on ``prefix_token``, as lm-eval's rolling windows do), i.e. one forward over
    ``[prefix_token] + doc[:-1]`` scored at ``doc``. It runs in chunks of ``chunk_length``
    tokens that carry the recurrent state, so no tensor grows with the document: the largest
    forward is ``rows x chunk_length`` and the LM head works in budget-sized row chunks. Several
    documents run side by side (rows), as many as the budget allows. An empty document scores 0.
    ``batch_invariant`` as in :func:`score_continuations`.
    """
    if chunk_length < 1:
        raise MambaEvalError(f"chunk_length must be at least 1, got {chunk_length}")
    stats = stats if stats is not None else EngineStats()
    stats.requests = stats.unique = len(documents)
    docs = [list(d) for d in documents]
    results = [0.0] * len(docs)
    order = sorted((i for i in range(len(docs)) if docs[i]), key=lambda i: (-len(docs[i]), docs[i], i))
    if not order:
        return results
    longest = min(chunk_length, len(docs[order[0]]))
    budget = token_budget(model, batch_size, longest, device, max_batch_size)
    ex = _Executor(model, device, pad_id, budget, stats, on_progress, batch_invariant, max(chunk_length, 1))

    def doc_batch(batch: list[int]) -> None:
        inputs = [[prefix_token] + docs[i][:-1] for i in batch]
        parts: list[Ranges] = [[] for _ in batch]
        state = None
        n_chunks = -(-len(inputs[0]) // chunk_length)
        for k in range(n_chunks):
            lo, hi = k * chunk_length, (k + 1) * chunk_length
            active = sum(1 for x in inputs if len(x) > lo)  # a prefix: longest first
            rows = [inputs[r][lo:hi] for r in range(active)]
            carry = any(len(inputs[r]) > hi for r in range(active))
            rr, cc, targets = [], [], []
            for r in range(active):
                n = len(rows[r])
                rr += [r] * n
                cc += range(n)
                targets += docs[batch[r]][lo:lo + n]
            picked, new_state = ex.forward(
                rows, rr, cc, state=state, owners=None if state is None else list(range(active)), return_state=carry
            )
            at = ex.score_rows(picked, list(range(len(targets))), targets)
            for r in range(active):
                n = len(rows[r])
                parts[r].append((at, n))
                at += n
            state = new_state
            del picked, new_state  # hold one chunk's activations at a time
            ex.progress(0, sum(len(x) for x in rows))
        for r, i in enumerate(batch):
            ranges[i] = parts[r]
        ex.progress(len(batch), 0)

    ranges: dict[int, Ranges] = {}
    extra = ex.cost.state_tokens
    with torch.inference_mode():
        ex.drain(order, lambda i: min(chunk_length, len(docs[i])), extra, doc_batch)
        scores = ex.scores.fetch()
    for i, r in ranges.items():
        results[i] = _gather(scores, r)[0]
    return results
