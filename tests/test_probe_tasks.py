"""Long-context probe tasks (mamba_eval.harness.probe_*, tasks/probes/): data and lm-eval integration.

Data: deterministic by seed and version, sized in tokens of the real GPT-NeoX-20B tokenizer,
the passkey at the requested depth, MQAR's structure, and per-position buckets that re-tokenise
to the window's own tokens. Integration: the shipped configs load through lm-eval's TaskManager
and run end to end with tiny random checkpoints; the per-bucket log-likelihoods of the
perplexity task equal a direct forward over the whole window.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from helpers_data import require_data_dir

from mamba_eval.harness import probe_common, probe_data, probe_mqar, probe_passkey, probe_ppl
from mamba_eval.errors import MambaEvalError

REPO = Path(__file__).resolve().parent.parent


# Many small forwards: one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def neox():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_data_dir() / "tokenizers" / "gpt-neox-20b"))


@pytest.fixture(scope="module")
def neox_dir():
    return str(require_data_dir() / "tokenizers" / "gpt-neox-20b")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from mamba_eval.commands.probe_model import build_tokenizer

    folder = tmp_path_factory.mktemp("probe_tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder)), folder


@pytest.fixture(scope="module")
def essay() -> Path:
    """A real long text from the data folder (a Paul Graham essay, about 3-9K GPT-NeoX tokens)."""
    folder = require_data_dir() / "long_context" / "paul_graham_essays"
    files = sorted(folder.glob("*.txt"), key=lambda p: -p.stat().st_size)
    assert files, f"no essays in {folder}"
    return files[0]


# --------------------------------------------------------------------------- lengths


def test_parse_length_and_names():
    assert probe_common.parse_length("4096") == 4096
    assert probe_common.parse_length("4k") == 4096 and probe_common.parse_length("16K") == 16384
    assert probe_common.parse_length("1m") == 1 << 20
    assert probe_common.parse_lengths("1k, 4k,16k") == [1024, 4096, 16384]
    assert [probe_common.length_name(n) for n in (256, 1024, 65536, 1 << 20, 1000, 3 << 19)] == [
        "256", "1k", "64k", "1m", "1000", "1536k"]
    for bad in ("4q", "", "-1", "0", "1.5k", "k"):
        with pytest.raises(MambaEvalError, match="length"):
            probe_common.parse_length(bad) if bad else probe_common.parse_lengths(bad)
    with pytest.raises(MambaEvalError, match="repeated"):
        probe_common.parse_lengths("1k,1024")


def test_position_buckets_cover_the_window():
    for length in (100, 256, 1000, 1024, 5000, 1 << 20):
        buckets = probe_ppl.position_buckets(length)
        assert buckets[0][0] == 0 and buckets[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))
    assert [probe_ppl.bucket_name(*b) for b in probe_ppl.position_buckets(4096)] == [
        "0-256", "256-512", "512-1k", "1k-2k", "2k-4k"]


# --------------------------------------------------------------------------- shipped configs


def test_shipped_configs_are_the_generators_output():
    """tasks/probes/ holds exactly what shipped_task_configs() writes (one source of truth)."""
    shipped = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "tasks" / "probes").glob("*.yaml")}
    expected = probe_data.shipped_task_configs()
    assert sorted(shipped) == sorted(expected)
    for name, text in expected.items():
        assert shipped[name] == text, f"tasks/probes/{name} is stale: rerun python -m mamba_eval.harness.probe_data --write tasks/probes"
    assert probe_data.include_path().resolve() == (REPO / "tasks" / "probes").resolve()


def test_task_names_and_versions():
    cfg = probe_data.task_config("mqar", 4096, pairs=8)
    assert cfg["task"] == "mamba_mqar_4k_p8"
    assert cfg["metadata"]["version"] == probe_common.PROBE_DATA_VERSION
    assert probe_data.task_config("passkey", 1 << 20)["task"] == "mamba_passkey_1m"
    assert probe_data.task_config("passkey_gen", 1024)["task"] == "mamba_passkey_gen_1k"
    assert probe_data.task_config("ppl", 16384)["task"] == "mamba_ppl_position_16k"
    with pytest.raises(MambaEvalError, match="unknown probe family"):
        probe_data.task_name("needle", 1024)


# --------------------------------------------------------------------------- passkey


def test_passkey_deterministic_by_seed_and_version(neox):
    a = probe_passkey.passkey_docs(neox, 1024, depths=[0.0, 0.5], samples_per_depth=3)
    b = probe_passkey.passkey_docs(neox, 1024, depths=[0.0, 0.5], samples_per_depth=3)
    c = probe_passkey.passkey_docs(neox, 1024, depths=[0.0, 0.5], samples_per_depth=3, seed=7)
    assert probe_common.docs_digest(a) == probe_common.docs_digest(b)
    assert [d["answer"] for d in a] != [d["answer"] for d in c]
    assert all(d["version"] == probe_common.PROBE_DATA_VERSION for d in a)
    # Documents are drawn per (seed, length, depth, index): a depth's documents do not depend on
    # which other depths are asked for.
    only_half = probe_passkey.passkey_docs(neox, 1024, depths=[0.5], samples_per_depth=3)
    assert probe_common.docs_digest(only_half) == probe_common.docs_digest(a[3:])


@pytest.mark.parametrize("length", [1024, 4096, 16384])
def test_passkey_length_in_real_tokens(neox, length):
    docs = probe_passkey.passkey_docs(neox, length, depths=[0.0, 0.5, 1.0], samples_per_depth=2)
    unit = max(len(neox.encode(s)) for s in probe_passkey.PASSKEY_FILLER)
    for d in docs:
        n = len(neox.encode(d["context"]))  # counted here independently of the generator's bookkeeping
        assert n == d["context_tokens"]
        assert length - unit < n <= length, (length, n)
        assert d["context"].endswith(probe_passkey.PASSKEY_QUESTION)
        assert d["choices"][d["label"]] == d["answer"] and len(set(d["choices"])) == probe_passkey.PASSKEY_CANDIDATES
        assert all(re.fullmatch(r"[1-9]\d{4}", c) for c in d["choices"])
        assert d["context"].count(d["answer"]) == 2  # stated twice by the needle, nowhere else


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_key_is_at_the_requested_depth(neox, depth):
    length = 4096
    (doc,) = probe_passkey.passkey_docs(neox, length, depths=[depth], samples_per_depth=1)
    context = doc["context"]
    needle_at = context.index(" The pass key is")
    intro = len(neox.encode(probe_passkey.PASSKEY_INTRO))
    before = len(neox.encode(context[:needle_at])) - intro  # filler tokens before the key
    needle = len(neox.encode(probe_passkey.PASSKEY_NEEDLE.format(key=doc["answer"])))
    filler = doc["context_tokens"] - intro - needle - len(neox.encode(probe_passkey.PASSKEY_QUESTION))
    unit = max(len(neox.encode(s)) for s in probe_passkey.PASSKEY_FILLER)
    assert abs(before / filler - depth) <= unit / filler, (before, filler, depth)
    if depth == 0.0:
        assert context[:needle_at] == probe_passkey.PASSKEY_INTRO
    if depth == 1.0:
        assert context.endswith(probe_passkey.PASSKEY_NEEDLE.format(key=doc["answer"]) + probe_passkey.PASSKEY_QUESTION)


def test_passkey_scoring_functions():
    doc = {"label": 2, "answer": "12345", "depth": 0.5}
    assert probe_passkey.passkey_mc_results(doc, [(-3.0, False), (-2.0, False), (-1.0, True)]) == {"acc": 1.0, "acc_depth_50": 1.0}
    assert probe_passkey.passkey_mc_results(doc, [(-0.5, True), (-2.0, False), (-1.0, False)])["acc"] == 0.0
    assert probe_passkey.passkey_gen_results(doc, [" 12345"]) == {"exact_match": 1.0, "exact_match_depth_50": 1.0}
    assert probe_passkey.passkey_gen_results(doc, ["123456"])["exact_match"] == 0.0
    assert probe_passkey.passkey_gen_results(doc, ["The key"])["exact_match"] == 0.0
    assert probe_passkey.depth_label(0.125) == "12.5" and probe_passkey.depth_label(1.0) == "100"


# --------------------------------------------------------------------------- MQAR


def test_mqar_words_structure():
    rng = random.Random(3)
    for pairs in (1, 4, 16):
        words, answers = probe_mqar.mqar_words(rng, pairs, 255)
        assert len(words) == 256  # 255 context words + the final value, one token each by default
        keys = [w for w in words[: 2 * pairs : 2]]
        value_of = dict(zip(keys, words[1 : 2 * pairs : 2]))
        assert set(keys) <= set(probe_mqar.KEY_WORDS) and len(set(keys)) == pairs
        assert len(answers) == pairs and answers[-1] == len(words) - 1
        for a in answers:  # every scored position: a key's value, right after that key
            assert words[a - 1] in value_of and words[a] == value_of[words[a - 1]]
        queried = [words[a - 1] for a in answers]
        assert sorted(queried) == sorted(keys)  # each key queried once, the last one at the end
        assert words[:-2].count(words[-2]) == 1  # the final key appears only in its pair before
        middle = [w for i, w in enumerate(words[2 * pairs :], 2 * pairs) if i not in answers and i + 1 not in answers]
        assert set(middle) <= set(probe_mqar.NOISE_WORDS)
    assert not set(probe_mqar.KEY_WORDS) & set(probe_mqar.VALUE_WORDS) and not set(probe_mqar.NOISE_WORDS) & (set(probe_mqar.KEY_WORDS) | set(probe_mqar.VALUE_WORDS))
    with pytest.raises(MambaEvalError, match="too short"):
        probe_mqar.mqar_words(rng, 16, 40)


@pytest.mark.parametrize("length", [256, 4096])
def test_mqar_length_in_real_tokens(neox, word_tokenizer, length):
    word_tok, _ = word_tokenizer
    for tok in (neox, word_tok):
        docs = probe_mqar.mqar_docs(tok, length, pairs=8, num_samples=4)
        again = probe_mqar.mqar_docs(tok, length, pairs=8, num_samples=4)
        assert probe_common.docs_digest(docs) == probe_common.docs_digest(again)
        for d in docs:
            assert len(tok.encode(d["context"])) == d["context_tokens"] == length  # noise words cost 1 token
            key = d["context"].split()[-1]
            words = d["context"].split()
            assert words[words.index(key) + 1] == d["target"].strip()
    # The drawn content does not depend on the tokenizer, only the amount of noise does.
    a = probe_mqar.mqar_docs(neox, length, pairs=8, num_samples=2)
    b = probe_mqar.mqar_docs(word_tok, length, pairs=8, num_samples=2)
    assert [d["target"] for d in a] == [d["target"] for d in b]


def test_word_tokenizer_one_token_per_word(word_tokenizer):
    tok, _ = word_tokenizer
    words = [*probe_mqar.KEY_WORDS, *probe_mqar.VALUE_WORDS, *probe_mqar.NOISE_WORDS]
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words) and len(set(ids)) == len(words)
    assert tok.decode(ids) == " ".join(words)
    assert tok.encode("apple 42") + tok.encode(" 17", add_special_tokens=False) == tok.encode("apple 42 17")
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1


# --------------------------------------------------------------------------- perplexity by position


def test_read_text_wikitext_and_errors(tmp_path, monkeypatch):
    raw, source = probe_ppl.read_text(None, require_data_dir())
    assert raw.startswith(" \n = Robert Boulter = \n") and "WikiText-2" in source
    with pytest.raises(MambaEvalError, match="not found"):
        probe_ppl.read_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MambaEvalError, match="empty"):
        probe_ppl.read_text(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(MambaEvalError, match="cannot read"):
        probe_ppl.read_text(binary)
    with pytest.raises(MambaEvalError, match="WikiText-2 test rows not found"):
        probe_ppl.read_text(None, tmp_path)
    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    with pytest.raises(MambaEvalError, match="needs a text"):
        probe_ppl.read_text(None, None)


def test_ppl_docs_reproduce_the_window_tokens(neox, essay):
    text = essay.read_text(encoding="utf-8")
    docs = probe_ppl.ppl_docs(neox, text, 1024, num_windows=2)
    windows = sorted({d["window"] for d in docs})
    assert windows == [0, 1]
    for w in windows:
        parts = [d for d in docs if d["window"] == w]
        assert [d["bucket"] for d in parts] == ["0-256", "256-512", "512-1k"]
        assert 1 <= parts[0]["bucket_start"] <= 4  # the window's first token(s) are context only
        window_text = parts[-1]["context"] + parts[-1]["continuation"]
        ids = neox.encode(window_text)
        assert abs(len(ids) - 1024) <= 2
        for a, b in zip(parts, parts[1:]):
            assert a["bucket_end"] == b["bucket_start"] and a["context"] + a["continuation"] == b["context"]
        for d in parts:  # lm-eval's context/continuation split gives back the window's tokens
            ctx, cont = probe_ppl.pair_tokens(neox, d["context"], d["continuation"])
            assert ctx == ids[: d["bucket_start"]] and cont == ids[d["bucket_start"] : d["bucket_end"]]
            assert d["n_tokens"] == len(cont)
    assert probe_ppl.token_loss([(-10.0, 5), (-2.0, 1)]) == pytest.approx(2.0)
    with pytest.raises(MambaEvalError, match="fewer than one window"):
        probe_ppl.ppl_docs(neox, "A short text.", 1024)


def test_max_length_guard(neox_dir):
    meta = {"tokenizer": neox_dir, "context_length": 4096, "samples_per_depth": 1, "depths": [0.5]}
    with pytest.raises(MambaEvalError, match="max_length=2048"):
        probe_passkey.passkey_dataset(**meta, max_length=2048)
    with pytest.raises(MambaEvalError, match="no max_length"):
        probe_passkey.passkey_dataset(**meta)
    ds = probe_passkey.passkey_dataset(**meta, max_length=4096 + 16)
    assert len(ds["test"]) == 1


# --------------------------------------------------------------------------- through lm-eval


def _manager(**meta):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(probe_data.include_path()), metadata=meta)


def _default_manager(**meta):
    """lm-eval's TaskManager as ``lm_eval`` makes it: no include path; the start-up hook adds the
    shipped probe tasks beside the built-in ones."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(metadata=meta)
    assert manager.include_path is None
    return manager


def test_tasks_load_through_the_task_manager(neox_dir):
    manager = _manager(tokenizer=neox_dir, max_length=4096)
    assert {"mamba_passkey", "mamba_passkey_gen", "mamba_mqar", "mamba_ppl_position"} <= set(manager.all_groups)
    assert {"mamba_passkey_1m", "mamba_mqar_64k_p16", "mamba_passkey_gen_4k"} <= set(manager.all_subtasks)
    loaded = manager.load(["mamba_passkey_1k", "mamba_passkey_gen_1k", "mamba_mqar_1k_p8"])["tasks"]
    mc, gen, mqar = (loaded[n] for n in ("mamba_passkey_1k", "mamba_passkey_gen_1k", "mamba_mqar_1k_p8"))
    assert mc.VERSION == gen.VERSION == mqar.VERSION == probe_common.PROBE_DATA_VERSION
    assert len(mc.test_docs()) == 50 and len(mqar.test_docs()) == 100
    for task in (mc, gen, mqar):
        task.build_all_requests(limit=2, rank=0, world_size=1)
    doc = mc.test_docs()[0]
    args = [inst.args for inst in mc.instances if inst.doc_id == 0]
    assert [a[1] for a in args] == [" " + c for c in doc["choices"]] and all(a[0] == doc["context"] for a in args)
    assert gen.instances[0].args[1]["until"] == ["\n", "."] and gen.instances[0].args[0] == gen.test_docs()[0]["context"]
    ctx, cont = mqar.instances[0].args
    assert re.fullmatch(r" \d\d", cont) and ctx == mqar.test_docs()[0]["context"]


def _assert_close_metric(value, lo=0.0, hi=1.0):
    assert isinstance(value, float) and lo <= value <= hi, value


def test_end_to_end_mqar_with_tiny_checkpoint(checkpoint, word_tokenizer):
    """mamba_mqar on the conftest's tiny random Mamba-1 (256 embedding rows) with the word tokenizer."""
    import lm_eval

    _, tok_dir = word_tokenizer
    ckpt = checkpoint("mamba1-small").ssm_dir
    # A TaskManager given to simple_evaluate needs the model_args as metadata itself (lm-eval
    # merges them only into the TaskManager it makes; the lm_eval CLI does so too).
    model_args = {"pretrained": str(ckpt), "tokenizer": str(tok_dir), "device": "cpu", "max_length": 1024}
    out = lm_eval.simple_evaluate(
        model="mamba", model_args=model_args, tasks=["mamba_mqar_256_p4"], limit=6,
        task_manager=_default_manager(**model_args), bootstrap_iters=0,
    )
    res = out["results"]["mamba_mqar_256_p4"]
    _assert_close_metric(res["acc,none"])
    assert res["perplexity,none"] > 1.0
    assert out["versions"]["mamba_mqar_256_p4"] == probe_common.PROBE_DATA_VERSION


@pytest.fixture(scope="module")
def neox_checkpoint(tmp_path_factory):
    """A tiny random Mamba-1 with GPT-NeoX's vocabulary (the demo's model shape)."""
    from mamba_eval.commands.demo import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("neox_ckpt"), 50277)


def test_end_to_end_passkey_both_variants(neox_checkpoint, neox_dir):
    import lm_eval

    model_args = {"pretrained": str(neox_checkpoint), "tokenizer": neox_dir, "device": "cpu", "max_length": 1100,
                  "batch_size": 4}
    out = lm_eval.simple_evaluate(
        model="mamba", model_args=model_args, tasks=["mamba_passkey_1k", "mamba_passkey_gen_1k"],
        samples={"mamba_passkey_1k": [0, 10, 49], "mamba_passkey_gen_1k": [0, 49]},
        task_manager=_manager(**model_args), bootstrap_iters=0,
    )
    mc, gen = out["results"]["mamba_passkey_1k"], out["results"]["mamba_passkey_gen_1k"]
    _assert_close_metric(mc["acc,none"])
    assert "acc_depth_0,none" in mc and "acc_depth_100,none" in mc and "acc_depth_50,none" not in mc
    _assert_close_metric(gen["exact_match,none"])
    assert "exact_match_depth_0,none" in gen


def test_end_to_end_ppl_buckets_equal_a_direct_forward(neox_checkpoint, neox_dir, essay, tmp_path):
    """Each bucket's log-likelihood through lm-eval equals the sum of the token log-probs of one
    forward over the whole window (so every bucket is conditioned on the whole window before it)."""
    import lm_eval

    from mamba_eval.models.checkpoint import load_model

    cfg = probe_data.task_config("ppl", 1024, samples=1, text_file=str(essay))
    folder = probe_data.write_task_configs(tmp_path / "tasks", {f"{cfg['task']}.yaml": probe_data.render_yaml(cfg)})
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(neox_checkpoint), "tokenizer": neox_dir, "device": "cpu", "max_length": 1100}
    out = lm_eval.simple_evaluate(
        model="mamba", model_args=model_args, tasks=[cfg["task"]], bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(folder), metadata=model_args),
    )
    samples = out["samples"][cfg["task"]]
    docs = [s["doc"] for s in samples]
    lls = {s["doc"]["bucket"]: float(s["filtered_resps"][0][0]) for s in samples}
    last = max(docs, key=lambda d: d["bucket_end"])
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(neox_dir).encode(last["context"] + last["continuation"])
    model = load_model(neox_checkpoint)
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids[:-1]]))
    # logprobs[p] = log P(ids[p] | ids[:p]) for p >= 1
    logprobs = torch.log_softmax(logits[0].double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    logprobs = torch.cat([torch.zeros(1, dtype=torch.double), logprobs])
    scored = 0
    for d in docs:
        direct = float(logprobs[d["bucket_start"] : d["bucket_end"]].sum())
        assert lls[d["bucket"]] == pytest.approx(direct, rel=1e-4, abs=1e-3), d["bucket"]
        scored += d["n_tokens"]
    first = docs[0]["bucket_start"]
    assert scored == len(ids) - first
    res = out["results"][cfg["task"]]
    total = -float(logprobs[first:].sum()) / scored
    assert res["loss,none"] == pytest.approx(total, rel=1e-4)
    for d in docs:
        assert res[f"loss_{d['bucket']},none"] == pytest.approx(-lls[d["bucket"]] / d["n_tokens"], rel=1e-6)
