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
   (``index_select`` of the layer states) and each continuation runs only its own tokens but the last
   from the forked state. A pair that needs truncation, or a context with one continuation, runs
   as one sequence, as lm-eval does. Contexts of different lengths share a pass, padded on the
   right to the longest and counted against the budget as rows x padded length, as continuations
   are: the model takes the rows' lengths (``backbone_forward(lengths=...)``) and returns each
   row's state after its own last token, the same bits as in a pass of its own length (Δ is
   ``-inf`` before the softplus at padded positions, so the scan carries the state through them
   unchanged; the conv window is gathered before the row's end). Three kinds of context keep
   passes of equal lengths: those of hybrid models (an attention layer's key/value cache would
   hold the padding), those longer than ``context_chunk`` (point 6; their state comes from the
   exact last chunk), and those shorter than ``RAGGED_MIN_LENGTH`` (a CPU library effect): the rules of
   ``mamba_eval.models.rows``, which runs every forward.
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
   pieces, which the model's policy handles (``mamba_eval.models.invariance``: invariant
   kernels on CUDA; on the CPU filler rows and aligned shapes, which every forward here gets
   from :func:`~mamba_eval.models.rows.forward_shape`). A pass that returns its rows' states
   without their lengths (equal-length context passes: hybrids, chunked and very short
   contexts) keeps its exact length and only gets filler rows.
6. *Long sequences*: a sequence longer than ``context_chunk`` tokens (default
   :data:`DEFAULT_CONTEXT_CHUNK`) runs in chunks of that many positions, at fixed offsets, that
   carry the recurrent state; only the hidden states at scored positions are kept. A context of
   a million tokens thus needs the memory of one chunk (long-context probes), and the budget
   counts a row at the chunk's length.
7. *Little host work per forward*: the distinct sequences sit end to end in one int64 array
   (:class:`~mamba_eval.harness.executor.TokenStore`); a forward's padded rows, picked positions, state owners and targets
   are cut from it with a few array operations and reach the device in one non-blocking copy.
   Scores stay on the device until one read at the end, so the host never waits for the GPU
   between forwards (``tests/test_engine.py`` runs the engine on the meta device, where any
   read of values fails). ``scripts/bench_host.py`` measures this host side.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.executor import (
    DEFAULT_CONTEXT_CHUNK, EngineStats, Executor, ProgressFn, Ranges, TokenStore, gc_paused, token_budget,
)
from mamba_eval.models.rows import can_share_padded_pass, ranges

# A (context tokens, continuation tokens) pair, as lm-eval's TemplateLM produces them.
TokenPair = tuple[Sequence[int], Sequence[int]]


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

    store: TokenStore
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
    store = TokenStore([w[0] for w in wholes] + [g[0] for g in groups] + [pairs[u][1] for u in members])
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


class PairScorer:
    """Runs a :class:`_Plan` and records where each distinct pair's token scores are: the first
    token's at ``first_at`` (from a shared context pass; -1 when none), and ``rest_n`` more
    from ``rest_at``."""

    def __init__(self, ex: Executor, plan: _Plan, pairs, weights: np.ndarray):
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
        perm[ranges(block + has_first, self.rest_n)] = ranges(self.rest_at, self.rest_n)
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
        targets = store.tokens[ranges(starts + first + 1, n)]
        picked, _, (targets_d,) = ex.forward(starts, lengths, first, n, extra=[targets])
        at = ex.score_rows(picked, targets_d)
        uids = p.whole_uid[i:j]
        self.rest_at[uids] = at + np.cumsum(n) - n
        self.rest_n[uids] = n
        ex.progress(self._commit(uids), int(lengths.sum()))

    # -- shared contexts -----------------------------------------------------------------------
    def run_groups(self) -> None:
        # The context pass returns every row's state. Contexts that may share a right-padded
        # pass with contexts of other lengths (models.rows.can_share_padded_pass: each row's
        # state taken after its own last token) do; the others (too long: chunked; too short;
        # every context of a hybrid) run in passes of equal lengths.
        p, ex = self.plan, self.ex
        if not len(p.group_seq):
            return
        lengths = p.store.lengths[p.group_seq]
        extra = ex.cost.state_tokens_at(int(lengths[0]))
        ok = np.fromiter((can_share_padded_pass(ex.model, n, ex.context_chunk) for n in lengths.tolist()), bool,
                         len(lengths))
        # longest first: the contexts too long are a prefix, those too short a suffix
        k = int(np.argmax(ok)) if ok.any() else len(lengths)
        m = k + int(np.count_nonzero(ok))
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
            targets = store.tokens[ranges(starts_c + 1, lens)]
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
    max_batch_size: int | None = None,
    on_progress: ProgressFn | None = None,
    stats: EngineStats | None = None,
    context_chunk: int = DEFAULT_CONTEXT_CHUNK,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, and whether greedy decoding would
    have produced it; results in the order of ``requests``.

    ``batch_size``: an int (a budget of that many rows of the longest request) or ``"auto"``
    (a share of the free memory, see :func:`token_budget`). ``share_context`` runs each distinct
    context once for all its continuations. Scores are independent of the batch as the model's
    invariance policy says (module docstring, point 5).
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
    ex = Executor(model, device, pad_id, budget, stats, on_progress, plan.store, context_chunk)
    scorer = PairScorer(ex, plan, pairs, weights)
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
    store = TokenStore([[prefix_token] + docs[i] for i in order])
    ex = Executor(model, device, pad_id, budget, stats, on_progress, store, max(chunk_length, 1))
    doc_lengths = store.lengths - 1
    doc_parts: list[Ranges] = [[] for _ in order]

    def doc_batch(a: int, b: int) -> None:
        lengths = doc_lengths[a:b]
        parts: list[Ranges] = [[] for _ in range(b - a)]
        state = None
        for lo in range(0, int(lengths[0]), chunk_length):
            hi = lo + chunk_length
            active = int(np.count_nonzero(lengths > lo))  # a prefix: longest first
            lens = np.minimum(lengths[:active], hi) - lo
            starts = store.starts[a:a + active] + lo
            targets = store.tokens[ranges(starts + 1, lens)]
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
        doc_parts[a:b] = parts
        ex.progress(b - a, 0)

    with torch.inference_mode():
        ex.drain(np.minimum(doc_lengths, chunk_length), ex.cost.state_tokens, doc_batch)
        values, _ = ex.scores.fetch()
    for i, parts in zip(order, doc_parts):
        results[i] = math.fsum(v for a, n in parts for v in values[a:a + n].tolist())
    return results
