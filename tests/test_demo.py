"""The self-contained offline demo (mamba_eval.commands.demo and ``mamba-eval demo``).

``mamba-eval demo`` runs once per module; its accuracy is checked against lm-eval's own ``hf``
model (transformers' Mamba implementation, an independent reference) on the same checkpoint:
after the single key rename that separates the two formats (``backbone.embedding`` ->
``backbone.embeddings``) the checkpoint must load into transformers with no missing or
unexpected key, and both must score the demo task the same. The task's scoring is checked by
hand on a few documents.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from mamba_eval.commands import cli
from mamba_eval.commands.demo import DEMO_NUM_CHOICES, DEMO_NUM_DOCS, DEMO_TASK, build_demo, demo_paths


@contextlib.contextmanager
def _one_torch_thread():
    """Small forwards run faster on one thread when the machine's two cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``mamba-eval demo`` run once: what it printed on stdout and its lm-eval results."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with _one_torch_thread(), contextlib.redirect_stdout(printed):
        status = cli.main(["demo", "-o", str(out)])
    assert status == 0
    results = list((out / "results").rglob("results_*.json"))
    assert len(results) == 1
    return {"out": out, "stdout": printed.getvalue(), "results": json.loads(results[0].read_text())["results"]}


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_paths(demo_run["out"])


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo["tokenizer"])


@pytest.fixture(scope="module")
def state_dict(demo):
    import torch

    return torch.load(demo["model"] / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def hf_model(demo, state_dict):
    """transformers' MambaForCausalLM holding the demo weights, built from the demo's config.json
    with mamba_ssm's defaults for an empty ``ssm_cfg`` (d_state 16, expand 2, d_conv 4); the load
    is strict, so every key and shape must match."""
    from transformers import MambaConfig, MambaForCausalLM

    config = json.loads((demo["model"] / "config.json").read_text())
    assert config["ssm_cfg"] == {}  # the defaults below apply
    hf_config = MambaConfig(
        vocab_size=state_dict["backbone.embedding.weight"].shape[0],
        hidden_size=config["d_model"],
        num_hidden_layers=config["n_layer"],
        state_size=16,
        expand=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=config["residual_in_fp32"],
        tie_word_embeddings=config["tie_embeddings"],
    )
    model = MambaForCausalLM(hf_config).eval()
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state_dict.items()}
    model.load_state_dict(renamed, strict=True)
    return model


@pytest.fixture(scope="module")
def task(demo):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(demo["tasks"]), include_defaults=False)
    return tm.load([DEMO_TASK])["tasks"][DEMO_TASK]


@pytest.fixture(scope="module")
def hf_run(hf_model, tokenizer, task):
    """lm-eval's ``--model hf`` on the demo checkpoint: every document, samples logged."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _one_torch_thread():
        lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=64, device="cpu")
        return simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0)


def test_demo_accuracy_equals_lm_eval_hf(demo_run, hf_run):
    ours, theirs = demo_run["results"][DEMO_TASK], hf_run["results"][DEMO_TASK]
    assert theirs["sample_len"] == DEMO_NUM_DOCS
    assert (ours["acc,none"], ours["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])


def test_demo_prints_the_chance_level(demo_run, task):
    """One line under lm-eval's results explains the accuracy: chance on the task, as lm-eval's
    own reading of its documents gives it."""
    counts = [len(task.doc_to_choice(doc)) for doc in task.eval_docs]
    chance = sum(1 / n for n in counts) / len(counts)
    lines = demo_run["stdout"].strip().splitlines()
    ours = [line for line in lines if line.startswith("mamba-eval demo: ")]
    assert ours == lines[-1:] and "untrained" in ours[0]
    assert f"chance: {chance:.2f} on {DEMO_TASK} (1 right answer in {max(counts)} choices)" in ours[0]


def test_task_documents(task):
    docs = task.eval_docs
    assert len(docs) == DEMO_NUM_DOCS
    for doc in docs:
        key = doc["context"].split("The key is ", 1)[1].split(".", 1)[0]
        assert doc["choices"][doc["label"]] == key and doc["choices"].count(key) == 1
        assert len(set(doc["choices"])) == DEMO_NUM_CHOICES


def test_task_is_scored_as_intended(hf_run, hf_model, tokenizer, task):
    """What lm-eval scores for the first documents, by hand: log p(" " + choice | context)
    summed over the choice's tokens, the answer the choice with the highest; all sequences in
    one right-padded batch (padding after a sequence cannot change a causal model's logits
    inside it)."""
    import torch

    samples = hf_run["samples"][DEMO_TASK][:8]
    docs = [task.eval_docs[s["doc_id"]] for s in samples]
    seqs, spans = [], []
    for doc in docs:
        context = tokenizer(doc["context"])["input_ids"]
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice)["input_ids"]
            assert whole[: len(context)] == context
            seqs.append(whole)
            spans.append(range(len(context), len(whole)))
    width = max(map(len, seqs))
    batch = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for seq in seqs])
    with torch.no_grad(), _one_torch_thread():
        logprobs = torch.log_softmax(hf_model(batch).logits.double(), dim=-1)
    scores = [sum(logprobs[j, i - 1, seq[i]].item() for i in span) for j, (seq, span) in enumerate(zip(seqs, spans))]
    for n, (doc, sample) in enumerate(zip(docs, samples)):
        mine = scores[DEMO_NUM_CHOICES * n: DEMO_NUM_CHOICES * (n + 1)]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(mine, abs=1e-4)
        best = max(range(DEMO_NUM_CHOICES), key=mine.__getitem__)
        assert sample["acc"] == float(best == doc["label"])


def test_paths(demo):
    for key in ("model", "tokenizer", "tasks"):
        assert demo[key].is_dir() and demo[key].is_absolute()
    for name in ("config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"):
        assert (demo["model"] / name).is_file()
    assert demo["task_yaml"].is_file() and demo["task_data"].is_file()


def test_tokenizer_loads_and_round_trips(tokenizer, demo):
    assert type(tokenizer).__name__ == "GPTNeoXTokenizer"
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    text = 'The key is amber otter 42.\n  "Tabs\tand ümlauts, 日本語 & emoji 🙂" '
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # no BOS/EOS added
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    with open(demo["model"] / "tokenizer_config.json") as fh:
        assert json.load(fh)["eos_token"] == "<|endoftext|>"


def test_checkpoint_pads_and_ties_the_embedding(demo, tokenizer, state_dict, hf_model):
    """Shapes are checked by the strict load into transformers (``hf_model``); what that load
    cannot see: the vocabulary padding, the tied LM head and the dtype."""
    config = json.loads((demo["model"] / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    multiple = config["pad_vocab_size_multiple"]
    rows = state_dict["backbone.embedding.weight"].shape[0]
    assert rows == math.ceil(len(tokenizer) / multiple) * multiple and rows != len(tokenizer)
    assert (state_dict["lm_head.weight"] == state_dict["backbone.embedding.weight"]).all()
    assert all(str(v.dtype) == "torch.float32" for v in state_dict.values())


def test_build_is_deterministic(demo, state_dict, tmp_path):
    import torch

    again = build_demo(tmp_path)
    for key in ("task_data", "task_yaml"):
        # the YAML names its data file by absolute path, which differs between the two folders
        a, b = demo[key].read_text(), again[key].read_text()
        assert a.replace(str(demo["tasks"]), "") == b.replace(str(again["tasks"]), "")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (demo["model"] / name).read_bytes() == (again["model"] / name).read_bytes()
    other = torch.load(again["model"] / "pytorch_model.bin", weights_only=True)
    assert other.keys() == state_dict.keys()
    assert all(torch.equal(other[k], state_dict[k]) for k in state_dict)
