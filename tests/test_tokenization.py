"""Tokenisation for the adapter (mamba_eval/harness/tokenization.py) on real task data with the
real GPT-NeoX-20B tokenizer: ``BatchTokenizer`` gives the tokenizer's own ids, and lm-eval's own
``TemplateLM.loglikelihood`` split into (context, continuation) tokens, for many strings at once."""

from __future__ import annotations

import json

import pytest
import transformers
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from mamba_eval.errors import MambaEvalError, ModelArgsError
from mamba_eval.harness import tokenization
from mamba_eval.harness.tokenization import BatchTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _jsonl(path, limit=None):
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(limit or 10**9), f)]
    return rows


@pytest.fixture(scope="module")
def pairs(data_dir):
    """(context, continuation) strings as lm-eval's stock tasks build them, and edge cases."""
    out = []
    for doc in _jsonl(data_dir / "hellaswag" / "hellaswag_val.jsonl", 500):
        query = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out += [(query, " " + ending) for ending in doc["endings"]]
    for doc in _jsonl(data_dir / "lambada_openai" / "lambada_test.jsonl", 500):
        words = doc["text"].split(" ")
        out.append((" ".join(words[:-1]), " " + words[-1]))
    for doc in _jsonl(data_dir / "piqa" / "valid.jsonl", 300):
        out += [(f"Question: {doc['goal']}\nAnswer:", " " + doc[s]) for s in ("sol1", "sol2")]
    for doc in _jsonl(data_dir / "winogrande" / "winogrande_xl_validation.jsonl", 300):
        idx = doc["sentence"].index("_")
        out += [(doc["sentence"][:idx] + opt, " " + doc["sentence"][idx + 1:].strip())
                for opt in (doc["option1"], doc["option2"])]
    out += [
        ("Question: why?\nAnswer: ", "Because."),  # trailing space moves to the continuation
        ("Two lines\n\n", "Next"),
        ("   ", " only spaces"),
        ("", "An empty context"),  # the prefix token
        ("", "<|endoftext|>starts with the prefix token"),
        ("cafe", "\u0301 au lait"),  # NFC joins the two across the boundary
        ("no space", "joined"),
        ("émoji 🙂", " 🙃 end"),
    ]
    return out


class _LmEvalReference(TemplateLM):
    """lm-eval's own per-request tokenisation (``TemplateLM.loglikelihood``, two encode calls
    per request) over the Hugging Face tokenizer; it returns the token pairs it made."""

    def __init__(self, tokenizer, add_special_tokens=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens  # as lm-eval's HFLM applies add_bos_token

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        if add_special_tokens is None:
            add_special_tokens = self.add_special_tokens
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(ctx, cont) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def _reference_pairs(hf_tokenizer, pairs, add_special_tokens=None):
    ref = _LmEvalReference(hf_tokenizer, add_special_tokens)
    instances = [Instance("loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    return ref.loglikelihood(instances, disable_tqdm=True), ref.prefix_token_id


def test_encode_many_equals_the_tokenizer(hf_tokenizer, pairs, data_dir, monkeypatch):
    tok = BatchTokenizer(hf_tokenizer)
    some = pairs[::3] + pairs[-8:]  # every task and the edge cases (all pairs: the test below)
    texts = [c for c, _ in some] + [c + d for c, d in some] + [d for _, d in some]
    texts += [r["text"] for r in _jsonl(data_dir / "wikitext" / "wikitext-2-raw-v1_test.jsonl", 300)] + ["", " "]
    want = [hf_tokenizer.encode(t) for t in texts]
    assert tok.encode_many(texts) == want
    assert [tok.encode(t) for t in texts[:50]] == want[:50]
    assert tok.encode_many(texts, add_special_tokens=False) == [
        hf_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert tok.decode(want[0]) == hf_tokenizer.decode(want[0], skip_special_tokens=True)
    assert tok.encode_many([]) == []
    # Encoded in threads over slices of 3 strings (slices of 2,048 by default): the same ids, in order.
    monkeypatch.setattr(tokenization, "_ENCODE_CHUNK", 3)
    monkeypatch.setattr(tokenization.os, "cpu_count", lambda: 4)
    assert BatchTokenizer(hf_tokenizer).encode_many(texts[:40]) == want[:40]


def test_encode_pairs_equal_lm_eval_on_real_requests(hf_tokenizer, pairs):
    tok = BatchTokenizer(hf_tokenizer)
    assert tok.splits_before_space()  # continuations that start with a space are tokenised apart
    reference, prefix = _reference_pairs(hf_tokenizer, pairs)
    ours = tok.encode_pairs(pairs, prefix)
    assert len(ours) == len(reference) == len(pairs) > 3000
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a == b, (i, pairs[i], a, b)
    with pytest.raises(MambaEvalError, match="request 1: empty context and empty continuation"):
        tok.encode_pairs([("a", " b"), ("", "")], prefix)


def test_a_tokenizer_that_does_not_split_before_a_space(tok_dir, tmp_path):
    """An added token that absorbs the space after it: continuations are not tokenised apart
    (that would be wrong here), and the pairs still equal lm-eval's."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    assert spec["added_tokens"][0]["content"] == "<|endoftext|>"
    spec["added_tokens"][0]["rstrip"] = True
    other = tmp_path / "tok_rstrip"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (other / name).write_text((tok_dir / name).read_text())
    hf = load_tokenizer(str(other), checkpoint_dir=tmp_path)
    tok = BatchTokenizer(hf)
    context, continuation = "The end.<|endoftext|>", " And then"
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    assert whole[len(ctx):] != tok.encode(continuation, add_special_tokens=False)
    assert not tok.splits_before_space()
    pairs = [(context, continuation), ("Hello", " world"), ("x", "\ny"), ("", "bare")]
    reference, prefix = _reference_pairs(hf, pairs)
    assert tok.encode_pairs(pairs, prefix) == reference


def test_load_tokenizer(tok_dir, tmp_path):
    """A checkpoint folder's own tokenizer files are used; without them, the default name;
    a tokenizer that cannot be loaded is one ModelArgsError line."""
    folder = tmp_path / "ckpt_with_tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text((tok_dir / name).read_text())
    assert load_tokenizer(None, folder).name_or_path == str(folder)
    with pytest.raises(ModelArgsError, match=r"^cannot load tokenizer '.*no-such-tokenizer': "):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"), folder)
    assert tokenization.DEFAULT_TOKENIZER == "EleutherAI/gpt-neox-20b"


@pytest.mark.parametrize("add_bos", [None, False])
def test_a_tokenizer_that_adds_a_bos_token(tok_dir, tmp_path, pairs, add_bos):
    """A post-processor that puts a BOS token before the text (``TemplateProcessing``): with the
    tokenizer's default (``add_bos_token`` not given) every encoding starts with it, with
    ``add_bos_token=False`` none does; the pairs equal lm-eval's either way, and a continuation
    is still tokenised apart (its BOS-free tokens follow the context's)."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    folder = tmp_path / "tok_bos"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text((tok_dir / "special_tokens_map.json").read_text())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    # The generic class keeps tokenizer.json's post-processor (GPT-NeoX's class builds its own).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = load_tokenizer(str(folder), checkpoint_dir=tmp_path)
    tok = BatchTokenizer(hf, add_special_tokens=add_bos)
    starts = {ids[0] == 0 for ids in tok.encode_many(["Hello world", "x", " y"])}
    assert starts == {add_bos is None}
    assert tok.encode_many(["Hello world"], add_special_tokens=True)[0][0] == 0
    assert tok.splits_before_space()
    reference, prefix = _reference_pairs(hf, pairs[:2000], add_special_tokens=add_bos)
    assert tok.encode_pairs(pairs[:2000], prefix) == reference
