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
   as one sequence, as lm-eval does. Contexts of different lengths share a pass, padded on the
   right to the longest and counted against the budget as rows x padded length, as continuations
   are: the model takes the rows' lengths (``backbone_forward(lengths=...)``) and returns each
   row's state after its own last token, the same bits as in a pass of its own length (Δ is
   ``-inf`` before the softplus at padded positions, so the scan carries the state through them
   unchanged; the conv window is gathered before the row's end). Three kinds of context keep
   passes of equal lengths: those of hybrid models (an attention layer's key/value cache would
   hold the padding), those longer than ``context_chunk`` (point 6; their state comes from the
   exact last chunk), and those shorter than :data:`RAGGED_MIN_LENGTH` (a CPU library effect).
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

   Filler rows of padding and extra padding columns make up the shapes; a pass that returns
   its rows' states without their lengths (equal-length context passes: hybrids, chunked and
   very short contexts) keeps its exact length and only gets filler rows (at least 64 x threads
   of them when its length is odd). That costs compute, more with more threads;
   ``batch_invariant=False`` turns it off (and with it the invariance: a change in how the
   requests are batched then changes last bits). On CUDA nothing is filled:
   the element-wise kernels have no tails, and cuBLAS picks its algorithm per shape, which a
   floor would not make invariant; instead the model is built with the batch-invariant ops of
   ``mamba_eval.models.ops`` (kernels whose launch configuration ignores the batch, and a GEMM
   whose tiling ignores the row count), which ``--model mamba`` does when ``batch_invariant``.
6. *Long sequences*: a sequence longer than ``context_chunk`` tokens (default
   :data:`DEFAULT_CONTEXT_CHUNK`) runs in chunks of that many positions, at fixed offsets, that
   carry the recurrent state; only the hidden states at scored positions are kept. A context of
   a million tokens thus needs the memory of one chunk (long-context probes), and the budget
   counts a row at the chunk's length.
7. *Little host work per forward*: the distinct sequences sit end to end in one int64 array
   (:class:`_TokenStore`); a forward's padded rows, picked positions, state owners and targets
   are cut from it with a few array operations and reach the device in one non-blocking copy.
   Scores stay on the device until one read at the end, so the host never waits for the GPU
   between forwards (``tests/test_engine.py`` runs the engine on the meta device, where any
   read of values fails). ``scripts/bench_host.py`` measures this host side.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
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
#: A batch is cut in two where that saves more padded positions than a forward costs
#: (:meth:`_Executor.pack`): the cost of a position is estimated as 2 flops per weight at
#: ``ASSUMED_FLOPS`` (about half an H200's bf16 peak), the cost of a forward as
#: ``FORWARD_OVERHEAD_S`` of host work (the engine's bookkeeping and some 10 kernel launches
#: per layer). For mamba-130m a cut would have to save ~33k positions, more than a forward
#: holds, so its batches are as before; for mamba-2.8b ~1.1k.
ASSUMED_FLOPS = 4e14
FORWARD_OVERHEAD_S = 0.015
#: Shared contexts shorter than this run in passes of their own length, not in the passes of
#: contexts of different lengths (module docstring, point 2): on the CPU, a product over a
#: strided [rows, L, K] activation (Mamba-1's out_proj reads the scan output transposed) gives
#: other last bits for L of 1-3 than for longer L, so a short context would score differently
#: in a wide pass than in a pass of its own length.
RAGGED_MIN_LENGTH = 4


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


def split_positions(model) -> int:
    """Padded positions a cut must save to pay for the extra forward (:data:`ASSUMED_FLOPS`,
    :data:`FORWARD_OVERHEAD_S`): the forward's overhead over the cost of one position, 2 flops
    per weight of the layers (the embedding and the LM head do not run per position)."""
    skip = {id(model.backbone.embedding.weight), id(model.lm_head.weight)}
    weights = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return max(1, int(FORWARD_OVERHEAD_S * ASSUMED_FLOPS / (2 * max(weights, 1))))


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


def _ranges(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(first[i], first[i] + count[i])`` over i (int64), in one
    array operation instead of a Python loop."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.repeat(first - (np.cumsum(count) - count), count) + np.arange(total, dtype=np.int64)


class _TokenStore:
    """The token sequences of one engine call, end to end in one int64 array: sequence ``i`` is
    ``tokens[starts[i] : starts[i] + lengths[i]]``. Padded rows, picks and targets of a forward
    are cut from it with a few array operations (no per-token Python)."""

    def __init__(self, seqs: Sequence[Sequence[int]]):
        self.lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        self.starts = np.zeros(len(seqs), np.int64)
        np.cumsum(self.lengths[:-1], out=self.starts[1:])
        self.tokens = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(self.lengths.sum()))


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

    def fetch(self) -> tuple[np.ndarray, np.ndarray]:
        """Every score on the host (float32 log-probabilities, bool is-greedy): the one wait for
        the device."""
        if not self.values:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return torch.cat(self.values).cpu().numpy(), torch.cat(self.greedy).cpu().numpy()


#: A result's scores: ranges ``(start, count)`` of a :class:`_Scores`.
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


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# The executor: padded forwards, chunked LM head, budget with out-of-memory recovery


class _Executor:
    """Runs batches of rows cut from a :class:`_TokenStore`. A batch is given as index arrays:
    row ``r`` is ``store.tokens[starts[r] : starts[r] + lengths[r]]``, and the positions to keep
    are columns ``pick_first[r] .. pick_first[r] + pick_count[r] - 1`` of row ``r``. Each forward
    makes one host-to-device copy (rows, picks, state owners and the caller's targets packed
    together), and nothing in it waits for the device."""

    def __init__(self, model, device: torch.device, pad_id: int, budget: int, stats: EngineStats,
                 on_progress: ProgressFn | None, store: _TokenStore, batch_invariant: bool = True,
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
        self.store = store
        self.cost = CostModel.of(model)
        # context passes may hold contexts of different lengths (backbone_forward's lengths)
        self.ragged_contexts = not model.has_attention
        self.min_rows = min_rows(device) if batch_invariant else 1
        self.align = cpu_alignment(device) if batch_invariant else 1
        self.scores = _Scores()
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
                if not _is_oom(err) or (j - i == 1 and self.logit_chunk() <= self.min_rows):
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
    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The int64 host arrays as tensors on the device, in one copy. The copy is non-blocking
        from pageable memory: it returns once the driver has staged the bytes, with no stream
        synchronisation (a blocking one waits for all queued work; pinning each small tensor
        first costs more than it saves)."""
        sizes = [a.size for a in arrays]
        host = torch.from_numpy(np.concatenate(arrays) if len(arrays) != 1 else np.ascontiguousarray(arrays[0]))
        if self.device.type != "cpu":
            host = host.to(self.device, non_blocking=True)
        return list(host.split(sizes))

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
        """Right-padded forward of the rows (class docstring); returns the hidden states at the
        picked positions ([P, D], row by row), the final state with ``return_state`` (else None),
        and the int64 host arrays ``extra`` as device tensors (copied with the rows). ``state``,
        if given, is forked per row: row ``r`` starts from ``state`` row ``owners[r]``. Filler
        rows and columns of padding make up the shape of :func:`forward_shape`; the final state
        includes them and is meaningful for the rows as long as the longest, except with
        ``ragged`` (models without attention layers, rows of at most ``context_chunk`` tokens):
        then the row lengths go to the model (``backbone_forward(lengths=...)``) and the final
        state of every row is its state after its own last token, padding columns or not.

        Rows longer than ``context_chunk`` tokens run in chunks of that many positions (at fixed
        offsets 0, C, 2C, ...) that carry the recurrent state, keeping only the picked positions:
        memory does not grow with the sequence (a million-token context runs like a short one).
        """
        n = len(starts)
        longest = int(lengths.max())
        ragged = ragged and return_state
        if ragged and longest > self.context_chunk:
            raise AssertionError("ragged rows longer than context_chunk")  # callers keep those apart
        if longest <= self.context_chunk:
            total, width = forward_shape(n, longest, self.min_rows, self.align,
                                         fixed_length=return_state and not ragged)
            forks = self._forks(owners, total) if state is not None else []
            # the filler rows count as full rows (their state is never read)
            row_lengths = [np.concatenate([lengths, np.full(total - n, width, np.int64)])] if ragged else []
            positions = _ranges(np.arange(n, dtype=np.int64) * width + pick_first, pick_count)
            dev = self.upload([self._rows(starts, lengths, 0, width, total).reshape(-1), positions, *forks,
                               *row_lengths, *extra])
            if state is not None:
                state = [layer.index_select(dev[2]) for layer in state]
            kwargs = {"lengths": dev[2 + len(forks)]} if ragged else {}
            hidden, final = self.model.backbone_forward(dev[0].view(total, width), state=state,
                                                        return_state=return_state, **kwargs)
            picked = hidden.flatten(0, 1).index_select(0, dev[1])
            del hidden
            self._count(int(lengths.sum()), total, width, forked=state is not None)
            return picked, final, dev[len(dev) - len(extra):]
        # Chunks are all context_chunk wide (the last padded on the right), so a position's
        # computation does not depend on the batch's longest row; except where the final state
        # is returned: that needs the exact last chunk (those rows have equal lengths). Every
        # chunk's rows x width must meet the shape rules: the full ones and the last.
        step = self.context_chunk
        last = longest - (longest - 1) // step * step if return_state else step
        total = max(forward_shape(n, step, self.min_rows, self.align, True)[0],
                    forward_shape(n, last, self.min_rows, self.align, True)[0])
        unit = math.lcm(self.align // math.gcd(step, self.align), self.align // math.gcd(last, self.align))
        total = -(-total // unit) * unit
        width = longest if return_state else -(-longest // step) * step
        forks = self._forks(owners, total) if state is not None else []
        rows = np.repeat(np.arange(n, dtype=np.int64), pick_count)
        cols = _ranges(pick_first, pick_count)
        extra_dev = self.upload(extra) if len(extra) else []
        picked = torch.empty(len(cols), self.model.config.d_model, dtype=self.model.dtype, device=self.device)
        for lo in range(0, width, step):
            hi = min(width, lo + step)
            sel = np.flatnonzero((cols >= lo) & (cols < hi))
            block = self._rows(starts, lengths, lo, hi - lo, total).reshape(-1)
            dev = self.upload([block, sel, rows[sel] * (hi - lo) + cols[sel] - lo, *(forks if lo == 0 else [])])
            if lo == 0 and state is not None:
                state = [layer.index_select(dev[3]) for layer in state]
            hidden, state = self.model.backbone_forward(dev[0].view(total, hi - lo), state=state,
                                                        return_state=return_state or hi < width)
            if len(sel):
                picked.index_copy_(0, dev[1], hidden.flatten(0, 1).index_select(0, dev[2]))
            del hidden
            self._count(int(lengths.sum()) if lo == 0 else 0, total, hi - lo, forked=owners is not None)
        return picked, (state if return_state else None), extra_dev

    @staticmethod
    def _forks(owners: np.ndarray, total: int) -> list[np.ndarray]:
        """The state row each of ``total`` rows starts from: its owner; filler rows the first's."""
        return [np.concatenate([owners, np.full(total - len(owners), owners[0], np.int64)])]

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
        argmax. The results stay on the device (:class:`_Scores`); returns the index of the
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


def _check_pair(i: int, ctx: Sequence[int], cont: Sequence[int], max_length: int) -> None:
    if len(ctx) == 0:
        raise MambaEvalError(f"request {i}: empty context (lm-eval supplies a prefix token)")
    if len(cont) == 0:
        raise MambaEvalError(f"request {i}: empty continuation")
    if len(cont) > max_length:
        raise MambaEvalError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")


@dataclass
class _Plan:
    """Distinct pairs cut into what runs, in run order, as index arrays into ``store``.

    Wholes (pairs run as one sequence): ``whole_seq`` holds ``(ctx + cont)[-(max_length + 1):]``,
    whose tokens but the last are the input, and whose last ``whole_n`` tokens are the targets.
    Groups (contexts shared by several continuations): ``group_seq`` holds the context; its
    members are ``group_members[g] .. group_members[g + 1] - 1``, each with its continuation
    (``member_seq``) and its group (``member_group``)."""

    store: _TokenStore
    whole_uid: np.ndarray
    whole_seq: np.ndarray
    whole_n: np.ndarray
    group_seq: np.ndarray
    group_members: np.ndarray
    member_uid: np.ndarray
    member_seq: np.ndarray
    member_group: np.ndarray


def plan_pairs(pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], max_length: int,
               share_context: bool) -> _Plan:
    """Split distinct pairs (uid = position in ``pairs``) into single sequences and shared-context
    groups, each in a fixed order that depends on the pairs alone (longest first)."""
    limit = max_length + 1
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    wholes: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []  # (sequence, targets, uid)
    for uid, (ctx, cont) in enumerate(pairs):
        if share_context and len(ctx) + len(cont) <= limit:
            by_context[ctx].append(uid)
        else:
            wholes.append(((ctx + cont)[-limit:], cont, uid))
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    for ctx, uids in by_context.items():
        if len(uids) == 1:
            cont = pairs[uids[0]][1]
            wholes.append((ctx + cont, cont, uids[0]))
        else:
            groups.append((ctx, sorted(uids, key=lambda u: (-len(pairs[u][1]), pairs[u][1]))))
    wholes.sort(key=lambda w: (-len(w[0]), w[0][:-1], w[1]))
    groups.sort(key=lambda g: (-len(g[0]), g[0]))
    members = [u for _, uids in groups for u in uids]
    n_w, n_g = len(wholes), len(groups)
    store = _TokenStore([w[0] for w in wholes] + [g[0] for g in groups] + [pairs[u][1] for u in members])
    sizes = np.fromiter((len(uids) for _, uids in groups), np.int64, n_g)
    group_members = np.zeros(n_g + 1, np.int64)
    np.cumsum(sizes, out=group_members[1:])
    return _Plan(
        store=store,
        whole_uid=np.fromiter((w[2] for w in wholes), np.int64, n_w),
        whole_seq=np.arange(n_w, dtype=np.int64),
        whole_n=np.fromiter((len(w[1]) for w in wholes), np.int64, n_w),
        group_seq=np.arange(n_w, n_w + n_g, dtype=np.int64),
        group_members=group_members,
        member_uid=np.array(members, dtype=np.int64),
        member_seq=np.arange(n_w + n_g, n_w + n_g + len(members), dtype=np.int64),
        member_group=np.repeat(np.arange(n_g, dtype=np.int64), sizes),
    )


class _PairScorer:
    """Runs a :class:`_Plan` and records where each distinct pair's token scores are: the first
    token's at ``first_at`` (from a shared context pass; -1 when none), and ``rest_n`` more
    from ``rest_at``."""

    def __init__(self, ex: _Executor, plan: _Plan, pairs, weights: np.ndarray):
        self.ex = ex
        self.plan = plan
        self.pairs = pairs
        self.weights = weights  # how many requests each distinct pair answers
        self.first_at = np.full(len(pairs), -1, np.int64)
        self.rest_at = np.zeros(len(pairs), np.int64)
        self.rest_n = np.zeros(len(pairs), np.int64)
        self.done = np.zeros(len(pairs), bool)

    def _commit(self, uids: np.ndarray) -> int:
        """Mark results complete; returns how many requests they newly answer (0 when a batch is
        repeated after an out-of-memory error)."""
        new = uids[~self.done[uids]]
        self.done[new] = True
        return int(self.weights[new].sum())

    def results(self) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) per distinct pair. The sum is ``math.fsum`` of
        the float32 scores: correctly rounded, so independent of their order."""
        values, greedy = self.ex.scores.fetch()  # the one wait for the GPU
        has_first = (self.first_at >= 0).astype(np.int64)
        count = has_first + self.rest_n
        block = np.cumsum(count) - count
        perm = np.empty(int(count.sum()), np.int64)  # each pair's scores made contiguous
        firsts = has_first.astype(bool)
        perm[block[firsts]] = self.first_at[firsts]
        perm[_ranges(block + has_first, self.rest_n)] = _ranges(self.rest_at, self.rest_n)
        vals = values[perm].tolist()
        all_greedy = np.logical_and.reduceat(greedy[perm], block).tolist()
        bounds = zip(block.tolist(), (block + count).tolist())
        return [(math.fsum(vals[a:b]), g) for (a, b), g in zip(bounds, all_greedy)]

    # -- pairs run as one sequence -----------------------------------------------------------
    def run_wholes(self) -> None:
        p = self.plan
        self.ex.drain(p.store.lengths[p.whole_seq] - 1, 0, self._whole_batch)

    def _whole_batch(self, i: int, j: int) -> None:
        p, ex, store = self.plan, self.ex, self.plan.store
        seq = p.whole_seq[i:j]
        starts, lengths, n = store.starts[seq], store.lengths[seq] - 1, p.whole_n[i:j]
        first = lengths - n  # the last n input positions predict the n targets
        targets = store.tokens[_ranges(starts + first + 1, n)]
        picked, _, (targets_d,) = ex.forward(starts, lengths, first, n, extra=[targets])
        at = ex.score_rows(picked, targets_d)
        uids = p.whole_uid[i:j]
        self.rest_at[uids] = at + np.cumsum(n) - n
        self.rest_n[uids] = n
        ex.progress(self._commit(uids), int(lengths.sum()))

    # -- shared contexts -----------------------------------------------------------------------
    def run_groups(self) -> None:
        # The context pass returns every row's state. Models without attention layers take
        # contexts of different lengths in one pass (the longest first, padded to the longest,
        # each row's state taken after its own last token: backbone_forward's lengths), except
        # contexts longer than context_chunk, which run in chunks; those, and every context of a
        # hybrid (key/value caches as long as the context), run in passes of equal lengths.
        p, ex = self.plan, self.ex
        if not len(p.group_seq):
            return
        lengths = p.store.lengths[p.group_seq]
        extra = ex.cost.state_tokens_at(int(lengths[0]))
        if not ex.ragged_contexts:
            ex.drain(lengths, extra, self._context_batch, same_length=True)
            return
        # longest first: the long contexts are a prefix, the short ones a suffix
        k = int(np.count_nonzero(lengths > ex.context_chunk))
        m = k + int(np.count_nonzero(lengths[k:] >= RAGGED_MIN_LENGTH))
        ex.drain(lengths[:k], extra, self._context_batch, same_length=True)
        ex.drain(lengths[k:m], extra, lambda i, j: self._context_batch(k + i, k + j, ragged=True))
        ex.drain(lengths[m:], extra, lambda i, j: self._context_batch(m + i, m + j), same_length=True)

    def _context_batch(self, i: int, j: int, ragged: bool = False) -> None:
        p, ex, store = self.plan, self.ex, self.plan.store
        seq = p.group_seq[i:j]
        starts, lengths = store.starts[seq], store.lengths[seq]  # equal in a batch unless ragged
        m_lo, m_hi = int(p.group_members[i]), int(p.group_members[j])
        m_seq, uids = p.member_seq[m_lo:m_hi], p.member_uid[m_lo:m_hi]
        rows = p.member_group[m_lo:m_hi] - i  # each member's context row
        firsts = store.tokens[store.starts[m_seq]]
        # [k, D]: the last position predicts each member's first continuation token
        last, states, (firsts_d, rows_d) = ex.forward(
            starts, lengths, lengths - 1, np.ones(j - i, np.int64), return_state=True, extra=[firsts, rows],
            ragged=ragged)
        at = ex.score_rows(last, firsts_d, rows=(rows, rows_d))
        self.first_at[uids] = at + np.arange(m_hi - m_lo)
        m_len = store.lengths[m_seq]
        ex.progress(self._commit(uids[m_len == 1]), int(lengths.sum()))

        # The members with more than one token run their continuations but the last from the
        # forked context states, longest first.
        multi, row_list, uid_list = np.flatnonzero(m_len > 1).tolist(), rows.tolist(), uids.tolist()
        order = np.array(sorted(multi, key=lambda m: (-len(self.pairs[uid_list[m]][1]),
                                                      self.pairs[uid_list[m]][1], row_list[m])), np.int64)
        c_seq, c_uid, c_owner = m_seq[order], uids[order], rows[order]
        c_len = store.lengths[c_seq] - 1

        def cont_batch(a: int, b: int) -> None:
            starts_c, lens = store.starts[c_seq[a:b]], c_len[a:b]
            targets = store.tokens[_ranges(starts_c + 1, lens)]
            picked, _, (targets_d,) = ex.forward(starts_c, lens, np.zeros(b - a, np.int64), lens, state=states,
                                                 owners=c_owner[a:b], extra=[targets])
            k = ex.score_rows(picked, targets_d)
            u = c_uid[a:b]
            self.rest_at[u] = k + np.cumsum(lens) - lens
            self.rest_n[u] = lens
            ex.progress(self._commit(u), int(lens.sum()))

        # Continuations run from a forked state, which weighs state_tokens per row. (The k
        # context states stay alive meanwhile: a context batch peaks near twice the budget.)
        ex.drain(c_len, ex.cost.state_tokens_at(int(lengths[0])), cont_batch)
        ex.stats.shared_contexts += j - i
        ex.stats.shared_requests += int(self.weights[uids].sum())


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
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    owner: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        key = (tuple(ctx), tuple(cont))
        uid = index.get(key)
        if uid is None:
            _check_pair(i, key[0], key[1], max_length)
            uid = index[key] = len(pairs)
            pairs.append(key)
        owner.append(uid)
    stats.unique = len(pairs)
    if not pairs:
        return []
    weights = np.bincount(np.array(owner, np.int64), minlength=len(pairs))
    longest = max(min(len(c) + len(t) - 1, max_length) for c, t in pairs)
    # A longer sequence runs in chunks of context_chunk positions: that is what a row costs.
    budget = token_budget(model, batch_size, min(longest, context_chunk), device, max_batch_size)
    plan = plan_pairs(pairs, max_length, share_context)
    ex = _Executor(model, device, pad_id, budget, stats, on_progress, plan.store, batch_invariant, context_chunk)
    scorer = _PairScorer(ex, plan, pairs, weights)
    with torch.inference_mode():
        scorer.run_wholes()
        scorer.run_groups()
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
    # Document i in run order is store sequence i: [prefix_token] + doc, the input all but its
    # last token, the targets all but its first.
    store = _TokenStore([[prefix_token] + docs[i] for i in order])
    ex = _Executor(model, device, pad_id, budget, stats, on_progress, store, batch_invariant, max(chunk_length, 1))
    doc_lengths = store.lengths - 1
    ranges: list[Ranges] = [[] for _ in order]

    def doc_batch(a: int, b: int) -> None:
        lengths = doc_lengths[a:b]
        parts: list[Ranges] = [[] for _ in range(b - a)]
        state = None
        for lo in range(0, int(lengths[0]), chunk_length):
            hi = lo + chunk_length
            active = int(np.count_nonzero(lengths > lo))  # a prefix: longest first
            lens = np.minimum(lengths[:active], hi) - lo
            starts = store.starts[a:a + active] + lo
            targets = store.tokens[_ranges(starts + 1, lens)]
            picked, new_state, (targets_d,) = ex.forward(
                starts, lens, np.zeros(active, np.int64), lens, state=state,
                owners=None if state is None else np.arange(active, dtype=np.int64),
                return_state=bool(lengths[0] > hi), extra=[targets])
            at = ex.score_rows(picked, targets_d)
            for r, (offset, n) in enumerate(zip((at + np.cumsum(lens) - lens).tolist(), lens.tolist())):
                parts[r].append((offset, n))
            state = new_state
            del picked, new_state  # hold one chunk's activations at a time
            ex.progress(0, int(lens.sum()))
        ranges[a:b] = parts
        ex.progress(b - a, 0)

    with torch.inference_mode():
        ex.drain(np.minimum(doc_lengths, chunk_length), ex.cost.state_tokens, doc_batch)
        values, _ = ex.scores.fetch()
    for i, parts in zip(order, ranges):
        results[i] = math.fsum(v for a, n in parts for v in values[a:a + n].tolist())
    return results
