"""The scoring engine (mamba_eval/harness/engine.py) and the adapter's request paths (mamba_eval/harness/lm.py).

On real data and the real GPT-NeoX-20B tokenizer, with tiny random-init checkpoints written by
transformers at the real vocabulary size (50280 rows):

- batched tokenisation gives exactly the token ids of lm-eval's own per-request path;
- scores equal a naive per-request forward (lm-eval's truncation and scoring rules), with and
  without shared contexts, and are bit-for-bit independent of the batch size and request order;
- an out-of-memory error shrinks the token budget and the work carries on, unchanged;
- the stateful ``loglikelihood_rolling`` equals one forward over the whole document, with the
  largest tensor independent of the document's length.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch


transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.tasks.hellaswag.utils import preprocess  # noqa: E402

from mamba_eval.harness import engine, executor  # noqa: E402
from mamba_eval.harness.engine import EngineStats, score_continuations, score_documents, token_budget  # noqa: E402
from mamba_eval.models import rows  # noqa: E402
from mamba_eval.models.rows import forward_shape  # noqa: E402
from mamba_eval.errors import ModelArgsError  # noqa: E402

VOCAB_ROWS = 50280  # GPT-NeoX-20B's 50277 tokens padded to a multiple of 8, as the releases do
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fixtures


def _write_checkpoint(out_dir, arch: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB_ROWS, hidden_size=64, num_hidden_layers=2, expand=2, conv_kernel=4,
                  residual_in_fp32=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(state_size=8, **common))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            state_size=16, head_dim=16, num_heads=8, n_groups=1, chunk_size=32, **common))
    with torch.no_grad():  # a spread-out output distribution, so that scores depend on the model
        model.backbone.embeddings.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_ckpt")
    return {arch: _write_checkpoint(root / arch, arch) for arch in ("mamba1", "mamba2")}


@pytest.fixture(scope="module")
def models(checkpoints):
    """The checkpoints under a batch-invariance policy (the engine's filler shapes on the CPU)."""
    from mamba_eval.models.checkpoint import load_model

    return {arch: load_model(path, dtype="float32", device="cpu", backend="ref", batch_invariant=True)
            for arch, path in checkpoints.items()}


@pytest.fixture(scope="module")
def plain_models(checkpoints):
    """The same weights without the batch-invariance policy."""
    from mamba_eval.models.checkpoint import load_model

    return {arch: load_model(path, dtype="float32", device="cpu", backend="ref", batch_invariant=False)
            for arch, path in checkpoints.items()}


def _read_jsonl(path, limit=None):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    return rows


def _hellaswag_requests(data_dir, limit=None):
    """(context, continuation) strings of lm-eval's hellaswag task, doc by doc."""
    docs = []
    for doc in _read_jsonl(data_dir / "hellaswag" / "hellaswag_val.jsonl", limit):
        query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        docs.append([(query, " " + preprocess(e)) for e in doc["endings"]])
    return docs


def _encode(tokenizer, context, continuation):
    """lm-eval's per-request split (TemplateLM._encode_pair) for a non-empty context."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def hellaswag_pairs(data_dir, tokenizer):
    """Token pairs of real hellaswag requests, chosen so that several contexts have the same
    length (context passes then hold several rows, cut differently by each batch size), plus
    documents of lengths seen once."""
    docs = _hellaswag_requests(data_dir, limit=300)
    by_len: dict[int, list] = {}
    for doc in docs:
        by_len.setdefault(len(tokenizer.encode(doc[0][0])), []).append(doc)
    common = sorted(by_len, key=lambda n: (-len(by_len[n]), n))[:3]
    chosen = [doc for n in common for doc in by_len[n][:5]]
    chosen += [by_len[n][0] for n in sorted(by_len) if len(by_len[n]) == 1][:5]
    return [_encode(tokenizer, c, x) for doc in chosen for c, x in doc]


def _naive(model, pairs, max_length):
    """One full forward per request, lm-eval's HF recipe: input (ctx + cont)[-(max_length+1):][:-1],
    log-softmax of the logits at the continuation's positions."""
    out = []
    with torch.inference_mode():
        for ctx, cont in pairs:
            inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
            logits, _ = model(torch.tensor([inp]))
            logprobs = torch.log_softmax(logits[0, -len(cont):].double(), dim=-1)
            target = torch.tensor(cont)
            out.append((logprobs[torch.arange(len(cont)), target].sum().item(),
                        bool((logprobs.argmax(-1) == target).all())))
    return out


def _assert_scores_close(got, want, rel=1e-5):
    assert len(got) == len(want)
    for i, ((a, ga), (b, gb)) in enumerate(zip(got, want)):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-4), (i, a, b)
        assert ga == gb, (i, ga, gb)


# ----------------------------------------------------------------------------- tokenisation


def _lm(checkpoint, tok_dir, **model_args):
    from mamba_eval.harness.lm import MambaLM

    return MambaLM(pretrained=str(checkpoint), tokenizer=str(tok_dir), dtype="float32", device="cpu", **model_args)


def _real_request_strings(data_dir):
    """(context, continuation) strings as lm-eval's stock tasks build them, several tasks, plus
    the awkward cases of TemplateLM's split."""
    pairs = [p for doc in _hellaswag_requests(data_dir, limit=1000) for p in doc]
    for doc in _read_jsonl(data_dir / "lambada_openai" / "lambada_test.jsonl", limit=1000):
        words = doc["text"].split(" ")
        pairs.append((" ".join(words[:-1]), " " + words[-1]))
    for doc in _read_jsonl(data_dir / "winogrande" / "winogrande_xl_validation.jsonl"):
        idx = doc["sentence"].index("_")
        target = " " + doc["sentence"][idx + 1:].strip()
        pairs += [(doc["sentence"][:idx] + opt, target) for opt in (doc["option1"], doc["option2"])]
    for doc in _read_jsonl(data_dir / "piqa" / "valid.jsonl", limit=500):
        pairs += [(f"Question: {doc['goal']}\nAnswer:", " " + doc[s]) for s in ("sol1", "sol2")]
    for doc in _read_jsonl(data_dir / "arc" / "ARC-Easy_validation.hf.jsonl"):
        pairs += [(f"Question: {doc['question']}\nAnswer:", " " + t) for t in doc["choices"]["text"]]
    pairs += [
        ("Question: why?\nAnswer: ", "Because."),  # trailing space moves to the continuation
        ("Two lines\n\n", "Next"),  # trailing newlines move too
        ("tabs\t \t", " x"),
        ("   ", " only spaces"),  # a context that is all whitespace
        ("", "An empty context"),  # empty context: the prefix token
        ("", "<|endoftext|>starts with the prefix token"),
        ("cafe", "\u0301 au lait"),  # NFC joins the two across the boundary
        ("no space", "joined"),
        ("émoji 🙂", " 🙃 end"),
    ]
    return pairs


def test_batched_tokenisation_equals_lm_eval_per_request_path(checkpoints, tok_dir, data_dir, monkeypatch):
    """MambaLM.loglikelihood tokenises all requests in two tokenizer calls; the token ids it
    hands on equal those of lm-eval's own TemplateLM.loglikelihood (two encode calls per
    request) on real requests of five tasks and on edge cases."""
    from mamba_eval.harness.lm import MambaLM

    lm = _lm(checkpoints["mamba1"], tok_dir)
    pairs = _real_request_strings(data_dir)
    instances = [Instance("loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    seen = []
    monkeypatch.setattr(MambaLM, "_loglikelihood_tokens",
                        lambda self, reqs, **kw: seen.append(reqs) or [(0.0, False)] * len(reqs))
    TemplateLM.loglikelihood(lm, instances, disable_tqdm=True)  # lm-eval's per-request path
    lm.loglikelihood(instances, disable_tqdm=True)  # ours
    reference, ours = seen
    assert len(ours) == len(reference) == len(pairs) > 10000
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a == b, (i, pairs[i], a, b)

    # loglikelihood_rolling's documents: one batched call equals tok_encode per document.
    from mamba_eval.harness.offline import rebuild_wikitext_raw, wikitext_pages

    rows = [r["text"] for r in _read_jsonl(data_dir / "wikitext" / "wikitext-2-raw-v1_test.jsonl")]
    pages = wikitext_pages(rebuild_wikitext_raw(rows))[:20] + ["", " "]
    assert lm.tok_encode_many(pages) == [lm.tok_encode(p) for p in pages]
    # Encoded in threads over slices of 3 strings (slices of 2,048 above): the same ids, in order.
    from mamba_eval.harness import tokenization

    monkeypatch.setattr(tokenization, "_ENCODE_CHUNK", 3)
    monkeypatch.setattr(tokenization.os, "cpu_count", lambda: 4)
    assert lm.tok_encode_many(pages) == [lm.tok_encode(p) for p in pages]


def test_continuations_tokenised_apart_only_where_exact(checkpoints, tok_dir, tmp_path, monkeypatch):
    """The GPT-NeoX-20B tokenizer splits before a space, so continuations are tokenised on their
    own (the test above checks the ids on real requests). A tokenizer whose added token absorbs
    the space after it does not split there: it is recognised and the whole string is tokenised,
    still giving lm-eval's ids."""
    from mamba_eval.harness.lm import MambaLM

    assert _lm(checkpoints["mamba1"], tok_dir).tok.splits_before_space()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    assert spec["added_tokens"][0]["content"] == "<|endoftext|>"
    spec["added_tokens"][0]["rstrip"] = True
    other = tmp_path / "tok_rstrip"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (other / name).write_text((tok_dir / name).read_text())
    lm = _lm(checkpoints["mamba1"], other)
    context, continuation = "The end.<|endoftext|>", " And then"
    whole, ctx = lm.tok_encode(context + continuation), lm.tok_encode(context)
    assert whole[len(ctx):] != lm.tok_encode(continuation, add_special_tokens=False)  # apart would be wrong
    assert not lm.tok.splits_before_space()
    pairs = [(context, continuation), ("Hello", " world"), ("x", "\ny")]
    instances = [Instance("loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    seen = []
    monkeypatch.setattr(MambaLM, "_loglikelihood_tokens",
                        lambda self, reqs, **kw: seen.append(reqs) or [(0.0, False)] * len(reqs))
    TemplateLM.loglikelihood(lm, instances, disable_tqdm=True)
    lm.loglikelihood(instances, disable_tqdm=True)
    assert seen[0] == seen[1]


# ----------------------------------------------------------------------------- scoring


def test_forward_shape():
    for n, length, fixed in [(1, 39, True), (3, 39, False), (7, 1, False), (200, 75, True), (1, 2048, True)]:
        rows, cols = forward_shape(n, length, 16, 128, fixed)
        assert rows >= n and rows * cols >= 16 and (rows * cols) % 128 == 0
        assert cols == length if fixed else length <= cols < length + 128
    assert forward_shape(5, 39, 1, 1, False) == (5, 39)  # CUDA: nothing added
    assert forward_shape(1, 10, 16, 128, False) == (8, 16)  # fewest positions, then shortest
    assert forward_shape(1, 39, 16, 128, True) == (128, 39)  # a returned state fixes the length


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_batches_cut_where_padding_costs_more_than_a_forward(models, hellaswag_pairs, arch, monkeypatch):
    """With a forward priced low enough (as for a large model), batches end where that saves the
    most padding: more forwards, fewer positions, the same scores bit for bit."""
    model, pairs = models[arch], hellaswag_pairs
    assert executor.split_positions(model) > 10 ** 6  # the tiny test model: never worth a forward
    runs, stats = {}, {}
    for split in (False, True):
        if split:
            monkeypatch.setattr(executor, "split_positions", lambda m: 8)
        stats[split] = EngineStats()
        runs[split] = score_continuations(model, pairs, max_length=2048, batch_size=64, device=CPU,
                                          stats=stats[split])
    assert runs[True] == runs[False]
    cut, whole = stats[True], stats[False]
    assert cut.forward_calls > whole.forward_calls and cut.tokens == whole.tokens
    assert cut.fork_padded_tokens < whole.fork_padded_tokens


def test_pack_cuts_where_it_saves_the_most_padding():
    import numpy as np

    ex = executor.Executor.__new__(executor.Executor)
    ex.budget, ex.split_positions = 1000, 10
    lengths = np.array([20, 19, 18, 6, 5, 5, 4], np.int64)
    # one batch pads all to 20; cutting before the 6 saves (20 - 6) x 4 = 56 positions, the most
    assert ex.pack(lengths, 0, 0) == 3
    assert ex.pack(lengths, 3, 0) == 7  # 6, 5, 5, 4: cutting saves at most 2
    ex.split_positions = 57
    assert ex.pack(lengths, 0, 0) == 7
    ex.budget = 40  # the budget still comes first: two rows of 20
    assert ex.pack(lengths, 0, 0) == 2
    assert ex.pack(lengths, 0, 0, same_length=True) == 1


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_scores_equal_naive_and_are_batch_invariant(models, plain_models, hellaswag_pairs, arch):
    """Real hellaswag requests: batch sizes 1, 7, 64 and auto, and a shuffled order, give the
    same bits; shared and unshared contexts agree with a naive per-request forward."""
    model, pairs = models[arch], hellaswag_pairs
    naive = _naive(model, pairs, 2048)
    perm = list(range(len(pairs)))
    random.Random(0).shuffle(perm)
    for share in (True, False):
        runs, calls = {}, {}
        for bs in (1, 7, 64, "auto"):
            stats = EngineStats()
            runs[bs] = score_continuations(model, pairs, max_length=2048, batch_size=bs, device=CPU,
                                           share_context=share, stats=stats)
            calls[bs] = stats.forward_calls
            assert (stats.shared_requests == len(pairs)) == share
        assert len(set(calls.values())) > 1, calls  # the batch sizes did cut the work differently
        for bs in (7, 64, "auto"):
            assert runs[bs] == runs[1], (share, bs)  # bit for bit
        shuffled = score_continuations(model, [pairs[i] for i in perm], max_length=2048, batch_size=7,
                                       device=CPU, share_context=share)
        assert [shuffled[perm.index(i)] for i in range(len(pairs))] == runs[1]
        _assert_scores_close(runs[1], naive)
    # Without the CPU's filler shapes (a model without the policy): the same scores up to
    # rounding, less work.
    fast, slow = EngineStats(), EngineStats()
    plain = score_continuations(plain_models[arch], pairs, max_length=2048, batch_size=7, device=CPU, stats=fast)
    score_continuations(model, pairs, max_length=2048, batch_size=7, device=CPU, stats=slow)
    _assert_scores_close(plain, naive)
    assert fast.padded_tokens < slow.padded_tokens and fast.tokens == slow.tokens
    # Continuations from forked context states are counted apart (all of them here: shared contexts).
    assert 0 < fast.fork_tokens < fast.tokens and fast.fork_tokens <= fast.fork_padded_tokens < fast.padded_tokens


def _greedy_continuation(model, ctx, n):
    toks = list(ctx)
    with torch.inference_mode():
        for _ in range(n):
            logits, _ = model(torch.tensor([toks]))
            toks.append(int(logits[0, -1].argmax()))
    return toks[len(ctx):]


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_truncation_duplicates_and_greedy(models, hellaswag_pairs, arch):
    """Requests longer than max_length + 1 are truncated from the left and not shared; duplicate
    requests are computed once; one-token continuations are scored from the context pass alone;
    is_greedy is true for greedy continuations."""
    model = models[arch]
    max_length = 40
    ctx_a, ctx_b = (hellaswag_pairs[0][0] * 3)[:30], hellaswag_pairs[4][0][:12]
    greedy3 = _greedy_continuation(model, ctx_b, 3)
    pairs = [
        (ctx_a, [11, 12, 13]),
        (ctx_a, [11, 12, 13]),  # duplicate
        (ctx_a, [14]),
        (ctx_a, list(range(100, 115))),  # 30 + 15 > 41: truncated, runs alone
        (ctx_b, greedy3),
        (ctx_b, greedy3[:1]),
        (ctx_b, [5, 6]),
        (ctx_b, list(range(200, 240))),  # continuation of max_length tokens: context truncated away
        ([7], [8, 9]),  # a context of its own
    ]
    want = _naive(model, pairs, max_length)
    assert want[4][1] and want[5][1] and not want[6][1]
    for share in (True, False):
        stats = EngineStats()
        got = score_continuations(model, pairs, max_length=max_length, batch_size=3, device=CPU,
                                  share_context=share, stats=stats)
        _assert_scores_close(got, want)
        assert got[0] == got[1]
        assert stats.unique == len(pairs) - 1
        assert stats.shared_requests == (6 if share else 0)  # ctx_a x 3 (one duplicate) + ctx_b x 3
        assert stats.shared_contexts == (2 if share else 0)
    with pytest.raises(ValueError, match="request 0: continuation of 41 tokens exceeds max_length=40"):
        score_continuations(model, [(ctx_a, list(range(41)))], max_length=max_length, batch_size=1, device=CPU)
    with pytest.raises(ValueError, match="request 1: empty context"):
        score_continuations(model, [([1], [2]), ([], [2])], max_length=max_length, batch_size=1, device=CPU)


def test_out_of_memory_shrinks_the_budget_and_carries_on(models, hellaswag_pairs, monkeypatch):
    model, pairs = models["mamba1"], hellaswag_pairs
    forward, head = model.backbone_forward, model.lm_logits
    limits = {}

    def fake_forward(ids, state=None, return_state=False, **kwargs):
        if ids.numel() > limits["positions"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(ids, state=state, return_state=return_state, **kwargs)

    def fake_head(hidden):
        if hidden.shape[0] > limits["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory. (injected, LM head)")
        return head(hidden)

    # Unshared, the first forward holds every request: the forward is made to fail. Shared, the
    # forwards are small (one context length each): the LM head over the continuations fails.
    for share in (False, True):
        want = score_continuations(model, pairs, max_length=2048, batch_size=1, device=CPU, share_context=share)
        peak = EngineStats()
        score_continuations(model, pairs, max_length=2048, batch_size="auto", device=CPU, share_context=share,
                            stats=peak)
        if share:
            limits.update(positions=10**9, rows=peak.max_logit_rows // 2)
        else:
            limits.update(positions=peak.max_rows * peak.max_length // 2, rows=10**9)
        monkeypatch.setattr(model, "backbone_forward", fake_forward)
        monkeypatch.setattr(model, "lm_logits", fake_head)
        start = token_budget(model, "auto", 0, CPU)
        stats = EngineStats()
        got = score_continuations(model, pairs, max_length=2048, batch_size="auto", device=CPU,
                                  share_context=share, stats=stats)
        assert got == want
        assert stats.ooms >= 1 and stats.budget < start // 4, stats
        assert stats.max_rows * stats.max_length <= limits["positions"] and stats.max_logit_rows <= limits["rows"]
        monkeypatch.undo()

    # Other errors are not swallowed, and one request that does not fit is an error.
    monkeypatch.setattr(model, "backbone_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        score_continuations(model, pairs[:4], max_length=2048, batch_size="auto", device=CPU)
    monkeypatch.setattr(model, "backbone_forward", fake_forward)
    limits.update(positions=10)
    with pytest.raises(torch.OutOfMemoryError):
        score_continuations(model, pairs[:8], max_length=2048, batch_size="auto", device=CPU)


def test_collector_paused_while_scoring_and_restored(models, hellaswag_pairs, monkeypatch):
    """Scoring runs with Python's cyclic garbage collector off (engine.gc_paused) and leaves it as
    it found it, also after an error."""
    import gc

    model = models["mamba1"]
    forward, seen = model.backbone_forward, []

    def spy(ids, state=None, return_state=False, **kwargs):
        seen.append(gc.isenabled())
        return forward(ids, state=state, return_state=return_state, **kwargs)

    monkeypatch.setattr(model, "backbone_forward", spy)
    assert gc.isenabled()
    score_continuations(model, hellaswag_pairs[:8], max_length=2048, batch_size=4, device=CPU)
    assert seen and not any(seen) and gc.isenabled()
    with engine.gc_paused():
        with engine.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # nested: the outer block still holds it
    assert gc.isenabled()
    with pytest.raises(ValueError, match="empty context"):
        score_continuations(model, [([], [2])], max_length=2048, batch_size=1, device=CPU)
    assert gc.isenabled()
    gc.disable()
    try:
        with engine.gc_paused():
            pass
        assert not gc.isenabled()  # was off before: stays off
    finally:
        gc.enable()


def _meta_model(config):
    """A model of ``config`` on PyTorch's meta device with a stand-in for its layers: every tensor
    operation is shape-only, so a host read of device values (``.item()``, ``.tolist()``, a
    Python ``if`` on a tensor) raises."""
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.models.state import SSMState

    meta = torch.device("meta")
    model = LanguageModel(config, backend="ref", device=meta, dtype=torch.float32)
    c = config
    mixers = [layer.mixer for layer in c.layers]

    def backbone_forward(ids, state=None, return_state=False, lengths=None):
        assert ids.device == meta and ids.dtype == torch.long, (ids.device, ids.dtype)
        if lengths is not None:
            assert return_state and lengths.device == meta and lengths.dtype == torch.long, lengths
            assert tuple(lengths.shape) == (ids.shape[0],), (lengths.shape, ids.shape)
        if state is not None:
            model._check_state(state, ids.shape[0])
        b = ids.shape[0]
        states = [SSMState(torch.empty(b, m.conv_dim, m.d_conv - 1, device=meta),
                           torch.empty(b, *m.ssm_state_shape, device=meta))
                  for m in mixers] if return_state else None
        return torch.empty(*ids.shape, c.d_model, device=meta), states

    model.backbone_forward = backbone_forward
    return model


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_no_host_read_of_device_values_before_the_end(models, hellaswag_pairs, arch, monkeypatch):
    """The host never waits for the device between forwards: on the meta device (where any read
    of values raises) every forward runs, and the scores are read once, at the end."""
    reads = []
    fetch = executor.Scores.fetch

    def final_read(self):  # zeros in place of the values, then the engine's own code
        reads.append(self.size)
        self.values = [torch.zeros(v.shape, dtype=v.dtype) for v in self.values]
        self.greedy = [torch.zeros(g.shape, dtype=g.dtype) for g in self.greedy]
        return fetch(self)

    monkeypatch.setattr(executor.Scores, "fetch", final_read)
    model, meta = _meta_model(models[arch].config), torch.device("meta")
    pairs = hellaswag_pairs + [(hellaswag_pairs[0][0][:30], list(range(100, 140)))]  # truncated below
    for kwargs in (dict(share_context=True), dict(share_context=False), dict(context_chunk=16)):
        reads.clear()
        stats = EngineStats()
        got = score_continuations(model, pairs, max_length=60, batch_size=7, device=meta, stats=stats, **kwargs)
        assert len(got) == len(pairs) and stats.forward_calls > 5 and len(reads) == 1
        assert reads[0] == sum(len(cont) for _, cont in pairs)  # one score per continuation token
    reads.clear()
    docs = [list(range(5, 5 + n)) for n in (300, 40, 1, 0)]
    assert score_documents(model, docs, prefix_token=0, chunk_length=64, batch_size=2, device=meta) == [0.0] * 4
    assert reads == [341]


def test_token_budget(models, monkeypatch):
    model = models["mamba2"]
    per_token = executor.CostModel.of(model).token_bytes
    assert token_budget(model, 8, 100, CPU) == 800
    monkeypatch.setattr(executor, "_free_memory", lambda device: 1000 * per_token * 4)
    assert token_budget(model, "auto", 100, CPU) == 1000  # a quarter of the free memory
    assert token_budget(model, "auto", 100, CPU, max_batch_size=3) == 300
    assert token_budget(model, "auto", 5000, CPU) == 5000  # never below one longest request
    cost = executor.CostModel.of(model)
    assert cost.state_tokens >= 1 and cost.logit_row_bytes == 12 * VOCAB_ROWS


def test_progress_reports_requests_and_tokens(models, hellaswag_pairs):
    from mamba_eval.harness.lm import _ProgressBar

    seen = []
    stats = EngineStats()
    pairs = hellaswag_pairs + hellaswag_pairs[:5]  # duplicates count as requests
    score_continuations(models["mamba1"], pairs, max_length=2048, batch_size=7, device=CPU,
                        on_progress=lambda r, t: seen.append((r, t)), stats=stats)
    assert sum(r for r, _ in seen) == len(pairs)
    assert sum(t for _, t in seen) == stats.tokens > 0
    with _ProgressBar(total=10, desc="test", disable=False) as bar:
        bar(4, 1000)
        bar.update(1)
        assert bar.bar.n == 5 and "req/s" in bar.bar.postfix and "tok/s" in bar.bar.postfix


# ----------------------------------------------------------------------------- rolling


def _full_forward_logprob(model, prefix, doc):
    with torch.inference_mode():
        logits, _ = model(torch.tensor([[prefix] + doc[:-1]]))
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    return logprobs[torch.arange(len(doc)), torch.tensor(doc)].sum().item()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_stateful_rolling_equals_one_forward_with_flat_memory(models, tokenizer, data_dir, arch, monkeypatch):
    model = models[arch]
    from mamba_eval.harness.offline import rebuild_wikitext_raw, wikitext_pages

    rows = [r["text"] for r in _read_jsonl(data_dir / "wikitext" / "wikitext-2-raw-v1_test.jsonl")]
    text = tokenizer.encode(wikitext_pages(rebuild_wikitext_raw(rows))[0])
    chunk = 64
    docs = [text[:300], text[300:301], text[400:417], [], text[500:629], text[700:764]]
    got = score_documents(model, docs, prefix_token=0, chunk_length=chunk, batch_size=2, device=CPU)
    assert got[3] == 0.0
    for doc, value in zip(docs, got):
        if doc:
            want = _full_forward_logprob(model, 0, doc)
            assert math.isclose(value, want, rel_tol=1e-5), (len(doc), value, want)

    # Memory: the largest forward and LM-head product do not grow with the document.
    forward, head = model.backbone_forward, model.lm_logits
    peaks = {}

    def peak_forward(ids, state=None, return_state=False):
        peaks["positions"] = max(peaks.get("positions", 0), ids.numel())
        peaks["length"] = max(peaks.get("length", 0), ids.shape[1])
        return forward(ids, state=state, return_state=return_state)

    def peak_head(hidden):
        peaks["rows"] = max(peaks.get("rows", 0), hidden.shape[0])
        return head(hidden)

    monkeypatch.setattr(model, "backbone_forward", peak_forward)
    monkeypatch.setattr(model, "lm_logits", peak_head)
    seen = []
    for n in (3 * chunk, 12 * chunk):
        peaks.clear()
        stats = EngineStats()
        score_documents(model, [text[:n]], prefix_token=0, chunk_length=chunk, batch_size=1, device=CPU, stats=stats)
        assert stats.forward_calls == n // chunk
        seen.append(dict(peaks))
    assert seen[0] == seen[1] and seen[0]["length"] == chunk, seen


# ----------------------------------------------------------------------------- the adapter


def test_model_args_share_context_and_rolling(checkpoints, tok_dir, data_dir, tokenizer, models):
    with pytest.raises(ModelArgsError, match="share_context='maybe'"):
        _lm(checkpoints["mamba1"], tok_dir, share_context="maybe")
    with pytest.raises(ModelArgsError, match="rolling='sliding' is not one of windows, stateful"):
        _lm(checkpoints["mamba1"], tok_dir, rolling="sliding")
    with pytest.raises(ModelArgsError, match="batch_invariant='sometimes'"):
        _lm(checkpoints["mamba1"], tok_dir, batch_invariant="sometimes")

    pairs = [p for doc in _hellaswag_requests(data_dir, limit=8) for p in doc] + [("", " An empty context")]
    instances = [Instance("loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    shared = _lm(checkpoints["mamba2"], tok_dir, batch_size=4, share_context="true")
    unshared = _lm(checkpoints["mamba2"], tok_dir, batch_size="auto", share_context="false", batch_invariant="false")
    a = shared.loglikelihood(instances, disable_tqdm=True)
    b = unshared.loglikelihood(instances, disable_tqdm=True)
    _assert_scores_close(a, b)
    assert any(x != y for x, y in zip(a, b))  # different computations, equal up to rounding

    # rolling: windows of max_length (lm-eval) vs stateful (the whole document as context).
    from mamba_eval.harness.offline import rebuild_wikitext_raw, wikitext_pages

    rows = [r["text"] for r in _read_jsonl(data_dir / "wikitext" / "wikitext-2-raw-v1_test.jsonl")]
    page = wikitext_pages(rebuild_wikitext_raw(rows))[1]
    docs = [page[:1200], page[:150]]  # about 250 and 30 tokens
    rolling = [Instance("loglikelihood_rolling", doc={}, arguments=(d,), idx=0) for d in docs]
    windows = _lm(checkpoints["mamba1"], tok_dir, max_length=64, batch_size=2)
    stateful = _lm(checkpoints["mamba1"], tok_dir, max_length=64, batch_size=2, rolling="stateful")
    w = windows.loglikelihood_rolling(rolling, disable_tqdm=True)
    s = stateful.loglikelihood_rolling(rolling, disable_tqdm=True)
    model = models["mamba1"]
    from lm_eval import utils as lm_utils

    for doc, value_w, value_s in zip(docs, w, s):
        tokens = tokenizer.encode(doc)
        assert math.isclose(value_s, _full_forward_logprob(model, 0, tokens), rel_tol=1e-5)
        pieces = [lm_utils.make_disjoint_window(win) for win in lm_utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=0, max_seq_len=64, context_len=1)]
        assert math.isclose(value_w, sum(v for v, _ in _naive(model, pieces, 64)), rel_tol=1e-5)
    assert len(tokenizer.encode(docs[0])) > 3 * 64 and len(tokenizer.encode(docs[1])) < 64
    assert math.isclose(w[1], s[1], rel_tol=1e-5)  # one window: the same quantity
    assert abs(w[0] - s[0]) > 0.5  # several windows: less context than the whole document


# ----------------------------------------------------------------------------- benchmark script


def test_bench_eval_smoke(data_dir, tmp_path):
    """scripts/bench_eval.py end to end on the CPU: tiny shape, 4 HellaSwag documents, and its
    batch-size invariance check on 3 documents."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_eval.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--shapes", "tiny", "--device", "cpu", "--dtype", "float32",
         "--limit", "4", "--batch-size", "8", "--data-dir", str(data_dir), "--work-dir", str(tmp_path / "work"),
         "--json", str(out), "--invariance", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["shape"] == "tiny" and run["mode"] == "shared"
    assert run["requests"] == 16 and run["shared_requests"] == 16  # 4 documents x 4 endings
    assert 0 < run["loglikelihood_s"] < run["whole_process_s"]
    assert "whole s" in proc.stdout and "ll s" in proc.stdout
    (inv,) = result["invariance"]
    checks = [v for v in inv.values() if isinstance(v, dict)]
    assert inv["requests"] == 12 and len(checks) == 8 and all(c["bitwise_equal_to_bs1"] for c in checks)


def test_prof_eval_smoke(data_dir, tmp_path):
    """scripts/prof_eval.py on the CPU: tiny shape, 4 HellaSwag documents; every phase sampled,
    the loglikelihood phase's samples inside the project's scoring code."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "prof_eval.py"
    out = tmp_path / "prof.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--limit", "4",
         "--batch-size", "8", "--data-dir", str(data_dir), "--interval", "0.005", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = {ph["phase"]: ph for ph in result["report"]}
    assert list(phases) == ["imports_and_task_index_s", "model_load_s", "task_building_s", "loglikelihood_s",
                            "metrics_and_output_s"]
    assert sum(ph["samples"] for ph in phases.values()) > 20
    ll = phases["loglikelihood_s"]
    # Nearly every sample of the phase is inside the project's scoring code (a sample at the
    # phase's edge may fall outside it). The script labels a frame by its file's folder and name:
    # for the project's code, one of mamba_eval's sub-packages.
    import mamba_eval

    subpackages = {p.name for p in Path(mamba_eval.__file__).parent.iterdir() if (p / "__init__.py").is_file()}
    assert ll["samples"] > 0 and ll["within"].split("/")[0] in subpackages, (ll, subpackages)
    assert "== loglikelihood_s" in proc.stdout


def test_bench_host_smoke(data_dir, tmp_path):
    """scripts/bench_host.py on 3 HellaSwag documents: the table, the JSON, one final read of the
    scores, and the operation counts."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_host.py"
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--limit", "3", "--data-dir", str(data_dir), "--json", str(out),
         "--count-ops", "--no-tqdm", "--profile", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 12 and result["final_reads"] == 1
    assert result["engine"]["shared_requests"] == 12 and result["engine"]["forward_calls"] >= 2
    assert result["stages"]["tokenisation"]["calls"] == 1 and 0 < result["host_s"] <= result["loglikelihood_s"]
    assert result["device_ops"]["uploads"] == result["engine"]["forward_calls"]  # one copy per forward
    assert len(result["profile"]) == 5 and "host (total minus device work)" in proc.stdout


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_long_sequences_run_in_chunks_with_the_same_scores(models, hellaswag_pairs, arch):
    """With a context_chunk shorter than the requests, contexts and whole sequences run in chunks
    that carry the state: the scores equal the naive forward, the batch-size invariance holds, and
    no forward holds more than one chunk of positions."""
    model, pairs = models[arch], hellaswag_pairs[:40]
    naive = _naive(model, pairs, 2048)
    for share in (True, False):
        runs = {}
        for bs in (1, 7):
            stats = EngineStats()
            runs[bs] = score_continuations(model, pairs, max_length=2048, batch_size=bs, device=CPU,
                                           share_context=share, stats=stats, context_chunk=16)
            assert stats.max_length <= 16 and stats.forward_calls > len(pairs) // bs
        assert runs[7] == runs[1]
        _assert_scores_close(runs[1], naive)
    with pytest.raises(Exception, match="context_chunk"):
        score_continuations(model, pairs[:1], max_length=2048, batch_size=1, device=CPU, context_chunk=0)


def test_model_arg_context_chunk(checkpoints, tok_dir):
    lm = _lm(checkpoints["mamba1"], tok_dir, context_chunk="32")
    assert lm.context_chunk == 32
    with pytest.raises(ModelArgsError, match="context_chunk"):
        _lm(checkpoints["mamba1"], tok_dir, context_chunk="0")


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_context_passes_hold_contexts_of_different_lengths(models, hellaswag_pairs, arch, monkeypatch):
    """Shared contexts of different lengths share a right-padded pass (``backbone_forward``'s
    ``lengths``), except those longer than context_chunk (chunked, equal lengths) and those shorter
    than RAGGED_MIN_LENGTH (own passes); the scores are batch-invariant, equal the naive forward,
    and equal the scores of a run whose context passes all hold one length."""
    model = models[arch]
    rng = random.Random(1)
    pairs = list(hellaswag_pairs[:60])
    for n in (1, 2, 3, 4, 5, 6, 9):  # short contexts, several continuations each
        ctx = [rng.randrange(1, 50000) for _ in range(n)]
        pairs += [(ctx, [rng.randrange(1, 50000) for _ in range(rng.randrange(1, 5))]) for _ in range(3)]
    chunk = 48  # some hellaswag contexts are longer: those run in chunks
    forward, calls = model.backbone_forward, []

    def spy(ids, state=None, return_state=False, lengths=None):
        calls.append((ids.shape[1], None if lengths is None else lengths.tolist()))
        return forward(ids, state=state, return_state=return_state, lengths=lengths)

    monkeypatch.setattr(model, "backbone_forward", spy)
    runs = {}
    for bs in (1, 7, 64):
        calls.clear()
        runs[bs] = score_continuations(model, pairs, max_length=2048, batch_size=bs, device=CPU, context_chunk=chunk)
        ragged = [(w, ls) for w, ls in calls if ls is not None]
        assert ragged and all(rows.RAGGED_MIN_LENGTH <= l <= min(w, chunk) for w, ls in ragged for l in ls)
        if bs > 1:  # the budget lets contexts of different lengths share a pass
            assert any(len(set(ls)) > 1 for _, ls in ragged), ragged
    assert runs[1] == runs[7] == runs[64]
    _assert_scores_close(runs[7], _naive(forward.__self__, pairs, 2048))
    # The same scores, bit for bit, with every context pass holding one length (the equal-length
    # path, which the engine takes for models whose layers include attention).
    monkeypatch.setattr(rows, "RAGGED_MIN_LENGTH", 10**9)
    assert score_continuations(model, pairs, max_length=2048, batch_size=7, device=CPU, context_chunk=chunk) == runs[7]
